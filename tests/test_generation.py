"""Adaptive generation: KV cache = full recomputation, policy limits, fixed-K = the training layout."""

from __future__ import annotations

import math

import pytest
import torch

from cyb_lightning.data.batch import LaidOutBatch
from cyb_lightning.losses import functional as LF
from cyb_lightning.generation import (
    AdaptiveRunner,
    PausePolicy,
    Sampling,
    adaptive_evaluate,
    answer_nll,
)
from cyb_lightning.model.gpt import GPTConfig
from tests.conftest import assert_cache_contract

V, DK, PAUSES, PAD = 24, 2, (3, 4, 5), 0
K = len(PAUSES)
BIAS = 4.0  # with the boosted DK row below, this model pauses 0, 2 or 3 times depending on the context


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    m = GPTConfig(n_layer=2, n_head=2, n_kv_head=1, d_model=32, max_position=64, init_std=0.1).build(V).eval()
    with torch.no_grad():
        m.head.weight[DK] *= 10  # make d depend strongly on the context (tied: DK is never an input)
    return m


def runner(decoder, kind, threshold=0.5, use_cache=True, sampling=Sampling(0.0), seed=1):
    return AdaptiveRunner(decoder, DK, PAUSES, PAD, BIAS, PausePolicy(kind, threshold), sampling,
                          use_cache=use_cache, generator=torch.Generator().manual_seed(seed))  # fmt: skip


PROMPT = [1, 7, 8, 9, 13, 21]
CASES = [("greedy", 0.5), ("threshold", 0.5), ("threshold", 0.2), ("sample", 0.5), ("fixed", 0.5), ("none", 0.5)]


@pytest.mark.parametrize("kind,threshold", CASES)
def test_kv_cache_generation_equals_full_recomputation(decoder, kind, threshold):
    cached = runner(decoder, kind, threshold).generate(PROMPT, 16)
    full = runner(decoder, kind, threshold, use_cache=False).generate(PROMPT, 16)
    assert cached.tokens.tolist() == full.tokens.tolist()
    assert cached.steps.tolist() == full.steps.tolist()
    torch.testing.assert_close(cached.nll, full.nll, rtol=1e-4, atol=1e-4)
    assert cached.tokens.shape[1] == len(PROMPT) + 16
    assert DK not in cached.tokens[0, len(PROMPT) :].tolist()


def test_the_policies_under_test_do_pause_adaptively(decoder):
    steps = torch.cat([runner(decoder, k, t).generate(PROMPT, 16).steps[0] for k, t in CASES[:4]])
    counts = torch.bincount(steps - 1, minlength=K + 1)
    assert counts[0] > 0 and counts[1:].sum() > 0  # some tokens answer at once, some pause


def test_threshold_one_never_pauses_and_equals_no_pause_decoding(decoder):
    t1 = runner(decoder, "threshold", 1.0).generate(PROMPT, 16)
    assert (t1.steps == 1).all()
    assert t1.tokens.tolist() == runner(decoder, "none").generate(PROMPT, 16).tokens.tolist()


def test_threshold_zero_always_uses_k_pauses_and_equals_fixed_k(decoder):
    t0 = runner(decoder, "threshold", 0.0).generate(PROMPT, 16)
    fixed = runner(decoder, "fixed").generate(PROMPT, 16)
    assert (t0.steps == K + 1).all() and (fixed.steps == K + 1).all()
    assert t0.tokens.tolist() == fixed.tokens.tolist()
    assert t0.forward_calls == fixed.forward_calls == (K + 1) * (len(PROMPT) - 1 + 16)


def cyb_layout(real: torch.Tensor) -> dict[str, torch.Tensor]:
    B, T = real.shape[0], real.shape[1] - 1
    ids = torch.empty(B, T, K + 1, dtype=torch.long)
    ids[:, :, 0] = real[:, :-1]
    ids[:, :, 1:] = torch.tensor(PAUSES)
    return {"input_ids": ids.view(B, -1), "position_ids": torch.arange(T).repeat_interleave(K + 1).expand(B, -1),
            "targets": real[:, 1:], "target_mask": torch.ones(B, T, dtype=torch.bool)}  # fmt: skip


