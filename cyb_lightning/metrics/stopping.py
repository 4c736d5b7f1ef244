"""Stopping-time statistics (spec §5): perplexity of the step mixture, latency distribution, DK rate.

``head_statistics`` turns the head's per-step statistics of real tokens into per-token quantities; ``StoppingStats``
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
    readout: Tensor | None = None  # [N] long: 0-based step where the trained rule answers (first d_i < 0.5)
    inputs: Tensor | None = None  # [N] long: the real input token x_t of each group (set by the caller)

    @property
    def extra_pauses(self) -> Tensor:
        """Expected number of extra pauses per token, Σ_i (i − 1) s_i."""
        return self.stop @ torch.arange(self.stop.shape[-1], dtype=self.stop.dtype, device=self.stop.device)


STOP_THRESHOLD = 0.5
"""τ of the trained stopping rule read deterministically: answer at the first step where d_i < τ."""


@torch.no_grad()
def head_statistics(
    lse_rest: Tensor,
    z_y: Tensor,
    z_dk: Tensor,
    best_id: Tensor,
    targets: Tensor,
    loss: PauseLoss,
    vocab_size: int,
    step_mask: Tensor | None = None,
) -> TokenStats:
    """The evaluation quantities of real tokens from the head's per-step statistics ``[N, W]``
    (:class:`~cyb_lightning.losses.head.HeadLoss`: LSE over the non-DK ids, z_y, z_dk, best non-DK id),
    under ``loss``'s DK prior. Training, validation and ``report`` all come through here.

    ``step_mask [N, W]`` (variable pauses): the steps the world granted each token; s is then the
    distribution over those steps only (d forced to 0 at the last granted one), as the loss trains it.
    A loss without DK answers at the last (granted) step, and its ``nll`` is its own per-token loss.
    """
    correct = best_id == targets[:, None]
    if not loss.uses_dk:  # it answers at the last (granted) step
        nll = loss.loss_from_stats(lse_rest, z_y, z_dk, vocab_size, step_mask).float()
        if step_mask is None:
            stop = torch.zeros(correct.shape, device=correct.device)
            stop[:, -1] = 1.0
        else:
            stop = F.last_granted_step(step_mask).float()
        return TokenStats(nll=nll, stop=stop, log_d=None, correct=correct, readout=stop.argmax(-1))
    log_d, log_1md, log_t = F.log_probs_from_stats(lse_rest, z_y, z_dk, loss.dk_bias(vocab_size))
    log_s = F.granted_halting_log_probs(log_d, log_1md, step_mask)
    return TokenStats(
        nll=-torch.logsumexp(log_s + log_t, -1),
        stop=log_s.exp(),
        log_d=log_d,
        log_t=log_t,
        correct=correct,
        readout=stopping_readout(log_d, step_mask),
    )


@torch.no_grad()
def step_statistics(
    logits: Tensor, targets: Tensor, dk_id: int, loss: PauseLoss, step_mask: Tensor | None = None
) -> TokenStats:
    """:func:`head_statistics` of full logits ``[N, W, V]`` (tests and small inputs)."""
    z = logits.float()
    top2 = z.topk(2, dim=-1).indices  # the best non-DK id without copying the vocabulary
    best_id = torch.where(top2[..., 0] == dk_id, top2[..., 1], top2[..., 0])
    return head_statistics(
        *F.step_logit_stats(logits, targets, dk_id), best_id, targets, loss, logits.shape[-1], step_mask
    )


def stopping_readout(log_d: Tensor, step_mask: Tensor | None = None, threshold: float = STOP_THRESHOLD) -> Tensor:
    """``[N, W]`` log d → ``[N]`` 0-based step where the trained rule answers: the first with d_i < τ.

    The losses train s_i = (1 − d_i) Π_{j<i} d_j: at step i the model answers with probability 1 − d_i,
    so with τ = 0.5 it answers where answering is more likely than not (spec §5). The last (granted) step
    always answers (d_W := 0). Not the greedy rule "pause while DK is the argmax over the vocabulary",
    which pauses at d ≈ 0.05 on high-entropy tokens and reads steps the loss never weighted.
    """
    answers = ~F.keeps_pausing(log_d, threshold)
    if step_mask is None:
        answers[:, -1] = True
    else:
        answers = (answers & step_mask.bool()) | F.last_granted_step(step_mask)
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
