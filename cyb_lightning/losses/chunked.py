"""Every pause loss straight from the final hidden states and the output head, chunk by chunk.

The plain path builds logits ``[N, W, V]`` and hands them to a loss (``PauseLoss.forward``); at V = 256k
those fp32 logits and their gradient are most of a training step's memory. Yet per step every loss needs
only three numbers (:func:`~cyb_lightning.losses.functional.step_logit_stats`): the log-sum-exp over the
non-DK ids, the target logit z_y and the DK logit z_dk. :func:`chunked_loss` computes them for a chunk of
whole tokens at a time (``chunk_size`` logit rows, ``[chunk, V]``), never the full logits, and applies the
loss's own math to them (``PauseLoss.loss_from_stats``: the same functions as the plain path).

Gradients are computed in the forward pass, chunk by chunk, by a ``torch.autograd.Function``:

1. logits of the chunk ``z = h Wᵀ (+ b)`` (in the weight's dtype, then fp32 / fp64);
2. (LSE_{v≠DK} z, z_y, z_dk) and the chunk's per-token losses; autograd on these small ``[n, W]``
   tensors gives g_lse, g_y, g_dk, the gradient of the chunk's summed loss w.r.t. the three quantities;
3. the gradient w.r.t. the logits is ``dZ = g_lse · softmax_{v≠DK}(z) + g_y · e_y + g_dk · e_DK``, written
   in place over the chunk's logits; then ``grad h = dZ W`` and ``grad W += dZᵀ h`` (``grad b += Σ dZ``).

This works because each token's loss depends only on its own W steps, so the gradient of a chunk of whole
tokens is known as soon as its logits are. It costs the three head matmuls cross-entropy costs (forward,
dZ·W, dZᵀ·h) and one pass of ``exp`` over the chunk; recomputing the logits in ``backward`` instead would
cost a fourth matmul (+33 % head FLOPs). The price: what is differentiable is the **sum** of the per-token
losses (a scalar, whose backward only scales the stored gradients); the per-token values come back
detached, for metrics. Memory: one chunk of logits, the gradient of the hidden states (their size) and an
fp32 gradient of the head weight (the size of its own ``.grad``), never ``[N·W, V]``.

Soft-capped or scaled logits (Gemma-2's ``final_logit_softcapping``, Cohere's ``logit_scale``) are not
supported: the decoders' ``output_head()`` refuses them, and the plain path serves them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cyb_lightning.losses import functional as F
from cyb_lightning.losses.modules import PauseLoss

class ChunkedLossUnsupported(ValueError):
    """The decoder's logits are not ``hidden @ weight.T + bias`` (e.g. soft-capped): use the plain loss."""


#: Logit elements per chunk when ``chunk_size`` is left to :func:`auto_chunk_size` (64 MiB in fp32).
CHUNK_ELEMENTS = 1 << 24