def test_fixed_k_teacher_forcing_reads_the_training_layout_at_step_w(decoder):
    real = torch.randint(6, V, (2, 10), generator=torch.Generator().manual_seed(3))
    batch = cyb_layout(real)
    trace = runner(decoder, "fixed").run(LaidOutBatch.of(batch).real_tokens(), length=9)
    with torch.no_grad():
        logits = decoder(batch["input_ids"], batch["position_ids"]).view(2, 9, K + 1, V)
    expected = answer_nll(logits[:, :, -1].reshape(-1, V), batch["targets"].reshape(-1), DK).view(2, 9)
    torch.testing.assert_close(trace.nll, expected, rtol=1e-5, atol=1e-5)
    none = runner(decoder, "none").run(real, length=9)
    with torch.no_grad():
        plain = decoder(real[:, :-1])
    expected = answer_nll(plain.reshape(-1, V), real[:, 1:].reshape(-1), DK).view(2, 9)
    torch.testing.assert_close(none.nll, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["greedy", "threshold"])
def test_rows_in_lockstep_see_only_their_own_pauses(decoder, kind):
    # A batch of rows pausing differently (invisible filler inputs) = each row run alone.
    real = torch.randint(6, V, (3, 12), generator=torch.Generator().manual_seed(4))
    together = runner(decoder, kind, 0.3).run(real, length=11)
    assert together.steps.unique().numel() > 1
    for b in range(3):
        alone = runner(decoder, kind, 0.3, use_cache=False).run(real[b : b + 1], length=11)
        assert alone.steps.tolist() == together.steps[b : b + 1].tolist()
        torch.testing.assert_close(alone.nll, together.nll[b : b + 1], rtol=1e-4, atol=1e-4)


def test_adaptive_evaluation_reports_compute_against_fixed_k(decoder):
    real = torch.randint(6, V, (2, 12), generator=torch.Generator().manual_seed(5))
    batch = cyb_layout(real)
    batch["target_mask"][1, 8:] = False
    greedy = adaptive_evaluate(runner(decoder, "greedy"), [batch])
    fixed = adaptive_evaluate(runner(decoder, "fixed"), [batch])
    trace = runner(decoder, "greedy").run(real, length=11)
    mask = batch["target_mask"]
    assert greedy["tokens"] == fixed["tokens"] == 11 + 8
    assert math.isclose(greedy["steps_per_token"], float(trace.steps[mask].double().mean()))
    assert math.isclose(greedy["ppl"], math.exp(float(trace.nll[mask].mean())), rel_tol=1e-9)
    assert fixed["steps_per_token"] == K + 1 and fixed["compute_saved"] == 0.0
    assert math.isclose(greedy["compute_saved"], 1 - greedy["steps_per_token"] / (K + 1))
    assert math.isclose(sum(greedy["p_pauses"]), 1.0)
    assert math.isclose(greedy["accuracy"], float(trace.correct[mask].double().mean()))
    # Rows run in lockstep: a batch computes every row at every decoder call (waiting rows included).
    assert math.isclose(greedy["batch_steps_per_token"], trace.forward_calls / 11)
    assert greedy["batch_steps_per_token"] >= greedy["steps_per_token"]
    assert fixed["batch_steps_per_token"] == K + 1


def test_adaptive_evaluation_by_difficulty(decoder):
    real = torch.randint(6, V, (2, 12), generator=torch.Generator().manual_seed(5))
    batch = cyb_layout(real)
    batch["difficulty"] = torch.tensor([[0, 1, 2, -1] * 2 + [1, 1, 1], [2] * 11])
    out = adaptive_evaluate(runner(decoder, "threshold"), [batch])
    trace = runner(decoder, "threshold").run(real, length=11)
    assert sorted(out["by_difficulty"]) == [0, 1, 2]  # level −1 (not a task target) is left out
    for level, r in out["by_difficulty"].items():
        sel = batch["difficulty"] == level
        assert r["tokens"] == int(sel.sum())
        assert math.isclose(r["steps_per_token"], float(trace.steps[sel].double().mean()))
        assert math.isclose(r["accuracy"], float(trace.correct[sel].double().mean()))


