"""titok-lightning: Lightning + Hydra framework for 1D image tokenizers and their generators."""

from titok_lightning.registry import create_model, get_spec, list_models

__all__ = ["create_model", "get_spec", "list_models"]
__version__ = "0.1.0"
