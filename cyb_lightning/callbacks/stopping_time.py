"""TensorBoard histograms of the stopping-time distribution, written once from rank 0 after reduction.

Two views, for training (every ``every_n_steps``) and for each validation run:
- ``<stage>/pauses/expected_per_token``: expected extra pauses per real token, Σ_i (i − 1) s_i;
- ``<stage>/pauses/stop_step``: P(answer after k extra pauses), k = 0…K, as a histogram whose bucket
  k holds the summed probability mass (so its shape is the latency distribution).
When the data labels each target with a difficulty (the synthetic tasks), validation also writes
``val/pauses_by_difficulty/<level>/stop_step``: the latency distribution of each level.
Where validation runs the adaptive reader (the pauses a deployed model really takes, each earlier token
given only what it asked for), ``val/adaptive/pauses`` is the share of tokens with k = 0…K pauses, and
``val/adaptive/pauses_by_difficulty/<level>`` the same per level.
The module computes per-token statistics on logging steps (``trainer.log_every_n_steps``) and for every
validation batch; this callback only accumulates and writes them.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from cyb_lightning.evaluation.plots import write_histograms, write_stop_histogram
from cyb_lightning.metrics.stopping import TokenStats


MAX_LEVEL = 15  # difficulty levels 0 … 15 get a histogram of their own


class _Window:
    """Stopping statistics accumulated on one rank since the last write."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.clear()

    def clear(self) -> None:
        self.pauses: list[Tensor] = []
        self.kept = 0
        self.stop_sum: Tensor | None = None
        self.level_stop: Tensor | None = None  # [MAX_LEVEL + 1, W]: Σ s per difficulty level
        self.taken: Tensor | None = None  # [MAX_LEVEL + 2, W]: adaptive reader, tokens with k pauses (row 0: all)

    def add(self, stats: TokenStats, difficulty: Tensor | None = None, adaptive_steps: Tensor | None = None) -> None:
        stop = stats.stop.detach().double().sum(0).cpu()
        self.stop_sum = stop if self.stop_sum is None else self.stop_sum + stop
        if adaptive_steps is not None:
            if self.taken is None:
                self.taken = torch.zeros(MAX_LEVEL + 2, stop.numel(), dtype=torch.float64)
            pauses = adaptive_steps.long().cpu() - 1
            self.taken[0] += torch.bincount(pauses, minlength=stop.numel()).double()
            if difficulty is not None:
                keep = ((difficulty >= 0) & (difficulty <= MAX_LEVEL)).cpu()
                self.taken.index_put_(
                    (difficulty.cpu()[keep].long() + 1, pauses[keep]),
                    torch.ones(int(keep.sum()), dtype=torch.float64),
                    accumulate=True,
                )
        if difficulty is not None:
            if self.level_stop is None:
                self.level_stop = torch.zeros(MAX_LEVEL + 1, stop.numel(), dtype=torch.float64)
            keep = (difficulty >= 0) & (difficulty <= MAX_LEVEL)
            self.level_stop.index_add_(0, difficulty[keep].long().cpu(), stats.stop.detach()[keep].double().cpu())
        room = self.max_tokens - self.kept
        if room > 0:
            # A per-rank cap bounds memory; a prefix of each batch is an unbiased sample of its tokens.
            values = stats.extra_pauses.detach().float().flatten()[:room].cpu()
            self.pauses.append(values)
            self.kept += values.numel()


class StoppingTimeHistograms(L.Callback):
    """Args: every_n_steps: training write interval; max_tokens: per-rank cap on histogram samples."""

    def __init__(self, every_n_steps: int = 100, max_tokens: int = 65536) -> None:
        if every_n_steps < 1 or max_tokens < 1:
            raise ValueError("every_n_steps and max_tokens must be positive")
        self.every_n_steps = every_n_steps
        self.max_tokens = max_tokens
        self._windows = {"train": _Window(max_tokens), "val": _Window(max_tokens)}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(outputs, dict) and isinstance(outputs.get("stats"), TokenStats):
            self._windows["train"].add(outputs["stats"])
        if trainer.global_step % self.every_n_steps == 0:
            self._write(trainer, pl_module, "train")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if isinstance(outputs, dict) and isinstance(outputs.get("stats"), TokenStats):
            self._windows["val"].add(outputs["stats"], outputs.get("difficulty"), outputs.get("adaptive_steps"))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            self._windows["val"].clear()
            return
        self._write(trainer, pl_module, "val")

    def _write(self, trainer, pl_module, stage: str) -> None:
        window = self._windows[stage]
        steps = pl_module.hparams.steps_per_token
        # Every rank takes part in the collectives, even one with nothing accumulated.
        stop_sum = window.stop_sum if window.stop_sum is not None else torch.zeros(steps, dtype=torch.float64)
        labelled = window.level_stop is not None  # the same on every rank: all read the same kind of data
        level_stop, taken = window.level_stop, window.taken
        padded = torch.full((self.max_tokens,), float("nan"))
        if window.pauses:
            values = torch.cat(window.pauses)
            padded[: values.numel()] = values
        window.clear()
        device = pl_module.device
        stop_sum = trainer.strategy.reduce(stop_sum.to(device), reduce_op="sum").cpu()
        if labelled:
            level_stop = trainer.strategy.reduce(level_stop.to(device), reduce_op="sum").cpu()
        if taken is not None:  # every rank read the same batches with the reader (adaptive_eval_batches)
            taken = trainer.strategy.reduce(taken.to(device), reduce_op="sum").cpu()
        gathered = pl_module.all_gather(padded.to(device)).flatten().cpu()
        pauses = gathered[~gathered.isnan()]
        if not trainer.is_global_zero or pauses.numel() == 0:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                write_histograms(logger.experiment, stage, pauses, stop_sum, trainer.global_step)
                if labelled:
                    for level in torch.nonzero(level_stop.sum(1) > 0).flatten().tolist():
                        write_stop_histogram(
                            logger.experiment,
                            f"{stage}/pauses_by_difficulty/{level}/stop_step",
                            level_stop[level],
                            trainer.global_step,
                        )
                if taken is not None:
                    write_stop_histogram(logger.experiment, f"{stage}/adaptive/pauses", taken[0], trainer.global_step)
                    for level in torch.nonzero(taken[1:].sum(1) > 0).flatten().tolist():
                        write_stop_histogram(
                            logger.experiment,
                            f"{stage}/adaptive/pauses_by_difficulty/{level}",
                            taken[level + 1],
                            trainer.global_step,
                        )
