"""The loss math of ``cyb_lightning.losses.functional`` against an independent float64 reference.

``reference.py`` walks the decision process step by step in probability space (no closed form of CYB
Eq. 2, no log space), so agreement to ~1e-12 checks the closed form, the log-space tricks and the
DK-prior handling at once.
"""

from __future__ import annotations

import importlib.util
import math
import zlib
from pathlib import Path

import pytest
import torch

from cyb_lightning.losses import functional as F

_spec = importlib.util.spec_from_file_location("cyb_losses_reference", Path(__file__).with_name("reference.py"))
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

TOL = dict(rtol=1e-12, atol=1e-12)
N, V = 5, 7


def make(steps: int, seed: int, dk_id: int = 2, vocab: int = V, n: int = N, scale: float = 2.0):
    """Random float64 logits ``[n, steps, vocab]`` and targets that are never the DK id."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, steps, vocab, generator=g, dtype=torch.float64) * scale
    targets = torch.randint(0, vocab - 1, (n,), generator=g)
    targets = targets + (targets >= dk_id).long()  # skip DK
    return logits, targets


def stable_seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode()) % 100_000


def close(actual: torch.Tensor, expected, **tol) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.to(torch.float64), expected, **(tol or TOL))


def omegas(steps: int) -> dict[str, list[float]]:
    """World stop distributions with and without early mass (unnormalised on purpose)."""
    out = {
        "last": ref.last_only(steps),
        "uniform": [1.0] * steps,
        "first": [1.0] + [0.0] * (steps - 1),
        "zeros_mid": [2.0] + [0.0] * (steps - 2) + [3.0] if steps > 1 else [1.0],
        "paper_4114": ([4.0, 1.0, 1.0, 4.0] + [2.0] * steps)[:steps],
    }
    if steps >= 4:
        out["alternating"] = [float(i % 2) for i in range(steps)]  # (0, 1, 0, 1, ...)
    return out


def gammas(steps: int) -> dict[str, list[float]]:
    return {
        "one": [1.0] * steps,
        "per_step": [1.0, 0.7, 0.95, 0.3, 0.5, 0.8][:steps],
        "with_zero": ([0.9, 0.0] + [0.6] * steps)[:steps] if steps > 1 else [0.4],
        "exponential": ref.gamma_exponential(0.9, steps),
        "linear": ref.gamma_linear(0.85, steps),
    }


STEPS = (1, 2, 4, 6)
BIASES = (0.0, 3.7)


# --------------------------------------------------------------------------------------------- 1. reference


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("dk_id", (0, 3, V - 1))
@pytest.mark.parametrize("dk_bias", BIASES)
def test_step_log_probs_matches_reference(steps, dk_id, dk_bias):
    logits, targets = make(steps, seed=steps * 10 + dk_id, dk_id=dk_id)
    log_d, log_1md, log_t = F.step_log_probs(logits, targets, dk_id, dk_bias)
    d, t = ref.step_probs(logits, targets, dk_id, dk_bias)
    close(log_d.exp(), d)
    close(log_1md.exp(), [[1.0 - x for x in row] for row in d])
    close(log_t.exp(), t)


def steps_and(table) -> list[tuple[int, str]]:
    """(W, kind) for every W in STEPS and every kind ``table(W)`` defines at that W."""
    return [(steps, kind) for steps in STEPS for kind in table(steps)]


@pytest.mark.parametrize("steps, omega_kind", steps_and(omegas))
@pytest.mark.parametrize("gamma_kind", ("one", "per_step", "with_zero", "exponential", "linear"))
@pytest.mark.parametrize("dk_bias", BIASES)
def test_cyb_loss_matches_reference(steps, omega_kind, gamma_kind, dk_bias):
    omega = omegas(steps)[omega_kind]
    gamma = gammas(steps)[gamma_kind]
    dk_id = (steps + len(omega_kind)) % V
    logits, targets = make(steps, seed=stable_seed(steps, omega_kind, gamma_kind), dk_id=dk_id)
    loss = F.cyb_loss(logits, targets, dk_id, omega, gamma, dk_bias)
    assert loss.dtype == torch.float64 and loss.shape == (N,)
    close(loss, ref.cyb_loss(logits, targets, dk_id, omega, gamma, dk_bias))


@pytest.mark.parametrize("steps, omega_kind", [(s, k) for s, k in steps_and(omegas) if s > 1])
@pytest.mark.parametrize("dk_bias", BIASES)
def test_every_loss_over_granted_steps_matches_reference(steps, omega_kind, dk_bias):
    """Tokens granted g ≤ W steps (variable pauses, pauses only before answers): the world that would grant
    more grants g (ω, ρ truncated at g), γ unchanged; the reference walks the process with each grant capped."""
    omega = omegas(steps)[omega_kind]
    gamma = gammas(steps)["per_step"]
    rho = ([4.0, 1.0, 2.0, 4.0] + [3.0] * steps)[:steps]
    dk_id = steps % V
    logits, targets = make(steps, seed=stable_seed("granted", steps, omega_kind), dk_id=dk_id, n=2 * steps)
    granted = torch.arange(2 * steps) % steps + 1  # every g = 1 … W, twice
    mask = torch.arange(steps)[None, :] < granted[:, None]
    lp = F.step_log_probs(logits, targets, dk_id, dk_bias)
    close(F.cyb_loss_from(lp, omega, gamma, mask), ref.cyb_loss(logits, targets, dk_id, omega, gamma, dk_bias, granted))
    close(F.cyb_va_loss_from(lp, rho, mask), ref.cyb_va_loss(logits, targets, dk_id, rho, dk_bias, granted))
    close(F.cyb_dp_loss_from(lp, omega, 0.3, mask),
          ref.cyb_dp_loss(logits, targets, dk_id, omega, 0.3, dk_bias, granted))  # fmt: skip
    close(-F.last_granted_log_t(lp[2], mask), ref.tbys_loss(logits, targets, dk_id, granted))
    # Every step granted: the plain losses.
    full = torch.ones(2 * steps, steps, dtype=torch.bool)
    close(F.cyb_loss_from(lp, omega, gamma, full), F.cyb_loss_from(lp, omega, gamma))
    close(F.cyb_dp_loss_from(lp, omega, 0.3, full), F.cyb_dp_loss_from(lp, omega, 0.3))
    close(F.cyb_va_loss_from(lp, rho, full), F.cyb_va_loss_from(lp, rho))


def test_granted_losses_have_finite_gradients_only_on_granted_steps():
    logits, targets = make(4, seed=11, n=8, scale=30.0)
    logits.requires_grad_()
    mask = torch.arange(4)[None, :] < (torch.arange(8) % 4 + 1)[:, None]
    lp = F.step_log_probs(logits, targets, 2, 1.0)
    total = (F.cyb_loss_from(lp, [1, 0, 2, 1], [1, 0.9, 0.8, 0.7], mask) + F.cyb_va_loss_from(lp, [4, 1, 1, 4], mask)
             + F.cyb_dp_loss_from(lp, [4, 0, 1, 4], 0.2, mask) - F.last_granted_log_t(lp[2], mask)).sum()  # fmt: skip
    total.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[~mask] == 0).all()
    # The last granted step's d never enters: its DK logit gets no gradient.
    last = F.last_granted_step(mask)
    assert (logits.grad[last][:, 2] == 0).all()


def test_cyb_loss_accepts_tensor_weights():
    logits, targets = make(4, seed=1)
    omega, gamma = torch.tensor([0.1, 0.0, 0.3, 0.6]), torch.tensor([1.0, 0.9, 0.81, 0.729])
    close(
        F.cyb_loss(logits, targets, 2, omega, gamma, 1.5),
        ref.cyb_loss(logits, targets, 2, omega.tolist(), gamma.tolist(), 1.5),
    )


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("rho_kind", ("uniform", "paper_4114", "random"))
@pytest.mark.parametrize("dk_bias", BIASES)
def test_cyb_va_loss_matches_reference(steps, rho_kind, dk_bias):
    rho = {
        "uniform": [1.0] * steps,
        "paper_4114": omegas(steps)["paper_4114"],
        "random": [0.3, 2.0, 0.05, 1.1, 0.7, 0.2][:steps],
    }[rho_kind]
    logits, targets = make(steps, seed=100 + steps, dk_id=1)
    close(F.cyb_va_loss(logits, targets, 1, rho, dk_bias), ref.cyb_va_loss(logits, targets, 1, rho, dk_bias))


@pytest.mark.parametrize("steps, rho_kind", steps_and(omegas))
@pytest.mark.parametrize("alpha", (0.0, 0.01, 1.7))
@pytest.mark.parametrize("dk_bias", BIASES)
def test_cyb_dp_loss_matches_reference(steps, rho_kind, alpha, dk_bias):
    rho = omegas(steps)[rho_kind]
    logits, targets = make(steps, seed=200 + steps, dk_id=V - 1)
    close(
        F.cyb_dp_loss(logits, targets, V - 1, rho, alpha, dk_bias),
        ref.cyb_dp_loss(logits, targets, V - 1, rho, alpha, dk_bias),
    )


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("dk_id", (None, 0, 4))
def test_tbys_loss_matches_reference(steps, dk_id):
    logits, targets = make(steps, seed=300 + steps, dk_id=0 if dk_id is None else dk_id)
    close(F.tbys_loss(logits, targets, dk_id), ref.tbys_loss(logits, targets, dk_id))


@pytest.mark.parametrize("steps, omega_kind", steps_and(omegas))
def test_stopping_log_probs_matches_reference(steps, omega_kind):
    omega = omegas(steps)[omega_kind]
    g = torch.Generator().manual_seed(400 + steps)
    d = torch.rand(N, steps, generator=g, dtype=torch.float64) * 0.98 + 0.01
    log_s = F.stopping_log_probs(d.log(), omega)
    expected = ref.stopping_probs(d, omega)
    close(log_s.exp(), expected)
    assert torch.isneginf(log_s).tolist() == [[p == 0.0 for p in row] for row in expected]  # exact zeros
    close(log_s.logsumexp(-1), [0.0] * N)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("dk_bias", BIASES)
def test_halting_log_probs_matches_reference(steps, dk_bias):
    logits, targets = make(steps, seed=500 + steps, dk_id=3)
    log_d, log_1md, _ = F.step_log_probs(logits, targets, 3, dk_bias)
    d, _ = ref.step_probs(logits, targets, 3, dk_bias)
    s = F.halting_log_probs(log_d, log_1md).exp()
    close(s, [ref.stopping(row, ref.last_only(steps)) for row in d])
    # the plain halting distribution of §3, written out: s_i = (1 − d_i) Π_{j<i} d_j, s_W = Π_{j<W} d_j
    for n, row in enumerate(d):
        expected = [(1 - row[i]) * math.prod(row[:i]) for i in range(steps - 1)] + [math.prod(row[:-1])]
        close(s[n], expected)


# --------------------------------------------------------------------------------------- 2. special cases


@pytest.mark.parametrize("steps", (1, 2, 4))
@pytest.mark.parametrize("dk_bias", (0.0, 14.65))
def test_tbys_is_cyb_with_dk_certain_before_the_last_step(steps, dk_bias):
    dk_id = 2
    logits, targets = make(steps, seed=600 + steps, dk_id=dk_id)
    logits[:, :-1, dk_id] += 1e3  # d_i = 1 (to float64 precision) for i < W
    cyb = F.cyb_loss(logits, targets, dk_id, ref.last_only(steps), [1.0] * steps, dk_bias)
    close(cyb, F.tbys_loss(logits, targets, dk_id))
    close(cyb, ref.tbys_loss(logits, targets, dk_id))


def test_tbys_without_dk_is_plain_cross_entropy_at_last_step():
    logits, targets = make(4, seed=7)
    expected = [-torch.log_softmax(logits[n, -1], -1)[targets[n]].item() for n in range(N)]
    close(F.tbys_loss(logits, targets), expected)
    # and with dk_id the DK id really is excluded: the two differ
    assert (F.tbys_loss(logits, targets, 2) < F.tbys_loss(logits, targets) - 1e-6).all()


@pytest.mark.parametrize("steps", (1, 2, 4, 6))
def test_stopping_distribution_sums_to_one(steps):
    g = torch.Generator().manual_seed(700 + steps)
    log_d = torch.rand(3, steps, generator=g, dtype=torch.float64).log()
    for omega in [*omegas(steps).values(), torch.rand(steps, generator=g, dtype=torch.float64).tolist()]:
        close(F.stopping_log_probs(log_d, omega).logsumexp(-1), [0.0] * 3)
    logits, targets = make(steps, seed=701)
    log_d, log_1md, _ = F.step_log_probs(logits, targets, 2, 5.0)
    close(F.halting_log_probs(log_d, log_1md).logsumexp(-1), [0.0] * N)


def test_last_step_dk_is_ignored():
    """d_W := 0: the last step's DK logit changes neither s nor t, so no loss may move."""
    logits, targets = make(4, seed=8)
    moved = logits.clone()
    moved[:, -1, 2] += torch.linspace(-5, 9, N, dtype=torch.float64)
    for omega in omegas(4).values():
        gamma = [1, 0.9, 0.8, 0.7]
        close(F.cyb_loss(moved, targets, 2, omega, gamma), F.cyb_loss(logits, targets, 2, omega, gamma))
    close(F.cyb_va_loss(moved, targets, 2, [4, 1, 1, 4]), F.cyb_va_loss(logits, targets, 2, [4, 1, 1, 4]))
    close(F.cyb_dp_loss(moved, targets, 2, [4, 0, 1, 4], 0.3), F.cyb_dp_loss(logits, targets, 2, [4, 0, 1, 4], 0.3))
    close(F.tbys_loss(moved, targets, 2), F.tbys_loss(logits, targets, 2))


