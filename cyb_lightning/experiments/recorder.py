"""A callback that records a run's curve for the experiment: loss against real tokens, laid-out tokens and time."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import lightning as L


class ExperimentRecorder(L.Callback):
    """Writes ``path`` (JSON): every ``every`` steps the training loss, and after every validation run the
    held-out ``val/ppl`` and ``val/loss``, each with the real tokens (``target_mask``), the laid-out tokens
    (``input_ids``, pauses included: forward positions) and the training wall time so far (validation
    excluded). Totals at the end: steps, real and laid-out tokens, training wall time.
    """

    def __init__(self, path: str, every: int = 10) -> None:
        self.path = Path(path)
        self.every = max(1, every)
        self.train: list[dict] = []
        self.val: list[dict] = []
        self.real = self.laid_out = 0
        self.train_s = 0.0
        self._t: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._t is not None:
            self.train_s += time.perf_counter() - self._t
        self.real += int(batch["target_mask"].sum())
        self.laid_out += int(batch["input_ids"].numel())
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.train.append(self._point(step, loss=float(loss)))

    def _point(self, step: int, **values: float) -> dict:
        return {
            "step": step,
            "real_tokens": self.real,
            "laid_out_tokens": self.laid_out,
            "train_wall_s": round(self.train_s, 3),
            **values,
        }

    def on_validation_end(self, trainer, pl_module) -> None:
        # Not on_validation_epoch_end: callbacks see that hook before the module has logged val/ppl.
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        m = trainer.callback_metrics
        if "val/ppl" in m:
            loss = float(m["val/loss"]) if "val/loss" in m else math.nan
            self.val.append(self._point(trainer.global_step, ppl=float(m["val/ppl"]), loss=loss))
        self._write(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer)

    def _write(self, trainer) -> None:
        data = {
            "steps": trainer.global_step,
            "real_tokens": self.real,
            "laid_out_tokens": self.laid_out,
            "train_wall_s": round(self.train_s, 3),
            "train": self.train,
            "val": self.val,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path)
