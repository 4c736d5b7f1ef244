"""Calibration, readout accuracy and per-token pause statistics (spec ``docs/method.md`` §5).

Each is a torchmetrics ``Metric`` fed with :class:`~cyb_lightning.metrics.stopping.TokenStats`, so the
global value is exact across ranks: sums are summed, and the per-token samples that Spearman
correlation and medians need are gathered (``dist_reduce_fx="cat"``, uneven sizes allowed).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.regression import spearman_corrcoef

from cyb_lightning.metrics.stopping import TokenStats


class _Sampled(Metric):
    """Keeps at most ``max_tokens`` samples per rank (the first ones: an unbiased sample of the tokens)."""

    full_state_update = False

    def __init__(self, max_tokens: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be positive or None (keep all), got {max_tokens}")
        self.max_tokens = max_tokens
        self._kept = 0

    def _room(self, n: int) -> int:
        room = n if self.max_tokens is None else max(0, min(n, self.max_tokens - self._kept))
        self._kept += room
        return room

    def reset(self) -> None:
        super().reset()
        self._kept = 0


class CalibrationSpearman(_Sampled):
    """Spearman ρ between d_i and the gain t_{i+1} − t_i, for each step i = 1 … W − 1 (CYB Fig. 9).

    Positive ρ: the model asks for another step where another step helps. ``compute`` returns ``[W − 1]``
    (NaN where a step has constant d or gain).
    """

    def __init__(self, steps: int, max_tokens: int | None = 1_000_000, **kwargs) -> None:
        super().__init__(max_tokens, **kwargs)
        if steps < 2:
            raise ValueError(f"calibration needs at least 2 steps per token, got W={steps}")
        self.steps = steps
        self.add_state("d", [], dist_reduce_fx="cat")
        self.add_state("gain", [], dist_reduce_fx="cat")

    def update(self, stats: TokenStats) -> None:
        if stats.log_d is None or stats.log_t is None:
            raise ValueError("calibration needs a loss with DK outputs (TokenStats.log_d and log_t)")
        room = self._room(stats.log_d.shape[0])
        d = stats.log_d[:room, :-1].double().exp()
        t = stats.log_t[:room].double().exp()
        self.d.append(d)
        self.gain.append(t[:, 1:] - t[:, :-1])

    def compute(self) -> Tensor:
        d, gain = _cat(self.d), _cat(self.gain)
        if d.shape[0] < 2:
            return torch.full((self.steps - 1,), float("nan"), dtype=torch.float64, device=self.device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*constant.*")  # a constant column gives NaN: fine
            rho = spearman_corrcoef(d.reshape(-1, self.steps - 1), gain.reshape(-1, self.steps - 1))
        return rho.reshape(-1).double()


def _cat(x: list[Tensor] | Tensor) -> Tensor:
    if isinstance(x, Tensor):
        return x
    return torch.cat(x) if x else torch.zeros(0)


class ReadoutAccuracy(Metric):
    """Next-token accuracy of the trained stopping rule, and at every step.

    ``compute``: ``accuracy`` (argmax over non-DK ids at the readout step, the first with d_i < 0.5, is the
    target), ``sampled_accuracy`` (Σ_i s_i · correct_i: a reader that stops with probability 1 − d_i, as the
    loss trains), ``per_step`` ``[W]``, and ``readout_steps``: the mean number of forward steps the trained
    rule spends per token (1 … W).
    """

    full_state_update = False

    def __init__(self, steps: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps = steps
        self.add_state("correct", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sampled_correct", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("step_correct", torch.zeros(steps, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("readout_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, stats: TokenStats) -> None:
        if stats.correct is None or stats.readout is None:
            raise ValueError("TokenStats without correct/readout: build them with metrics.step_statistics")
        self.correct += stats.correct.gather(1, stats.readout.long()[:, None]).double().sum()
        self.sampled_correct += (stats.stop.double() * stats.correct.double()).sum()
        self.step_correct += stats.correct.double().sum(0)
        self.readout_sum += (stats.readout.double() + 1).sum()
        self.count += stats.correct.shape[0]

    def compute(self) -> dict[str, Tensor]:
        n = self.count.clamp_min(1)
        return {
            "accuracy": self.correct / n,
            "sampled_accuracy": self.sampled_correct / n,
            "per_step": self.step_correct / n,
            "readout_steps": self.readout_sum / n,
        }


class TokenPauseStats(_Sampled):
    """Per vocabulary item: count, median and variance of the expected extra pauses Σ_i (i − 1) s_i.

    Tokens are the real *input* tokens x_t (the pauses come right after them). ``compute`` returns the
    items seen at least ``min_count`` times, most frequent first: ``ids``, ``count``, ``median``,
    ``variance`` (population variance), ``mean``.
    """

    def __init__(self, min_count: int = 5, max_tokens: int | None = 4_000_000, **kwargs) -> None:
        super().__init__(max_tokens, **kwargs)
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        self.min_count = min_count
        self.add_state("ids", [], dist_reduce_fx="cat")
        self.add_state("pauses", [], dist_reduce_fx="cat")

    def update(self, stats: TokenStats) -> None:
        if stats.inputs is None:
            raise ValueError("TokenPauseStats needs TokenStats.inputs (the real input token of each group)")
        room = self._room(stats.inputs.numel())
        self.ids.append(stats.inputs[:room].long())
        self.pauses.append(stats.extra_pauses[:room].double())

    def compute(self) -> dict[str, Tensor]:
        ids, pauses = _cat(self.ids).long().cpu(), _cat(self.pauses).double().cpu()
        return token_table(ids, pauses, self.min_count)

    def table(self) -> dict[str, Tensor]:
        """``compute()`` with every column 1-D (torchmetrics squeezes one-row results to scalars)."""
        return {k: v.reshape(-1) for k, v in self.compute().items()}


def token_table(ids: Tensor, values: Tensor, min_count: int) -> dict[str, Tensor]:
    """Group ``values`` by ``ids``: count, median (lower median, as ``torch.median``), variance, mean."""
    out: dict[str, list] = {"ids": [], "count": [], "median": [], "variance": [], "mean": []}
    if ids.numel():
        order = torch.argsort(ids, stable=True)
        ids, values = ids[order], values[order]
        uniq, counts = torch.unique_consecutive(ids, return_counts=True)
        for tok, group in zip(uniq.tolist(), torch.split(values, counts.tolist())):
            if group.numel() >= min_count:
                out["ids"].append(tok)
                out["count"].append(group.numel())
                out["median"].append(group.median().item())
                out["variance"].append(group.var(unbiased=False).item())
                out["mean"].append(group.mean().item())
    table = {
        "ids": torch.tensor(out["ids"], dtype=torch.long),
        "count": torch.tensor(out["count"], dtype=torch.long),
        **{k: torch.tensor(out[k], dtype=torch.float64) for k in ("median", "variance", "mean")},
    }
    order = torch.argsort(-table["count"], stable=True)
    return {k: v[order] for k, v in table.items()}


class DifficultyStats(_Sampled):
    """Per difficulty level of the targets (the synthetic tasks label each one): how well and how long.

    ``update(stats, difficulty)`` with ``difficulty [N]`` long (levels 0 … ``max_level``; negative ones are
    skipped). ``compute`` returns, per level ``[max_level + 1]`` (NaN where a level has no token):
    ``tokens``; ``accuracy`` of the trained rule's readout (first d_i < 0.5), ``sampled_accuracy``
    (Σ_i s_i · correct_i), ``first_step_accuracy`` (no pause) and ``last_step_accuracy`` (fixed K);
    ``extra_pauses`` (expected, Σ_i (i − 1) s_i); ``readout_steps`` (forward steps of the trained rule);
    ``p_stop`` ``[levels, W]``; and ``spearman``: Spearman ρ between a token's difficulty and its expected
    pauses over the sampled tokens (NaN when either is constant).
    """

    def __init__(self, steps: int, max_level: int = 15, max_tokens: int | None = 1_000_000, **kwargs) -> None:
        super().__init__(max_tokens, **kwargs)
        self.steps, self.levels = steps, max_level + 1
        for name in ("count", "correct", "sampled_correct", "first_correct", "last_correct", "pauses", "readout"):
            self.add_state(name, torch.zeros(self.levels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("stop_sum", torch.zeros(self.levels, steps, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sample_level", [], dist_reduce_fx="cat")
        self.add_state("sample_pauses", [], dist_reduce_fx="cat")

    def update(self, stats: TokenStats, difficulty: Tensor) -> None:
        keep = (difficulty >= 0) & (difficulty < self.levels)
        level = difficulty[keep].long()
        correct = stats.correct[keep].double()
        stop = stats.stop[keep].double()
        pauses = stats.extra_pauses[keep].double()
        readout = stats.readout[keep].long()

        def add(state: Tensor, values: Tensor) -> None:
            state.index_add_(0, level, values)

        add(self.count, torch.ones_like(pauses))
        add(self.correct, correct.gather(1, readout[:, None]).squeeze(1))
        add(self.sampled_correct, (stop * correct).sum(1))
        add(self.first_correct, correct[:, 0])
        add(self.last_correct, correct[:, -1])
        add(self.pauses, pauses)
        add(self.readout, readout.double() + 1)
        self.stop_sum.index_add_(0, level, stop)
        room = self._room(level.numel())
        self.sample_level.append(level[:room].double())
        self.sample_pauses.append(pauses[:room])

    def compute(self) -> dict[str, Tensor]:
        n = self.count
        per = {
            name: getattr(self, state) / n
            for name, state in (
                ("accuracy", "correct"),
                ("sampled_accuracy", "sampled_correct"),
                ("first_step_accuracy", "first_correct"),
                ("last_step_accuracy", "last_correct"),
                ("extra_pauses", "pauses"),
                ("readout_steps", "readout"),
            )
        }
        level, pauses = _cat(self.sample_level).double(), _cat(self.sample_pauses).double()
        rho = torch.tensor(float("nan"), dtype=torch.float64)
        if level.numel() > 1 and level.unique().numel() > 1 and pauses.unique().numel() > 1:
            rho = spearman_corrcoef(pauses, level).double()
        return {"tokens": n, **per, "p_stop": self.stop_sum / n[:, None], "spearman": rho}