def test_dk_bias_changes_d_but_not_t():
    logits, targets = make(4, seed=9)
    log_d0, _, log_t0 = F.step_log_probs(logits, targets, 2, 0.0)
    log_d1, _, log_t1 = F.step_log_probs(logits, targets, 2, 2.5)
    close(log_t1, log_t0)
    assert (log_d1 > log_d0 + 0.1).all()
    # and it does change the CYB loss (through s), so the bias is really applied
    with_bias = F.cyb_loss(logits, targets, 2, [1, 1, 1, 1], [1] * 4, 2.5)
    assert not torch.allclose(with_bias, F.cyb_loss(logits, targets, 2, [1, 1, 1, 1], [1] * 4))


def _manual_s_t(logits, targets, dk_id, dk_bias=0.0):
    d, t = ref.step_probs(logits, targets, dk_id, dk_bias)
    return [ref.stopping(row, ref.last_only(len(row))) for row in d], t


def test_va_uses_kl_of_s_against_rho():
    logits, targets = make(4, seed=10)
    rho = ref.normalise([4, 1, 1, 4])
    s, t = _manual_s_t(logits, targets, 2)
    nll = [-sum(si * math.log(ti) for si, ti in zip(sn, tn)) for sn, tn in zip(s, t)]
    forward_kl = [e + sum(si * math.log(si / ri) for si, ri in zip(sn, rho)) for e, sn in zip(nll, s)]
    reverse_kl = [e + sum(ri * math.log(ri / si) for si, ri in zip(sn, rho)) for e, sn in zip(nll, s)]
    loss = F.cyb_va_loss(logits, targets, 2, [4, 1, 1, 4])
    close(loss, forward_kl)
    assert (loss - torch.tensor(reverse_kl, dtype=torch.float64)).abs().min() > 1e-3


