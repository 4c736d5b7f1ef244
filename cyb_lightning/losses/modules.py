"""The losses a config selects with ``class_path``: thin wrappers over ``losses.functional``.

Each module validates its hyperparameters when it is built (so a bad YAML fails before any data is
read) and maps ``(logits [N, W, V], targets [N], dk_id)`` to the per-token loss ``[N]``. The DK logit
prior is derived from the vocabulary size of the logits it sees. Each loss also owns its form for tokens
granted fewer than W steps (``step_mask``: the ``variable`` and ``answer_pauses`` layouts): its step
distributions (ω, ρ) truncated at the granted steps (``functional.granted_weights``), the last granted
step answering; with every step granted it is the plain loss. ω, γ, ρ are kept as float64 CPU
tensors, not buffers: moving the model (``bf16-true`` included) must never round them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from cyb_lightning.losses import functional as F


class PauseLoss(nn.Module):
    """Base class. ``steps`` is the W the loss is defined for (None: any); ``uses_dk``: DK is an output."""

    uses_dk: bool = True
    psi_dk: float | None = None
    last_step_only: bool = False  # only step W's output enters the loss (head_loss skips the others' head)

    @property
    def steps(self) -> int | None:
        return None

    def check_steps(self, steps_per_token: int) -> None:
        """Fail early, naming both settings, when the data's W and the loss's W disagree."""
        if self.steps is not None and self.steps != steps_per_token:
            raise ValueError(
                f"{type(self).__name__} is set up for W={self.steps} steps per token (from the length of its "
                f"omega/gamma/rho) but the data layout gives W={steps_per_token} (1 + data.num_pauses); "
                "make the two agree"
            )

    def dk_bias(self, vocab_size: int) -> float:
        return 0.0 if self.psi_dk is None else F.dk_prior_bias(vocab_size, self.psi_dk)

    def stopping_log_probs(self, logits: Tensor, targets: Tensor, dk_id: int) -> Tensor:
        """log s ``[N, W]``: the model's own halting distribution (ω = last step), for metrics.

        A loss without DK always answers at the last step, so its s is one-hot on W.
        """
        if not self.uses_dk:
            s = torch.full(logits.shape[:2], float("-inf"), device=logits.device)
            s[:, -1] = 0.0
            return s
        log_d, log_1md, _ = F.step_log_probs(logits, targets, dk_id, self.dk_bias(logits.shape[-1]))
        return F.halting_log_probs(log_d, log_1md)

    def forward(self, logits: Tensor, targets: Tensor, dk_id: int, step_mask: Tensor | None = None) -> Tensor:
        """The per-token loss ``[N]`` of full logits ``[N, W, V]``: the reference (tests, small inputs); training
        takes the same math chunk by chunk from the head (:func:`~cyb_lightning.losses.head.head_loss`)."""
        return self.loss_from_stats(*F.step_logit_stats(logits, targets, dk_id), logits.shape[-1], step_mask)

    def loss_from_steps(
        self, steps: tuple[Tensor, Tensor, Tensor], step_mask: Tensor | None = None
    ) -> Tensor:  # pragma: no cover - abstract
        """The per-token loss ``[N]`` from (log d, log(1 − d), log t) ``[N, W]`` (DK prior applied);
        ``step_mask [N, W]``: the steps each token was granted (a prefix; None: all W)."""
        raise NotImplementedError

    def loss_from_stats(
        self, lse_rest: Tensor, z_y: Tensor, z_dk: Tensor, vocab_size: int, step_mask: Tensor | None = None
    ) -> Tensor:
        """The per-token loss from :func:`~cyb_lightning.losses.functional.step_logit_stats`'s quantities.

        Every path calls this (:mod:`cyb_lightning.losses.head`, ``forward`` on full logits). With
        ``last_step_only`` and no ``step_mask`` the quantities may hold the last step only (``[N, 1]``).
        """
        steps = F.log_probs_from_stats(lse_rest, z_y, z_dk, self.dk_bias(vocab_size))
        return self.loss_from_steps(steps, step_mask)


def _psi(psi_dk: float | None) -> float | None:
    if psi_dk is not None:
        F.dk_prior_bias(2, psi_dk)  # validates the range with the functional layer's message
    return psi_dk


class CrossEntropy(PauseLoss):
    """Ordinary next-token cross-entropy: the no-pause baseline and TBYS random-pause pretraining (W = 1)."""

    uses_dk = False
    last_step_only = True

    @property
    def steps(self) -> int | None:
        return 1

    def check_steps(self, steps_per_token: int) -> None:
        if steps_per_token != 1:
            raise ValueError(
                f"CrossEntropy reads one output per target but the layout gives W={steps_per_token}; use "
                "cyb_lightning.losses.TBYSPerToken for per-token pauses, or data.layout: none / tbys_random / "
                "pause_groups"
            )

    def loss_from_steps(self, steps: tuple[Tensor, Tensor, Tensor], step_mask: Tensor | None = None) -> Tensor:
        _, log_1md, log_t = steps  # log p(y) = log t + log(1 − d): DK is an ordinary id here (no prior)
        return -(log_t + log_1md)[:, -1]  # W = 1: the one step is always granted


class TBYSPerToken(PauseLoss):
    """TBYS per-token pauses (CYB's "pause + cross-entropy"): CE at the last step only, DK excluded."""

    uses_dk = False
    last_step_only = True

    def loss_from_steps(self, steps: tuple[Tensor, Tensor, Tensor], step_mask: Tensor | None = None) -> Tensor:
        return -F.last_granted_log_t(steps[2], step_mask)


class CYBAP(PauseLoss):
    """CYB anytime prediction: ℓ = −log Σ_i s_i γ_i t_i with a world stop distribution ω and discount γ.

    γ is given per step (``gamma``), or from ``gamma0`` as ``exponential`` γ_i = γ0^(i−1) or ``linear``
    γ_i = 1 − (i−1)(1−γ0); with neither, γ = 1.
    """

    def __init__(
        self,
        omega: Sequence[float] = (0.0, 0.0, 0.0, 1.0),
        gamma: Sequence[float] | None = None,
        gamma0: float | None = None,
        discount: Literal["exponential", "linear"] = "exponential",
        psi_dk: float | None = 0.9,
    ) -> None:
        super().__init__()
        omega_t = F.check_weights(omega, "omega", normalise=True)
        steps = omega_t.numel()
        if gamma is not None and gamma0 is not None:
            raise ValueError("give either gamma (one value per step) or gamma0 (with discount), not both")
        if gamma0 is not None:
            if not 0.0 <= gamma0 <= 1.0:
                raise ValueError(f"gamma0 must lie in [0, 1], got {gamma0}")
            i = torch.arange(steps, dtype=torch.float64)
            if discount == "exponential":
                gamma_t = gamma0**i
            elif discount == "linear":
                gamma_t = (1 - i * (1 - gamma0)).clamp_min(0.0)
            else:
                raise ValueError(f"discount must be 'exponential' or 'linear', got {discount!r}")
        else:
            gamma_t = [1.0] * steps if gamma is None else gamma
        self.omega = omega_t
        self.gamma = F.check_discount(gamma_t, steps)
        self.psi_dk = _psi(psi_dk)

    @property
    def steps(self) -> int:
        return self.omega.numel()

    def loss_from_steps(self, steps: tuple[Tensor, Tensor, Tensor], step_mask: Tensor | None = None) -> Tensor:
        return F.cyb_loss_from(steps, self.omega, self.gamma, step_mask)


class CYBVA(PauseLoss):
    """CYB variational: −Σ_i s_i log t_i + KL(s ‖ ρ), ω = last step, γ = 1; ρ must be positive."""

    def __init__(self, rho: Sequence[float] = (4.0, 1.0, 1.0, 4.0), psi_dk: float | None = 0.9) -> None:
        super().__init__()
        rho_t = F.check_weights(rho, "rho", normalise=True)
        if (rho_t <= 0).any():
            raise ValueError(
                f"CYB-VA needs every entry of rho > 0 (KL(s||rho) is infinite where rho is 0), got {list(rho)}; "
                "use CYBDP for a prior with zeros"
            )
        self.rho = rho_t
        self.psi_dk = _psi(psi_dk)

    @property
    def steps(self) -> int:
        return self.rho.numel()

    def loss_from_steps(self, steps: tuple[Tensor, Tensor, Tensor], step_mask: Tensor | None = None) -> Tensor:
        return F.cyb_va_loss_from(steps, self.rho, step_mask)


class CYBDP(PauseLoss):
    """CYB distributional penalty: ℓ_CYB(ω = last, γ = 1) + α · KL(ρ ‖ s); ρ may contain zeros."""

    def __init__(
        self, rho: Sequence[float] = (4.0, 1.0, 1.0, 4.0), alpha: float = 0.01, psi_dk: float | None = 0.9
    ) -> None:
        super().__init__()
        if alpha < 0:
            raise ValueError(f"alpha must be non-negative, got {alpha}")
        self.rho = F.check_weights(rho, "rho", normalise=True)
        self.alpha = float(alpha)
        self.psi_dk = _psi(psi_dk)

    @property
    def steps(self) -> int:
        return self.rho.numel()

    def loss_from_steps(self, steps: tuple[Tensor, Tensor, Tensor], step_mask: Tensor | None = None) -> Tensor:
        return F.cyb_dp_loss_from(steps, self.rho, self.alpha, step_mask)
