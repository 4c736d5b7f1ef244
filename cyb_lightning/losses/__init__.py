"""Losses: the math in ``functional``, the config-selectable modules in ``modules``."""

from cyb_lightning.losses.modules import CYBAP, CYBDP, CYBVA, CrossEntropy, PauseLoss, TBYSPerToken

__all__ = ["CYBAP", "CYBDP", "CYBVA", "CrossEntropy", "PauseLoss", "TBYSPerToken"]
