"""Lightning callbacks: EMA of the trainable model, reconstruction metrics, image grids."""

from callbacks.ema import EMACallback
from callbacks.image_logger import ImageLoggerCallback
from callbacks.metrics import ReconstructionMetricsCallback

__all__ = ["EMACallback", "ImageLoggerCallback", "ReconstructionMetricsCallback"]
