"""Layouts, checked against hand-written examples of the batch contract."""

from __future__ import annotations

import numpy as np
import pytest

from cyb_lightning.data import (
    Vocab,
    layout_cyb,
    layout_none,
    layout_pause_groups,
    layout_tbys_random,
    make_layout,
    pause_group_tokens,
    random_pause_slots,
)
from tests.conftest import assert_example

PAD, P1, P2, P3 = 0, 3, 4, 5
VOCAB = Vocab(pad_id=0, eot_id=1, dk_id=2, pause_ids=tuple(range(3, 11)), size=100)


def test_none_by_hand():
    assert_example(layout_none([10, 11, 12, 13], 3, PAD),
        input_ids=[10, 11, 12], position_ids=[0, 1, 2], targets=[11, 12, 13], target_mask=[1, 1, 1])  # fmt: skip


def test_cyb_by_hand():
    assert_example(layout_cyb([10, 11, 12, 13], 3, (P1, P2), PAD),
        input_ids=[10, P1, P2, 11, P1, P2, 12, P1, P2],
        position_ids=[0, 0, 0, 1, 1, 1, 2, 2, 2],
        targets=[11, 12, 13],
        target_mask=[1, 1, 1])  # fmt: skip


def test_cyb_padded_by_hand():
    # The end of a finite stream: 2 real tokens for T = 3 → one scored target.
    assert_example(layout_cyb([10, 11], 3, (P1, P2), PAD),
        input_ids=[10, P1, P2, 11, P1, P2, PAD, PAD, PAD],
        position_ids=[0, 0, 0, 1, 1, 1, 2, 2, 2],
        targets=[11, PAD, PAD],
        target_mask=[1, 0, 0])  # fmt: skip


@pytest.mark.parametrize("n", [2, 5, 9])
def test_cyb_with_no_pauses_is_none(n):
    tokens = np.arange(20, 20 + n)
    a, b = layout_cyb(tokens, 8, (), PAD), layout_none(tokens, 8, PAD)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_tbys_by_hand():
    # T = 4, one pause: the pause fills the slot random_pause_slots picks, real tokens fill the others.
    for index in range(6):
        slot = int(np.flatnonzero(random_pause_slots(4, 1, seed=7, index=index))[0])
        seq = [10, 11, 12, 13]
        seq.insert(slot, P1)
        ex = layout_tbys_random([10, 11, 12, 13], 4, P1, PAD, num_pauses=1, seed=7, index=index)
        # Scored: every real target but the first real token (the context; the previous chunk scored it).
        assert_example(ex, input_ids=seq[:4], position_ids=[0, 1, 2, 3], targets=seq[1:],
            target_mask=[t not in (P1, 10) for t in seq[1:]])  # fmt: skip


def test_tbys_pause_in_slot_0_does_not_score_the_first_token_again():
    # Slot 0 a pause: [P1 10 11 12 13]. Token 10 opens the chunk (the previous chunk's last target); the
    # output at P1 would predict it from a context of pauses only, and score it a second time.
    index = next(i for i in range(100) if random_pause_slots(4, 1, seed=7, index=i)[0])
    ex = layout_tbys_random([10, 11, 12, 13], 4, P1, PAD, num_pauses=1, seed=7, index=index)
    assert_example(ex, input_ids=[P1, 10, 11, 12], position_ids=[0, 1, 2, 3], targets=[10, 11, 12, 13],
        target_mask=[0, 1, 1, 1])  # fmt: skip


def test_tbys_trims_extra_tokens_and_pads_short_chunks():
    slots = random_pause_slots(6, 2, seed=1, index=3)
    full = layout_tbys_random(np.arange(10, 17), 6, P1, PAD, 2, seed=1, index=3)  # 7 real: 2 trimmed
    laid = np.append(full["input_ids"], full["targets"][-1])
    np.testing.assert_array_equal(laid[~slots], [10, 11, 12, 13, 14])
    assert (laid[slots] == P1).all()

    short = layout_tbys_random([10, 11, 12], 6, P1, PAD, 2, seed=1, index=3)
    laid = np.append(short["input_ids"], short["targets"][-1])
    last = np.flatnonzero(~slots)[2]  # the slot of the last real token
    np.testing.assert_array_equal(laid[: last + 1][~slots[: last + 1]], [10, 11, 12])
    assert (laid[last + 1 :] == PAD).all()
    first = np.flatnonzero(~slots)[0]  # the slot of the first real token: context, not a target
    scored = ~slots[1:] & (np.arange(1, 7) <= last) & (np.arange(1, 7) > first)
    np.testing.assert_array_equal(short["target_mask"], scored)