@dataclass
class HeadLoss:
    """What :func:`chunked_loss` returns. Everything but ``total`` is detached.

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


def auto_chunk_size(vocab_size: int, steps: int, d_model: int = 0) -> int:
    """Logit rows per chunk: about ``CHUNK_ELEMENTS`` logits, or ``d_model`` rows if more, whole tokens.

    ``d_model`` rows make a chunk of logits as large as the fp32 gradient of the head, which the step
    holds anyway; fewer rows would mean more passes of ``grad W += dZᵀ h`` over that ``[V, d]`` gradient.
    """
    rows = max(CHUNK_ELEMENTS // max(1, vocab_size), d_model)
    return max(steps, rows // steps * steps)


PerToken = Callable[[Tensor, Tensor, Tensor, slice], Tensor]


def chunked_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    loss: PauseLoss,
    dk_id: int,
    bias: Tensor | None = None,
    chunk_size: int | None = None,
    step_mask: Tensor | None = None,
    with_argmax: bool = False,
) -> HeadLoss:
    """``loss`` of the logits ``hidden @ weight.T + bias``, computed without materialising them.

    Args:
        hidden: final hidden states (after the final norm) of the counted tokens, ``[N, W, d]``.
        weight, bias: the output head, ``[V, d]`` and ``[V]`` (or None).
        targets: ``[N]`` next real token of each group.
        loss: the pause loss; its ``loss_from_stats`` is the math (shared with the plain path).
        chunk_size: logit rows per chunk (rounded down to whole tokens); None: :func:`auto_chunk_size`.
        step_mask: ``[N, W]`` granted steps of the variable-pause layout (CYB "recipe 2"): the loss is then
            :func:`~cyb_lightning.losses.functional.granted_steps_loss` under ``loss``'s DK prior.
        with_argmax: also return the best non-DK logit and its id per step (metrics); this computes all W
            steps even for a ``last_step_only`` loss.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [N, W, d], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, d={hidden.shape[-1]}], got shape {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N]={hidden.shape[0]}, got shape {tuple(targets.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V]={weight.shape[0]}, got shape {tuple(bias.shape)}")
    V = weight.shape[0]
    if step_mask is not None:
        if not loss.uses_dk:
            raise ValueError("the variable-pause layout trains a DK loss (CYBAP); the baselines need no step_mask")
        if step_mask.shape != hidden.shape[:2]:
            raise ValueError(f"step_mask must be [N, W]={tuple(hidden.shape[:2])}, got {tuple(step_mask.shape)}")
        dk_bias = loss.dk_bias(V)

        def per_token(lse_rest: Tensor, z_y: Tensor, z_dk: Tensor, rows: slice) -> Tensor:
            steps = F.log_probs_from_stats(lse_rest, z_y, z_dk, dk_bias)
            return F.granted_steps_loss_from(steps, step_mask[rows])

    else:

        def per_token(lse_rest: Tensor, z_y: Tensor, z_dk: Tensor, rows: slice) -> Tensor:
            return loss.loss_from_stats(lse_rest, z_y, z_dk, V)

        if loss.last_step_only and not with_argmax:
            hidden = hidden[:, -1:]  # the other steps' outputs never enter the loss: skip their head
    steps = hidden.shape[1]
    rows = auto_chunk_size(V, steps, hidden.shape[-1]) if chunk_size is None else chunk_size
    if rows < 1:
        raise ValueError(f"chunk_size must be a positive number of logit rows (or None: automatic), got {rows}")
    chunk_tokens = max(1, rows // steps)
    run = _Run(targets, dk_id, per_token, chunk_tokens, with_argmax)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or
                                    (bias is not None and bias.requires_grad)):  # fmt: skip
        out = _ChunkedHeadLoss.apply(hidden, weight, bias, run)
    else:
        out = run(hidden, weight, bias, (False, False, False))[0]
    total, per, lse_rest, z_y, z_dk, best, best_id = out
    return HeadLoss(total, per, lse_rest, z_y, z_dk, best if with_argmax else None, best_id if with_argmax else None)


class _Run:
    """The chunk loop: statistics, per-token losses and (when asked) gradients, for one call."""

    def __init__(self, targets: Tensor, dk_id: int, per_token: PerToken, chunk_tokens: int, with_argmax: bool):
        self.targets, self.dk_id, self.per_token = targets, dk_id, per_token
        self.chunk_tokens, self.with_argmax = chunk_tokens, with_argmax

    def __call__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, needs: tuple[bool, bool, bool]):
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
            del z, dz  # free this chunk's logits before the next chunk allocates its own
        if needs[1] and grad_w is None:  # no tokens at all
            grad_w = torch.zeros(V, d, **new)
        total_loss = per.sum()
        return (total_loss, per, lse_rest, z_y, z_dk, best, best_id), (grad_h, grad_w, grad_b)


class _ChunkedHeadLoss(torch.autograd.Function):
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
            raise RuntimeError("the chunked loss stores its gradients for one backward pass (no retain_graph reuse)")
        grads = []
        for g, dtype in zip(ctx.grads, ctx.dtypes):  # in place: the stored gradients are used once
            grads.append(None if g is None else g.mul_(g_total.to(g.dtype)).to(dtype))
        ctx.grads = None
        return (*grads, None)
