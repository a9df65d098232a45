"""Plain ``nn.Module`` model families. Importing this package registers every named variant."""
from titok_lightning.models import maskgit  # noqa: F401
from titok_lightning.models import rar  # noqa: F401
from titok_lightning.models import maskgit_vqgan  # noqa: F401
from titok_lightning.models import titok  # noqa: F401
from titok_lightning.models import maskgen  # noqa: F401
