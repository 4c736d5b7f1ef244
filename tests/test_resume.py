"""Checkpoints a cluster run can always resume from (cyb_lightning/checkpoint.py, resume.py, cli.py).

- saves are atomic whatever ``TMPDIR`` is: a kill when a save would write onto the checkpoint's name, or in
  the middle of the save, leaves the previous checkpoint whole and no temporary file anywhere after the
  next start;
- one resume picker (the sbatch template's and the CLI's) validates candidates, falls back with a
  warning, never takes ``*.consolidated.ckpt`` or an older ``last.ckpt`` over a further step checkpoint;
- the end of ``fit`` is checkpointed when ``max_steps`` is off the checkpoint interval;
- ``--ckpt_path`` says which settings differ from the checkpoint's and which win, or refuses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from cyb_lightning.cli import main as cli_main
from cyb_lightning.resume import NoValidCheckpoint, inspect, pick_checkpoint
from tests.conftest import tiny_cyb_yaml

ROOT = Path(__file__).resolve().parents[1]


def experiment(tmp: Path, tiny_quickstart, run_dir: Path, max_steps: int = 13) -> Path:
    """A tiny CYB-AP fit config, checkpoints every 5 steps into ``run_dir/checkpoints``."""
    config = tmp / "experiment.yaml"
    config.write_text(tiny_cyb_yaml(tiny_quickstart) + f"""  batch_size: 4
trainer:
  accelerator: cpu
  devices: 1
  precision: 32-true
  max_steps: {max_steps}
  limit_val_batches: 0
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  logger: false
  default_root_dir: {run_dir}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {run_dir / "checkpoints"}, save_last: true, every_n_train_steps: 5, save_top_k: -1}}
""")  # fmt: skip
    return config


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def lead(checkpoint: dict) -> tuple[int, int]:
    """Loop batch counter and the saved data position relative to the optimizer steps taken."""
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    step = checkpoint["global_step"]
    (stream,) = checkpoint["CYBDataModule"]["train_streams"]
    return progress["completed"] - step, stream["index"] - 4 * step


@pytest.fixture(scope="module")
def run13(tmp_path_factory, tiny_quickstart):
    """One 13-step fit (checkpoints every 5 steps) through the CLI: (config, run folder)."""
    tmp = tmp_path_factory.mktemp("run13")
    config = experiment(tmp, tiny_quickstart, tmp / "run")
    cli_main(["fit", "--config", str(config)])
    return config, tmp / "run"


# ------------------------------------------------------------------ the end of fit is checkpointed (item 5)


def test_fit_checkpoints_its_last_step_off_the_interval(run13):
    _, run = run13
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "epoch=0-step=10.ckpt", "epoch=0-step=13.ckpt", "epoch=0-step=5.ckpt", "last.ckpt",
    ]  # fmt: skip
    last, final = load(ckpts / "last.ckpt"), load(ckpts / "epoch=0-step=13.ckpt")
    periodic = load(ckpts / "epoch=0-step=5.ckpt")
    assert last["global_step"] == final["global_step"] == 13
    # Saved where periodic checkpoints are: the same loop counters and data position relative to the step.
    assert lead(last) == lead(final) == lead(periodic)
    torch.testing.assert_close(last["state_dict"], final["state_dict"], rtol=0, atol=0)


# ------------------------------------------------------------- --ckpt_path: what differs, what wins (item 2)


def test_resume_names_differing_settings_and_the_checkpoints_values_win(run13):
    config, run = run13
    ckpt = run / "checkpoints" / "last.ckpt"
    args = ["fit", "--config", str(config), "--trainer.max_steps", "13", "--ckpt_path", str(ckpt)]  # nothing to train
    with pytest.warns(UserWarning) as record:
        cli = cli_main([*args, "--model.decoder.init_args.d_model", "64", "--model.loss", "cyb_lightning.losses.CYBDP",
                        "--data.val_documents", "3"])  # fmt: skip
    (message,) = [str(w.message) for w in record if "differ from the checkpoint" in str(w.message)]
    assert f"resuming from {ckpt}: 3 setting(s) differ" in message
    assert "model.decoder.init_args.d_model: given 64, checkpoint 32 -> the checkpoint's" in message
    assert (
        "model.loss.class_path: given 'cyb_lightning.losses.CYBDP', checkpoint 'cyb_lightning.losses.CYBAP' "
        "-> the checkpoint's" in message
    )
    assert "data.val_documents: given 3, checkpoint 1000 -> the given one" in message
    assert cli.model.decoder_spec.d_model == 32 and type(cli.model.loss_fn).__name__ == "CYBAP"
    assert cli.datamodule.val_documents == 3


def test_resume_with_another_number_of_pauses_is_refused_naming_the_checkpoint(run13):
    config, run = run13
    ckpt = run / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError) as err:
        cli_main(["fit", "--config", str(config), "--data.num_pauses", "2", "--model.loss.init_args.omega", "[0, 0, 1]",
                  "--ckpt_path", str(ckpt)])  # fmt: skip
    assert f"cannot resume from {ckpt}: its model was built for other data" in str(err.value)
    assert "data.num_pauses: given 2, checkpoint 3" in str(err.value)
    assert f"--model.init_from {ckpt}" in str(err.value)


# ------------------------------------------------------------------------------- atomic saves (item 1)

SAVE_CHILD = """
import os, signal, sys
from pathlib import Path

