"""A checkpoint at the last step of ``fit``, which periodic checkpoints miss unless it is one of theirs.

With ``every_n_train_steps: 5`` and ``max_steps: 13`` Lightning's ``ModelCheckpoint`` saves at steps 5 and
10 and ``last.ckpt`` stays at step 10: the last 3 steps are lost. The CLI adds this callback to every
trainer: at the end of the step that reaches ``max_steps`` it has each ``ModelCheckpoint`` save what it
saves periodically (its step checkpoint and ``last.ckpt``), at the same point of the loop as a periodic
save (loop counters and data position included), unless it already saved at that step.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class FinalCheckpoint(L.Callback):
    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.max_steps is None or trainer.max_steps < 0 or trainer.global_step < trainer.max_steps:
            return
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        for callback in trainer.checkpoint_callbacks:
            # Lightning runs checkpoint callbacks after every other one: a periodic save at this very step
            # has not happened yet, and the callback skips its own once this one has saved.
            if isinstance(callback, ModelCheckpoint) and callback._last_global_step_saved != trainer.global_step:
                candidates = callback._monitor_candidates(trainer)
                callback._save_topk_checkpoint(trainer, candidates)
                callback._save_last_checkpoint(trainer, candidates)
