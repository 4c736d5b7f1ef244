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
                 chunk_size=0, threads=1, warmup=0, steps=2)  # fmt: skip
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
