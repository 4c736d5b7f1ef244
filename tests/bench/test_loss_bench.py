"""bench/loss_bench.py measures like against like: every training-step case optimises its loss on the same
model and batch, and the cross-entropy reference is the TBYS loss that our chunked path computes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from tests.conftest import load_script

@pytest.fixture(scope="module")
def bench():
    return load_script("bench/loss_bench.py")


def step_args(method: str, **kw) -> SimpleNamespace:
    sizes = dict(method=method, vocab=97, batch=2, seq_len=6, pauses=3, layers=1, heads=2, model_d=32,
                 chunk_size=5, threads=1, warmup=0, steps=2)  # fmt: skip
    return SimpleNamespace(**{**sizes, **kw})


def test_training_step_cases_share_model_and_batch(bench):
    rows = {m: bench.step_case(step_args(m)) for m in bench.STEP_METHODS}
    # F.cross_entropy on the full logits with the pause steps ignored vs our chunked TBYS loss on the same
    # weights: TBYS renormalises without DK (t = p(y)/(1 − d)), which at initialisation (d ≈ 1/V) lowers
    # the loss by about −log(1 − 1/V); a different model or batch would be off by far more.
    gap = rows["ce"]["first_loss"] - rows["tbys_chunked"]["first_loss"]
    assert 0 < gap < 3 / 97
    # The plain and chunked CYB-AP paths are one objective.
    assert rows["ap_chunked"]["first_loss"] == pytest.approx(rows["ap_plain"]["first_loss"], rel=1e-5)
    # An untrained model: CE near log V; the CYB losses are other objectives of the same logits.
    assert abs(rows["ce"]["first_loss"] - math.log(97)) < 1.0
    assert len({round(rows[m]["first_loss"], 4) for m in ("ce", "ap_chunked", "va_chunked", "dp_chunked")}) == 4
    params = {r["params"] for r in rows.values()}
    assert len(params) == 1 and params.pop() > 97 * 32 * 2  # one untied model for every case
    for r in rows.values():  # (peak memory is only meaningful in the fresh process the benchmark gives each case)
        assert r["n"] == 2 and 0 < r["min"] <= r["median"] <= r["max"]


def test_ratio_rows_are_against_cross_entropy(bench):
    args = SimpleNamespace(vocabs=[32_000])
    rows = [{"vocab": 32_000, "method": "ce", "median": 2.0, "min": 1.5, "max": 2.5, "peak_mib": 400.0},
            {"vocab": 32_000, "method": "ap_chunked", "median": 1.0, "min": 0.9, "max": 1.2, "peak_mib": 100.0}]
    lines = bench.ratio_rows(args, rows)
    assert lines[0] == "| 32k | TBYS cross-entropy (F.cross_entropy, full logits) | plain | 2,000 ms (1,500–2,500) | 1.00 | 400 MiB | 1.00 |"
    assert lines[1] == "| 32k | CYB-AP | chunked | 1,000 ms (900–1,200) | 0.50 | 100 MiB | 0.25 |"


def test_fsdp2_case_runs_the_sharded_step_with_the_single_process_objective(bench, tmp_path):
    """Two gloo ranks under torchrun: the CYB-AP step runs its head inside the sharded decoder's forward, on
    the same initial weights and batch as one process (the first loss agrees), and reports both ranks' memory."""
    import json
    import os
    import subprocess
    import sys

    args = ["--vocab", "97", "--batch", "2", "--seq-len", "6", "--pauses", "3", "--layers", "1", "--heads", "2",
            "--model-d", "32", "--chunk-size", "5", "--threads", "2", "--warmup", "0", "--steps", "2"]  # fmt: skip
    rows = {}
    for method in ("ce", "ap_chunked"):
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "bench/loss_bench.py", "_fsdp2_case", "--method", method, *args],
                             capture_output=True, text=True, timeout=300, cwd=bench.ROOT,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        rows[method] = json.loads(res.stdout.strip().splitlines()[-1])
    single = bench.step_case(step_args("ap_chunked"))
    assert rows["ap_chunked"]["first_loss"] == pytest.approx(single["first_loss"], rel=1e-5)
    assert rows["ce"]["first_loss"] == pytest.approx(bench.step_case(step_args("ce"))["first_loss"], rel=1e-5)
    for r in rows.values():
        assert r["world"] == 2 and len(r["peak_mib_per_rank"]) == 2 and r["peak_mib"] == max(r["peak_mib_per_rank"])
