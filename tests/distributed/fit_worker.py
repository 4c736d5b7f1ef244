"""One Lightning fit of a tiny CYB decoder on hand-built batches, for the multi-process tests.

Run as ``python -m tests.distributed.fit_worker --strategy fsdp2 ...`` under ``torchrun`` (or in-process
through :func:`run` for the single-process reference). Rank 0 writes a JSON report: the global loss of
every step, the learning rates, and how the parameters are laid out (DTensor shards or plain tensors).

Every global batch of ``G`` rows is the same whatever the number of processes: rank r of w takes rows
``[r·G/w, (r+1)·G/w)`` of each consecutive block of G (no sampler of Lightning's involved), and the loss is
a global token mean, so one process with batch G and two with batch G/2 see the same objective.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from cyb_lightning.losses import CYBAP
from cyb_lightning.model import GPTConfig
from cyb_lightning.module import CYBModule

V, DK, PAUSES, K, T = 40, 2, (3, 4, 5), 3, 8
GLOBAL_BATCH = 4


class LayoutRows(Dataset):
    """CYB-laid-out rows (x P1 P2 P3 per token, shared positions) of a learnable sequence: next = current + 1."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(6, V, (n, 1), generator=g)
        real = 6 + (starts - 6 + torch.arange(T + 1)) % (V - 6)
        noise = torch.rand(n, T + 1, generator=g) < 0.2  # some unpredictable tokens: the loss does not vanish
        real = torch.where(noise, torch.randint(6, V, (n, T + 1), generator=g), real)
        W = K + 1
        ids = torch.empty(n, T, W, dtype=torch.long)
        ids[:, :, 0] = real[:, :-1]
        for i in range(K):
            ids[:, :, i + 1] = PAUSES[i]
        self.items = [
            {
                "input_ids": ids[j].reshape(T * W),
                "position_ids": torch.arange(T).repeat_interleave(W),
                "targets": real[j, 1:].clone(),
                "target_mask": torch.ones(T, dtype=torch.bool),
            }
            for j in range(n)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class RankSlice(Dataset):
    """Rank ``rank``'s rows of every global batch, in order (local batch size = global / world)."""

    def __init__(self, rows: Dataset, rank: int, world: int) -> None:
        self.rows, self.rank, self.local = rows, rank, GLOBAL_BATCH // world

    def __len__(self) -> int:
        return len(self.rows) // GLOBAL_BATCH * self.local

    def __getitem__(self, i: int) -> dict:
        block, j = divmod(i, self.local)
        return self.rows[block * GLOBAL_BATCH + self.rank * self.local + j]


class Rows(L.LightningDataModule):
    """Exactly resumable through Lightning's checkpoint: it saves how many global batches were consumed
    (one per optimizer step) and a restored run starts its loader right after them."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.rows = LayoutRows(n)
        self.start = 0

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        local = RankSlice(self.rows, rank, world)
        rest = torch.utils.data.Subset(local, range(self.start * local.local, len(local)))
        return DataLoader(rest, batch_size=GLOBAL_BATCH // world)

    def state_dict(self) -> dict:
        return {"consumed": self.trainer.global_step}

    def load_state_dict(self, state: dict) -> None:
        self.start = state["consumed"]


class SeededModule(CYBModule):
    """Builds the decoder from a fixed seed, so every run (any strategy) starts from the same weights."""

    def configure_model(self) -> None:
        if self.decoder is None:
            torch.manual_seed(0)
        super().configure_model()


class Record(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.grad_norms: list[float] = []
        self.first_step: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.strategy.reduce(outputs["loss"].detach().float(), reduce_op="mean")
        self.losses.append(float(loss))
        if self.first_step is None:
            self.first_step = trainer.global_step - 1
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        if "train/grad_norm" in trainer.callback_metrics:
            self.grad_norms.append(float(trainer.callback_metrics["train/grad_norm"]))


def layout_of(module: torch.nn.Module) -> dict:
    out = {}
    for name, p in module.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        out[name] = {
            "dtensor": hasattr(p, "to_local"),
            "placements": [str(x) for x in getattr(p, "placements", ())],
            "shape": list(p.shape),
            "local_shape": list(local.shape),
            "dtype": str(local.dtype),
        }
    return out


def mp_policy_of(module: torch.nn.Module) -> dict | None:
    state = getattr(module, "_get_fsdp_state", None)
    if state is None:
        return None
    policy = state()._mp_policy
    return {"param_dtype": str(policy.param_dtype), "reduce_dtype": str(policy.reduce_dtype)}


def strategy_of(name: str):
    if name == "fsdp2":
        from cyb_lightning.parallel import FSDP2Strategy

        return FSDP2Strategy()
    return {"single": "auto", "ddp": "ddp", "ddp_spawn": "ddp_spawn"}[name]


def run(args: argparse.Namespace, return_model: bool = False):
    world = 1 if args.strategy == "single" else 2
    L.seed_everything(0, workers=True)
    model = SeededModule(
        GPTConfig(n_layer=2, n_head=2, d_model=32, max_position=64), CYBAP(), vocab_size=V, dk_id=DK,
        steps_per_token=K + 1, seq_len=T, lr=args.lr, warmup_steps=2, weight_decay=0.1,
        activation_checkpointing=args.activation_checkpointing,
    )
    data = Rows(GLOBAL_BATCH * args.max_steps)
    record = Record()
    callbacks: list[L.Callback] = [record]
    if args.ckpt_dir:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(
            dirpath=args.ckpt_dir, every_n_train_steps=args.ckpt_every, save_top_k=-1, save_last=True,
            filename="step{step}", auto_insert_metric_name=False,
        ))
    trainer = L.Trainer(
        accelerator="cpu", devices=world, num_nodes=1, strategy=strategy_of(args.strategy),
        precision=args.precision, max_steps=args.max_steps, gradient_clip_val=args.clip or None,
        logger=False, enable_checkpointing=bool(args.ckpt_dir), callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        limit_val_batches=0, default_root_dir=args.root or None, use_distributed_sampler=False,
    )
    # Our hparams hold the decoder spec and loss objects: a full (trusted, own) unpickle.
    trainer.fit(model, datamodule=data, ckpt_path=args.resume or None, weights_only=False)
    report = {
        "losses": record.losses, "lrs": record.lrs, "grad_norms": record.grad_norms,
        "first_step": record.first_step, "global_step": trainer.global_step, "world_size": trainer.world_size,
        "layout": layout_of(model.decoder), "strategy": type(trainer.strategy).__name__,
        "mp_policy": mp_policy_of(model.decoder),
    }
    if trainer.is_global_zero and args.out:
        Path(args.out).write_text(json.dumps(report))
    return (report, model) if return_model else report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", default="single", choices=["single", "ddp", "ddp_spawn", "fsdp2"])
    p.add_argument("--precision", default="32-true")
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--clip", type=float, default=0.0)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--ckpt-dir", default="")
    p.add_argument("--ckpt-every", type=int, default=4)
    p.add_argument("--resume", default="")
    p.add_argument("--root", default="")
    p.add_argument("--out", default="")
    return p


if __name__ == "__main__":
    run(parser().parse_args(sys.argv[1:]))
    from cyb_lightning.__main__ import end_process_group

    end_process_group()  # as `python -m cyb_lightning` does after a successful fit
