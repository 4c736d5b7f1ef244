"""The math of every loss, as pure functions of tensors (spec: ``docs/method.md`` §3–4).

Shapes: ``logits`` is ``[N, W, V]`` (N real tokens, W = 1 + K steps each, V output ids), ``targets`` is
``[N]``. Every function returns the per-token loss ``[N]``; reduction (sum / global token count) is the
caller's job. Everything runs in log space in fp32 (or float64 when given float64), so bf16 logits in
±1e4 stay finite, and no ``log`` is ever taken of a probability that can underflow.

Per step i: d_i = p_i(DK) (with d_W := 0), t_i = p_i(y) / (1 − d_i). Both come straight from
log-sum-exps of the logits, which is exact even when d_i rounds to 1 in probability space:
    log t_i       = z_y − LSE_{v≠DK} z
    log (1 − d_i) = LSE_{v≠DK} z − LSE_v z
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

Weights = Sequence[float] | Tensor


def dk_prior_bias(vocab_size: int, psi_dk: float = 0.9) -> float:
    """The constant added to the DK logit: log(ψ'/ψ) with ψ uniform and ψ' giving ``psi_dk`` to DK.

    ψ'_DK / ψ_DK = psi_dk·V and ψ'_v / ψ_v = (1 − psi_dk)·V / (V − 1) for the rest; only the difference
    of the two matters to a softmax, so the bias is log(psi_dk·(V − 1) / (1 − psi_dk)) (= log 9(V−1) at 0.9).
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2 (DK plus one real id), got {vocab_size}")
    if not 0.0 < psi_dk < 1.0:
        raise ValueError(f"psi_dk must lie strictly between 0 and 1, got {psi_dk}")
    return math.log(psi_dk * (vocab_size - 1) / (1.0 - psi_dk))


def check_weights(w: Weights, name: str, steps: int | None = None, normalise: bool = False) -> Tensor:
    """ω, γ, ρ as a 1-D float64 CPU tensor after checking length, sign and finiteness.

    Checks run on the CPU, so hyperparameters held on the host never cost a device synchronisation;
    every error names the argument and the fix.
    """
    t = torch.as_tensor(w, dtype=torch.float64).detach().cpu().flatten()
    if steps is not None and t.numel() != steps:
        raise ValueError(
            f"{name} has {t.numel()} entries but there are W={steps} steps per token (1 + num_pauses); "
            f"give {name} exactly {steps} values"
        )
    if t.numel() == 0 or not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"{name} must be a non-empty list of finite, non-negative numbers, got {t.tolist()}")
    if normalise:
        if t.sum() <= 0:
            raise ValueError(f"{name} must have positive total mass, got {t.tolist()}")
        t = t / t.sum()
    return t


def check_discount(gamma: Weights, steps: int | None = None) -> Tensor:
    """γ: per-step discounts in [0, 1], not all zero (that would make every loss infinite)."""
    t = check_weights(gamma, "gamma", steps)
    if (t > 1).any():
        raise ValueError(f"gamma is a discount and must lie in [0, 1], got {t.tolist()}")
    if not (t > 0).any():
        raise ValueError(f"gamma must be positive at some step (all zero: infinite loss), got {t.tolist()}")
    return t


def _on(t: Tensor, like: Tensor) -> Tensor:
    return t.to(dtype=like.dtype, device=like.device, non_blocking=True)


def _fp32(x: Tensor) -> Tensor:
    """Losses run in fp32, or in float64 when given float64 (for exact reference checks)."""
    return x if x.dtype == torch.float64 else x.float()


def _safe_log(x: Tensor) -> Tensor:
    """log of a constant non-negative tensor: -inf where it is 0 (no gradient flows into constants)."""
    return torch.where(x > 0, x.clamp_min(torch.finfo(x.dtype).tiny).log(), -math.inf)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate on both sides of −log 2 (Mächler 2012).

    Each branch only sees inputs from its own side (−log 2 stands in for the rest), so the branch that
    ``where`` discards cannot put NaN into the gradient (0 · inf) near x = 0.
    """
    near_zero = x > -math.log(2.0)
    half = torch.full_like(x, -math.log(2.0))
    high = torch.log(-torch.expm1(torch.where(near_zero, x, half)))
    low = torch.log1p(-torch.exp(torch.where(near_zero, half, x)))
    return torch.where(near_zero, high, low)


def step_logit_stats(logits: Tensor, targets: Tensor, dk_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """(LSE over the non-DK ids, target logit z_y, raw DK logit z_dk), each ``[N, W]`` in fp32/fp64.

    These three numbers per step are all any loss here needs from the ``V`` logits (no DK prior yet):
    :mod:`cyb_lightning.losses.head` computes them chunk by chunk from hidden states and the output
    head, the plain path from full logits; both then share the math below.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [N, W, V], got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be [N]={logits.shape[0]}, got shape {tuple(targets.shape)}")
    z = _fp32(logits)
    z_y = z.gather(-1, targets.view(-1, 1, 1).expand(-1, z.shape[1], 1)).squeeze(-1)
    return _lse_rest(z, dk_id), z_y, z[..., dk_id]