tmpdir, target, config, when = Path(os.environ["TMPDIR"]), Path(sys.argv[1]), sys.argv[2], sys.argv[3]
real_rename = os.rename


def rename(src, dst, *a, **k):
    # What os.rename does from a TMPDIR on another filesystem (node-local tmp, shared run folder).
    if Path(src).resolve().is_relative_to(tmpdir.resolve()):
        raise OSError(18, "Invalid cross-device link")
    return real_rename(src, dst, *a, **k)


os.rename = rename
from cyb_lightning.cli import CYBLightningCLI
from cyb_lightning.datamodule import CYBDataModule
from cyb_lightning.module import CYBModule

cli = CYBLightningCLI(CYBModule, CYBDataModule, args=["--config", config], run=False)
strategy = cli.trainer.strategy
armed = False


def hook(event, args):
    # SIGKILL when the armed save writes onto the checkpoint's name itself ("name"), or when it moves its
    # finished temporary file into place ("rename": os.rename and os.replace raise this audit event).
    if not armed:
        return
    if when == "rename" and event == "os.rename":
        os.kill(os.getpid(), signal.SIGKILL)
    if when == "name" and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2] or 0
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or flags & (os.O_WRONLY | os.O_RDWR)
        if writes and Path(os.fsdecode(args[0])).resolve() == target.resolve():
            os.kill(os.getpid(), signal.SIGKILL)


sys.addaudithook(hook)
import torch

def checkpoint(step):
    return {"global_step": step, "loops": {}, "optimizer_states": [{}], "state_dict": {"w": torch.full((1000,), step)}}


strategy.save_checkpoint(checkpoint(1), target)
armed = True
strategy.save_checkpoint(checkpoint(2), target)
print("saved")
"""


@pytest.mark.slow
@pytest.mark.parametrize("when", ["name", "rename"])
def test_a_killed_save_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path, tiny_quickstart, when):
    """name: killed when the save writes onto last.ckpt itself (Lightning's cross-filesystem move is a copy
    there); rename: killed when the finished temporary file is moved into place. Either way last.ckpt is
    whole, TMPDIR stays empty and the next start (the picker) leaves no temporary file."""
    tmpdir = tmp_path / "node_tmp"
    tmpdir.mkdir()
    run = tmp_path / "run"
    target = run / "checkpoints" / "last.ckpt"
    config = experiment(tmp_path, tiny_quickstart, run)
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    child = subprocess.run([sys.executable, "-c", SAVE_CHILD, str(target), str(config), when], env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    if when == "name":  # an atomic save never writes onto the checkpoint's name: it finishes
        assert child.returncode == 0, child.stderr[-3000:]
        assert load(target)["global_step"] == 2
    else:
        assert child.returncode == -9, child.stderr[-3000:]
        assert load(target)["global_step"] == 1
    assert list(tmpdir.iterdir()) == []
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert pick_checkpoint(run) == target
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


# --------------------------------------------------------------------------------- the resume picker (item 1)


def fake_checkpoint(path: Path, step: int, mtime: float, optimizer: bool = True) -> Path:
    ckpt = {"global_step": step, "loops": {}, "state_dict": {"w": torch.full((64,), float(step))}}
    if optimizer:
        ckpt["optimizer_states"] = [{"state": {}}]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    os.utime(path, (mtime, mtime))
    return path


def sharded_checkpoint(folder: Path, step: int, mtime: float) -> Path:
    import torch.distributed.checkpoint as dcp

    dcp.save({"state_dict": {"w": torch.arange(4096.0)}}, checkpoint_id=folder, no_dist=True)
    torch.save({"global_step": step, "loops": {}}, folder / "meta.pt")
    os.utime(folder, (mtime, mtime))
    return folder


def sbatch_choice(tmp: Path, run: Path) -> tuple[str, str]:
    """The --ckpt_path that scripts/slurm/train.sbatch passes (srun replaced by a stub that prints its
    arguments), and the script's stderr."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text('#!/bin/bash\necho "SRUN $*"\n')
    (bin_dir / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable, "RUN_DIR": str(run),
           "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}  # fmt: skip
    out = subprocess.run(["bash", str(ROOT / "scripts/slurm/train.sbatch")], env=env, capture_output=True, text=True,
                         timeout=120, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("SRUN ")]
    args = line.split()
    return (args[args.index("--ckpt_path") + 1] if "--ckpt_path" in args else ""), out.stderr


@pytest.mark.slow
def test_sbatch_resumes_from_the_valid_checkpoint_furthest_on(tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    fake_checkpoint(run / "hpc_ckpt_1.ckpt", 12, 1000)
    step20 = fake_checkpoint(ckpts / "epoch=0-step=20.ckpt", 20, 2000)
    fake_checkpoint(ckpts / "last.ckpt", 15, 3000)  # older in steps, newer on disk
    fake_checkpoint(ckpts / "last.consolidated.ckpt", 20, 4000, optimizer=False)  # consolidate's output
    broken = fake_checkpoint(run / "hpc_ckpt_2.ckpt", 25, 5000)
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])  # a save killed half way
    os.utime(broken, (5000, 5000))
    chosen, stderr = sbatch_choice(tmp_path, run)
    assert chosen == str(step20)
    assert f"skipping {broken}: unreadable" in stderr and f"resuming from {step20} (step 20)" in stderr


