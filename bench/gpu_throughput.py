"""Tokens per second and MFU of an FSDP2 bf16 fit of the ~125M decoder (conf/decoder/gpt_125m.yaml).

This is the measurement the docs quote (docs/slurm.md, "Throughput"); it needs NVIDIA GPUs and has not
been run in CI. The data are synthetic CYB-laid-out batches (uniform random token ids, K pauses after
each, shared positions), so the number measures the model and the parallel setup only, not the input
pipeline. The loss, optimizer, schedule, FSDP2 sharding (fully_shard per block + root, bf16 parameters,
fp32 reduction) and the TokenThroughput callback are those of a real run.

    python bench/gpu_throughput.py                                # every GPU of this node
    python bench/gpu_throughput.py --devices 1 --batch-size 8    # one GPU
    python bench/gpu_throughput.py --activation-checkpointing --batch-size 32

It prints one JSON line (rank 0) with real and laid-out tokens/s, TFLOP/s per GPU and MFU, the GPU name,
torch/lightning versions and the date, and a Markdown table row for the docs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from cyb_lightning.callbacks import TokenThroughput
from cyb_lightning.losses import CYBAP
from cyb_lightning.model import GPTConfig
from cyb_lightning.module import CYBModule
from cyb_lightning.parallel import FSDP2Strategy


class SyntheticCYB(Dataset):
    """Random real tokens in the CYB layout: x P1 … PK per token, every pause at its token's position."""

    def __init__(self, n: int, seq_len: int, num_pauses: int, vocab: int, first_text_id: int) -> None:
        self.n, self.T, self.K, self.V, self.lo = n, seq_len, num_pauses, vocab, first_text_id

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        real = torch.randint(self.lo, self.V, (self.T + 1,), generator=g)
        W = self.K + 1
        ids = torch.empty(self.T, W, dtype=torch.long)
        ids[:, 0] = real[:-1]
        ids[:, 1:] = torch.arange(3, 3 + self.K)  # reserved pause ids
        return {
            "input_ids": ids.reshape(-1),
            "position_ids": torch.arange(self.T).repeat_interleave(W),
            "targets": real[1:],
            "target_mask": torch.ones(self.T, dtype=torch.bool),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", default="auto")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16, help="per GPU")
    p.add_argument("--seq-len", type=int, default=1024, help="real tokens per row (laid out: × (K+1))")
    p.add_argument("--num-pauses", type=int, default=3)
    p.add_argument("--vocab-size", type=int, default=32008)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--smoke", action="store_true", help="a tiny model on one CPU process: checks the script runs")
    args = p.parse_args()
    accelerator = "cpu" if args.smoke else "gpu"
    if args.smoke:
        args.devices, args.seq_len, args.batch_size, args.vocab_size, args.steps, args.window = 1, 16, 2, 64, 6, 3
    elif not torch.cuda.is_available():
        raise SystemExit("bench/gpu_throughput.py measures GPUs; no CUDA device is visible")
    torch.backends.cuda.matmul.allow_tf32 = True

    L.seed_everything(0)
    if args.smoke:
        spec = GPTConfig(n_layer=2, n_head=2, d_model=32, max_position=64)
    else:
        spec = GPTConfig(n_layer=12, n_head=12, d_model=768, max_position=2048)  # conf/decoder/gpt_125m.yaml
    K, dk_id = args.num_pauses, 2
    model = CYBModule(spec, CYBAP(), vocab_size=args.vocab_size, dk_id=dk_id, steps_per_token=K + 1,
                      seq_len=args.seq_len, lr=6e-4, warmup_steps=10,
                      activation_checkpointing=args.activation_checkpointing)
    meter = TokenThroughput(window_size=args.window, log_every_n_steps=args.window)
    trainer = L.Trainer(
        accelerator=accelerator, devices=args.devices, num_nodes=args.num_nodes, strategy=FSDP2Strategy(),
        precision=args.precision, max_steps=args.steps, gradient_clip_val=1.0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=args.window, callbacks=[meter],
    )
    n = args.batch_size * args.steps * 1024  # plenty; each rank reads its own slice
    data = DataLoader(SyntheticCYB(n, args.seq_len, K, args.vocab_size, first_text_id=3 + K),
                      batch_size=args.batch_size, num_workers=0 if args.smoke else 4, pin_memory=not args.smoke)
    trainer.fit(model, data)
    if not trainer.is_global_zero:
        return
    m = meter.last_metrics
    result = {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name() if accelerator == "gpu" else "cpu",
        "gpus": trainer.world_size,
        "torch": torch.__version__,
        "lightning": L.__version__,
        "model": "tiny (smoke test)" if args.smoke else "gpt_125m",
        "params": dataclasses.replace(spec, vocab_size=args.vocab_size).num_params(),
        "precision": args.precision, "activation_checkpointing": args.activation_checkpointing,
        "batch_per_gpu": args.batch_size, "seq_len_real": args.seq_len, "seq_len_laid_out": args.seq_len * (K + 1),
        **{k.removeprefix("throughput/"): v for k, v in m.items()},
        "peak_tflops_per_gpu": (meter.peak_flops or 0) / 1e12,
    }
    print(json.dumps(result))
    print(
        f"| {result['date']} | {result['gpus']}× {result['gpu']} | {args.precision} | {args.batch_size} × "
        f"{args.seq_len}·{K + 1} | {m.get('throughput/tokens_per_sec', float('nan')):,.0f} | "
        f"{m.get('throughput/laid_out_tokens_per_sec', float('nan')):,.0f} | "
        f"{100 * m.get('throughput/mfu', float('nan')):.1f} % |"
    )


if __name__ == "__main__":
    main()
