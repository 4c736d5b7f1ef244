"""End to end through the CLI: ``fit`` for 2n steps vs ``fit`` for n steps then resume to 2n.

The training losses logged for steps n+1 … 2n must be identical (bit for bit: same weights, optimizer,
LR schedule and, above all, the same batches after the resume).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from cyb_lightning.__main__ import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
N = 4


def _losses(log_dir: Path) -> dict[int, float]:
    (metrics,) = log_dir.rglob("metrics.csv")
    with open(metrics) as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def _fit(tmp: Path, run: str, max_steps: int, source: dict, ckpt_path: Path | None = None) -> dict[int, float]:
    override = tmp / f"{run}.yaml"
    override.write_text(
        f"""
trainer:
  max_steps: {max_steps}
  log_every_n_steps: 1
  val_check_interval: 1000
  limit_val_batches: 0
  enable_progress_bar: false
  default_root_dir: {tmp / run}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {tmp / run}, name: logs}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {tmp / run / "ckpt"}, filename: "{{step}}", every_n_train_steps: {N}, save_top_k: -1}}
data:
  source: {source}
  bpe_vocab_size: 512
  seq_len: 16
  batch_size: 4
  val_documents: 2
"""
    )
    args = ["fit", "--config", str(ROOT / "conf" / "quickstart.yaml"), "--config", str(override)]
    if ckpt_path is not None:
        args += ["--ckpt_path", str(ckpt_path)]
    cli_main(args)
    return _losses(tmp / run / "logs")


@pytest.mark.slow
def test_fit_2n_equals_fit_n_then_resume(tiny_source, tmp_path, capsys):
    init_args = {"root": tiny_source.root, **tiny_source.build_kwargs}
    source = {"class_path": "cyb_lightning.data.QuickstartCorpus", "init_args": init_args}
    straight = _fit(tmp_path, "straight", 2 * N, source)
    assert f"fit: {2 * N} steps in " in capsys.readouterr().out
    resumed = _fit(tmp_path, "resumed", 2 * N, source, tmp_path / "straight" / "ckpt" / f"step={N}.ckpt")
    later = {s: v for s, v in straight.items() if s >= N}
    assert len(straight) == 2 * N and len(later) == N, straight
    assert resumed == later  # steps n+1 … 2n (0-based steps n … 2n-1), exactly
    assert f"fit: {N} steps in " in capsys.readouterr().out  # the steps this fit trained, not the checkpoint's too
    assert straight[0] != straight[N]
