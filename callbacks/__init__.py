"""Lightning callbacks: EMA of the trainable model, reconstruction metrics, image grids, skipped-data counts."""

from callbacks.ema import EMACallback
from callbacks.image_logger import ImageLoggerCallback
from callbacks.metrics import ReconstructionMetricsCallback
from callbacks.skipped_samples import SkippedSamplesCallback

__all__ = ["EMACallback", "ImageLoggerCallback", "ReconstructionMetricsCallback", "SkippedSamplesCallback"]