def _lse_rest(z: Tensor, dk_id: int) -> Tensor:
    """LSE over every id but DK from the two slices around it: exact (no cancellation when DK dominates)
    and without copying the vocabulary."""
    return torch.logaddexp(torch.logsumexp(z[..., :dk_id], -1), torch.logsumexp(z[..., dk_id + 1 :], -1))


def dk_log_prob(logits: Tensor, dk_id: int, dk_bias: float = 0.0) -> Tensor:
    """log d = log p(DK) ``[...]`` of logits ``[..., V]`` with the DK prior applied (adaptive inference)."""
    z = _fp32(logits)
    z_dk = z[..., dk_id] + dk_bias
    return z_dk - torch.logaddexp(z_dk, _lse_rest(z, dk_id))


def keeps_pausing(log_d: Tensor, threshold: float = 0.5) -> Tensor:
    """The trained stopping rule read deterministically: ask for another step while d ≥ τ, answer once d < τ
    (τ = 0.5: answer as soon as answering is more likely than not; a tie pauses). τ = 1 never pauses, τ = 0
    always does. Every reader of the rule (validation's readout, adaptive inference) decides through this."""
    if threshold >= 1.0:
        return torch.zeros_like(log_d, dtype=torch.bool)
    if threshold <= 0.0:
        return torch.ones_like(log_d, dtype=torch.bool)
    return log_d >= math.log(threshold)


