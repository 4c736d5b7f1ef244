"""Evaluate and inspect a trained model: metrics, token analysis, coloured text and a report folder.

``python -m cyb_lightning report --ckpt_path RUN/checkpoints/last.ckpt`` writes everything; see
``docs/evaluation.md``. Submodules import matplotlib/tensorboard only when they draw or log.
"""

from cyb_lightning.evaluation.tokens import quadrants

__all__ = ["quadrants"]
