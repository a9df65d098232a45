"""Plain ``nn.Module`` model families. Importing this package registers every named variant."""

from titok_lightning.models import maskgen, maskgit, maskgit_vqgan, rar, titok  # noqa: F401
