"""Callbacks: logging and reporting that stays out of the LightningModule."""

from cyb_lightning.callbacks.final_checkpoint import FinalCheckpoint
from cyb_lightning.callbacks.requeue import SLURMRequeueAtStepEnd
from cyb_lightning.callbacks.skipped_data import SkippedDataReport
from cyb_lightning.callbacks.stopping_time import StoppingTimeHistograms
from cyb_lightning.callbacks.throughput import TokenThroughput
from cyb_lightning.callbacks.token_report import TokenPauseReport

__all__ = [
    "FinalCheckpoint",
    "SLURMRequeueAtStepEnd",
    "SkippedDataReport",
    "StoppingTimeHistograms",
    "TokenPauseReport",
    "TokenThroughput",
]
