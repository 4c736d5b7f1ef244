"""SIGKILL of a 2-process DDP run and of a 2-process FSDP2 run (CPU, gloo) at a random step, then resume.

The killed run is resumed from the checkpoint the resume picker chooses (the sbatch template's); every
rank's trace from the resume point on (loss bit for bit, and a hash of its own batch: each rank's data
position) must equal the uninterrupted run's. A kill may land in a save: the picker then takes the
previous checkpoint (atomic saves leave it whole).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from cyb_lightning.resume import load_metadata, pick_checkpoint
from tests.conftest import tiny_cyb_yaml
from tests.distributed.trace import read

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 8, 2
STRATEGY = {
    "ddp": "{class_path: lightning.pytorch.strategies.DDPStrategy, init_args: {process_group_backend: gloo}}",
    "fsdp2": "{class_path: cyb_lightning.parallel.FSDP2Strategy, init_args: {process_group_backend: gloo}}",
}

pytestmark = pytest.mark.slow


def config(tmp: Path, tiny_quickstart, strategy: str, run: str) -> Path:
    path = tmp / f"{run}.yaml"
    path.write_text(tiny_cyb_yaml(tiny_quickstart) + f"""  batch_size: 2
  lanes: 2
trainer:
  accelerator: cpu
  devices: 2
  strategy: {STRATEGY[strategy]}
  precision: 32-true
  max_steps: {STEPS}
  limit_val_batches: 0
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  logger: false
  default_root_dir: {tmp / run}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {tmp / run / "checkpoints"}, save_last: true, every_n_train_steps: {EVERY}, save_top_k: -1}}
    - class_path: tests.distributed.trace.LossTrace
      init_args: {{path: {tmp / run / "trace"}}}
""")  # fmt: skip
    return path


def start(cfg: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("SLURM_NTASKS", None)
    cmd = [sys.executable, "-m", "cyb_lightning", "fit", "--config", str(cfg), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 300) -> None:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert proc.returncode == 0, out[-5000:]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_sigkill_at_a_random_step_then_resume_reproduces_every_ranks_trace(tmp_path, tiny_quickstart, strategy):
    finish(start(config(tmp_path, tiny_quickstart, strategy, "straight")))
    straight = [read(tmp_path / "straight" / "trace", r) for r in (0, 1)]
    assert [s for s, _, _ in straight[0]] == list(range(1, STEPS + 1))
    assert straight[0] != straight[1]  # each rank has its own data

    kill_at = random.randrange(EVERY + 1, STEPS)  # some steps after a checkpoint, before the end
    run = tmp_path / "killed"
    job = start(config(tmp_path, tiny_quickstart, strategy, "killed"))
    deadline = time.monotonic() + 300
    trace = run / "trace.rank0"
    while not (trace.exists() and len(read(run / "trace", 0)) >= kill_at):
        assert job.poll() is None, f"the run ended before step {kill_at}: {job.stdout.read()[-5000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # every rank and the launcher, without warning
    job.wait()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        ckpt = pick_checkpoint(run)
    resume_step = load_metadata(ckpt)["global_step"]
    assert 0 < resume_step <= kill_at and resume_step % EVERY == 0, (kill_at, ckpt)

    (run / "trace.rank0").rename(run / "before.rank0")
    (run / "trace.rank1").rename(run / "before.rank1")
    finish(start(config(tmp_path, tiny_quickstart, strategy, "killed"), "--ckpt_path", str(ckpt)))
    for rank in (0, 1):
        resumed = read(run / "trace", rank)
        assert resumed == [t for t in straight[rank] if t[0] > resume_step], (rank, kill_at, resume_step)
