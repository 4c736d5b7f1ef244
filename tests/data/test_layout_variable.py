"""Variable pauses per token ("recipe 2"): the layout follows ω, and the loss counts granted steps only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cyb_lightning.data.layout import layout_variable, make_layout, variable_pause_counts
from cyb_lightning.data.tokenizer import standard_vocab
from cyb_lightning.losses import CYBAP
from cyb_lightning.losses import functional as F

VOCAB = standard_vocab(100)
PAUSES = VOCAB.pause_ids[:3]
PAD = VOCAB.pad_id


def test_pause_counts_follow_omega_on_a_large_sample():
    omega = (0.5, 0.2, 0.2, 0.1)
    lay = make_layout("variable", 64, VOCAB, num_pauses=3, omega=[5, 2, 2, 1], seed=11)
    assert lay.omega == pytest.approx(omega) and lay.steps_per_token == 4 and lay.length == 256
    counts = np.zeros(4)
    tokens = np.arange(20, 85)
    for index in range(500):  # 500 × 64 = 32,000 tokens
        ex = lay(tokens, index)
        counts += np.bincount(ex["step_mask"].sum(1) - 1, minlength=4)
    freq = counts / counts.sum()
    # 5 standard errors of a binomial share at n = 32,000 is < 0.015.
    assert np.abs(freq - omega).max() < 0.015, freq
    # Deterministic in (seed, index), different across indices and seeds.
    a = variable_pause_counts(64, omega, 11, 3)
    assert np.array_equal(a, variable_pause_counts(64, omega, 11, 3))
    assert not np.array_equal(a, variable_pause_counts(64, omega, 11, 4))
    assert not np.array_equal(a, variable_pause_counts(64, omega, 12, 3))


def test_layout_packs_each_token_with_its_granted_pauses():
    tokens = np.arange(30, 39)  # T + 1 = 9 real tokens
    ex = layout_variable(tokens, 8, PAUSES, PAD, (0.25, 0.25, 0.25, 0.25), seed=0, index=5)
    granted = ex["step_mask"].sum(1) - 1
    assert ex["step_mask"].shape == ex["step_index"].shape == (8, 4)
    assert ex["input_ids"].shape == ex["position_ids"].shape == (32,)
    assert ex["targets"].tolist() == tokens[1:].tolist() and ex["target_mask"].all()
    # Packed back to back: x_0 P1..P_k0 x_1 P1..P_k1 … then padding, each pause at its token's position.
    expected = []
    for t in range(8):
        expected += [tokens[t]] + list(PAUSES[: granted[t]])
    n = len(expected)
    assert ex["input_ids"][:n].tolist() == expected and (ex["input_ids"][n:] == PAD).all()
    assert ex["position_ids"][:n].tolist() == np.repeat(np.arange(8), 1 + granted).tolist()
    for t in range(8):
        for i in range(4):
            slot = ex["step_index"][t, i]
            want = tokens[t] if i == 0 else PAUSES[min(i, granted[t]) - 1] if granted[t] else tokens[t]
            assert ex["input_ids"][slot] == want
            assert ex["step_mask"][t, i] == (i <= granted[t])
    assert len(set(np.unique(granted))) > 1


def test_short_chunk_and_empty_example_keep_the_contract():
    lay = make_layout("variable", 6, VOCAB, num_pauses=3, seed=1)
    ex = lay(np.array([40, 41, 42]), 0)
    assert ex["target_mask"].tolist() == [True, True, False, False, False, False]
    assert (ex["step_mask"][2:].sum(1) == 1).all()  # no target, no pauses
    empty = lay.empty_example()
    assert set(empty) == set(ex) and all(empty[k].shape == ex[k].shape for k in ex)
    assert not empty["target_mask"].any() and not empty["step_mask"].any()
    with pytest.raises(ValueError, match="omega"):
        make_layout("variable", 6, VOCAB, num_pauses=3, omega=[1, 1])


def reference_loss(logits: torch.Tensor, y: int, dk: int, granted: int) -> float:
    """The definition, step by step in probabilities (float64): −log Σ_{i ≤ g} s_i t_i, d_g := 0."""
    p = logits.double().softmax(-1)
    total, survive = 0.0, 1.0
    for i in range(granted):
        d = float(p[i, dk])
        t = float(p[i, y]) / (1 - d)
        stop = survive if i == granted - 1 else survive * (1 - d)
        total += stop * t
        survive *= d
    return -math.log(total)


def test_loss_equals_the_reference_on_hand_made_examples():
    dk = VOCAB.dk_id
    logits = torch.tensor(
        [[[0.0, 0.0, 2.0, 1.0, 0.5], [0.0, 0.0, -1.0, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 5],
         [[1.0, 0.5, -2.0, 0.0, 0.0], [0.0, 0.0, 4.0, 0.0, 1.0], [0.0, 2.0, 1.0, 0.0, 0.0], [0.5, 0.0, 3.0, 0.0, 2.0]],
         [[0.0, 0.0, 0.0, 0.0, 3.0], [9.0] * 5, [9.0] * 5, [9.0] * 5]],
        dtype=torch.float64,
    )  # fmt: skip
    y = torch.tensor([3, 4, 4])
    granted = [2, 4, 1]
    mask = torch.arange(4)[None, :] < torch.tensor(granted)[:, None]
    got = CYBAP(psi_dk=None)(logits, y, dk, step_mask=mask)
    want = torch.tensor([reference_loss(logits[n], int(y[n]), dk, granted[n]) for n in range(3)], dtype=torch.float64)
    torch.testing.assert_close(got, want)
    # All steps granted: ℓ_CYB with ω = last step; g steps: the CYB loss of the first g steps.
    torch.testing.assert_close(got[1], F.cyb_loss(logits[1:2], y[1:2], dk, [0, 0, 0, 1], [1] * 4)[0])
    torch.testing.assert_close(got[0], F.cyb_loss(logits[:1, :2], y[:1], dk, [0, 1], [1, 1])[0])
    # One granted step: plain cross-entropy without DK.
    torch.testing.assert_close(got[2], F.tbys_loss(logits[2:, :1], y[2:], dk)[0])
    # The DK prior enters like in every other loss.
    biased = F.cyb_loss_from(F.step_log_probs(logits, y, dk, dk_bias=1.5), [0, 0, 0, 1], [1] * 4, mask)
    shifted = logits.clone()
    shifted[..., dk] += 1.5
    torch.testing.assert_close(biased, CYBAP(psi_dk=None)(shifted, y, dk, step_mask=mask))


def test_loss_gradient_is_finite_and_ignores_steps_not_granted():
    dk = VOCAB.dk_id
    logits = (torch.randn(6, 4, 12, dtype=torch.float64) * 30).requires_grad_()
    mask = torch.arange(4)[None, :] < torch.tensor([1, 2, 3, 4, 2, 1])[:, None]
    CYBAP(psi_dk=None)(logits, torch.randint(11, 12, (6,)), dk, step_mask=mask).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[~mask] == 0).all()


def test_module_trains_on_granted_steps_only():
    from cyb_lightning.losses import CYBAP
    from cyb_lightning.model import GPTConfig
    from cyb_lightning.module import CYBModule

    lay = make_layout("variable", 8, VOCAB, num_pauses=3, seed=2)
    examples = [lay(np.arange(20 + b, 29 + b), b) for b in range(2)]
    batch = {k: torch.from_numpy(np.stack([e[k] for e in examples])) for k in examples[0]}
    torch.manual_seed(0)
    m = CYBModule(GPTConfig(n_layer=1, n_head=2, d_model=16), CYBAP(), vocab_size=VOCAB.size, dk_id=VOCAB.dk_id,
                  steps_per_token=4, seq_len=8, warmup_steps=1)  # fmt: skip
    m.configure_model()
    out = m.training_step(batch, 0)
    full = m(batch["input_ids"], batch["position_ids"])  # [2, 32, V] over the packed inputs
    logits = torch.stack([full[b, batch["step_index"][b]] for b in range(2)])  # [2, 8, 4, V]
    per_token = m.loss_fn(logits.view(16, 4, -1), batch["targets"].view(-1), VOCAB.dk_id,
                          step_mask=batch["step_mask"].view(16, 4))  # fmt: skip
    torch.testing.assert_close(out["loss"], per_token.mean())
    from cyb_lightning.data.batch import LaidOutBatch

    assert LaidOutBatch.of(batch).group_inputs.tolist() == [20 + b + t for b in range(2) for t in range(8)]


def test_trailing_columns_no_group_reads_are_trimmed_without_changing_the_loss():
    from dataclasses import replace

    from cyb_lightning.data.batch import LaidOutBatch
    from cyb_lightning.losses import CYBAP
    from cyb_lightning.model import GPTConfig
    from cyb_lightning.module import CYBModule

    lay = make_layout("answer_pauses", 8, VOCAB, num_pauses=3)
    scored = [np.arange(8) == 5, np.arange(8) == 2]
    examples = [lay(np.arange(20 + b, 29 + b), b, scored=scored[b]) for b in range(2)]
    batch = {k: torch.from_numpy(np.stack([e[k] for e in examples])) for k in examples[0]}
    trimmed = LaidOutBatch.of(batch)
    assert batch["input_ids"].shape[1] == 32 and trimmed.input_ids.shape[1] == 8 + 3  # T + K columns are read
    full = replace(trimmed, input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    torch.manual_seed(0)
    m = CYBModule(GPTConfig(n_layer=1, n_head=2, d_model=16), CYBAP(), vocab_size=VOCAB.size, dk_id=VOCAB.dk_id,
                  steps_per_token=4, seq_len=8, warmup_steps=1)  # fmt: skip
    m.configure_model()
    a, b = m.head_outputs(trimmed, with_argmax=True), m.head_outputs(full, with_argmax=True)
    torch.testing.assert_close(a.per_token, b.per_token, rtol=0, atol=1e-6)
    assert torch.equal(a.best_id, b.best_id)
