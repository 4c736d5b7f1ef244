"""What the data pipeline skipped, where a run's user sees it: TensorBoard scalars and a summary.

The sources count every skipped input per reason (``TextSource.stats``: malformed lines, unreadable
shards, empty or unencodable documents, read retries, lane epochs without data), and each warning names
the file and line; this callback adds ``data/skipped/<reason>`` scalars (summed over ranks and DataLoader
workers, counted since this process started) every ``log_every_n_steps`` optimizer steps, and one summary
line at the end of ``fit``. The CLI adds it to every trainer.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

REASONS = ("malformed_lines", "broken_shards", "empty_documents", "invalid_text", "empty_lane_epochs", "retries")


class SkippedDataReport(L.Callback):
    def __init__(self) -> None:
        self._logged_step = -1

    @staticmethod
    def totals(trainer: L.Trainer) -> dict[str, int]:
        """Skips per reason, summed over ranks (a collective: every rank calls it at the same point)."""
        loader = trainer.train_dataloader
        own = loader.skipped() if hasattr(loader, "skipped") else {}
        counts = torch.tensor([float(own.get(r, 0)) for r in REASONS], device=trainer.strategy.root_device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        return {r: int(n) for r, n in zip(REASONS, counts.tolist())}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._logged_step or step % max(trainer.log_every_n_steps, 1) != 0:
            return
        self._logged_step = step
        totals = self.totals(trainer)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({f"data/skipped/{r}": float(n) for r, n in totals.items()}, step=step)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        totals = {r: n for r, n in self.totals(trainer).items() if n}
        what = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in totals.items())
        rank_zero_info(
            f"data skipped during this fit: {what} (the warnings name each file and line)"
            if totals
            else "data skipped during this fit: nothing"
        )