def test_tbys_deterministic_fraction_and_mask():
    lay = make_layout("tbys_random", 100, VOCAB, pause_fraction=0.1, seed=5)
    assert lay.num_random_pauses == 10 and lay.real_tokens == 91
    tokens = np.arange(1000, 1091)
    a, b = lay(tokens, 42), lay(tokens, 42)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])  # same (seed, index) → same example
    laid = np.append(a["input_ids"], a["targets"][-1])
    assert (laid == P1).sum() == 10  # exactly the fraction, and no real token lost
    np.testing.assert_array_equal(laid[laid != P1], tokens)
    np.testing.assert_array_equal(a["target_mask"], (a["targets"] != P1) & (a["targets"] != tokens[0]))
    np.testing.assert_array_equal(a["position_ids"], np.arange(100))
    assert not np.array_equal(lay(tokens, 43)["input_ids"], a["input_ids"])
    other_seed = make_layout("tbys_random", 100, VOCAB, pause_fraction=0.1, seed=6)
    assert not np.array_equal(other_seed(tokens, 42)["input_ids"], a["input_ids"])


def test_tbys_slots_are_uniform():
    counts = sum(random_pause_slots(20, 2, seed=0, index=i).astype(int) for i in range(4000))
    expected = 4000 * 2 / 21
    assert counts.sum() == 8000
    assert np.all(np.abs(counts - expected) < 0.25 * expected), counts


def test_pause_groups_by_hand():
    # T = 11, K = 2, 2 groups: 12 slots hold 8 real tokens. Seed 1, index 0 puts the groups after tokens
    # 23 and 25; every pause takes its token's position, the token after a group is predicted from P2.
    np.testing.assert_array_equal(np.flatnonzero(pause_group_tokens(8, 2, seed=1, index=0)), [3, 5])
    ex = layout_pause_groups(np.arange(20, 28), 11, (P1, P2), PAD, num_groups=2, seed=1, index=0)
    assert_example(ex, input_ids=[20, 21, 22, 23, P1, P2, 24, 25, P1, P2, 26],
        position_ids=[0, 1, 2, 3, 3, 3, 4, 5, 5, 5, 6],
        targets=[21, 22, 23, P1, P2, 24, 25, P1, P2, 26, 27],
        target_mask=[1, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1])  # fmt: skip


def test_pause_groups_after_the_first_token_and_short_chunks():
    # A group after the first token: x0 P1 P2 P3 x1 …, all four at position 0.
    index = next(i for i in range(200) if pause_group_tokens(6, 1, seed=2, index=i)[0])
    ex = layout_pause_groups([10, 11, 12, 13, 14, 15], 8, (P1, P2, P3), PAD, num_groups=1, seed=2, index=index)
    assert_example(ex, input_ids=[10, P1, P2, P3, 11, 12, 13, 14], position_ids=[0, 0, 0, 0, 1, 2, 3, 4],
        targets=[P1, P2, P3, 11, 12, 13, 14, 15], target_mask=[0, 0, 0, 1, 1, 1, 1, 1])  # fmt: skip
    # The end of a finite stream: 2 real tokens, the group (if drawn) stays only before a real token.
    short = layout_pause_groups([10, 11], 8, (P1, P2, P3), PAD, num_groups=1, seed=2, index=index)
    assert_example(short, input_ids=[10, P1, P2, P3, 11, PAD, PAD, PAD], position_ids=[0, 0, 0, 0, 1, 2, 3, 4],
        targets=[P1, P2, P3, 11, PAD, PAD, PAD, PAD], target_mask=[0, 0, 0, 1, 0, 0, 0, 0])  # fmt: skip
    last = next(i for i in range(200) if pause_group_tokens(6, 1, seed=2, index=i)[4])  # after token 14
    ex = layout_pause_groups([10, 11, 12], 8, (P1, P2, P3), PAD, num_groups=1, seed=2, index=last)
    assert_example(ex, input_ids=[10, 11, 12, PAD, PAD, PAD, PAD, PAD], position_ids=[0, 1, 2, 3, 4, 5, 6, 7],
        targets=[11, 12, PAD, PAD, PAD, PAD, PAD, PAD], target_mask=[1, 1, 0, 0, 0, 0, 0, 0])  # fmt: skip