def test_dp_uses_kl_of_rho_against_s():
    logits, targets = make(4, seed=11)
    rho, alpha = ref.normalise([4, 1, 1, 4]), 0.5
    s, t = _manual_s_t(logits, targets, 2)
    base = [-math.log(sum(si * ti for si, ti in zip(sn, tn))) for sn, tn in zip(s, t)]
    reverse = [b + alpha * sum(ri * math.log(ri / si) for si, ri in zip(sn, rho)) for b, sn in zip(base, s)]
    forward = [b + alpha * sum(si * math.log(si / ri) for si, ri in zip(sn, rho)) for b, sn in zip(base, s)]
    loss = F.cyb_dp_loss(logits, targets, 2, [4, 1, 1, 4], alpha)
    close(loss, reverse)
    assert (loss - torch.tensor(forward, dtype=torch.float64)).abs().min() > 1e-3


@pytest.mark.parametrize("dk_bias", BIASES)
def test_dp_with_alpha_zero_is_cyb_last_gamma_one(dk_bias):
    logits, targets = make(4, seed=12)
    close(
        F.cyb_dp_loss(logits, targets, 2, [4, 0, 1, 4], 0.0, dk_bias),
        F.cyb_loss(logits, targets, 2, [0, 0, 0, 1], [1, 1, 1, 1], dk_bias),
    )


