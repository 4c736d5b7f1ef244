"""Scale-out pieces that are PyTorch's and Lightning's own, wired for our decoder.

- :class:`FSDP2Strategy`: Lightning's ``ModelParallelStrategy`` with the device mesh sized for pure FSDP2
  (every process is a data-parallel rank; no tensor parallelism), so ``trainer.num_nodes``/``devices``
  are the only sizes a config (or SLURM) has to give.
- :func:`parallelize`: what ``CYBModule.configure_model`` applies after building the decoder: optional
  activation checkpointing per transformer block, then ``fully_shard`` per block and on the root with a
  ``MixedPrecisionPolicy`` (bf16 parameters for compute, fp32 gradient reduction).
- :func:`clip_grad_norm_`: clipping by the global norm that also works when gradients are DTensor shards
  (``torch.nn.utils.get_total_norm`` + ``clip_grads_with_norm_``; the norm is made a full tensor first).

The decoder is built in full on every rank (fp32, same seed, so the same initial weights as a single
process) and ``fully_shard`` then keeps only each rank's shard; FSDP2 moves the shards to the mesh's device.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn

_BF16 = ("bf16-mixed", "bf16-true", "bf16")


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for pure FSDP2: the data-parallel size defaults to the world size.

    Lightning's own default (``"auto"``) makes the data-parallel dimension the number of *nodes* and the
    tensor-parallel one the GPUs per node, which is for 2-D (FSDP + TP) models; our decoder is sharded
    over every rank. Everything else (process group, checkpoint I/O, distributed checkpoints) is
    Lightning's. ``save_distributed_checkpoint=True`` (the default) writes one shard per rank.
    """

    def __init__(
        self,
        data_parallel_size: int | str = "auto",
        tensor_parallel_size: int | str = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            **kwargs,
        )

    def setup_environment(self) -> None:
        # num_nodes and the number of local processes are known here (set by the trainer's connector).
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        if self._tensor_parallel_size == "auto":
            self._tensor_parallel_size = 1
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """Lightning's save, made atomic: a sharded checkpoint is written to a hidden folder next to its
        destination, then renamed (``checkpoint.replace_folder``); single files go through the checkpoint
        IO (``AtomicCheckpointIO`` under the CLI)."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        from pathlib import Path

        from cyb_lightning.checkpoint import partial_path, replace_folder

        path = Path(self.broadcast(str(filepath)))
        tmp = partial_path(path)
        if self.global_rank == 0 and tmp.exists():  # left by a save that was killed
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        self.barrier("cyb_checkpoint_tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)  # every rank's shard; meta.pt from rank 0
        self.barrier("cyb_checkpoint_written")
        if self.global_rank == 0:
            replace_folder(tmp, path)
        self.barrier("cyb_checkpoint_renamed")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        # Lightning 2.6 does not forward ``fit(weights_only=...)`` to strategies that restore after setup
        # (this one), so torch.load's ``weights_only=True`` default would refuse the metadata file, whose
        # hyperparameters pickle the decoder spec and the loss. Unset means: our own checkpoint, load it fully.
        return super().load_checkpoint(checkpoint_path, weights_only=False if weights_only is None else weights_only)


def mixed_precision_policy(precision: str | None):
    """FSDP2's policy for a Lightning precision string: bf16 compute, fp32 reduction; None for fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    precision = str(precision or "32-true")
    if precision in _BF16:
        # bf16-true already stores bf16 parameters (Lightning builds the model under a bf16 default dtype);
        # the policy then only changes the reduction. bf16-mixed keeps fp32 master shards.
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision.startswith("16"):
        raise ValueError(
            f"precision={precision!r} under FSDP2 needs a sharded gradient scaler; use bf16-mixed or bf16-true"
        )
    return None


def data_parallel_mesh(device_mesh):
    """The 1-D mesh FSDP2 shards over, from Lightning's ``(data_parallel, tensor_parallel)`` mesh."""
    if device_mesh is None:
        return None
    if device_mesh.ndim == 1:
        return device_mesh
    if device_mesh["tensor_parallel"].size() != 1:
        raise ValueError(
            f"the device mesh has tensor_parallel={device_mesh['tensor_parallel'].size()}, but this decoder has "
            "no tensor-parallel plan: use cyb_lightning.parallel.FSDP2Strategy (or ModelParallelStrategy with "
            "data_parallel_size=<world size>, tensor_parallel_size=1)"
        )
    return device_mesh["data_parallel"]


def apply_activation_checkpointing(model: nn.Module, block_types: tuple[type[nn.Module], ...]) -> int:
    """Recompute each transformer block in the backward pass (non-reentrant ``checkpoint_wrapper``).

    The wrapper's state-dict hooks strip its prefix, so checkpoints are the same with or without it.
    Returns the number of blocks wrapped.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        CheckpointWrapper,
        checkpoint_wrapper,
    )

    wrapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, block_types) and not isinstance(parent, CheckpointWrapper):
                parent.register_module(name, checkpoint_wrapper(child, checkpoint_impl=CheckpointImpl.NO_REENTRANT))
                wrapped += 1
    return wrapped


def _is_block(module: nn.Module, block_types: tuple[type[nn.Module], ...]) -> bool:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    inner = module._checkpoint_wrapped_module if isinstance(module, CheckpointWrapper) else module
    return isinstance(inner, block_types)


def parallelize(
    model: nn.Module,
    block_types: tuple[type[nn.Module], ...],
    device_mesh=None,
    precision: str | None = None,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Activation checkpointing (optional, any strategy), then FSDP2 when a device mesh is given.

    ``fully_shard`` goes on every block (each block's parameters are all-gathered just before it runs
    and freed after) and finally on the root, which holds the embedding, the final norm and the (tied)
    output head. Works in place; returns ``model``.
    """
    if activation_checkpointing:
        if not apply_activation_checkpointing(model, block_types):
            raise ValueError(f"activation_checkpointing: no module of type {block_types} in the model")
    mesh = data_parallel_mesh(device_mesh)
    if mesh is None:
        return model
    from torch.distributed.fsdp import fully_shard

    kwargs: dict[str, Any] = {"mesh": mesh}
    policy = mixed_precision_policy(precision)
    if policy is not None:
        kwargs["mp_policy"] = policy
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    inside_wrappers = {id(m._checkpoint_wrapped_module) for m in model.modules() if isinstance(m, CheckpointWrapper)}
    blocks = [m for m in model.modules() if _is_block(m, block_types) and id(m) not in inside_wrappers]
    if not blocks:
        raise ValueError(f"FSDP2: no module of type {block_types} to shard in {type(model).__name__}")
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at the start of backward: keep them gathered.
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, **kwargs)
    # The root holds the embedding, final norm and output head; the loss's head gradients are computed inside
    # forward (losses/head.py), and FSDP2 gathers the root again for backward through a hook on forward's
    # outputs (torch walks the HeadLoss dataclass for them).
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    return model


def clip_grad_norm_(
    parameters: Iterable[Tensor] | Tensor, max_norm: float, norm_type: float = 2.0, foreach: bool | None = None
) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also works on FSDP2's DTensor gradients.

    The total norm of sharded gradients comes back as a DTensor holding a partial reduction; turning it
    into a full tensor does the cross-rank reduction, so every rank scales by the same, global factor.
    Returns the total norm before clipping (a plain tensor).
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total = torch.nn.utils.get_total_norm(grads, norm_type=norm_type, foreach=foreach)
    if hasattr(total, "full_tensor"):  # a DTensor
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total, foreach=foreach)
    return total
