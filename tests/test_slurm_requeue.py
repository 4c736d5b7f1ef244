"""A simulated SLURM requeue through scripts/slurm/train.sbatch and the real CLI + data module.

``srun`` and ``scontrol`` are fakes on PATH: srun runs the task in place; scontrol records its arguments
and then ends the job, as a real requeue does (SLURM terminates the job before requeueing it). The SLURM
variables make Lightning pick its SLURMEnvironment with auto-requeue (conf/trainer/slurm.yaml).

1. start a fit, wait until it trains, send SIGUSR1 (what ``--signal=SIGUSR1@120`` delivers to every task);
2. at the end of that step Lightning writes ``$RUN_DIR/hpc_ckpt_1.ckpt`` and calls
   ``scontrol requeue <job id>``;
3. start the same script again: it resumes from that checkpoint (data position included, via Lightning's
   checkpoint) and overwrites the config file it wrote the first time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_cyb_yaml

ROOT = Path(__file__).resolve().parents[1]
JOB_ID = "4242"

pytestmark = pytest.mark.slow

FAKE_SRUN = """#!/bin/bash
# One task per SLURM_NTASKS on this machine, each with its own SLURM_PROCID / SLURM_LOCALID.
while [[ $# -gt 0 && $1 == -* ]]; do shift; done   # drop srun's own options
pids=()
for ((i = 0; i < ${SLURM_NTASKS:-1}; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$@" >> "{log}"
kill -KILL -- -$(ps -o pgid= $PPID | tr -d ' ')   # the requeue ends the running job: every task
"""


STRATEGIES = {
    "single": "devices: 1\n",
    "fsdp2": "devices: 2\nstrategy: {class_path: cyb_lightning.parallel.FSDP2Strategy}\n",
}


def write_config(tmp: Path, tiny_quickstart, strategy: str) -> tuple[Path, Path]:
    config = tmp / "experiment.yaml"
    config.write_text(tiny_cyb_yaml(tiny_quickstart) + f"""  batch_size: 4
""")
    layer = tmp / "cpu_layer.yaml"  # the STRATEGY layer: CPU tasks, frequent periodic checkpoints
    layer.write_text(STRATEGIES[strategy] + """
accelerator: cpu
precision: 32-true
max_steps: 100000
log_every_n_steps: 5
limit_val_batches: 0
num_sanity_val_steps: 0
enable_progress_bar: false
callbacks:
  - class_path: lightning.pytorch.callbacks.ModelCheckpoint
    init_args: {save_last: true, every_n_train_steps: 5, save_top_k: -1}
""")
    return config, layer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(tmp: Path, config: Path, layer: Path, tasks: int) -> dict:
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL.format(log=tmp / "scontrol.log"))
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    slurm = {
        "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": "cyb-test", "SLURM_NTASKS": str(tasks),
        "SLURM_NTASKS_PER_NODE": str(tasks), "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
        "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0", "SLURM_NODELIST": "localhost", "SLURM_CPUS_PER_TASK": "1",
    }
    return {**os.environ, **slurm, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable,
            "PYTHONPATH": str(ROOT), "CONFIG": str(config), "STRATEGY": str(layer), "RUN_DIR": str(tmp / "run"),
            "HF_HUB_OFFLINE": "1"}


def leads(checkpoint: dict) -> tuple[int, int]:
    """How far the loop's batch counter and the saved loader position are from the optimizer steps taken."""
    loop = checkpoint["loops"]["fit_loop"]
    (loader,) = loop["state_dict"]["combined_loader"]
    step = checkpoint["global_step"]
    return loop["epoch_loop.batch_progress"]["total"]["completed"] - step, loader["_num_yielded"] - step


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def kill_group(proc: subprocess.Popen) -> None:
    """End the job and every task it started (they share its session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_job(script: list[str], env: dict, timeout: float) -> tuple[int, str]:
    job = subprocess.Popen(script, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        out, _ = job.communicate(timeout=timeout)
    finally:
        kill_group(job)
    return job.returncode, out


def wait_for(predicate, timeout: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (rc={proc.returncode}) before {what}:\n{proc.stdout.read()[-5000:]}")
        if time.monotonic() > deadline:
            kill_group(proc)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def load(path: Path) -> dict:
    """A checkpoint's non-tensor part: the file itself, or the ``meta.pt`` of a sharded folder."""
    return torch.load(path / "meta.pt" if path.is_dir() else path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("strategy", ["single", "fsdp2"])
def test_sigusr1_checkpoints_requeues_and_the_restart_resumes(tmp_path, tiny_quickstart, strategy):
    """single: one task; fsdp2: two tasks (gloo), sharded checkpoints (folders), signal to both tasks."""
    tasks = 2 if strategy == "fsdp2" else 1
    config, layer = write_config(tmp_path, tiny_quickstart, strategy)
    env = env_for(tmp_path, config, layer, tasks)
    run_dir = tmp_path / "run"
    script = ["bash", str(ROOT / "scripts/slurm/train.sbatch")]

    job = subprocess.Popen(script, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "epoch=0-step=10.ckpt").exists(), 150, job, "10 training steps")
        (srun,) = children(job.pid)
        ranks = children(srun)  # the training tasks that srun started
        assert len(ranks) == tasks
        for pid in ranks:
            os.kill(pid, signal.SIGUSR1)
        out, _ = job.communicate(timeout=60)
    finally:
        kill_group(job)
    assert "resume from: nothing" in out, out[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", JOB_ID], out[-3000:]
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert hpc.is_dir() if strategy == "fsdp2" else hpc.is_file(), out[-3000:]
    if strategy == "fsdp2":
        assert len(list(hpc.glob("*.distcp"))) == 2  # one shard per rank
    saved = load(hpc)
    step = saved["global_step"]
    assert step >= 10
    # Saved at a step boundary (SLURMRequeueAtStepEnd): the loop counters and the data position relate to
    # the step exactly as in a periodic checkpoint, so the resumed job neither repeats nor skips a batch.
    periodic = load(run_dir / "checkpoints" / "epoch=0-step=5.ckpt")
    assert leads(saved) == leads(periodic)
    assert (run_dir / "config.yaml").is_file()

    # The requeued job: same script, same job id; it ends a few steps later, on a periodic checkpoint.
    target = (step // 5 + 2) * 5
    rc, log = run_job([*script, "--trainer.max_steps", str(target)], env, timeout=180)
    assert rc == 0, log[-5000:]
    assert f"resume from: {hpc}" in log, log[-3000:]
    assert f"Restoring states from the checkpoint path at {hpc}" in log, log[-3000:]
    final = load(last)
    assert final["global_step"] == target
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", JOB_ID]  # no second requeue
