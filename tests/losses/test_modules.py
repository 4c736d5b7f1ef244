"""The config-selectable loss modules: same numbers as the functional layer (and the float64 reference),
hyperparameter validation at construction, and the W bookkeeping the trainer relies on."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from cyb_lightning.losses import CYBAP, CYBDP, CYBVA, CrossEntropy, PauseLoss, TBYSPerToken
from cyb_lightning.losses import functional as F

_spec = importlib.util.spec_from_file_location("cyb_losses_reference", Path(__file__).with_name("reference.py"))
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

TOL = dict(rtol=1e-12, atol=1e-12)
N, V, DK = 5, 9, 4


def make(steps: int, seed: int, dtype=torch.float64, n: int = N):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, steps, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    targets = torch.randint(0, V - 1, (n,), generator=g)
    return logits, targets + (targets >= DK).long()


def close(actual, expected, **tol) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual).to(torch.float64), torch.as_tensor(expected, dtype=torch.float64), **(tol or TOL)
    )


PSIS = (0.9, 0.97, None)


def _bias(psi):
    return 0.0 if psi is None else F.dk_prior_bias(V, psi)


# ------------------------------------------------------------------------------------ forward = functional


@pytest.mark.parametrize("psi", PSIS)
@pytest.mark.parametrize(
    "omega, gamma",
    [((0, 0, 0, 1), None), ((1, 1, 1, 1), (1, 0.9, 0.5, 0.1)), ((1, 0, 0, 0), None), ((0, 1, 0, 1), (0, 1, 1, 1))],
)
def test_cybap_forward_is_functional(psi, omega, gamma):
    loss = CYBAP(omega=omega, gamma=gamma, psi_dk=psi)
    logits, targets = make(4, seed=1)
    gamma_list = [1.0] * 4 if gamma is None else list(gamma)
    out = loss(logits, targets, DK)
    close(out, F.cyb_loss(logits, targets, DK, list(omega), gamma_list, _bias(psi)))
    bias = 0.0 if psi is None else ref.prior_bias(V, psi)
    close(out, ref.cyb_loss(logits, targets, DK, omega, gamma_list, bias))


@pytest.mark.parametrize("discount, gamma0, expected", [
    ("exponential", 0.9, [1.0, 0.9, 0.81, 0.729]),
    ("exponential", 0.0, [1.0, 0.0, 0.0, 0.0]),
    ("linear", 0.8, [1.0, 0.8, 0.6, 0.4]),
    ("linear", 0.5, [1.0, 0.5, 0.0, 0.0]),  # 1 − (i−1)(1−γ0) would go negative: clamped at 0
    ("linear", 1.0, [1.0, 1.0, 1.0, 1.0]),
])
def test_cybap_gamma0_discounts(discount, gamma0, expected):
    loss = CYBAP(omega=(1, 1, 1, 1), gamma0=gamma0, discount=discount, psi_dk=0.9)
    close(loss.gamma, expected)
    formula = ref.gamma_exponential(gamma0, 4) if discount == "exponential" else ref.gamma_linear(gamma0, 4)
    close(loss.gamma, [max(g, 0.0) for g in formula])
    logits, targets = make(4, seed=2)
    close(loss(logits, targets, DK), ref.cyb_loss(logits, targets, DK, [1, 1, 1, 1], expected, ref.prior_bias(V, 0.9)))


def test_cybap_gamma0_exponential_is_default_discount():
    close(CYBAP(omega=(0, 0, 1), gamma0=0.99).gamma, [1.0, 0.99, 0.99**2])


def test_cybap_defaults_are_the_paper_setting():
    loss = CYBAP()
    close(loss.omega, [0, 0, 0, 1])
    close(loss.gamma, [1, 1, 1, 1])
    assert loss.psi_dk == 0.9
    logits, targets = make(4, seed=3)
    close(loss(logits, targets, DK), ref.cyb_loss(logits, targets, DK, [0, 0, 0, 1], [1] * 4, math.log(9 * (V - 1))))


@pytest.mark.parametrize("psi", PSIS)
@pytest.mark.parametrize("rho", [(4, 1, 1, 4), (1, 2, 3)])
def test_cybva_forward_is_functional(psi, rho):
    loss = CYBVA(rho=rho, psi_dk=psi)
    logits, targets = make(len(rho), seed=4)
    out = loss(logits, targets, DK)
    close(out, F.cyb_va_loss(logits, targets, DK, list(rho), _bias(psi)))
    close(out, ref.cyb_va_loss(logits, targets, DK, rho, 0.0 if psi is None else ref.prior_bias(V, psi)))


@pytest.mark.parametrize("psi", PSIS)
@pytest.mark.parametrize("rho, alpha", [((4, 1, 1, 4), 0.01), ((1, 0, 0, 1), 0.7), ((0, 1), 0.0)])
def test_cybdp_forward_is_functional(psi, rho, alpha):
    loss = CYBDP(rho=rho, alpha=alpha, psi_dk=psi)
    assert loss.alpha == alpha
    logits, targets = make(len(rho), seed=5)
    out = loss(logits, targets, DK)
    close(out, F.cyb_dp_loss(logits, targets, DK, list(rho), alpha, _bias(psi)))
    close(out, ref.cyb_dp_loss(logits, targets, DK, rho, alpha, 0.0 if psi is None else ref.prior_bias(V, psi)))


def test_tbys_per_token_forward_is_functional():
    loss = TBYSPerToken()
    for steps in (1, 4):
        logits, targets = make(steps, seed=6 + steps)
        out = loss(logits, targets, DK)
        close(out, F.tbys_loss(logits, targets, DK))
        close(out, ref.tbys_loss(logits, targets, DK))


def test_cross_entropy_forward_is_functional():
    logits, targets = make(1, seed=8)
    out = CrossEntropy()(logits, targets, DK)
    close(out, F.tbys_loss(logits, targets))
    close(out, ref.tbys_loss(logits, targets))  # DK (an ordinary id here) is not excluded


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_modules_run_in_fp32_on_low_precision_logits(dtype):
    logits, targets = make(4, seed=9, dtype=dtype)
    exact = logits.double()
    for loss in (CYBAP(omega=(1, 1, 1, 1), gamma0=0.9), CYBVA(), CYBDP(rho=(1, 0, 0, 1)), TBYSPerToken()):
        out = loss(logits, targets, DK)
        assert out.dtype == torch.float32, type(loss).__name__
        torch.testing.assert_close(out.double(), loss(exact, targets, DK), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- W bookkeeping


def test_steps_property():
    assert CYBAP(omega=(0, 0, 0, 1)).steps == 4
    assert CYBAP(omega=(1, 1)).steps == 2
    assert CYBVA(rho=(1, 2, 3)).steps == 3
    assert CYBDP(rho=(1, 0, 0, 0, 1)).steps == 5
    assert CrossEntropy().steps == 1
    assert TBYSPerToken().steps is None


@pytest.mark.parametrize("loss", [CYBAP(omega=(0, 0, 0, 1)), CYBVA(rho=(4, 1, 1, 4)), CYBDP(rho=(4, 1, 1, 4))])
def test_check_steps(loss):
    loss.check_steps(4)  # agrees: no error
    for wrong in (1, 3, 5):
        with pytest.raises(ValueError, match="num_pauses") as info:
            loss.check_steps(wrong)
        assert "W=4" in str(info.value) and f"W={wrong}" in str(info.value)


def test_tbys_per_token_accepts_any_w_and_cross_entropy_only_one():
    for steps in (1, 2, 4, 8):
        TBYSPerToken().check_steps(steps)
    CrossEntropy().check_steps(1)
    for steps in (2, 4):
        with pytest.raises(ValueError, match="W=%d" % steps):
            CrossEntropy().check_steps(steps)


def test_modules_are_pause_losses_and_flag_dk_use():
    for cls in (CYBAP, CYBVA, CYBDP):
        assert issubclass(cls, PauseLoss) and cls.uses_dk
    for cls in (CrossEntropy, TBYSPerToken):
        assert issubclass(cls, PauseLoss) and not cls.uses_dk


# ------------------------------------------------------------------------------------- stopping_log_probs


@pytest.mark.parametrize("loss", [CYBAP(omega=(1, 1, 1, 1)), CYBVA(psi_dk=0.97), CYBDP(psi_dk=None)])
def test_module_stopping_is_the_models_halting_distribution(loss):
    logits, targets = make(4, seed=10)
    log_s = loss.stopping_log_probs(logits, targets, DK)
    close(log_s.logsumexp(-1), [0.0] * N)
    # ω = last (the model's own halting), whatever ω the loss trains with, and with the module's DK prior
    bias = 0.0 if loss.psi_dk is None else ref.prior_bias(V, loss.psi_dk)
    d, _ = ref.step_probs(logits, targets, DK, bias)
    close(log_s.exp(), [ref.stopping(row, ref.last_only(4)) for row in d])


@pytest.mark.parametrize("loss, steps", [(TBYSPerToken(), 4), (TBYSPerToken(), 2), (CrossEntropy(), 1)])
def test_module_stopping_without_dk_is_one_hot_last(loss, steps):
    logits, targets = make(steps, seed=11)
    s = loss.stopping_log_probs(logits, targets, DK).exp()
    close(s, [[0.0] * (steps - 1) + [1.0]] * N)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: CYBAP(omega=(0, 0, 0, 1), gamma=(1, 1, 1, 1), gamma0=0.9), "gamma"),
        (lambda: CYBAP(omega=(0, 0, 0, 1), gamma=(1, 1.5, 1, 1)), "gamma"),
        (lambda: CYBAP(omega=(0, 0, 0, 1), gamma=(1, 1, 1)), "gamma"),
        (lambda: CYBAP(omega=(0, 0, 0, 1), gamma=(1, -1, 1, 1)), "gamma"),
        (lambda: CYBAP(omega=(0, 0, 0, 1), gamma=(0, 0, 0, 0)), "gamma"),
        (lambda: CYBAP(omega=(0, 0, 0, 1), gamma0=1.2), "gamma0"),
        (lambda: CYBAP(omega=(0, 0, 0, 1), gamma0=-0.1), "gamma0"),
        (lambda: CYBAP(omega=(0, 0, 0, 1), gamma0=0.9, discount="cosine"), "discount"),
        (lambda: CYBAP(omega=(0, 0, 0, 0)), "omega"),
        (lambda: CYBAP(omega=(0, -1, 0, 1)), "omega"),
        (lambda: CYBAP(omega=()), "omega"),
        (lambda: CYBAP(psi_dk=1.0), "psi_dk"),
        (lambda: CYBAP(psi_dk=0.0), "psi_dk"),
        (lambda: CYBVA(rho=(1, 0, 0, 1)), "rho"),
        (lambda: CYBVA(rho=(1, -1, 1, 1)), "rho"),
        (lambda: CYBVA(rho=(0, 0)), "rho"),
        (lambda: CYBVA(psi_dk=1.5), "psi_dk"),
        (lambda: CYBDP(rho=(1, -1, 1, 1)), "rho"),
        (lambda: CYBDP(rho=(0, 0, 0, 0)), "rho"),
        (lambda: CYBDP(alpha=-0.01), "alpha"),
        (lambda: CYBDP(psi_dk=-0.5), "psi_dk"),
    ],
)
def test_construction_errors_name_the_argument(build, name):
    with pytest.raises(ValueError, match=name):
        build()


def test_both_gamma_and_gamma0_is_refused_even_if_consistent():
    with pytest.raises(ValueError, match="not both"):
        CYBAP(omega=(1, 1), gamma=(1, 0.9), gamma0=0.9)


def test_forward_refuses_logits_of_another_w():
    logits, targets = make(3, seed=12)
    for loss, name in ((CYBAP(), "omega"), (CYBVA(), "rho"), (CYBDP(), "rho")):
        with pytest.raises(ValueError, match=name):
            loss(logits, targets, DK)


def test_hyperparameters_survive_a_cast_of_the_module():
    # bf16-true moves every floating tensor of the model; ω, γ, ρ must keep their exact values.
    from cyb_lightning.losses import CYBAP, CYBDP

    ap = CYBAP(omega=(4, 1, 1, 4), gamma0=0.99).to(torch.bfloat16)
    assert ap.omega.dtype == torch.float64 and ap.omega.tolist() == [0.4, 0.1, 0.1, 0.4]
    assert ap.gamma.tolist() == [1.0, 0.99, 0.99**2, 0.99**3]
    assert CYBDP(rho=(4, 1, 1, 4)).to(torch.bfloat16).rho.tolist() == [0.4, 0.1, 0.1, 0.4]
