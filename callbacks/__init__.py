"""Lightning callbacks: EMA of the trainable model, reconstruction metrics, image grids."""

from callbacks.ema import EMACallback, load_model_state_dict
from callbacks.image_logger import ImageLoggerCallback
from callbacks.metrics import ReconstructionMetricsCallback

__all__ = ["EMACallback", "ImageLoggerCallback", "ReconstructionMetricsCallback", "load_model_state_dict"]
