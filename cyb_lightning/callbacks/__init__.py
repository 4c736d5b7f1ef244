"""Callbacks: logging and reporting that stays out of the LightningModule."""

from cyb_lightning.callbacks.stopping_time import StoppingTimeHistograms

__all__ = ["StoppingTimeHistograms"]
