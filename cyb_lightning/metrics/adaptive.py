"""What the adaptive reader did: the model a user deploys, measured (spec ``docs/method.md`` §5c).

The adaptive reader (``generation.AdaptiveRunner``, teacher-forced) gives each real token exactly the pauses
it asks for — earlier tokens included — and really skips the rest of the compute. :class:`AdaptiveReadout`
accumulates its per-token results (forward steps spent, whether the answer was right, its NLL) over an
evaluation; validation, ``report`` and the experiments all read the reader through it. Sums reduce by
summing across ranks; the per-token samples behind the Spearman correlation are gathered.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics.functional.regression import spearman_corrcoef

from cyb_lightning.metrics.evaluation import _cat, _Sampled


class AdaptiveReadout(_Sampled):
    """Accuracy, perplexity and forward steps of the adaptive reader; per difficulty level when the data
    labels its targets.

    ``update(steps, correct, nll, mask, difficulty=None, calls=0)`` with ``[B, T]`` tensors from a reader's
    trace (``steps`` 1 … W per token), ``mask`` the counted targets, ``calls`` the decoder calls the batch
    made (rows run in lockstep, so it computed ``calls · B`` steps). ``compute`` returns ``accuracy``,
    ``ppl``, ``nll``, ``steps_per_token`` (1 … W), ``p_pauses [W]`` (share of tokens with 0 … K pauses),
    ``batch_steps_per_token``, ``tokens``; and per level ``[max_level + 1]`` (NaN where a level has no
    token) ``level_tokens``, ``level_accuracy``, ``level_steps``, ``level_p_pauses [levels, W]``, plus
    ``spearman``: Spearman ρ between a token's difficulty and the pauses it took (NaN when either is
    constant).
    """

    def __init__(self, steps: int, max_level: int = 15, max_tokens: int | None = 1_000_000, **kwargs) -> None:
        super().__init__(max_tokens, **kwargs)
        self.steps, self.levels = steps, max_level + 1
        for name in ("count", "correct", "nll_sum", "steps_sum", "calls", "positions"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("hist", torch.zeros(steps, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("level_count", "level_correct", "level_steps_sum"):
            self.add_state(name, torch.zeros(self.levels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("level_hist", torch.zeros(self.levels, steps, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sample_level", [], dist_reduce_fx="cat")
        self.add_state("sample_pauses", [], dist_reduce_fx="cat")

    def update(
        self,
        steps: Tensor,
        correct: Tensor,
        nll: Tensor,
        mask: Tensor,
        difficulty: Tensor | None = None,
        calls: int = 0,
    ) -> None:
        mask = mask.bool()
        spent = steps[mask].long()
        self.count += mask.sum().double()
        self.correct += correct[mask].double().sum()
        self.nll_sum += nll[mask].double().sum()
        self.steps_sum += spent.double().sum()
        self.hist += torch.bincount(spent - 1, minlength=self.steps).double()[: self.steps]
        self.calls += float(calls * steps.shape[0])
        self.positions += float(steps.numel())
        if difficulty is None:
            return
        keep = mask & (difficulty >= 0) & (difficulty < self.levels)
        level, taken = difficulty[keep].long(), steps[keep].long()
        self.level_count.index_add_(0, level, torch.ones_like(level, dtype=torch.float64))
        self.level_correct.index_add_(0, level, correct[keep].double())
        self.level_steps_sum.index_add_(0, level, taken.double())
        self.level_hist.index_put_((level, taken - 1), torch.ones_like(level, dtype=torch.float64), accumulate=True)
        room = self._room(level.numel())
        self.sample_level.append(level[:room].double())
        self.sample_pauses.append((taken[:room] - 1).double())

    def compute(self) -> dict[str, Tensor]:
        n = self.count.clamp_min(1)
        level_n = self.level_count[:, None]
        level, pauses = _cat(self.sample_level).double(), _cat(self.sample_pauses).double()
        rho = torch.tensor(float("nan"), dtype=torch.float64)
        if level.numel() > 1 and level.unique().numel() > 1 and pauses.unique().numel() > 1:
            rho = spearman_corrcoef(pauses, level).double()
        return {
            "accuracy": self.correct / n,
            "nll": self.nll_sum / n,
            "ppl": (self.nll_sum / n).exp(),
            "steps_per_token": self.steps_sum / n,
            "p_pauses": self.hist / n,
            "batch_steps_per_token": self.calls / self.positions.clamp_min(1),
            "tokens": self.count,
            "level_tokens": self.level_count,
            "level_accuracy": self.level_correct / self.level_count,
            "level_steps": self.level_steps_sum / self.level_count,
            "level_p_pauses": self.level_hist / level_n,
            "spearman": rho,
        }


def readout_summary(result: dict[str, Tensor]) -> dict:
    """:meth:`AdaptiveReadout.compute` as JSON: the totals, and ``by_difficulty`` {level: {...}} where labelled."""
    out = {
        "ppl": float(result["ppl"]),
        "nll": float(result["nll"]),
        "accuracy": float(result["accuracy"]),
        "steps_per_token": float(result["steps_per_token"]),
        "batch_steps_per_token": float(result["batch_steps_per_token"]),
        "fixed_steps": float(result["p_pauses"].numel()),
        "compute_saved": 1.0 - float(result["steps_per_token"]) / result["p_pauses"].numel(),
        "p_pauses": result["p_pauses"].reshape(-1).tolist(),
        "tokens": int(result["tokens"]),
    }
    levels = torch.nonzero(result["level_tokens"] > 0).flatten().tolist()
    if levels:
        out["by_difficulty"] = {
            level: {
                "tokens": int(result["level_tokens"][level]),
                "accuracy": float(result["level_accuracy"][level]),
                "steps_per_token": float(result["level_steps"][level]),
                "p_pauses": result["level_p_pauses"][level].tolist(),
            }
            for level in levels
        }
        rho = float(result["spearman"])
        out["spearman"] = None if math.isnan(rho) else rho
    return out
