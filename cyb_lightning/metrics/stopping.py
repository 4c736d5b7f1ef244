"""Stopping-time statistics (spec §5): perplexity of the step mixture, latency distribution, DK rate.

``step_statistics`` turns the logits of real tokens into per-token quantities; ``StoppingStats``
accumulates token-weighted sums of them, which torchmetrics sums across ranks, so the global value is
exact whatever the split of tokens between ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics import Metric

from cyb_lightning.losses import PauseLoss
from cyb_lightning.losses import functional as F


@dataclass
class TokenStats:
    """Per-token quantities, each detached. ``log_d`` is None for losses without DK."""

    nll: Tensor  # [N]: −log Σ_i s_i t_i (γ = 1) for DK losses, the loss's own CE otherwise
    stop: Tensor  # [N, W]: s, the probability of answering at step i
    log_d: Tensor | None  # [N, W]: log p_i(DK), prior included
    log_t: Tensor | None = None  # [N, W]: log t_i = log p_i(y | not DK)
    correct: Tensor | None = None  # [N, W] bool: argmax over the non-DK ids is the target, per step
    readout: Tensor | None = None  # [N] long: 0-based step where a greedy reader answers (first non-DK argmax)
    inputs: Tensor | None = None  # [N] long: the real input token x_t of each group (set by the caller)

    @property
    def extra_pauses(self) -> Tensor:
        """Expected number of extra pauses per token, Σ_i (i − 1) s_i."""
        return self.stop @ torch.arange(self.stop.shape[-1], dtype=self.stop.dtype, device=self.stop.device)


@torch.no_grad()
def step_statistics(logits: Tensor, targets: Tensor, dk_id: int, loss: PauseLoss) -> TokenStats:
    """``logits [N, W, V]`` of real tokens → their evaluation quantities under ``loss``'s DK prior."""
    steps = logits.shape[1]
    z = logits.float()
    top2 = z.topk(2, dim=-1).indices  # the best non-DK id without copying the vocabulary
    pred = torch.where(top2[..., 0] == dk_id, top2[..., 1], top2[..., 0])
    correct = pred == targets[:, None]
    if not loss.uses_dk:
        stop = torch.zeros(logits.shape[:2], device=logits.device)
        stop[:, -1] = 1.0
        readout = torch.full_like(targets, steps - 1)
        return TokenStats(nll=loss(logits, targets, dk_id).float(), stop=stop, log_d=None, correct=correct,
                          readout=readout)  # fmt: skip
    bias = loss.dk_bias(logits.shape[-1])
    log_d, log_1md, log_t = F.step_log_probs(logits, targets, dk_id, bias)
    log_s = F.halting_log_probs(log_d, log_1md)
    return TokenStats(nll=-torch.logsumexp(log_s + log_t, -1), stop=log_s.exp(), log_d=log_d, log_t=log_t,
                      correct=correct, readout=greedy_readout(z, dk_id, bias))  # fmt: skip


def greedy_readout(logits: Tensor, dk_id: int, dk_bias: float) -> Tensor:
    """``[N, W]`` logits → ``[N]`` 0-based step of the first output whose argmax is not DK (W − 1 if none).

    This is where the greedy-on-DK policy of adaptive generation answers (d_W := 0 caps it at W − 1).
    """
    z = logits.float()
    top2 = z.topk(2, dim=-1)
    others = torch.where(top2.indices[..., 0] == dk_id, top2.values[..., 1], top2.values[..., 0])
    answers = z[..., dk_id] + dk_bias <= others
    answers[:, -1] = True
    return answers.int().argmax(-1)


class StoppingStats(Metric):
    """Token-weighted means over an evaluation (or logging window): ppl, P(stop at step i), DK rate."""

    full_state_update = False

    def __init__(self, steps: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps = steps
        self.add_state("nll_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("stop_sum", torch.zeros(steps, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("dk_sum", torch.zeros(steps, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, stats: TokenStats) -> None:
        self.nll_sum += stats.nll.double().sum()
        self.stop_sum += stats.stop.double().sum(0)
        if stats.log_d is not None:
            self.dk_sum += stats.log_d.double().exp().sum(0)
        self.count += stats.nll.numel()

    def compute(self) -> dict[str, Tensor]:
        n = self.count.clamp_min(1)
        p_stop = self.stop_sum / n
        return {
            "ppl": (self.nll_sum / n).exp(),
            "nll": self.nll_sum / n,
            "p_stop": p_stop,
            "dk_rate": self.dk_sum / n,
            "extra_pauses": p_stop @ torch.arange(self.steps, dtype=p_stop.dtype, device=p_stop.device),
            "tokens": self.count,
        }
