"""DDP and FSDP2 fits of a tiny decoder on 2 CPU processes (gloo, launched with torchrun).

Every run trains the same tiny CYB model from the same initial weights on the same global batches
(tests/distributed/fit_worker.py), so a 2-process run must reproduce the single-process loss curve.

Tolerances (fp32): per-step losses and gradient norms within rtol = atol = 1e-5 of the single-process
run (observed ~1e-7: only the order of the cross-rank reductions differs); a resumed run reproduces the
uninterrupted one to 1e-6; consolidated weights within 1e-4 of the single-process weights after 8 AdamW
steps. bf16 (FSDP2 MixedPrecisionPolicy: bf16 parameters, fp32 reduction): finite, within 0.05 (absolute,
on losses ≈ 3.6) of fp32 at every step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import fit_worker

ROOT = Path(__file__).resolve().parents[1]
STEPS, CLIP = 8, 0.5  # the clip is active: every step's gradient norm is above 0.5

pytestmark = pytest.mark.slow


def torchrun(args: list[str], tmp: Path, timeout: int = 240) -> dict:
    out = tmp / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.distributed.fit_worker", "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def single(**kw) -> tuple[dict, torch.nn.Module]:
    args = fit_worker.parser().parse_args(["--strategy", "single", "--max-steps", str(STEPS), "--clip", str(CLIP)])
    for k, v in kw.items():
        setattr(args, k, v)
    return fit_worker.run(args, return_model=True)


@pytest.fixture(scope="module")
def reference():
    report, model = single()
    return report, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp2")
    report = torchrun(["--strategy", "fsdp2", "--max-steps", str(STEPS), "--clip", str(CLIP),
                       "--ckpt-dir", str(tmp / "ckpt"), "--ckpt-every", "4"], tmp)
    return report, tmp / "ckpt"


def test_fsdp2_parameters_are_dtensor_shards(fsdp2):
    report, _ = fsdp2
    assert report["strategy"] == "FSDP2Strategy" and report["world_size"] == 2
    for name, p in report["layout"].items():
        assert p["dtensor"], name
        assert p["placements"] == ["S(0)"], (name, p["placements"])
        assert p["local_shape"][0] == (p["shape"][0] + 1) // 2, (name, p)  # each rank holds half of dim 0
        assert p["dtype"] == "torch.float32"  # fp32 master shards


def test_fsdp2_loss_and_clipped_updates_match_single_process(fsdp2, reference):
    report, _ = fsdp2
    ref, _ = reference
    assert len(report["losses"]) == STEPS
    torch.testing.assert_close(report["losses"], ref["losses"], rtol=1e-5, atol=1e-5)
    # Clipping by the global norm of DTensor gradients: the same norms, hence the same clipped updates.
    assert min(ref["grad_norms"]) > CLIP
    torch.testing.assert_close(report["grad_norms"], ref["grad_norms"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(report["lrs"], ref["lrs"], rtol=0, atol=0)  # the same schedule


def test_fsdp2_sharded_checkpoint_resumes_the_same_curve(fsdp2, tmp_path):
    report, ckpt = fsdp2
    assert (ckpt / "step4.ckpt").is_dir() and sorted(p.name for p in (ckpt / "step4.ckpt").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]  # one shard per rank
    assert (ckpt / "last.ckpt" / "meta.pt").is_file()
    resumed = torchrun(["--strategy", "fsdp2", "--max-steps", str(STEPS), "--clip", str(CLIP),
                        "--resume", str(ckpt / "step4.ckpt")], tmp_path)
    assert resumed["first_step"] == 4 and resumed["global_step"] == STEPS
    torch.testing.assert_close(resumed["losses"], report["losses"][4:], rtol=1e-6, atol=1e-6)


def test_consolidated_checkpoint_loads_on_one_cpu_process(fsdp2, reference, tmp_path):
    from cyb_lightning.__main__ import main
    from cyb_lightning.module import CYBModule

    _, ckpt = fsdp2
    out = tmp_path / "model.ckpt"
    main(["consolidate", str(ckpt / "last.ckpt"), "--output", str(out)])
    checkpoint = torch.load(out, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == STEPS and "optimizer_states" not in checkpoint
    model = CYBModule.load_from_checkpoint(out, map_location="cpu", weights_only=False)
    _, ref_state = reference
    state = model.state_dict()
    assert set(state) == set(ref_state)
    for k, v in ref_state.items():
        assert not hasattr(state[k], "to_local"), k  # plain tensors again
        torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-4, msg=k)
    batch = next(iter(torch.utils.data.DataLoader(fit_worker.LayoutRows(4), batch_size=4)))
    with torch.no_grad():
        per_token, _ = model.evaluation_outputs(batch)
        assert torch.isfinite(per_token).all() and per_token.numel() == int(batch["target_mask"].sum())


def test_ddp_loss_matches_single_process(reference, tmp_path):
    ref, _ = reference
    report = torchrun(["--strategy", "ddp", "--max-steps", str(STEPS), "--clip", str(CLIP)], tmp_path)
    assert report["strategy"] == "DDPStrategy"
    assert not any(p["dtensor"] for p in report["layout"].values())
    torch.testing.assert_close(report["losses"], ref["losses"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(report["grad_norms"], ref["grad_norms"], rtol=1e-5, atol=1e-5)


def test_fsdp2_bf16_loss_is_finite_and_close_to_fp32(reference, tmp_path):
    ref, _ = reference
    report = torchrun(["--strategy", "fsdp2", "--precision", "bf16-mixed", "--max-steps", str(STEPS),
                       "--clip", str(CLIP)], tmp_path)
    assert report["mp_policy"]["param_dtype"] == "torch.bfloat16"
    assert report["mp_policy"]["reduce_dtype"] == "torch.float32"
    assert {p["dtype"] for p in report["layout"].values()} == {"torch.float32"}  # fp32 master shards
    losses = torch.tensor(report["losses"])
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses, torch.tensor(ref["losses"]), rtol=0, atol=0.05)
    assert not torch.equal(losses, torch.tensor(ref["losses"]))  # bf16 really was used
