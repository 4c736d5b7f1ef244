"""The head loss (hidden states + output head, chunk by chunk) against the plain loss on full logits.

Values and gradients w.r.t. the hidden states, the head weight and bias agree to ~1e-10 in float64 for
every loss, several W, with and without the DK prior, at chunk sizes that do and do not divide the batch;
fp32 and bf16 agree to stated tolerances.
"""

from __future__ import annotations

import math

import pytest
import torch

from cyb_lightning.losses import CYBAP, CYBDP, CYBVA, CrossEntropy, TBYSPerToken
from cyb_lightning.losses import functional as F
from cyb_lightning.losses.head import OutputHead, auto_chunk_size, head_loss
from cyb_lightning.metrics import head_statistics, step_statistics

DK = 2


def losses_for(W: int) -> dict[str, object]:
    ramp = [float(i + 1) for i in range(W)]
    last = [0.0] * (W - 1) + [1.0]
    return {
        "ap": CYBAP(omega=last),
        "ap_uniform_discounted": CYBAP(omega=[1.0] * W, gamma0=0.9),
        "ap_no_prior": CYBAP(omega=last, psi_dk=None),
        "va": CYBVA(rho=ramp),
        "dp": CYBDP(rho=[1.0] + [0.0] * (W - 2) + [1.0] if W > 1 else [1.0], alpha=0.5),
        "tbys": TBYSPerToken(),
    }


def problem(N: int, W: int, d: int, V: int, dtype=torch.float64, bias: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, W, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(V, d, generator=g, dtype=torch.float64) * 0.7).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g, dtype=torch.float64)).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(DK + 1, V, (N,), generator=g)
    return hidden, weight, b, targets