def test_pause_groups_fraction_and_determinism():
    lay = make_layout("pause_groups", 1024, VOCAB, num_pauses=3, pause_fraction=0.1, seed=5)
    assert lay.pause_ids == (P1, P2, P3)
    assert lay.num_random_pauses == 79 * 3 and lay.real_tokens == 1025 - 237  # 79 groups / 788 tokens = 10 %
    tokens = np.arange(1000, 1000 + lay.real_tokens)
    a = lay(tokens, 42)
    for k, v in lay(tokens, 42).items():
        np.testing.assert_array_equal(a[k], v)  # same (seed, index) → same example
    laid = np.append(a["input_ids"], a["targets"][-1])
    np.testing.assert_array_equal(laid[~np.isin(laid, lay.pause_ids)], tokens)  # every real token, in order
    starts = np.flatnonzero(laid == P1)
    assert starts.size == 79
    for s in starts:  # a whole group P1 P2 P3 at its token's position
        np.testing.assert_array_equal(laid[s : s + 3], [P1, P2, P3])
        assert (a["position_ids"][s : s + 3] == a["position_ids"][s - 1]).all()
    real = ~np.isin(a["input_ids"], lay.pause_ids)
    np.testing.assert_array_equal(a["position_ids"][real], np.arange(real.sum()))
    np.testing.assert_array_equal(a["target_mask"], ~np.isin(a["targets"], lay.pause_ids))
    assert not np.array_equal(lay(tokens, 43)["input_ids"], a["input_ids"])
    counts = sum(pause_group_tokens(11, 2, seed=0, index=i).astype(int) for i in range(3000))
    assert counts[-1] == 0 and np.all(np.abs(counts[:-1] - 600) < 0.25 * 600), counts  # uniform, never last


@pytest.mark.parametrize(
    "name, k, w, length, real",
    [("none", 3, 1, 8, 9), ("cyb", 0, 1, 8, 9), ("cyb", 3, 4, 32, 9), ("tbys_random", 3, 1, 8, 8),
     ("pause_groups", 3, 1, 8, 6)],
)
def test_layout_properties(name, k, w, length, real):
    lay = make_layout(name, 8, VOCAB, num_pauses=k, pause_fraction=0.1)
    assert (lay.steps_per_token, lay.length, lay.real_tokens) == (w, length, real)
    ex = lay(np.arange(20, 20 + real), 0)
    assert ex["input_ids"].shape == ex["position_ids"].shape == (length,)
    assert ex["targets"].shape == ex["target_mask"].shape == (8,)
    empty = lay.empty_example()
    assert {k: v.shape for k, v in empty.items()} == {k: v.shape for k, v in ex.items()}
    assert not empty["target_mask"].any() and (empty["input_ids"] == VOCAB.pad_id).all()


def test_layout_pause_ids():
    assert make_layout("cyb", 4, VOCAB, num_pauses=3).pause_ids == (3, 4, 5)
    assert make_layout("tbys_random", 4, VOCAB).pause_ids == (3,)
    assert make_layout("none", 4, VOCAB).pause_ids == ()
    assert make_layout("pause_groups", 4, VOCAB, num_pauses=2).pause_ids == (3, 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="pauses"), "unknown layout"),
        (dict(name="cyb", num_pauses=9), "num_pauses=9"),
        (dict(name="cyb", num_pauses=-1), "num_pauses=-1"),
        (dict(name="cyb", seq_len=0), "seq_len"),
        (dict(name="tbys_random", pause_fraction=1.0), "pause_fraction"),
        (dict(name="tbys_random", seq_len=2, pause_fraction=0.9), "fewer than 2 real tokens"),
        (dict(name="pause_groups", num_pauses=0), "1 <= num_pauses"),
        (dict(name="pause_groups", pause_fraction=-0.1), "pause_fraction"),
        (dict(name="pause_groups", num_pauses=8, pause_fraction=0.5), "does not fit"),
    ],
)
def test_bad_configs(kwargs, match):
    kwargs = {"seq_len": 8, **kwargs}
    name, seq_len = kwargs.pop("name"), kwargs.pop("seq_len")
    with pytest.raises(ValueError, match=match):
        make_layout(name, seq_len, VOCAB, **kwargs)


