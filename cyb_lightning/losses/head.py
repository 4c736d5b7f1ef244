"""The one seam between a decoder's output head and everything after it.

Design notes: docs/internals.md, section `cyb_lightning/losses/head.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cyb_lightning.losses.modules import PauseLoss


@dataclass(frozen=True)
class OutputHead:
    """A decoder's output layer: logits = cap · tanh(scale · (hidden @ weight.T + bias) / cap).

    ``softcap`` None: no cap (Gemma-2 caps at 30); ``scale``: a multiplier on the logits (Cohere's
    ``logit_scale``, Granite's ``1 / logits_scaling``).
    """

    weight: Tensor  # [V, d]
    bias: Tensor | None = None  # [V]
    softcap: float | None = None
    scale: float = 1.0

    def logits(self, hidden: Tensor) -> Tensor:
        """The model's logits of ``hidden [..., d]`` (for tests and small inputs; the loss never builds them)."""
        z = hidden @ self.weight.t() if self.bias is None else hidden @ self.weight.t() + self.bias
        return _cap(z * self.scale if self.scale != 1.0 else z, self.softcap)


def _cap(z: Tensor, softcap: float | None) -> Tensor:
    return z if not softcap else torch.tanh(z / softcap) * softcap


#: Logit elements per chunk when ``chunk_size`` is left to :func:`auto_chunk_size` (64 MiB in fp32).
CHUNK_ELEMENTS = 1 << 24


@dataclass
class HeadLoss:
    """What :func:`head_loss` returns. Everything but ``total`` is detached.

    ``lse_rest``/``z_y``/``z_dk``/``best_rest``/``best_id`` are ``[N, W']`` with W' = W, or 1 when only the
    last step was computed (a ``last_step_only`` loss and no ``with_argmax``).
    """

    total: Tensor  # scalar: Σ of the per-token losses, differentiable w.r.t. hidden, weight, bias
    per_token: Tensor  # [N]
    lse_rest: Tensor  # LSE over the non-DK logits
    z_y: Tensor  # target logit
    z_dk: Tensor  # raw DK logit (no prior)
    best_rest: Tensor | None = None  # largest non-DK logit (with_argmax)
    best_id: Tensor | None = None  # its id (with_argmax)
    vocab_size: int = 0  # V of the head (the DK prior depends on it)


def auto_chunk_size(vocab_size: int, steps: int, d_model: int = 0) -> int:
    """Logit rows per chunk: about ``CHUNK_ELEMENTS`` logits, or ``d_model`` rows if more, whole tokens.

    ``d_model`` rows make a chunk of logits as large as the fp32 gradient of the head, which the step
    holds anyway; fewer rows would mean more passes of ``grad W += dZᵀ h`` over that ``[V, d]`` gradient.
    """
    rows = max(CHUNK_ELEMENTS // max(1, vocab_size), d_model)
    return max(steps, rows // steps * steps)


PerToken = Callable[[Tensor, Tensor, Tensor, slice], Tensor]


def head_loss(
    hidden: Tensor,
    head: OutputHead,
    targets: Tensor,
    loss: PauseLoss,
    dk_id: int,
    chunk_size: int | None = None,
    step_mask: Tensor | None = None,
    with_argmax: bool = False,
) -> HeadLoss:
    """``loss`` of the logits of ``hidden`` under ``head``, computed chunk by chunk.

    Args:
        hidden: final hidden states (after the final norm) of the counted tokens, ``[N, W, d]``.
        head: the output layer (weight ``[V, d]``, bias, soft cap, scale).
        targets: ``[N]`` next real token of each group.
        loss: the pause loss; its ``loss_from_stats`` is the math.
        chunk_size: logit rows per chunk (rounded down to whole tokens); 0: one chunk (full logits);
            None: :func:`auto_chunk_size`.
        step_mask: ``[N, W]`` granted steps (the ``variable`` and ``answer_pauses`` layouts): the loss's own
            form for tokens granted fewer steps (``PauseLoss.loss_from_steps``).
        with_argmax: also return the best non-DK logit and its id per step (metrics); this computes all W
            steps even for a ``last_step_only`` loss.
    """
    weight, bias = head.weight, head.bias
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [N, W, d], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, d={hidden.shape[-1]}], got shape {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N]={hidden.shape[0]}, got shape {tuple(targets.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V]={weight.shape[0]}, got shape {tuple(bias.shape)}")
    V = weight.shape[0]
    if step_mask is not None and step_mask.shape != hidden.shape[:2]:
        raise ValueError(f"step_mask must be [N, W]={tuple(hidden.shape[:2])}, got {tuple(step_mask.shape)}")

    def per_token(lse_rest: Tensor, z_y: Tensor, z_dk: Tensor, rows: slice) -> Tensor:
        return loss.loss_from_stats(lse_rest, z_y, z_dk, V, None if step_mask is None else step_mask[rows])

    if loss.last_step_only and step_mask is None and not with_argmax:
        hidden = hidden[:, -1:]  # the other steps' outputs never enter the loss: skip their head
    steps = hidden.shape[1]
    if chunk_size is None:
        rows = auto_chunk_size(V, steps, hidden.shape[-1])
    elif chunk_size == 0:
        rows = max(1, hidden.shape[0]) * steps  # the plain case: every row in one chunk
    else:
        rows = chunk_size
    if rows < 1:
        raise ValueError(f"chunk_size must be a number of logit rows >= 0 (0: one chunk; None: automatic), got {rows}")
    chunk_tokens = max(1, rows // steps)
    run = _Run(targets, dk_id, per_token, chunk_tokens, with_argmax, head.softcap, head.scale)
    if torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        out = _HeadLossFunction.apply(hidden, weight, bias, run)
    else:
        out = run(hidden, weight, bias, (False, False, False))[0]
    total, per, lse_rest, z_y, z_dk, best, best_id = out
    return HeadLoss(total, per, lse_rest, z_y, z_dk, best if with_argmax else None, best_id if with_argmax else None, V)


class _Run:
    """The chunk loop: statistics, per-token losses and (when asked) gradients, for one call."""

    def __init__(
        self,
        targets: Tensor,
        dk_id: int,
        per_token: PerToken,
        chunk_tokens: int,
        with_argmax: bool,
        softcap: float | None = None,
        scale: float = 1.0,
    ):
        self.targets, self.dk_id, self.per_token = targets, dk_id, per_token
        self.chunk_tokens, self.with_argmax = chunk_tokens, with_argmax
        self.softcap, self.scale = softcap or None, scale

    def __call__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, needs: tuple[bool, bool, bool]):
        device = hidden.device.type
        if not torch.is_autocast_enabled(device):
            return self._run(hidden, weight, bias, needs)
        compute = torch.get_autocast_dtype(device)  # what autocast would give the matmuls, now for all of them
        with torch.autocast(device, enabled=False):
            out, grads = self._run(
                hidden.to(compute), weight.to(compute), None if bias is None else bias.to(compute), needs
            )
        return out, grads

    def _run(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, needs: tuple[bool, bool, bool]):
        N, W, d = hidden.shape
        V, dk = weight.shape[0], self.dk_id
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # the losses' dtype
        new = dict(device=hidden.device, dtype=acc)
        lse_rest, z_y, z_dk = (torch.empty(N, W, **new) for _ in range(3))
        per = torch.empty(N, **new)
        best = torch.empty(N, W, **new) if self.with_argmax else per.new_empty(0)
        best_id = torch.empty(N, W, dtype=torch.long, device=hidden.device) if self.with_argmax else best.long()
        grad_h = torch.empty_like(hidden) if needs[0] else None
        grad_w = None  # from the first chunk on
        grad_b = torch.zeros(V, **new) if needs[2] else None
        any_grad = any(needs)
        for s in range(0, N, self.chunk_tokens):
            e = min(N, s + self.chunk_tokens)
            n, rows = e - s, slice(s, e)
            h = hidden[rows].reshape(-1, d)
            z = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
            z = z.to(acc)  # [n·W, V]; no copy in fp32
            if self.scale != 1.0:
                z.mul_(self.scale)
            slope = None
            if self.softcap:  # z = cap·tanh(z / cap); its slope 1 − tanh² scales the gradient below
                z.div_(self.softcap).tanh_()
                slope = (1 - z * z) if any_grad else None
                z.mul_(self.softcap)
            y = self.targets[rows].repeat_interleave(W)[:, None]
            zy = z.gather(1, y).squeeze(1)
            zdk = z[:, dk].clone()
            z[:, dk] = -math.inf
            if self.with_argmax:
                top, top_id = z.max(1)
                best[rows], best_id[rows] = top.view(n, W), top_id.view(n, W)
            else:
                top = z.amax(1)
            z.sub_(top[:, None]).exp_()  # one exp pass: the LSE now, the softmax for the gradient later
            total = z.sum(1)
            lse = top + total.log()
            lse_rest[rows], z_y[rows], z_dk[rows] = lse.view(n, W), zy.view(n, W), zdk.view(n, W)
            if not any_grad:
                per[rows] = self.per_token(lse.view(n, W), zy.view(n, W), zdk.view(n, W), rows)
                continue
            with torch.enable_grad():
                stats = [t.view(n, W).detach().requires_grad_() for t in (lse, zy, zdk)]
                chunk_loss = self.per_token(*stats, rows)
                g_lse, g_y, g_dk = torch.autograd.grad(chunk_loss.sum(), stats, materialize_grads=True)
            per[rows] = chunk_loss.detach()
            # dZ = g_lse · softmax_{v≠DK}(z) + g_y · e_y + g_dk · e_DK, in place over the chunk's logits.
            z.mul_((g_lse.reshape(-1) / total)[:, None])
            z[:, dk] = g_dk.reshape(-1)  # softmax_{v≠DK} is 0 there
            z.scatter_add_(1, y, g_y.reshape(-1, 1))
            if slope is not None:
                z.mul_(slope)
            if self.scale != 1.0:
                z.mul_(self.scale)
            dz = z.to(weight.dtype)
            if grad_h is not None:
                grad_h[rows] = (dz @ weight).view(n, W, d).to(grad_h.dtype)
            if needs[1]:
                if grad_w is not None and dz.dtype == acc and h.dtype == acc:
                    grad_w.addmm_(dz.t(), h)
                else:
                    chunk_grad_w = (dz.t() @ h.to(dz.dtype)).to(acc)
                    grad_w = chunk_grad_w if grad_w is None else grad_w.add_(chunk_grad_w)
            if grad_b is not None:
                grad_b += z.sum(0)
            del z, dz, slope  # free this chunk's logits before the next chunk allocates its own
        if needs[1] and grad_w is None:  # no tokens at all
            grad_w = torch.zeros(V, d, **new)
        total_loss = per.sum()
        return (total_loss, per, lse_rest, z_y, z_dk, best, best_id), (grad_h, grad_w, grad_b)


class _HeadLossFunction(torch.autograd.Function):
    """(hidden, weight, bias) → Σ per-token loss (+ detached statistics); gradients come from the forward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, run: _Run):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        out, grads = run(hidden, weight, bias, needs)
        ctx.grads = grads
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(*out[1:])
        return out

    @staticmethod
    def backward(ctx, g_total: Tensor, *_unused):
        if ctx.grads is None:
            raise RuntimeError("head_loss stores its gradients for one backward pass (no retain_graph reuse)")
        grads = []
        for g, dtype in zip(ctx.grads, ctx.dtypes):  # in place: the stored gradients are used once
            grads.append(None if g is None else g.mul_(g_total.to(g.dtype)).to(dtype))
        ctx.grads = None
        return (*grads, None)
