"""Every metric reduced over 2 processes (gloo, uneven token split) equals the single-process value."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cyb_lightning.losses import CYBAP
from cyb_lightning.metrics import CalibrationSpearman, ReadoutAccuracy, StoppingStats, TokenPauseStats, step_statistics

V, DK, W, N = 12, 2, 3, 20
SPLIT = 7  # rank 0 gets 7 tokens, rank 1 gets 13


def _data():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(N, W, V, generator=g) * 2
    targets = torch.randint(3, V, (N,), generator=g)
    inputs = torch.randint(3, 6, (N,), generator=g)  # few distinct tokens, so medians cross ranks
    return logits, targets, inputs


def _results(logits, targets, inputs):
    stats = step_statistics(logits, targets, DK, CYBAP([0, 0, 1]))
    stats.inputs = inputs
    metrics = {"stop": StoppingStats(W), "acc": ReadoutAccuracy(W), "cal": CalibrationSpearman(W),
               "tok": TokenPauseStats(min_count=2)}  # fmt: skip
    for m in metrics.values():
        m.update(stats)
    out = {}
    for name, m in metrics.items():
        value = m.table() if name == "tok" else m.compute()
        value = value if isinstance(value, dict) else {"rho": value}
        out.update({f"{name}/{k}": v.double() for k, v in value.items()})
    return out


def _worker(rank: int, port: int, path: str) -> None:
    torch.set_num_threads(1)  # forked from a process that may have used its thread pool
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        logits, targets, inputs = _data()
        part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, N)
        out = _results(logits[part], targets[part], inputs[part])
        if rank == 0:
            torch.save(out, path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_metrics_reduce_across_two_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "rank0.pt")
    # fork: the children inherit the imported modules (spawn re-imports torchmetrics: tens of seconds here).
    mp.start_processes(_worker, args=(port, path), nprocs=2, join=True, start_method="fork")
    reduced = torch.load(path)
    single = _results(*_data())
    assert set(reduced) == set(single)
    for key, value in single.items():
        torch.testing.assert_close(reduced[key], value, rtol=1e-6, atol=1e-9, msg=key)
    assert single["tok/ids"].numel() >= 2 and single["stop/tokens"] == N
