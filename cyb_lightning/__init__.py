"""cyb_lightning: Catch Your Breath losses and pause-token training on PyTorch Lightning."""

__version__ = "0.1.0"