def test_the_default_policy_is_the_trained_rule():
    assert PausePolicy().kind == "threshold" and PausePolicy().threshold == 0.5
    # d = 0.3 while DK is the single most likely id: greedy pauses, the trained rule (τ = 0.5) answers.
    z = torch.full((1, V), -10.0)
    z[0, DK], z[0, 6:] = math.log(0.3), math.log(0.7 / (V - 6))
    assert PausePolicy().pause(z, DK, 0.0, None).tolist() == [False]
    assert PausePolicy("greedy").pause(z, DK, 0.0, None).tolist() == [True]


def test_sampling_options():
    logits = torch.tensor([[0.0, 1.0, 9.0, 3.0, 2.0, 2.5]])  # DK = 2 has the largest logit
    g = torch.Generator().manual_seed(0)
    assert Sampling(0.0).draw(logits, DK, g).item() == 3
    assert Sampling(1.0, top_k=1).draw(logits, DK, g).item() == 3
    assert Sampling(1.0, top_p=1e-6).draw(logits, DK, g).item() == 3
    draws = torch.cat([Sampling(1.0, top_k=2).draw(logits.expand(400, -1), DK, g) for _ in range(3)])
    assert set(draws.tolist()) == {3, 5}
    draws = torch.cat([Sampling(2.0).draw(logits.expand(400, -1), DK, g) for _ in range(3)])
    assert DK not in draws.tolist() and len(set(draws.tolist())) == 5
    with pytest.raises(ValueError):
        Sampling(1.0, top_p=0.0)
    with pytest.raises(ValueError, match="unknown pause policy"):
        PausePolicy("always")


def test_decoder_cache_chunks_and_hidden_inputs(decoder):
    ids = torch.randint(6, V, (2, 11), generator=torch.Generator().manual_seed(6))
    pos = torch.arange(11).expand(2, -1)
    assert_cache_contract(decoder, ids, pos, filler_id=PAD)
    with pytest.raises(ValueError, match="needs a cache"):
        decoder(ids, pos, key_mask=torch.ones(2, 11, dtype=torch.bool))


def answer_layout(real: torch.Tensor, scored: torch.Tensor) -> dict[str, torch.Tensor]:
    """The answer_pauses layout of rows of real tokens (pauses after the scored targets only), batched."""
    from cyb_lightning.data.layout import layout_answer_pauses

    rows = [layout_answer_pauses(r.numpy(), r.numel() - 1, PAUSES, PAD, s.numpy()) for r, s in zip(real, scored)]
    out = {k: torch.from_numpy(torch.utils.data.default_collate([r[k] for r in rows]).numpy()) for k in rows[0]}
    out["target_mask"] = scored.clone()
    return out


def test_a_token_the_layout_never_paused_after_gets_no_pauses(decoder):
    """Teacher-forced reading of an answer_pauses batch: the pauses only where the layout put them (the
    answers), every other token read plainly, so fixed-K there is exactly the training layout's last step."""
    real = torch.randint(6, V, (2, 10), generator=torch.Generator().manual_seed(7))
    scored = torch.zeros(2, 9, dtype=torch.bool)
    scored[0, 4], scored[1, [2, 7]] = True, True
    batch = LaidOutBatch.of(answer_layout(real, scored))
    assert batch.pause_slots.tolist() == scored.tolist()
    assert batch.input_ids.shape[1] == 9 + 2 * K  # trimmed: the columns no group reads are dropped
    fixed = runner(decoder, "fixed").run(batch.real_tokens(), 9, may_pause=batch.pause_slots)
    assert fixed.steps.tolist() == torch.where(scored, K + 1, 1).tolist()
    with torch.no_grad():
        logits = batch.groups(decoder(batch.input_ids, batch.position_ids))  # [N, W, V] of the scored groups
    expected = answer_nll(logits[:, -1], batch.targets, DK)
    torch.testing.assert_close(fixed.nll[scored], expected, rtol=1e-5, atol=1e-5)
    # The trained rule pauses only there too; everywhere else it is the plain model.
    threshold = runner(decoder, "threshold", 0.0).run(batch.real_tokens(), 9, may_pause=batch.pause_slots)
    assert (threshold.steps[~scored] == 1).all() and (threshold.steps[scored] == K + 1).all()
    plain = runner(decoder, "none").run(real, 9)
    first_answer = int(torch.nonzero(scored[0])[0])  # before any pause the row is the plain model's
    torch.testing.assert_close(threshold.nll[0, :first_answer], plain.nll[0, :first_answer])
    assert LaidOutBatch.of(cyb_layout(real)).pause_slots.all()


