"""torchmetrics Metrics, so every statistic reduces correctly across ranks."""

from cyb_lightning.metrics.stopping import StoppingStats, step_statistics

__all__ = ["StoppingStats", "step_statistics"]
