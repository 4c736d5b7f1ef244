"""torchmetrics Metrics, so every statistic reduces correctly across ranks."""

from cyb_lightning.metrics.evaluation import CalibrationSpearman, ReadoutAccuracy, TokenPauseStats, token_table
from cyb_lightning.metrics.stopping import StoppingStats, TokenStats, greedy_readout, step_statistics

__all__ = [
    "CalibrationSpearman",
    "ReadoutAccuracy",
    "StoppingStats",
    "TokenPauseStats",
    "TokenStats",
    "greedy_readout",
    "step_statistics",
    "token_table",
]