def test_dp_accepts_zeros_in_rho_and_va_refuses_them():
    logits, targets = make(4, seed=13)
    loss = F.cyb_dp_loss(logits, targets, 2, [1, 0, 0, 1], 0.1)
    assert torch.isfinite(loss).all()
    close(loss, ref.cyb_dp_loss(logits, targets, 2, [1, 0, 0, 1], 0.1))
    with pytest.raises(ValueError, match="rho"):
        F.cyb_va_loss(logits, targets, 2, [1, 0, 0, 1])


def test_dk_prior_bias():
    assert F.dk_prior_bias(256_000, 0.9) == pytest.approx(14.65, abs=5e-3)
    assert F.dk_prior_bias(256_000, 0.9) == pytest.approx(math.log(9 * (256_000 - 1)), rel=1e-14)
    for vocab, psi in [(10, 0.9), (50, 0.5), (3, 0.99), (1000, 0.1)]:
        bias = F.dk_prior_bias(vocab, psi)
        assert bias == pytest.approx(ref.prior_bias(vocab, psi), rel=1e-12, abs=1e-12)
        # on flat logits the prior gives DK exactly psi
        assert ref.softmax([bias] + [0.0] * (vocab - 1))[0] == pytest.approx(psi, rel=1e-12)


def test_fp32_exclusive_cumsum_keeps_precision():
    """Π_{j<i} d_j must not pick up the rounding of a huge later log d (cumsum − log d loses ~1e-3 in fp32)."""
    log_d = torch.tensor([[math.log(0.9), -2e4 + 0.3, -0.5, -0.2]])
    log_s = F.stopping_log_probs(log_d, [0, 0, 0, 1])
    expected = F.stopping_log_probs(log_d.double(), [0, 0, 0, 1])
    torch.testing.assert_close(log_s[:, :2].double(), expected[:, :2], rtol=0, atol=1e-6)
    # the same through a loss: step 2 nearly never says DK
    logits, targets = make(4, seed=14)
    logits[:, 0, 2], logits[:, 1, 2] = 30.0, -1e4  # d_1 ≈ 1, d_2 ≈ 0
    torch.testing.assert_close(
        F.cyb_loss(logits.float(), targets, 2, [0, 0, 0, 1], [1] * 4).double(),
        F.cyb_loss(logits, targets, 2, [0, 0, 0, 1], [1] * 4),
        rtol=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize("dtype, x", [(torch.float64, -1e-10), (torch.float32, -1e-5), (torch.float64, -60.0)])
def test_stopping_log_probs_derives_log_1md_accurately(dtype, x):
    """log(1 − d) from log d near d = 1 (log d → 0⁻) and d → 0: s_1 = 1 − d_1 under ω = last."""
    log_d = torch.tensor([[x, -0.5]], dtype=dtype)
    log_s = F.stopping_log_probs(log_d, [0, 1])
    expected = torch.tensor([math.log(-math.expm1(x)), x], dtype=torch.float64)
    torch.testing.assert_close(log_s[0].double(), expected, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-15)


def test_dk_logit_minus_inf_means_answer_at_first_step():
    """d_i = 0 exactly (a masked DK logit): s_1 = 1 and ℓ_CYB = −log t_1, no NaN."""
    logits, targets = make(3, seed=15)
    logits[:, :, 2] = -math.inf
    loss = F.cyb_loss(logits, targets, 2, [0, 0, 1], [1, 1, 1])
    expected = [-torch.log_softmax(logits[n, 0], -1)[targets[n]].item() for n in range(N)]
    close(loss, expected)
    log_d, log_1md, _ = F.step_log_probs(logits, targets, 2)
    close(F.halting_log_probs(log_d, log_1md).exp(), [[1.0, 0.0, 0.0]] * N)


# -------------------------------------------------------------------------- 3. extreme logits, bf16 / fp32

BIG = 1e4
DK = 3
EXTREME_V = 11


def _extreme(pattern: str, dtype: torch.dtype, steps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(stable_seed(pattern))
    n = 6
    targets = torch.tensor([0, 1, 2, 4, 7, 10])
    if pattern == "uniform":
        z = (torch.rand(n, steps, EXTREME_V, generator=g) * 2 - 1) * BIG
    else:
        z = torch.full((n, steps, EXTREME_V), -BIG)
        if pattern == "dk_hot":  # DK +1e4, everything else −1e4
            z[..., DK] = BIG
        elif pattern == "dk_cold":  # vice versa
            z.fill_(BIG)
            z[..., DK] = -BIG
        elif pattern == "target_hot":  # the right answer dominates, DK −1e4
            z[torch.arange(n), :, targets] = BIG
        elif pattern == "target_cold":  # everything but the answer +1e4, DK included
            z.fill_(BIG)
            z[torch.arange(n), :, targets] = -BIG
        elif pattern == "dk_then_answer":  # DK certain at odd steps, the answer elsewhere
            z[:, 0::2, DK] = BIG
            z[torch.arange(n), 1::2, targets] = BIG
    return z.to(dtype), targets


PATTERNS = ("uniform", "dk_hot", "dk_cold", "target_hot", "target_cold", "dk_then_answer")

EXTREME_LOSSES = {
    "cyb_last": lambda z, y, b: F.cyb_loss(z, y, DK, [0, 0, 0, 1], [1, 1, 1, 1], b),
    "cyb_uniform_exp": lambda z, y, b: F.cyb_loss(z, y, DK, [1, 1, 1, 1], ref.gamma_exponential(0.9, 4), b),
    "cyb_first": lambda z, y, b: F.cyb_loss(z, y, DK, [1, 0, 0, 0], [1, 1, 1, 1], b),
    "cyb_0101": lambda z, y, b: F.cyb_loss(z, y, DK, [0, 1, 0, 1], [1, 1, 1, 1], b),
    "cyb_gamma_zero": lambda z, y, b: F.cyb_loss(z, y, DK, [1, 1, 1, 1], [1, 0, 0.5, 1], b),
    "cyb_0101_gamma_zero": lambda z, y, b: F.cyb_loss(z, y, DK, [0, 1, 0, 1], [0, 1, 0.5, 0], b),
    "va": lambda z, y, b: F.cyb_va_loss(z, y, DK, [4, 1, 1, 4], b),
    "dp": lambda z, y, b: F.cyb_dp_loss(z, y, DK, [4, 1, 1, 4], 0.01, b),
    "dp_zeros": lambda z, y, b: F.cyb_dp_loss(z, y, DK, [1, 0, 0, 1], 0.5, b),
    "tbys": lambda z, y, b: F.tbys_loss(z, y),
    "tbys_dk": lambda z, y, b: F.tbys_loss(z, y, DK),
    # s weighted by the step index (an expected-latency penalty): gradients through the halting distribution
    "halting": lambda z, y, b: (
        F.halting_log_probs(*F.step_log_probs(z, y, DK, b)[:2]).exp() * torch.arange(4, dtype=torch.float32)
    ).sum(-1),
}


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dk_bias", (0.0, math.log(9 * (EXTREME_V - 1))))
def test_extreme_logits_finite_values_and_gradients(dtype, pattern, dk_bias):
    logits, targets = _extreme(pattern, dtype)
    exact = logits.detach().double()
    for name, fn in EXTREME_LOSSES.items():
        z = logits.clone().requires_grad_(True)
        loss = fn(z, targets, dk_bias)
        assert loss.dtype == torch.float32, name
        assert torch.isfinite(loss).all(), (name, loss)
        loss.sum().backward()
        assert z.grad is not None and torch.isfinite(z.grad).all(), (name, z.grad)
        # values: the fp32 computation agrees with a float64 run on the same (rounded) logits. fp32 log-probs
        # of logits ~1e4 carry an absolute error ~ulp(1e4) ≈ 1e-3; VA multiplies s (relative error 1e-3) by
        # log t (~ −2e4), so it only gets a relative tolerance of that size.
        rtol = 2e-3 if name == "va" else 1e-5
        torch.testing.assert_close(loss.double(), fn(exact, targets, dk_bias), rtol=rtol, atol=5e-3, msg=name)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
@pytest.mark.parametrize("pattern", PATTERNS)
def test_extreme_logits_stopping_is_a_distribution(dtype, pattern):
    # fp32 log-probs of logits ~1e4 are good to ~ulp(1e4) ≈ 1e-3 absolute, and log d, log(1 − d) round
    # independently, so Σ s = 1 holds to ~1e-4 here (exactly where logits are moderate, see above).
    logits, targets = _extreme(pattern, dtype)
    log_d, log_1md, _ = F.step_log_probs(logits, targets, DK, 14.65)
    log_s = F.halting_log_probs(log_d, log_1md)
    assert not torch.isnan(log_s).any()
    torch.testing.assert_close(log_s.logsumexp(-1), torch.zeros(len(targets)), rtol=0, atol=2e-4)
    for omega in ([1, 0, 0, 0], [0, 1, 0, 1], [1, 1, 1, 1]):
        log_s = F.stopping_log_probs(log_d, omega)
        assert not torch.isnan(log_s).any()
        torch.testing.assert_close(log_s.logsumexp(-1), torch.zeros(len(targets)), rtol=0, atol=2e-4)


def test_extreme_known_values():
    """A few extremes whose loss is known in closed form, to pin values and not only finiteness.

    Tolerance 1e-3: an fp32 log-sum-exp of logits ~1e4 is only good to ~ulp(1e4) ≈ 1e-3 absolute.
    """
    tol = dict(rtol=0, atol=1e-3)
    z, y = _extreme("dk_hot", torch.float32)
    # DK certain everywhere: with ω = last the model always reaches step W; t_W is uniform over V−1 ids.
    torch.testing.assert_close(
        F.cyb_loss(z, y, DK, [0, 0, 0, 1], [1] * 4), torch.full((6,), math.log(EXTREME_V - 1)), **tol
    )
    z, y = _extreme("target_hot", torch.float32)
    # the answer certain everywhere, DK never: s_1 = 1, t_1 = 1, loss 0; DP adds α·KL(ρ‖one-hot on 1) = huge
    torch.testing.assert_close(F.cyb_loss(z, y, DK, [0, 1, 0, 1], [1] * 4), torch.zeros(6), **tol)
    assert (F.cyb_dp_loss(z, y, DK, [1, 0, 0, 1], 1.0) > 1e3).all()
    z, y = _extreme("dk_then_answer", torch.float32)
    # DK at steps 1, 3; the answer at 2, 4: s = (0, 1, 0, 0) and t_2 = 1
    log_d, log_1md, _ = F.step_log_probs(z, y, DK)
    s = F.halting_log_probs(log_d, log_1md).exp()
    torch.testing.assert_close(s, torch.tensor([[0.0, 1, 0, 0]]).expand(6, 4), **tol)
    torch.testing.assert_close(F.cyb_loss(z, y, DK, [0, 0, 0, 1], [1] * 4), torch.zeros(6), **tol)
    # with γ_2 = 0 the only good step is discounted away: the loss is as large as the logits allow
    assert (F.cyb_loss(z, y, DK, [0, 0, 0, 1], [1, 0, 1, 1]) > 1e3).all()


# -------------------------------------------------------------------------------------------- 4. gradcheck


def _small(seed=16):
    logits, targets = make(3, seed=seed, n=3, vocab=5, dk_id=1)
    return logits.requires_grad_(True), targets


@pytest.mark.parametrize(
    "fn",
    [
        lambda z, y: F.cyb_loss(z, y, 1, [0, 0, 1], [1, 1, 1], 0.7),
        lambda z, y: F.cyb_loss(z, y, 1, [0.5, 0, 0.5], [1, 0.9, 0.81]),
        lambda z, y: F.cyb_loss(z, y, 1, [1, 0, 0], [1, 0, 0.5], 1.3),
        lambda z, y: F.cyb_va_loss(z, y, 1, [4, 1, 4], 0.7),
        lambda z, y: F.cyb_dp_loss(z, y, 1, [4, 1, 4], 0.3, 0.7),
        lambda z, y: F.cyb_dp_loss(z, y, 1, [1, 0, 1], 2.0),
        lambda z, y: F.tbys_loss(z, y, 1),
        lambda z, y: F.halting_log_probs(*F.step_log_probs(z, y, 1, 0.5)[:2]),
    ],
    ids=["cyb_last", "cyb_ap", "cyb_first_gamma0", "va", "dp", "dp_zeros", "tbys", "halting"],
)
def test_gradcheck(fn):
    z, y = _small()
    assert torch.autograd.gradcheck(lambda x: fn(x, y), (z,), eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- 5. errors


def _w4():
    return make(4, seed=17)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda z, y: F.cyb_loss(z, y, 2, [0, 0, 1], [1] * 4), "omega"),
        (lambda z, y: F.cyb_loss(z, y, 2, [0, 0, 0, 0, 1], [1] * 4), "omega"),
        (lambda z, y: F.cyb_loss(z, y, 2, [1, -1, 0, 1], [1] * 4), "omega"),
        (lambda z, y: F.cyb_loss(z, y, 2, [0, 0, 0, 0], [1] * 4), "omega"),
        (lambda z, y: F.cyb_loss(z, y, 2, [0, 0, math.nan, 1], [1] * 4), "omega"),
        (lambda z, y: F.cyb_loss(z, y, 2, [0, 0, 0, 1], [1] * 3), "gamma"),
        (lambda z, y: F.cyb_loss(z, y, 2, [0, 0, 0, 1], [1, 1, -0.1, 1]), "gamma"),
        (lambda z, y: F.cyb_loss(z, y, 2, [0, 0, 0, 1], [0, 0, 0, 0]), "gamma"),
        (lambda z, y: F.cyb_loss(z, y, 2, [0, 0, 0, 1], [1, 1.01, 1, 1]), "gamma"),
        (lambda z, y: F.cyb_va_loss(z, y, 2, [1, 1, 1]), "rho"),
        (lambda z, y: F.cyb_va_loss(z, y, 2, [1, -1, 1, 1]), "rho"),
        (lambda z, y: F.cyb_va_loss(z, y, 2, [0, 0, 0, 0]), "rho"),
        (lambda z, y: F.cyb_va_loss(z, y, 2, [1, 0, 1, 1]), "rho"),
        (lambda z, y: F.cyb_dp_loss(z, y, 2, [1, 1, 1, 1, 1], 0.1), "rho"),
        (lambda z, y: F.cyb_dp_loss(z, y, 2, [1, 1, -1, 1], 0.1), "rho"),
        (lambda z, y: F.cyb_dp_loss(z, y, 2, [0, 0, 0, 0], 0.1), "rho"),
        (lambda z, y: F.cyb_dp_loss(z, y, 2, [1, 1, 1, 1], -0.1), "alpha"),
        (lambda z, y: F.cyb_dp_loss(z, y, 2, [1, 1, 1, 1], math.inf), "alpha"),
        (lambda z, y: F.stopping_log_probs(torch.zeros(2, 4).log(), [1, 1, 1]), "omega"),
        (lambda z, y: F.stopping_log_probs(torch.zeros(2, 4).log(), [-1, 1, 1, 1]), "omega"),
        (lambda z, y: F.cyb_loss(z[0], y, 2, [0, 0, 0, 1], [1] * 4), "logits"),
        (lambda z, y: F.cyb_loss(z, y[:2], 2, [0, 0, 0, 1], [1] * 4), "targets"),
        (lambda z, y: F.tbys_loss(z[0], y), "logits"),
        (lambda z, y: F.dk_prior_bias(100, 0.0), "psi_dk"),
        (lambda z, y: F.dk_prior_bias(100, 1.0), "psi_dk"),
        (lambda z, y: F.dk_prior_bias(100, -0.2), "psi_dk"),
        (lambda z, y: F.dk_prior_bias(100, 1.5), "psi_dk"),
        (lambda z, y: F.dk_prior_bias(1, 0.9), "vocab_size"),
    ],
)
def test_errors_name_the_argument(call, name):
    logits, targets = _w4()
    with pytest.raises(ValueError, match=name):
        call(logits, targets)


