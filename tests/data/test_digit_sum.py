"""The digit-sum task (the positive control): rows, answers, difficulty, the curriculum and the answer's own pauses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cyb_lightning.data import PackedStream, make_layout
from cyb_lightning.data.curriculum import Curriculum
from cyb_lightning.data.sources import source_tokenizer
from cyb_lightning.data.synthetic import ANSWERS, DigitSum, sum_table


@pytest.fixture(scope="module")
def task_and_tokenizer(tmp_path_factory):
    task = DigitSum(levels=[1, 2, 3, 4], max_digit=3, classes=6, documents_per_shard=300, train_shards=2,
                    root=str(tmp_path_factory.mktemp("digit_sum")))  # fmt: skip
    tok, _, _ = source_tokenizer(task, 256)
    return task, tok


def test_rows_answer_by_the_table_of_the_digit_sum(task_and_tokenizer):
    task, _ = task_and_tokenizer
    rows = list(task.iter_shard("train", "train-0000"))
    assert len(rows) == 300
    table = sum_table(3 * 4, 6, 1234)
    seen = set()
    for row in rows:
        assert row[0] == "^" and row[-2] == "="
        digits = [int(c) for c in row[1:-2]]
        seen.add(len(digits))
        assert all(0 <= d <= 3 for d in digits)
        assert row[-1] == ANSWERS[table[sum(digits)]] == task.answer(digits)
    assert seen == {1, 2, 3, 4}
    # The table is the task (fixed by table_seed), the rows a function of (seed, split, shard).
    assert rows == list(task.iter_shard("train", "train-0000"))
    assert list(task.iter_shard("test", "test-0000")) != rows and len(set(task.table)) > 1
    assert (DigitSum(levels=[1, 2, 3, 4], max_digit=3, classes=6, table_seed=7).table != task.table).any()


def test_difficulty_of_a_hand_written_row(task_and_tokenizer):
    task, tok = task_and_tokenizer
    ids = np.asarray(tok.encode("^3102=" + task.answer([3, 1, 0, 2])) + [tok.vocab.eot_id])
    # Target j is ids[j + 1]: only the answer (the input is "=") is scored, with n = 4 digits.
    assert task.target_difficulty(ids, tok).tolist() == [-1, -1, -1, -1, -1, 4, -1]
    # A chunk that starts inside a problem cannot count its digits: not scored.
    assert task.target_difficulty(np.asarray(tok.encode("02=A")), tok).tolist() == [-1, -1, -1]


def _stream(task, tok, layout="none", **kw):
    return PackedStream(task, tok, make_layout(layout, 7, tok.vocab, num_pauses=3), seed=3, **kw)


def test_one_problem_per_row_padded(task_and_tokenizer):
    task, tok = task_and_tokenizer
    examples = [e for _, e in zip(range(40), _stream(task, tok))]
    for e in examples:
        inputs = e["input_ids"]
        assert inputs[0] == tok.encode("^")[0]  # every row starts its own problem
        (scored,) = torch.nonzero(e["target_mask"], as_tuple=True)
        assert scored.numel() == 1 and inputs[scored] == tok.encode("=")[0]
        n = int(scored) - 1
        assert e["difficulty"][scored] == n and (e["difficulty"] >= 0).sum() == 1
        assert e["targets"][scored + 1] == tok.vocab.eot_id
        assert bool((inputs[scored + 3 :] == tok.vocab.pad_id).all())  # padding after the end of text


def test_a_row_that_does_not_fit_says_which_setting_to_raise(task_and_tokenizer, tmp_path):
    task, tok = task_and_tokenizer
    stream = PackedStream(task, tok, make_layout("none", 5, tok.vocab), seed=3)
    with pytest.raises(ValueError, match="raise data.seq_len to at least 7"):
        [e for _, e in zip(range(200), stream)]
    from cyb_lightning.datamodule import CYBDataModule

    with pytest.raises(ValueError, match="data.seq_len to at least 7"):
        CYBDataModule(source=task, bpe_vocab_size=256, layout="none", seq_len=6)


def test_answer_pauses_give_only_the_answer_its_pauses(task_and_tokenizer):
    task, tok = task_and_tokenizer
    pauses = tok.vocab.pause_ids[:3]
    for e in [e for _, e in zip(range(20), _stream(task, tok, "answer_pauses"))]:
        (scored,) = torch.nonzero(e["target_mask"], as_tuple=True)
        t = int(scored)
        assert e["step_mask"].sum(1).tolist() == [4 if i == t else 1 for i in range(7)]
        ids, pos = e["input_ids"], e["position_ids"]
        # ^ d_1 … d_n = P1 P2 P3 A <eot>: the pauses right after "=", at its position, distinct ids.
        assert ids[t + 1 : t + 4].tolist() == list(pauses) and pos[t : t + 4].tolist() == [t] * 4
        assert ids[t + 4] == e["targets"][t] and pos[t + 4] == t + 1
        assert e["step_index"][t].tolist() == [t, t + 1, t + 2, t + 3]


def test_row_levels_of_a_batch_equal_each_rows_hardest_target(task_and_tokenizer):
    """The curriculum reads a whole batch of rows at once (DigitSum.row_levels): the same level as the per-target
    labels, also for a row without a problem."""
    task, tok = task_and_tokenizer
    rows = [np.concatenate([tok.encode(r), [tok.vocab.eot_id]]) for r in list(task.iter_shard("train", "train-0001"))[:50]]
    rows.append(np.asarray(tok.encode("0123"), dtype=np.int64))  # no ^ and no =: nothing scored
    expected = [int(task.target_difficulty(r, tok).max(initial=-1)) for r in rows]
    assert task.row_levels(rows, tok).tolist() == expected
    assert expected[-1] == -1 and set(expected[:-1]) == {1, 2, 3, 4}


def test_curriculum_opens_levels_with_the_step(task_and_tokenizer):
    task, tok = task_and_tokenizer
    cur = Curriculum(start=1, ramp_steps=8)
    assert [cur.level_cap(s, 4) for s in (0, 1, 2, 3, 4, 5, 6, 7, 8, 100)] == [1, 1, 2, 2, 3, 3, 4, 4, 4, 4]
    stream = _stream(task, tok, batch_size=4, curriculum=cur)
    levels = [int(e["difficulty"].max()) for _, e in zip(range(48), stream)]
    for step in range(12):
        batch = levels[4 * step : 4 * step + 4]
        assert max(batch) <= cur.level_cap(step, 4), (step, batch)
    assert set(levels[:8]) == {1} and max(levels[32:]) == 4  # a single level first, all of them later
    # With gradient accumulation a step takes two batches: the cap follows the optimizer step.
    slow = _stream(task, tok, batch_size=4, curriculum=cur, batches_per_step=2)
    levels = [int(e["difficulty"].max()) for _, e in zip(range(48), slow)]
    assert all(max(levels[8 * s : 8 * s + 8]) <= cur.level_cap(s, 4) for s in range(6))


def test_curriculum_resumes_exactly_with_any_workers(task_and_tokenizer):
    task, tok = task_and_tokenizer
    cur = Curriculum(start=1, ramp_steps=6)

    def make():
        return _stream(task, tok, "answer_pauses", batch_size=3, lanes=2, curriculum=cur)

    full = [e for _, e in zip(range(30), make())]
    first = make()
    it = iter(first)
    for _ in range(11):
        next(it)
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    again = [e for _, e in zip(range(19), resumed)]
    for a, b in zip(full[11:], again):
        for key in ("input_ids", "position_ids", "targets", "difficulty", "step_mask"):
            assert torch.equal(a[key], b[key]), key
    # Another curriculum is other data: a saved position does not resume under it.
    other = _stream(task, tok, "answer_pauses", batch_size=3, lanes=2, curriculum=Curriculum(1, 7))
    with pytest.raises(ValueError, match="different data config"):
        other.load_state_dict(state)


def test_curriculum_needs_labelled_rows(task_and_tokenizer):
    task, tok = task_and_tokenizer
    with pytest.raises(ValueError, match="curriculum"):
        _stream(task, tok, split="validation", curriculum=Curriculum())
