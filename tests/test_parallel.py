"""cyb_lightning.parallel: activation checkpointing, the precision policy, clipping; FSDP2 on 2 gloo processes."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cyb_lightning.model import GPTConfig
from cyb_lightning.parallel import (
    FSDP2Strategy,
    apply_activation_checkpointing,
    clip_grad_norm_,
    mixed_precision_policy,
    parallelize,
)

ROOT = Path(__file__).resolve().parents[1]


def tiny():
    torch.manual_seed(0)
    spec = GPTConfig(n_layer=2, n_head=2, d_model=32, max_position=64)
    return spec, spec.build(50)


def test_mixed_precision_policy_follows_the_trainer_precision():
    for precision in ("bf16-mixed", "bf16-true"):
        policy = mixed_precision_policy(precision)
        assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert mixed_precision_policy("32-true") is None and mixed_precision_policy(None) is None
    with pytest.raises(ValueError, match="bf16"):
        mixed_precision_policy("16-mixed")


def test_activation_checkpointing_keeps_outputs_gradients_and_state_dict_keys():
    spec, model = tiny()
    wrapped = copy.deepcopy(model)
    assert apply_activation_checkpointing(wrapped, spec.block_types()) == 2
    assert sorted(wrapped.state_dict()) == sorted(model.state_dict())  # checkpoints stay interchangeable
    ids = torch.randint(0, 50, (2, 12))
    for m in (model, wrapped):
        m(ids).logsumexp(-1).mean().backward()
    for (name, p), q in zip(model.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    # Without a device mesh, parallelize only checkpoints (DDP / single device).
    again = copy.deepcopy(model)
    assert parallelize(again, spec.block_types(), activation_checkpointing=True) is again
    assert not any(hasattr(p, "to_local") for p in again.parameters())


def test_clip_grad_norm_matches_torch_on_plain_tensors():
    _, a = tiny()
    b = copy.deepcopy(a)
    ids = torch.randint(0, 50, (2, 12))
    for m in (a, b):
        m(ids).pow(2).mean().backward()
    ref = torch.nn.utils.clip_grad_norm_(a.parameters(), 0.01)
    norm = clip_grad_norm_(b.parameters(), 0.01)
    torch.testing.assert_close(norm, ref)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q.grad, p.grad)


def test_fsdp2_strategy_shards_over_every_rank():
    s = FSDP2Strategy()
    assert s._data_parallel_size == "auto" and s._tensor_parallel_size == 1


def _torchrun(tmp_path, mode: str) -> dict:
    out = tmp_path / f"{mode}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.distributed.parallel_worker", str(out), mode, "0.05"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "ac"])
def test_fsdp2_clipping_gives_the_single_process_update(tmp_path, mode):
    """Global norm and clipped gradients of the sharded model = those of one process (1e-6), and AdamW on the
    sharded parameters and state makes the same weights of them."""
    r = _torchrun(tmp_path, mode)
    assert r["sharded"] and r["keys_equal"]
    assert r["ref_norm"] > 0.05  # clipping is active
    assert r["norm"] == pytest.approx(r["ref_norm"], rel=1e-6)
    assert r["grad_err"] < 1e-6 and r["weight_err"] < 1e-6