def log_probs_from_stats(
    lse_rest: Tensor, z_y: Tensor, z_dk: Tensor, dk_bias: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """(log d, log(1 − d), log t) ``[N, W]`` from :func:`step_logit_stats`, with the DK prior applied."""
    z_dk = z_dk + dk_bias
    lse_all = torch.logaddexp(lse_rest, z_dk)
    return z_dk - lse_all, lse_rest - lse_all, z_y - lse_rest


def step_log_probs(logits: Tensor, targets: Tensor, dk_id: int, dk_bias: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """(log d, log(1 − d), log t), each ``[N, W]`` in fp32/fp64, with the DK prior applied.

    ``log d`` holds the model's raw DK probability at every step (the last included); the d_W := 0 rule
    is applied by the stopping distribution, never here, so metrics can still read the last step's DK.
    """
    return log_probs_from_stats(*step_logit_stats(logits, targets, dk_id), dk_bias)


def _stopping(log_d: Tensor, log_1md: Tensor, omega: Tensor) -> Tensor:
    """log s_i = log[ω_i + (1 − d_i) Σ_{j>i} ω_j] + Σ_{j<i} log d_j  (CYB Eq. 2), with d_W := 0.

    ``omega`` is normalised, ``[W]`` or ``[N, W]``. Where ω_i or the tail Σ_{j>i} ω_j is 0 the sum has one term; taking the
    other branch of a logaddexp(−inf, −inf) would put NaN into the gradient, so only finite values ever
    reach logaddexp.
    """
    W = omega.shape[-1]  # ω is [W], or [N, W] per token (granted steps)
    tail = omega.flip(-1).cumsum(-1).flip(-1) - omega  # Σ_{j>i} ω_j, exactly 0 at i = W
    tail = torch.where(torch.arange(W, device=omega.device) == W - 1, 0.0, tail)
    log_w, log_tail = _safe_log(omega), _safe_log(tail)
    w_pos, tail_pos = omega > 0, tail > 0
    stop_by_model = log_1md + torch.where(tail_pos, log_tail, 0.0)
    both = torch.logaddexp(torch.where(w_pos, log_w, 0.0).expand_as(stop_by_model), stop_by_model)
    head = torch.where(tail_pos, torch.where(w_pos, both, stop_by_model), log_w.expand_as(stop_by_model))
    # Π_{j<i} d_j: an exclusive cumulative sum of log d (the last step's d never enters it).
    survive = torch.nn.functional.pad(torch.cumsum(log_d[..., :-1], dim=-1), (1, 0))
    return head + survive


def stopping_log_probs(log_d: Tensor, omega: Weights) -> Tensor:
    """log s for ``log_d`` of shape ``[..., W]`` (the last step treated as d_W = 0) and weights ω ``[W]``.

    ω is normalised here. With ω = (0, …, 0, 1) this is the plain halting distribution
    s_i = (1 − d_i) Π_{j<i} d_j, s_W = Π_{j<W} d_j.
    """
    omega_t = _on(check_weights(omega, "omega", log_d.shape[-1], normalise=True), log_d)
    # Where d rounds to 1 (log d = 0) the value 1 − d is lost: take the smallest normal number for it, with
    # the gradient passed straight through, so s = (1 − d)·… keeps its finite gradient −d·… instead of
    # 0 · inf = NaN. (The losses never need this: they get log(1 − d) exactly from the logits.)
    ceiling = -torch.finfo(log_d.dtype).tiny
    log_d_below_1 = log_d + (log_d.clamp_max(ceiling) - log_d).detach()
    # The last step's d never enters s; keep it away from log1mexp, whose gradient is infinite at d = 1.
    last = torch.arange(log_d.shape[-1], device=log_d.device) == log_d.shape[-1] - 1
    log_1md = _log1mexp(torch.where(last, -1.0, log_d_below_1))
    return _stopping(log_d, log_1md, omega_t)


def halting_log_probs(log_d: Tensor, log_1md: Tensor) -> Tensor:
    """The model's own halting distribution (ω = last step) from exact log d and log(1 − d) ``[..., W]``.

    Metrics use this with the outputs of :func:`step_log_probs`; it avoids re-deriving log(1 − d) from d.
    """
    return _stopping(log_d, log_1md, _last_only(log_d.shape[-1], log_d))


def _last_only(steps: int, like: Tensor) -> Tensor:
    return torch.nn.functional.one_hot(torch.tensor(steps - 1), steps).to(like)


def cyb_loss(
    logits: Tensor,
    targets: Tensor,
    dk_id: int,
    omega: Weights,
    gamma: Weights,
    dk_bias: float = 0.0,
) -> Tensor:
    """ℓ_CYB = −log Σ_i s_i γ_i t_i per token (CYB Eq. 3); CYB-AP is this with its ω and γ."""
    return cyb_loss_from(step_log_probs(logits, targets, dk_id, dk_bias), omega, gamma)


def cyb_loss_from(
    steps: tuple[Tensor, Tensor, Tensor], omega: Weights, gamma: Weights, step_mask: Tensor | None = None
) -> Tensor:
    """:func:`cyb_loss` from ``steps`` = (log d, log(1 − d), log t) ``[N, W]``; ``step_mask``: see
    :func:`granted_weights` (ω truncated at each token's granted steps, γ unchanged)."""
    log_d, log_1md, log_t = steps
    W = log_d.shape[-1]
    omega_t = _granted(_on(check_weights(omega, "omega", W, normalise=True), log_d), step_mask)
    log_gamma = _on(_safe_log(check_discount(gamma, W)), log_d)
    log_s = _stopping(log_d, log_1md, omega_t)
    return -torch.logsumexp(log_s + log_gamma + log_t, dim=-1)


def granted_weights(weights: Tensor, step_mask: Tensor) -> Tensor:
    """A distribution over steps ``[W]`` (ω, ρ) for tokens granted only their first g steps (``step_mask
    [N, W]``, a prefix: variable pauses, pauses only before answers) → ``[N, W]``: w_i for i < g, the tail
    Σ_{j≥g} w_j at g, 0 after. The world that would have granted more steps grants g: with every step
    granted it is ``weights`` itself, and ω = (0, …, 0, 1) becomes the one-hot at g, so s_g = Π_{j<g} d_j
    (d forced to 0 at the last granted step) and the steps after g do not exist.
    """
    mask = step_mask.bool()
    w = weights.expand(mask.shape)
    tail = w.flip(-1).cumsum(-1).flip(-1)  # Σ_{j≥i} w_j
    return torch.where(last_granted_step(mask), tail, torch.where(mask, w, 0.0))


def _granted(weights: Tensor, step_mask: Tensor | None) -> Tensor:
    return weights if step_mask is None else granted_weights(weights, step_mask.to(weights.device))


def _finite(log_s: Tensor) -> Tensor:
    """log s with −inf (s exactly 0, from −inf logits) raised to the lowest float, so 0·log 0 terms are 0."""
    return log_s.clamp_min(torch.finfo(log_s.dtype).min)


def cyb_va_loss(logits: Tensor, targets: Tensor, dk_id: int, rho: Weights, dk_bias: float = 0.0) -> Tensor:
    """ℓ_VA = −Σ_i s_i log t_i + KL(s ‖ ρ) with ω = (0, …, 0, 1), γ = 1 (an ELBO; optimum s ∝ ρ t).

    KL(s ‖ ρ) is infinite where ρ_i = 0 and s_i > 0, so ρ must be strictly positive here.
    """
    return cyb_va_loss_from(step_log_probs(logits, targets, dk_id, dk_bias), rho)


def cyb_va_loss_from(steps: tuple[Tensor, Tensor, Tensor], rho: Weights, step_mask: Tensor | None = None) -> Tensor:
    """:func:`cyb_va_loss` from ``steps`` = (log d, log(1 − d), log t) ``[N, W]``; ``step_mask``: see
    :func:`granted_weights` (s and ρ over each token's granted steps)."""
    log_d, log_1md, log_t = steps
    W = log_d.shape[-1]
    rho_t = check_weights(rho, "rho", W, normalise=True)
    if (rho_t <= 0).any():
        raise ValueError(
            f"CYB-VA needs a strictly positive prior rho (KL(s||rho) is infinite where rho is 0), got "
            f"{rho_t.tolist()}; give every step some mass, or use CYB-DP, whose KL(rho||s) allows zeros"
        )
    rho_g = _granted(_on(rho_t, log_d), step_mask)
    log_s = _finite(_stopping(log_d, log_1md, _granted(_last_only(W, log_d), step_mask)))
    log_rho = torch.where(rho_g > 0, rho_g.clamp_min(torch.finfo(rho_g.dtype).tiny).log(), 0.0)  # s = 0 there
    return (log_s.exp() * (log_s - log_rho - log_t)).sum(-1)


def cyb_dp_loss(
    logits: Tensor, targets: Tensor, dk_id: int, rho: Weights, alpha: float, dk_bias: float = 0.0
) -> Tensor:
    """ℓ_DP = ℓ_CYB(ω = (0, …, 0, 1), γ = 1) + α · KL(ρ ‖ s); the reverse KL lets ρ contain zeros."""
    return cyb_dp_loss_from(step_log_probs(logits, targets, dk_id, dk_bias), rho, alpha)


def cyb_dp_loss_from(
    steps: tuple[Tensor, Tensor, Tensor], rho: Weights, alpha: float, step_mask: Tensor | None = None
) -> Tensor:
    """:func:`cyb_dp_loss` from ``steps`` = (log d, log(1 − d), log t) ``[N, W]``; ``step_mask``: see
    :func:`granted_weights` (s and ρ over each token's granted steps)."""
    if alpha < 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite non-negative weight, got {alpha}")
    log_d, log_1md, log_t = steps
    W = log_d.shape[-1]
    rho_t = _granted(_on(check_weights(rho, "rho", W, normalise=True), log_d), step_mask)
    log_s = _stopping(log_d, log_1md, _granted(_last_only(W, log_d), step_mask))
    base = -torch.logsumexp(log_s + log_t, dim=-1)
    # Σ_i ρ_i (log ρ_i − log s_i) over the support of ρ only (ρ is a constant, so masking is safe).
    kl = (torch.special.xlogy(rho_t, rho_t) - rho_t * _finite(log_s)).sum(-1)
    return base + alpha * kl


def tbys_loss(logits: Tensor, targets: Tensor, dk_id: int | None = None) -> Tensor:
    """Cross-entropy at the last step, −log p_W(y); with ``dk_id`` the DK id is excluded (renormalised).

    With W = 1 and no ``dk_id`` this is the ordinary next-token cross-entropy of the no-pause baseline
    and of TBYS random-pause pretraining.
    """
    if dk_id is not None:
        return -step_log_probs(logits[:, -1:], targets, dk_id)[2][:, 0]
    if logits.dim() != 3:
        raise ValueError(f"logits must be [N, W, V], got shape {tuple(logits.shape)}")
    return torch.nn.functional.cross_entropy(_fp32(logits[:, -1]), targets, reduction="none")


def last_granted_step(step_mask: Tensor) -> Tensor:
    """Bool ``[N, W]``: the last granted step of each token (``step_mask`` marks a prefix of the steps)."""
    mask = step_mask.bool()
    return mask & ~torch.nn.functional.pad(mask[:, 1:], (0, 1), value=False)


def granted_halting_log_probs(log_d: Tensor, log_1md: Tensor, step_mask: Tensor | None) -> Tensor:
    """log s ``[N, W]`` when token n may use only its granted steps (``step_mask``, a prefix; None: all W).

    d is forced to 0 at the last granted step g: s_i = (1 − d_i) Π_{j<i} d_j for i < g, s_g = Π_{j<g} d_j,
    and s_i = 0 (log −inf) for the steps after g, which the world never granted.
    """
    return _stopping(log_d, log_1md, _granted(_last_only(log_d.shape[-1], log_d), step_mask))


def last_granted_log_t(log_t: Tensor, step_mask: Tensor | None) -> Tensor:
    """log t ``[N]`` at each token's last granted step (the last step when ``step_mask`` is None)."""
    if step_mask is None:
        return log_t[:, -1]
    return log_t.gather(-1, (step_mask.bool().sum(-1, keepdim=True) - 1).to(log_t.device)).squeeze(-1)