def plain(hidden, weight, bias, targets, loss, weights=None):
    logits = hidden @ weight.T if bias is None else hidden @ weight.T + bias
    per_token = loss(logits, targets, DK)
    (per_token * (1 if weights is None else weights)).sum().backward()
    grads = [t.grad.clone() if t is not None else None for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    return per_token.detach(), grads


def chunked_loss(hidden, weight, targets, loss, dk, bias=None, softcap=None, **kw):
    return head_loss(hidden, OutputHead(weight, bias, softcap=softcap), targets, loss, dk, **kw)


def chunked(hidden, weight, bias, targets, loss, scale=1.0, **kw):
    out = chunked_loss(hidden, weight, targets, loss, DK, bias=bias, **kw)
    (scale * out.total).backward()
    grads = [t.grad.clone() if t is not None else None for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    return out, grads


@pytest.mark.parametrize("W", [1, 2, 4])
@pytest.mark.parametrize("chunk_size", [1, 5, 8, None, 0])
@pytest.mark.parametrize("name", list(losses_for(4)))
def test_float64_values_and_gradients_match_the_plain_loss(W, chunk_size, name):
    loss = losses_for(W)[name]
    if name == "dp" and W == 1:
        loss = CYBDP(rho=[1.0], alpha=0.5)
    hidden, weight, bias, targets = problem(N=7, W=W, d=6, V=37)
    ref, ref_grads = plain(hidden, weight, bias, targets, loss)
    # A scaled total: the backward must scale the gradients it stored in the forward pass.
    out, grads = chunked(hidden, weight, bias, targets, loss, scale=0.3, chunk_size=chunk_size)
    torch.testing.assert_close(out.per_token, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.total, ref.sum(), rtol=0, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, 0.3 * r, rtol=0, atol=1e-10)


def test_cross_entropy_baseline_matches_ordinary_cross_entropy():
    hidden, weight, bias, targets = problem(N=9, W=1, d=5, V=23)
    ref, ref_grads = plain(hidden, weight, bias, targets, CrossEntropy())
    out, grads = chunked(hidden, weight, bias, targets, CrossEntropy(), chunk_size=4)
    torch.testing.assert_close(out.per_token, ref, rtol=0, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)


def test_dk_dominating_and_extreme_logits_stay_exact():
    # DK logits far above the rest (d ≈ 1 in probability) and large-magnitude logits: the LSE over the
    # non-DK ids must not cancel, exactly as on the plain path.
    hidden, weight, bias, targets = problem(N=6, W=4, d=4, V=19)
    with torch.no_grad():
        bias[DK] = 60.0
        weight.mul_(20.0)
    for loss in losses_for(4).values():
        ref, ref_grads = plain(hidden, weight, bias, targets, loss)
        out, grads = chunked(hidden, weight, bias, targets, loss, chunk_size=8)
        assert torch.isfinite(out.per_token).all()
        torch.testing.assert_close(out.per_token, ref, rtol=1e-12, atol=1e-9)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-9)


def test_masked_targets_only_the_counted_rows_enter():
    # The module selects the counted tokens (target_mask) before the loss: same rows, same gradients.
    hidden, weight, _, targets = problem(N=10, W=4, d=6, V=31, bias=False)
    mask = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    loss = CYBAP()
    ref, ref_grads = plain(hidden[mask].detach().requires_grad_(), weight, None, targets[mask], loss)
    h = hidden.detach().clone().requires_grad_()
    out = chunked_loss(h[mask], weight, targets[mask], loss, DK, chunk_size=6)
    out.total.backward()
    torch.testing.assert_close(out.per_token, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(h.grad[mask], ref_grads[0], rtol=0, atol=1e-10)
    assert (h.grad[~mask] == 0).all()
    torch.testing.assert_close(weight.grad, ref_grads[1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["ap", "va", "dp", "tbys"])
def test_granted_steps_match_the_loss_on_full_logits(name):
    hidden, weight, bias, targets = problem(N=8, W=4, d=6, V=29)
    granted = torch.tensor([1, 4, 2, 3, 4, 1, 2, 4])
    step_mask = torch.arange(4)[None] < granted[:, None]
    loss = {"ap": CYBAP(omega=[1, 0, 2, 1], gamma0=0.9), "va": CYBVA(), "dp": CYBDP(alpha=0.3),
            "tbys": TBYSPerToken()}[name]  # fmt: skip
    logits = hidden @ weight.T + bias
    ref = loss(logits, targets, DK, step_mask=step_mask)
    ref.sum().backward()
    ref_grads = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    out, grads = chunked(hidden, weight, bias, targets, loss, chunk_size=12, step_mask=step_mask)
    torch.testing.assert_close(out.per_token, ref.detach(), rtol=0, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("name", ["ap", "va", "dp", "tbys"])
def test_low_precision_matches_the_float64_reference(dtype, tol, name):
    # Both paths in fp32/bf16 against the exact float64 loss: the chunked path is at least as accurate.
    loss = losses_for(4)[name]
    h64, w64, _, targets = problem(N=12, W=4, d=16, V=64, bias=False)
    ref, ref_grads = plain(h64, w64, None, targets, loss)
    h, w = (t.detach().to(dtype).requires_grad_() for t in (h64, w64))
    low_plain, low_plain_grads = plain(h, w, None, targets, loss)
    out, grads = chunked(h, w, None, targets, loss, chunk_size=16)
    assert out.per_token.dtype == torch.float32
    scale = ref.abs().max()
    assert (out.per_token.double() - ref).abs().max() <= tol * scale
    assert (out.per_token.double() - ref).abs().max() <= 2 * (low_plain.double() - ref).abs().max() + 1e-6 * scale
    for g, r in zip(grads[:2], ref_grads[:2]):
        assert g.dtype == dtype
        assert (g.double() - r).abs().max() <= tol * r.abs().max()


def test_statistics_equal_the_functional_math_on_the_logits():
    """head_statistics of the chunked quantities against the loss math applied to full logits, written out here."""
    from cyb_lightning.model import GPTConfig
    from cyb_lightning.module import CYBModule

    hidden, weight, _, targets = problem(N=9, W=4, d=6, V=40, bias=False)
    m = CYBModule(GPTConfig(n_layer=1, n_head=2, d_model=8), CYBAP(), vocab_size=40, dk_id=DK, steps_per_token=4)
    with torch.no_grad():
        weight[DK] *= 3  # some steps answer, some pause
        out = chunked_loss(hidden, weight, targets, m.loss_fn, DK, chunk_size=8, with_argmax=True)
        logits = hidden @ weight.T
        log_d, log_1md, log_t = F.step_log_probs(logits, targets, DK, m.loss_fn.dk_bias(40))
        log_s = F.halting_log_probs(log_d, log_1md)
        no_dk = logits.clone()
        no_dk[..., DK] = -torch.inf
        ref = {"nll": -torch.logsumexp(log_s + log_t, -1), "stop": log_s.exp(), "log_d": log_d, "log_t": log_t,
               "correct": no_dk.argmax(-1) == targets[:, None],
               "readout": torch.where(log_d < math.log(0.5), 1, 0).index_fill(1, torch.tensor([3]), 1).argmax(-1)}
    got = head_statistics(out.lse_rest, out.z_y, out.z_dk, out.best_id, targets, m.loss_fn, out.vocab_size)
    assert 0 < int(got.readout.gt(0).sum()) < 9  # both kinds of token occur
    for field, value in ref.items():
        torch.testing.assert_close(getattr(got, field), value.to(getattr(got, field).dtype), msg=field)
    same = step_statistics(logits, targets, DK, m.loss_fn)  # the full-logits entry point agrees too
    torch.testing.assert_close(same.nll, got.nll.to(same.nll.dtype))


def test_autocast_runs_every_chunk_in_the_autocast_dtype():
    """Under bf16 autocast (fp32 parameters, ``bf16-mixed``) the head matmuls of every chunk run in bf16,
    exactly as on bf16 copies of the operands; the statistics and losses stay fp32."""
    hidden, weight, _, targets = problem(N=12, W=4, d=16, V=64, dtype=torch.float32, bias=False)
    loss = CYBAP()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = chunked_loss(hidden, weight, targets, loss, DK, chunk_size=8)
        out.total.backward()
    got_h, got_w = hidden.grad.clone(), weight.grad.clone()
    assert out.per_token.dtype == torch.float32 and got_w.dtype == torch.float32
    h16, w16 = (t.detach().bfloat16().requires_grad_() for t in (hidden, weight))
    ref = chunked_loss(h16, w16, targets, loss, DK, chunk_size=8)
    ref.total.backward()
    torch.testing.assert_close(out.per_token, ref.per_token, rtol=0, atol=0)
    torch.testing.assert_close(got_h, h16.grad.float(), rtol=0, atol=0)
    # The weight gradient is accumulated in fp32 both ways; the bf16 copy's is rounded once at the end.
    torch.testing.assert_close(got_w.bfloat16(), w16.grad, rtol=0, atol=0)


def test_no_grad_path_and_last_step_only_skip_work():
    hidden, weight, _, targets = problem(N=5, W=4, d=6, V=21, bias=False)
    with torch.no_grad():
        out = chunked_loss(hidden, weight, targets, TBYSPerToken(), DK)
        ref = TBYSPerToken()(hidden @ weight.T, targets, DK)
    assert out.lse_rest.shape == (5, 1)  # only the last step's head was computed
    assert out.total.grad_fn is None
    torch.testing.assert_close(out.per_token, ref, rtol=0, atol=1e-10)


def test_auto_chunk_size_and_bad_arguments():
    assert auto_chunk_size(256_000, 4) % 4 == 0 and auto_chunk_size(256_000, 4) * 256_000 <= 1 << 24
    assert auto_chunk_size(1 << 30, 4) == 4  # at least one token
    hidden, weight, _, targets = problem(N=3, W=4, d=6, V=21, bias=False)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_loss(hidden, weight, targets, CYBAP(), DK, chunk_size=-3)
    one = chunked_loss(hidden, weight, targets, CYBAP(), DK, chunk_size=0)  # one chunk: the full logits
    torch.testing.assert_close(one.per_token, CYBAP()(hidden @ weight.T, targets, DK), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match=r"weight must be \[V, d=6\]"):
        chunked_loss(hidden, weight.T, targets, CYBAP(), DK)
    with pytest.raises(ValueError, match="step_mask"):
        chunked_loss(hidden, weight, targets, TBYSPerToken(), DK, step_mask=torch.ones(3, 3, dtype=torch.bool))


def test_gpt_hidden_states_and_output_head_give_forward():
    from cyb_lightning.model import GPTConfig

    torch.manual_seed(0)
    model = GPTConfig(n_layer=2, n_head=2, d_model=16).build(30)
    ids = torch.randint(0, 30, (2, 8))
    pos = torch.arange(4).repeat_interleave(2).expand(2, -1)
    head = model.output_head()
    assert head.bias is None and head.weight is model.embed.weight  # tied
    torch.testing.assert_close(head.logits(model.hidden_states(ids, pos)), model(ids, pos))
    # The seam: head_fn sees exactly the hidden states and head that forward's logits come from.
    got = model(ids, pos, head_fn=lambda h, hd: hd.logits(h))
    torch.testing.assert_close(got, model(ids, pos))


def test_hf_output_head_gives_forward_with_soft_capping_and_scaling():
    transformers = pytest.importorskip("transformers")
    from cyb_lightning.model import HFCausalLM

    lm = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=64)
    ids = torch.randint(0, 48, (2, 8))
    pos = torch.arange(4).repeat_interleave(2).expand(2, -1)
    configs = {"llama": transformers.LlamaConfig(**lm, tie_word_embeddings=False),
               "gpt2": transformers.GPT2Config(vocab_size=48, n_embd=32, n_layer=2, n_head=2, n_positions=64),
               # Gemma-2 soft-caps its logits at 30; a cap of 0.5 makes the tanh bend for these small logits.
               "gemma2": transformers.Gemma2Config(**lm, head_dim=16, final_logit_softcapping=0.5),
               "cohere": transformers.CohereConfig(**lm, logit_scale=0.25)}  # fmt: skip
    for name, config in configs.items():
        torch.manual_seed(0)
        model = HFCausalLM(transformers.AutoModelForCausalLM.from_config(config)).eval()
        head = model.output_head()
        assert (head.softcap, head.scale) == {"gemma2": (0.5, 1.0), "cohere": (None, 0.25)}.get(name, (None, 1.0))
        torch.testing.assert_close(model(ids, pos, head_fn=lambda h, hd: hd.logits(h)), model(ids, pos), msg=name)


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_soft_capped_and_scaled_heads_match_the_plain_loss_on_their_logits(scale):
    """The cap and the scale are applied inside the chunk: values and gradients equal the plain loss on
    cap·tanh(scale·z/cap) (Gemma-2's head), which trains instead of falling back to full logits."""
    hidden, weight, bias, targets = problem(N=7, W=4, d=6, V=37)
    with torch.no_grad():
        weight.mul_(4.0)  # logits well into the tanh's bend at cap 3
    for loss in losses_for(4).values():
        head = OutputHead(weight, bias, softcap=3.0, scale=scale)
        per_token = loss(head.logits(hidden), targets, DK)
        per_token.sum().backward()
        ref_grads = [t.grad.clone() for t in (hidden, weight, bias)]
        for t in (hidden, weight, bias):
            t.grad = None
        out = head_loss(hidden, head, targets, loss, DK, chunk_size=8)
        out.total.backward()
        torch.testing.assert_close(out.per_token, per_token.detach(), rtol=0, atol=1e-10)
        for t, r in zip((hidden, weight, bias), ref_grads):
            torch.testing.assert_close(t.grad, r, rtol=0, atol=1e-10)
            t.grad = None
