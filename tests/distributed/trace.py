"""A callback for the multi-process fault tests: every rank appends, after each training step, the step,
its own loss (``repr``: exact) and a hash of its own batch to ``<path>.rank<r>`` (one flushed JSON line)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L


class LossTrace(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        digest = hashlib.sha256(batch["input_ids"].cpu().numpy().tobytes()).hexdigest()[:16]
        line = {"step": trainer.global_step, "loss": repr(float(outputs["loss"])), "batch": digest}
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.write(json.dumps(line) + "\n")


def read(path: str | Path, rank: int) -> list[tuple[int, str, str]]:
    """(step, loss, batch hash) per step of one rank's trace; a line cut short by a kill is left out."""
    out = []
    for line in Path(f"{path}.rank{rank}").read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        out.append((r["step"], r["loss"], r["batch"]))
    return out
