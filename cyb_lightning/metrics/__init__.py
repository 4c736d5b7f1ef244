"""torchmetrics Metrics, so every statistic reduces correctly across ranks."""

from cyb_lightning.metrics.evaluation import (
    CalibrationSpearman,
    DifficultyStats,
    ReadoutAccuracy,
    TokenPauseStats,
    token_table,
)
from cyb_lightning.metrics.stopping import (
    StoppingStats,
    TokenStats,
    head_statistics,
    step_statistics,
    stopping_readout,
)

__all__ = [
    "CalibrationSpearman",
    "DifficultyStats",
    "ReadoutAccuracy",
    "StoppingStats",
    "TokenPauseStats",
    "TokenStats",
    "head_statistics",
    "step_statistics",
    "stopping_readout",
    "token_table",
]