def test_every_layout_name_is_one_class_with_its_own_behaviour():
    from cyb_lightning.data.layout import LAYOUT_CLASSES, make_layout
    from cyb_lightning.data.tokenizer import standard_vocab

    vocab = standard_vocab()
    assert tuple(LAYOUT_CLASSES) == ("none", "cyb", "tbys_random", "pause_groups", "tbys_finetune", "variable",
                                     "answer_pauses")  # fmt: skip
    built = {name: make_layout(name, 16, vocab, num_pauses=3) for name in LAYOUT_CLASSES}
    for name, layout in built.items():
        assert type(layout) is LAYOUT_CLASSES[name] and layout.name == name
    assert {n: lay.steps_per_token for n, lay in built.items()} == {
        "none": 1, "cyb": 4, "tbys_random": 1, "pause_groups": 1, "tbys_finetune": 1, "variable": 4,
        "answer_pauses": 4}
    assert [n for n, lay in built.items() if lay.pairs] == ["tbys_finetune"]
    assert [n for n, lay in built.items() if lay.answers_only] == ["answer_pauses"]
    for name in ("variable", "answer_pauses"):
        assert set(built[name].empty_example()) - set(built["cyb"].empty_example()) == {"step_mask", "step_index"}


def test_answer_pauses_equal_variable_pauses_granted_k_at_the_scored_targets():
    from cyb_lightning.data.layout import layout_answer_pauses, layout_granted

    tokens = np.arange(20, 29)
    scored = np.array([False, True, False, False, True, False, False, True])
    got = make_layout("answer_pauses", 8, VOCAB, num_pauses=2)(tokens, 0, scored=scored)
    want = layout_granted(tokens, 8, VOCAB.pause_ids[:2], VOCAB.pad_id, np.where(scored, 2, 0))
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert got["input_ids"][:10].tolist() == [20, 21, *VOCAB.pause_ids[:2], 22, 23, 24, *VOCAB.pause_ids[:2], 25]
    assert got["step_mask"].sum(1).tolist() == [1, 3, 1, 1, 3, 1, 1, 3]
    assert np.array_equal(layout_answer_pauses(tokens, 8, VOCAB.pause_ids[:2], VOCAB.pad_id, scored)["step_index"],
                          got["step_index"])  # fmt: skip
    with pytest.raises(ValueError, match="labels its targets"):
        make_layout("answer_pauses", 8, VOCAB, num_pauses=2)(tokens, 0)


def test_a_layout_defined_elsewhere_is_built_and_laid_out_without_touching_anything_else(tmp_path):
    """A new layout is one class: defining it registers it under its name, and the config, the stream and the
    data module take it from there (here: a pause after every other real token, W = 2)."""
    from dataclasses import dataclass

    from cyb_lightning.data.layout import LAYOUT_CLASSES, Layout, layout_granted
    from cyb_lightning.data.synthetic import WindowLookup
    from cyb_lightning.datamodule import CYBDataModule

    @dataclass(frozen=True)
    class EveryOther(Layout):
        name = "every_other_test"
        per_token_groups = True

        @classmethod
        def from_config(cls, seq_len, vocab, **_):
            return cls(seq_len, vocab.pad_id, pause_ids=vocab.pause_ids[:1])

        def __call__(self, tokens, index, scored=None):
            return layout_granted(tokens, self.seq_len, self.pause_ids, self.pad_id, np.arange(self.seq_len) % 2)

        empty_example = LAYOUT_CLASSES["variable"].empty_example

    try:
        source = WindowLookup(levels=[1, 2], problems_per_document=8, documents_per_shard=20, root=str(tmp_path))
        dm = CYBDataModule(layout="every_other_test", seq_len=8, batch_size=2, lanes=1, bpe_vocab_size=256,
                           source=source, val_documents=2)  # fmt: skip
        assert dm.steps_per_token == 2 and type(dm.layout_spec) is EveryOther
        example = next(iter(dm.stream("train")))
        assert example["step_mask"].sum(1).tolist() == [1, 2] * 4
        with pytest.raises(ValueError, match="every_other_test, answer_pauses|answer_pauses, every_other_test"):
            make_layout("no_such_layout", 8, VOCAB)
    finally:
        del LAYOUT_CLASSES["every_other_test"]