def test_wrong_length_message_names_w():
    logits, targets = _w4()
    with pytest.raises(ValueError, match=r"omega has 3 entries but there are W=4 steps"):
        F.cyb_loss(logits, targets, 2, [0, 0, 1], [1] * 4)


# -- regressions found in review ---------------------------------------------------------------
def test_va_and_dp_are_finite_when_a_step_has_zero_stopping_mass():
    # A DK logit of −inf means d = 0: the model answers at step 1 and s_2.. are exactly 0.
    logits = torch.tensor([[[2.0, 3.0, -math.inf, 4.0]] * 3], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1])
    log_t1 = 3.0 - torch.logsumexp(torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64), 0)
    va = F.cyb_va_loss(logits, y, 2, [1, 1, 1])
    torch.testing.assert_close(va, (-log_t1 + math.log(3)).view(1))
    dp = F.cyb_dp_loss(logits, y, 2, [1, 0, 0], 0.1)
    torch.testing.assert_close(dp, (-log_t1).view(1))
    (va + dp).sum().backward()
    assert torch.isfinite(logits.grad[..., [0, 1, 3]]).all()


def test_stopping_log_probs_gradient_ignores_the_last_steps_dk():
    log_d = torch.tensor([[-0.5, 0.0]], requires_grad=True)  # d_W rounds to 1 and must not matter
    F.stopping_log_probs(log_d, [0, 1]).exp().sum().backward()
    assert torch.isfinite(log_d.grad).all() and log_d.grad[0, 1] == 0