def test_generation_of_an_answer_pause_model_pauses_only_after_the_prompt(decoder):
    trace = runner(decoder, "fixed").generate(PROMPT, 6, answers_only=True)
    assert trace.steps[0].tolist() == [1] * (len(PROMPT) - 1) + [K + 1] * 6
    assert runner(decoder, "fixed").generate(PROMPT, 6).steps[0].tolist() == [K + 1] * (len(PROMPT) - 1 + 6)


def test_ranks_agree_on_when_every_row_has_answered(decoder):
    """Under a sharded decoder every rank must make the same decoder calls: a rank whose rows have all answered
    goes on feeding invisible inputs while any rank still pauses (``any_rank``), with the same results."""
    real = torch.randint(6, V, (2, 10), generator=torch.Generator().manual_seed(8))
    alone = runner(decoder, "threshold", 0.3).run(real, 9)
    calls = []

    def any_rank(pausing: bool) -> bool:  # another rank that always pauses to the end
        calls.append(pausing)
        return True

    synced = AdaptiveRunner(decoder, DK, PAUSES, PAD, BIAS, PausePolicy("threshold", 0.3), Sampling(0.0),
                            any_rank=any_rank).run(real, 9)  # fmt: skip
    assert synced.forward_calls == 9 * (K + 1) > alone.forward_calls
    assert synced.steps.tolist() == alone.steps.tolist()
    torch.testing.assert_close(synced.nll, alone.nll, rtol=1e-5, atol=1e-5)
    assert len(calls) == 9 * K


def test_both_readers_of_the_trained_rule_break_a_tie_alike():
    """d exactly τ: validation's readout and adaptive inference both ask for another step (before, inference
    answered and the readout paused)."""
    from cyb_lightning.metrics.stopping import stopping_readout

    z = torch.full((1, V), -1e4, dtype=torch.float64)
    z[0, DK], z[0, 7] = 0.0, 0.0  # DK and one id equally likely, the rest nothing: d = 0.5 exactly
    log_d = LF.dk_log_prob(z, DK)
    assert log_d.item() == math.log(0.5)
    assert PausePolicy("threshold").pause(z, DK, 0.0, None).tolist() == [True]
    assert stopping_readout(torch.stack([log_d, log_d - 5.0], -1)).tolist() == [1]  # pauses at step 1
    assert PausePolicy("threshold", 1.0).pause(z, DK, 0.0, None).tolist() == [False]


def test_pauses_inside_the_text_are_read_at_their_layout_positions(decoder):
    """A ``pause_groups`` batch (the K pauses at their token's position inside the text, W = 1): the reader feeds
    every input at the position the layout gave it, so no-pause reading equals the full forward the validation
    loss reads (it fed consecutive positions before: 129.57 against 135.86 perplexity on one run)."""
    from cyb_lightning.data.layout import layout_pause_groups

    rows = [layout_pause_groups(torch.randint(6, V, (20,), generator=torch.Generator().manual_seed(9 + b)).numpy(),
                                16, PAUSES, PAD, num_groups=2, seed=0, index=b) for b in range(2)]  # fmt: skip
    batch = LaidOutBatch.of({k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0]})
    assert not torch.equal(batch.first_positions, torch.arange(16).expand(2, 16))  # shared positions inside
    with torch.no_grad():
        logits = decoder(batch.input_ids, batch.position_ids)
    expected = answer_nll(logits[batch.target_mask], batch.targets, DK)
    out = adaptive_evaluate(runner(decoder, "none"), [batch])
    assert math.isclose(out["nll"], float(expected.mean()), rel_tol=1e-6)


def test_a_long_adaptive_evaluation_says_how_far_it_got(decoder):
    real = torch.randint(6, V, (2, 12), generator=torch.Generator().manual_seed(5))
    heard: list[str] = []
    adaptive_evaluate(runner(decoder, "threshold"), [cyb_layout(real)] * 3, progress=heard.append, every_s=0.0)
    assert heard == [f"  threshold: {b} batches, {22 * b} tokens, {heard[b - 1].rsplit(', ', 1)[1]}" for b in (1, 2, 3)]
