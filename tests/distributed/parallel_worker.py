"""Run under ``torchrun --nproc_per_node 2``: cyb_lightning.parallel without Lightning's Trainer.

Each rank keeps a full single-process reference copy of the decoder; the sharded copy sees only this
rank's half of the global batch. Rank 0 writes a JSON report comparing, after one backward pass and one
clipped AdamW step: the global gradient norm, the clipped gradients and the weights that AdamW on the
sharded parameters and optimizer state makes of them.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from cyb_lightning.__main__ import end_process_group
from cyb_lightning.losses import CYBAP
from cyb_lightning.model import GPTConfig
from cyb_lightning.parallel import clip_grad_norm_, parallelize
from tests.distributed.fit_worker import DK, LayoutRows, V


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def loss_of(model, batch, loss_fn, n_total: int, world: int) -> torch.Tensor:
    logits = model(batch["input_ids"], batch["position_ids"])
    B, T = batch["targets"].shape
    per_token = loss_fn(logits.view(B, T, -1, logits.shape[-1]).flatten(0, 1), batch["targets"].flatten(), DK)
    return per_token.sum() * world / n_total  # as CYBModule.reduce_tokens: the global token mean after averaging


def main(out: str, activation_checkpointing: bool, max_norm: float) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    spec = GPTConfig(n_layer=2, n_head=2, d_model=32, max_position=64)
    reference = spec.build(V)
    sharded = copy.deepcopy(reference)
    mesh = init_device_mesh("cpu", (world,))
    parallelize(sharded, spec.block_types(), device_mesh=mesh, activation_checkpointing=activation_checkpointing)

    rows = LayoutRows(4)
    batch = torch.utils.data.default_collate([rows[i] for i in range(4)])
    local = {k: v[rank * 2 : (rank + 1) * 2] for k, v in batch.items()}
    loss_fn, n = CYBAP(), batch["targets"].numel()

    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-2)
    loss_of(reference, batch, loss_fn, n, 1).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
    loss_of(sharded, local, loss_fn, n, world).backward()
    norm = clip_grad_norm_(list(sharded.parameters()), max_norm)

    names = [k for k, _ in reference.named_parameters()]
    grad_err = max(
        (full(p.grad) - q.grad).abs().max().item() for p, q in zip(sharded.parameters(), reference.parameters())
    )
    # Adam's first step is lr·g/(|g| + eps): near-zero gradient entries amplify fp32 rounding differences in
    # the reduction (up to lr·Δg/eps), so the update is compared on the same gradients. That the gradients
    # themselves agree is what grad_err checks.
    for p, q in zip(sharded.parameters(), reference.parameters()):
        q.grad.copy_(full(p.grad))
    ref_opt.step()
    opt.step()
    ref_state = reference.state_dict()
    weight_err = max((full(v) - ref_state[k]).abs().max().item() for k, v in sharded.state_dict().items())
    report = {
        "norm": float(norm), "ref_norm": float(ref_norm), "grad_err": grad_err, "weight_err": weight_err,
        "sharded": all(hasattr(p, "to_local") for p in sharded.parameters()), "n_params": len(names),
        "keys_equal": sorted(sharded.state_dict()) == sorted(ref_state),
    }
    if rank == 0:
        with open(out, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "ac", float(sys.argv[3]))
    # The entry point's teardown, once main's sharded model and device mesh are gone (they hold the group).
    end_process_group()
