"""An independent float64 reference for the losses of ``cyb_lightning.losses.functional``.

Nothing here imports the package. Everything is plain Python floats in probability space, and the
stopping distribution is obtained by *walking the decision process* rather than from CYB's closed form
(Eq. 2): the world grants j steps with probability ω_j; at every step i < j the model answers (stops) with
probability 1 − d_i and otherwise says DK and goes on; at step j it must answer. P(S = i) accumulates the
probability of answering at step i over every grant. The last step's d never enters (a grant of j ≤ W
forces the answer at j), which is the d_W := 0 rule without writing it down.

Only meant for small, moderate inputs (probabilities that do not underflow in float64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _rows(x) -> list:
    """A torch tensor / nested sequence as nested Python floats (no torch arithmetic is used)."""
    return x.tolist() if hasattr(x, "tolist") else [list(r) for r in x]


def softmax(row: Sequence[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    total = sum(e)
    return [v / total for v in e]


def prior_bias(vocab_size: int, psi_dk: float) -> float:
    """log(ψ'_DK/ψ_DK) − log(ψ'_v/ψ_v): ψ uniform over V ids, ψ' = psi_dk on DK and the rest spread evenly."""
    psi = 1.0 / vocab_size
    psi_prime_dk = psi_dk
    psi_prime_v = (1.0 - psi_dk) / (vocab_size - 1)
    return math.log(psi_prime_dk / psi) - math.log(psi_prime_v / psi)


def step_probs(logits, targets, dk_id: int, dk_bias: float = 0.0) -> tuple[list[list[float]], list[list[float]]]:
    """(d, t) as ``[N][W]`` lists: d_i = p_i(DK), t_i = p_i(y) / (1 − d_i), DK logit shifted by ``dk_bias``."""
    z_all, ys = _rows(logits), _rows(targets)
    d_all, t_all = [], []
    for z_tok, y in zip(z_all, ys):
        d_tok, t_tok = [], []
        for z in z_tok:
            z = list(z)
            z[dk_id] += dk_bias
            p = softmax(z)
            d_tok.append(p[dk_id])
            t_tok.append(p[y] / (1.0 - p[dk_id]))
        d_all.append(d_tok)
        t_all.append(t_tok)
    return d_all, t_all


def normalise(w: Sequence[float]) -> list[float]:
    w = [float(v) for v in w]
    total = sum(w)
    return [v / total for v in w]


def truncated(w: Sequence[float], granted: int | None) -> list[float]:
    """The distribution of min(J, g) for J ~ w: a world that would grant more than the g steps a token was
    granted (variable pauses, pauses only before answers) grants g."""
    w = normalise(w)
    if granted is None:
        return w
    return [w[i] if i < granted - 1 else (sum(w[granted - 1 :]) if i == granted - 1 else 0.0) for i in range(len(w))]


def stopping(d: Sequence[float], omega: Sequence[float], granted: int | None = None) -> list[float]:
    """P(S = i) for one token by simulating every world grant j ~ ω (ω need not be normalised), each grant
    capped at the ``granted`` steps the token has (None: all W)."""
    steps = len(d)
    omega = truncated(omega, granted)
    s = [0.0] * steps
    for j in range(1, steps + 1):  # the world grants exactly j steps
        w = omega[j - 1]
        if w == 0.0:
            continue
        alive = 1.0  # probability the model is still saying DK when step i starts
        for i in range(1, j + 1):
            if i == j:
                s[i - 1] += w * alive  # out of steps: forced to answer
            else:
                s[i - 1] += w * alive * (1.0 - d[i - 1])  # answers of its own accord
                alive *= d[i - 1]
    return s


def last_only(steps: int) -> list[float]:
    return [0.0] * (steps - 1) + [1.0]


def kl(p: Sequence[float], q: Sequence[float]) -> float:
    """KL(p ‖ q) = Σ p log(p/q) with 0 log 0 = 0."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0.0)


def gamma_exponential(gamma0: float, steps: int) -> list[float]:
    return [gamma0**i for i in range(steps)]


def gamma_linear(gamma0: float, steps: int) -> list[float]:
    return [1.0 - i * (1.0 - gamma0) for i in range(steps)]


def _grants(granted, n: int) -> list:
    return [None] * n if granted is None else [int(g) for g in _rows(granted)]


def cyb_loss(logits, targets, dk_id, omega, gamma, dk_bias=0.0, granted=None) -> list[float]:
    """ℓ_CYB per token; ``granted``: steps per token (None: all W)."""
    d, t = step_probs(logits, targets, dk_id, dk_bias)
    out = []
    for d_tok, t_tok, g in zip(d, t, _grants(granted, len(d))):
        s = stopping(d_tok, omega, g)
        out.append(-math.log(sum(si * gi * ti for si, gi, ti in zip(s, gamma, t_tok))))
    return out


def cyb_va_loss(logits, targets, dk_id, rho, dk_bias=0.0, granted=None) -> list[float]:
    d, t = step_probs(logits, targets, dk_id, dk_bias)
    out = []
    for d_tok, t_tok, g in zip(d, t, _grants(granted, len(d))):
        s = stopping(d_tok, last_only(len(d_tok)), g)
        out.append(-sum(si * math.log(ti) for si, ti in zip(s, t_tok)) + kl(s, truncated(rho, g)))
    return out


def cyb_dp_loss(logits, targets, dk_id, rho, alpha, dk_bias=0.0, granted=None) -> list[float]:
    d, t = step_probs(logits, targets, dk_id, dk_bias)
    out = []
    for d_tok, t_tok, g in zip(d, t, _grants(granted, len(d))):
        s = stopping(d_tok, last_only(len(d_tok)), g)
        base = -math.log(sum(si * ti for si, ti in zip(s, t_tok)))
        out.append(base + alpha * kl(truncated(rho, g), s))
    return out


def tbys_loss(logits, targets, dk_id=None, granted=None) -> list[float]:
    """−log p_W(y) (at the last granted step); with ``dk_id`` the DK id is removed and the rest renormalised."""
    out = []
    rows = _rows(logits)
    for z_tok, y, g in zip(rows, _rows(targets), _grants(granted, len(rows))):
        p = softmax(z_tok[-1 if g is None else g - 1])
        out.append(-math.log(p[y] if dk_id is None else p[y] / (1.0 - p[dk_id])))
    return out


def stopping_probs(d_rows, omega) -> list[list[float]]:
    """P(S = i) for every row of d ``[N][W]``."""
    return [stopping(d_tok, omega) for d_tok in _rows(d_rows)]