@pytest.mark.parametrize("omega", [[0, 0, 1], [0.2, 0.3, 0.5]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stopping_log_probs_gradient_where_dk_probability_rounds_to_one(omega, dtype):
    """log d = 0 (d = 1 in its precision): finite gradients, equal to the limit d → 1 in float64.

    ℓ = −log Σ s_i t_i through the public function: at d_1 = 1 its gradient is finite (s_1 = ω_1 + (1 − d_1)·…
    is smooth in d_1), although log(1 − d_1) itself is −inf there.
    """
    log_t = torch.tensor([math.log(0.7), math.log(0.2), math.log(0.4)], dtype=torch.float64)

    def grads(log_d0: float, dt: torch.dtype, second: float) -> torch.Tensor:
        log_d = torch.tensor([[log_d0, second, math.log(0.6)]], dtype=dt, requires_grad=True)
        loss = -(F.stopping_log_probs(log_d, omega)[0] + log_t.to(dt)).logsumexp(-1)
        loss.backward()
        return log_d.grad[0].double()

    for second in (math.log(0.3), 0.0):  # one step or two consecutive steps with d = 1
        got = grads(0.0, dtype, second)
        limit = grads(-1e-300, torch.float64, -1e-300 if second == 0.0 else second)
        assert torch.isfinite(got).all(), got
        torch.testing.assert_close(got, limit, rtol=1e-5, atol=1e-6)
