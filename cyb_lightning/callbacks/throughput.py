"""Tokens per second (real and laid-out) and, on GPUs, model FLOPs utilisation, logged to TensorBoard.

Lightning's ``ThroughputMonitor`` counts one kind of item per batch; with pauses there are two: the *real*
tokens (what the data contains; ``target_mask`` counts them) and the *laid-out* tokens the decoder actually
processes (``input_ids``, pauses included: W = K + 1 times more with the CYB layout). This callback feeds
both to Lightning's own ``Throughput`` meter (rolling window, per device and global) and gives it the FLOPs
of each step from ``DecoderSpec.flops_per_token``; the MFU comes from Lightning's table of peak FLOPs
(``get_available_flops``), so it exists on known GPUs only (not on CPU).

Logged every ``log_every_n_steps`` (the trainer's by default) on global rank 0, once the window is full:

- ``throughput/tokens_per_sec``, ``throughput/laid_out_tokens_per_sec``, ``throughput/samples_per_sec``:
  the whole job (device value × world size; ranks see equal batches);
- ``throughput/device/tokens_per_sec``, ``throughput/device/laid_out_tokens_per_sec``;
- ``throughput/device/tflops_per_sec`` and ``throughput/mfu`` where the spec knows its FLOPs and the GPU
  its peak.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops


def _compute_dtype(precision: str) -> torch.dtype:
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


class TokenThroughput(L.Callback):
    """Real and laid-out tokens per second, FLOPs and MFU (on GPUs), via Lightning's ``Throughput``.

    Args:
        window_size: number of steps the rolling rates average over.
        log_every_n_steps: how often to log; None → the trainer's ``log_every_n_steps``.
    """

    def __init__(self, window_size: int = 20, log_every_n_steps: int | None = None) -> None:
        if window_size < 2:
            raise ValueError(f"window_size must be >= 2, got {window_size}")
        self.window_size = window_size
        self.log_every_n_steps = log_every_n_steps
        self._real: Throughput | None = None
        self._laid_out: Throughput | None = None
        self.last_metrics: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        dtype = _compute_dtype(str(trainer.precision))
        self.peak_flops = get_available_flops(trainer.strategy.root_device, dtype)
        world = trainer.world_size
        self._real = Throughput(world_size=world, window_size=self.window_size)
        self._laid_out = Throughput(available_flops=self.peak_flops, world_size=world, window_size=self.window_size)
        self._flops_per_token: dict[int, int | None] = {}
        self._t0: float | None = None
        self._samples = self._real_tokens = self._laid_out_tokens = self._steps = 0

    def _flops(self, pl_module: L.LightningModule, context: int) -> int | None:
        if context not in self._flops_per_token:
            spec = getattr(pl_module, "decoder_spec", None)
            vocab = getattr(pl_module.hparams, "vocab_size", 0)
            self._flops_per_token[context] = spec.flops_per_token(vocab, context) if spec is not None else None
        return self._flops_per_token[context]

    def _sync(self, trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self._t0 is None:  # the clock starts at the first batch, after setup and compilation
            self._sync(trainer)
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        if self._real is None or self._laid_out is None or self._t0 is None:
            return
        self._sync(trainer)
        elapsed = time.perf_counter() - self._t0
        input_ids = batch["input_ids"]
        laid_out = int(input_ids.numel())
        real = int(batch["target_mask"].sum()) if "target_mask" in batch else laid_out
        self._steps += 1
        self._samples += int(input_ids.shape[0])
        self._laid_out_tokens += laid_out
        self._real_tokens += real
        per_token = self._flops(pl_module, int(input_ids.shape[1]))
        flops = per_token * laid_out if per_token else None
        self._laid_out.update(
            time=elapsed, batches=self._steps, samples=self._samples, lengths=self._laid_out_tokens, flops=flops
        )
        self._real.update(time=elapsed, batches=self._steps, samples=self._samples, lengths=self._real_tokens)
        every = self.log_every_n_steps or trainer.log_every_n_steps or 1
        if trainer.global_step % every:
            return
        metrics = self.compute(trainer.world_size)
        if metrics and trainer.is_global_zero:
            self.last_metrics = metrics
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def compute(self, world_size: int) -> dict[str, float]:
        """The current rates (empty until the window is full)."""
        assert self._real is not None and self._laid_out is not None
        laid, real = self._laid_out.compute(), self._real.compute()
        if "device/items_per_sec" not in laid:
            return {}
        out = {
            "throughput/device/tokens_per_sec": real["device/items_per_sec"],
            "throughput/device/laid_out_tokens_per_sec": laid["device/items_per_sec"],
            "throughput/tokens_per_sec": real["device/items_per_sec"] * world_size,
            "throughput/laid_out_tokens_per_sec": laid["device/items_per_sec"] * world_size,
            "throughput/samples_per_sec": laid["device/samples_per_sec"] * world_size,
        }
        if "device/flops_per_sec" in laid:
            out["throughput/device/tflops_per_sec"] = laid["device/flops_per_sec"] / 1e12
        if "device/mfu" in laid:
            out["throughput/mfu"] = laid["device/mfu"]
        return out
