"""Lightning's SLURM auto-requeue, run at the end of a training step on every rank together.

Lightning's own handler (``_SignalConnector._slurm_sigusr_handler_fn``) saves ``hpc_ckpt_<n>.ckpt`` and
calls ``scontrol requeue`` *inside the signal handler*, i.e. wherever the main thread happens to be:

- in the middle of a step, the checkpoint holds the weights after step k but a data position that
  already counts the batch of step k + 1 (the loader runs ahead), so the resumed job skips a batch;
- with several ranks, each one enters the handler at a different point of its step, and the checkpoint's
  collectives (path broadcast, distributed-checkpoint planning) can interleave with the training's own
  (DDP all-reduce, FSDP2 all-gather / reduce-scatter): a hang or a corrupted save.

This callback replaces that handler (only while fitting, only when Lightning installed it: a
``SLURMEnvironment`` with ``auto_requeue``) by one that just notes the signal. At the end of each training
step the ranks agree (one tiny all-reduce) whether any of them got it, and then all of them call
Lightning's handler function itself, at the same point, where the checkpoint is consistent: the same
save, the same ``scontrol requeue``. Training then stops; SLURM requeues the job and the restart resumes.
"""

from __future__ import annotations

import signal
import threading

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment


class SLURMRequeueAtStepEnd(L.Callback):
    """Defer Lightning's SLURM requeue (hpc checkpoint + ``scontrol requeue``) to a step boundary."""

    def __init__(self) -> None:
        self._signum: int | None = None
        self._received = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        env = trainer._accelerator_connector.cluster_environment
        if not (isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None):
            return
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled in the main thread; Lightning's handler stays
        self._signum = env.requeue_signal
        self._received = False
        signal.signal(self._signum, self._note)  # Lightning restores its own handlers at teardown

    def _note(self, signum, frame) -> None:
        self._received = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._signum is None:
            return
        if not trainer.strategy.reduce_boolean_decision(self._received, all=False):
            return
        self._received = False
        trainer._signal_connector._slurm_sigusr_handler_fn(self._signum, None)  # Lightning's: save + requeue
        trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._signum = None
