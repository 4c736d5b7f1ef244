"""Data pipeline throughput vs what the quickstart model consumes in training, on this machine.

    python bench/data_throughput.py                 # quickstart config (conf/quickstart.yaml), ~2 minutes
    python bench/data_throughput.py --seconds 30 --train-steps 60

Pipeline: read → tokenize → pack → lay out (pauses), through the training DataLoader exactly as the
DataModule builds it (``StatefulDataLoader`` + ``PackedStream``), with 0 (in process), 1 and 2 workers;
reported in real tokens per second (B · T per batch). Training: the quickstart LightningModule's
optimizer steps (forward, loss, backward, AdamW), timed from batch start to batch end, so data loading
is excluded; the median step time gives the tokens per second the model consumes. The pipeline should
be >= 10x faster with one worker, so that data never limits training.

Prints a Markdown table (machine, date, load) for docs/data.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pipeline_tokens_per_s(dm, num_workers: int, seconds: float, warmup_batches: int = 5) -> tuple[float, int]:
    """Real tokens per second out of the training DataLoader with ``num_workers`` workers."""
    dm.num_workers = num_workers
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(warmup_batches):  # worker start-up, first shard opened
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        batch = next(it)
        n += int(batch["targets"].numel())
    elapsed = time.perf_counter() - t0
    del it, loader
    return n / elapsed, n


def training_tokens_per_s(config: str, steps: int) -> tuple[float, float]:
    """(tokens/s, median step seconds) of fitting the quickstart model for ``steps`` steps."""
    import lightning as L

    from cyb_lightning.cli import CYBLightningCLI
    from cyb_lightning.datamodule import CYBDataModule
    from cyb_lightning.module import CYBModule

    class StepTimer(L.Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter() - self.t0)
            self.tokens = int(batch["targets"].numel())

    with tempfile.TemporaryDirectory() as tmp:
        override = Path(tmp) / "bench.yaml"
        override.write_text(
            f"trainer:\n  max_steps: {steps}\n  logger: false\n  enable_checkpointing: false\n  callbacks: []\n"
            f"  enable_progress_bar: false\n  enable_model_summary: false\n  limit_val_batches: 0\n"
            f"  default_root_dir: {tmp}\n"
        )
        argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees the script's own argv
        try:
            cli = CYBLightningCLI(CYBModule, CYBDataModule, args=["--config", config, "--config", str(override)],
                                  run=False, parser_kwargs={"parser_mode": "omegaconf"})  # fmt: skip
        finally:
            sys.argv = argv
        timer = StepTimer()
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    step = statistics.median(timer.times[min(5, len(timer.times) // 2) :])  # skip warm-up steps
    return timer.tokens / step, step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "conf" / "quickstart.yaml"))
    p.add_argument("--seconds", type=float, default=20.0, help="measuring time per worker setting")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-steps", type=int, default=40)
    args = p.parse_args(argv)

    import torch
    from jsonargparse import ArgumentParser

    from cyb_lightning.datamodule import CYBDataModule

    # The data module exactly as the config builds it (corpus and tokenizer from their caches).
    parser = ArgumentParser(parser_mode="omegaconf")
    parser.add_argument("--config", action="config")
    parser.add_class_arguments(CYBDataModule, "data")
    parser.add_argument("--seed_everything", default=None)
    parser.add_argument("--trainer", default=None, type=dict)
    parser.add_argument("--model", default=None, type=dict)
    dm = parser.instantiate_classes(parser.parse_args(["--config", args.config])).data
    desc = f"layout {dm.layout} (K={dm.num_pauses}), T={dm.seq_len}, batch {dm.batch_size}, lanes {dm.lanes}"

    rows = []
    for w in args.workers:
        tps, n = pipeline_tokens_per_s(dm, w, args.seconds)
        rows.append((w, tps))
        print(f"pipeline, {w} workers: {tps:,.0f} tokens/s ({n:,} tokens)", flush=True)
    train_tps, step_s = training_tokens_per_s(args.config, args.train_steps)
    print(f"training consumption: {train_tps:,.0f} tokens/s ({step_s * 1000:.0f} ms per step)", flush=True)

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    print()
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} "
          f"{platform.release()}; torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"load average during the run {load[0]:.1f}")  # fmt: skip
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"Date: {now:%Y-%m-%d %H:%M} UTC; config {Path(args.config).name}: {desc}")
    print()
    print("| what | real tokens/s | × training |")
    print("|---|---:|---:|")
    for w, tps in rows:
        label = "pipeline, in process (0 workers)" if w == 0 else f"pipeline, {w} worker{'s' if w > 1 else ''}"
        print(f"| {label} | {tps:,.0f} | {tps / train_tps:.1f} |")
    print(f"| training consumption (quickstart model) | {train_tps:,.0f} | 1 |")


if __name__ == "__main__":
    main()