def test_picker_validates_sharded_folders_and_refuses_when_nothing_is_valid(tmp_path):
    run = tmp_path / "run"
    ok = sharded_checkpoint(run / "checkpoints" / "epoch=0-step=5.ckpt", 5, 1000)
    last = sharded_checkpoint(run / "checkpoints" / "last.ckpt", 10, 2000)
    (shard,) = last.glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[:100])  # one rank's shard cut short
    assert inspect(ok).step == 5 and inspect(last).step is None
    assert inspect(last).problem.startswith(f"shard {shard.name} is truncated (100 of ")
    with pytest.warns(UserWarning, match=f"skipping {last}: shard .* truncated"):
        assert pick_checkpoint(run) == ok
    (ok / ".metadata").unlink()
    with pytest.raises(NoValidCheckpoint, match="no checkpoint in .* can be resumed from"):
        pick_checkpoint(run)
    assert pick_checkpoint(tmp_path / "fresh") is None


def test_automatic_resume_under_slurm_goes_through_the_picker(run13, tmp_path, monkeypatch):
    """No --ckpt_path under SLURM: Lightning alone would load the newest hpc_ckpt_<n>.ckpt unchecked."""
    config, run = run13
    broken = run / "hpc_ckpt_1.ckpt"
    broken.write_bytes((run / "checkpoints" / "epoch=0-step=10.ckpt").read_bytes()[:5000])
    try:
        monkeypatch.setenv("SLURM_NTASKS", "1")
        monkeypatch.setenv("SLURM_JOB_NAME", "cyb-test")
        with pytest.warns(UserWarning, match=f"skipping {broken}: unreadable"):
            cli = cli_main(["fit", "--config", str(config)])  # max_steps 13 = the checkpoint's: restores only
    finally:
        broken.unlink()
    assert cli.trainer.ckpt_path == str(run / "checkpoints" / "last.ckpt")
    assert cli.trainer.global_step == 13


def test_a_sharded_checkpoint_folder_is_replaced_whole(tmp_path):
    """What FSDP2Strategy.save_checkpoint does once every rank has written ``.<name>.partial/``."""
    from cyb_lightning.checkpoint import partial_path, replace_folder

    run = tmp_path / "run"
    last = sharded_checkpoint(run / "checkpoints" / "last.ckpt", 4, 1000)
    new = sharded_checkpoint(partial_path(last), 6, 2000)
    assert inspect(new).step == 6 and pick_checkpoint(run) == last  # a hidden folder is never a candidate
    new = sharded_checkpoint(partial_path(last), 6, 2000)  # (the picker removed it as a leftover)
    replace_folder(new, last)
    assert inspect(last).step == 6
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no .partial, no .old
