"""The synthetic tasks: generators, difficulty labels on known values, one problem per row, the curriculum,
stream and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cyb_lightning.data import PackedStream, make_layout
from cyb_lightning.data.sources import source_tokenizer
from cyb_lightning.data.synthetic import (
    BITS,
    SEPARATOR,
    WindowLookup,
    answer_symbol,
    lookup_tables,
    query_symbol,
    window_lookup_document,
)


@pytest.fixture(scope="module")
def task_and_tokenizer(tmp_path_factory):
    task = WindowLookup(levels=[1, 3, 5], problems_per_document=6, documents_per_shard=5, train_shards=4,
                         root=str(tmp_path_factory.mktemp("synthetic")))  # fmt: skip
    tok, _, _ = source_tokenizer(task, 256)
    return task, tok


def test_every_symbol_is_distinct():
    symbols = [*BITS, SEPARATOR] + [query_symbol(k) for k in range(1, 9)]
    symbols += [answer_symbol(k, v) for k in range(1, 9) for v in range(10)]
    assert len(set(symbols)) == len(symbols) == 91 and all(len(c) == 1 and not c.isspace() for c in symbols)


def test_documents_follow_the_format_and_answer_by_the_tables():
    levels = [2, 4]
    tables = lookup_tables(levels, table_seed=7)
    rng = np.random.default_rng(0)
    doc = window_lookup_document(rng, levels, tables, problems=50, extra_bits=2)
    problems = doc.split(SEPARATOR)[:-1]
    assert doc.endswith(SEPARATOR) and len(problems) == 50
    seen = set()
    for p in problems:
        bits, query, answer = p[:-2], p[-2], p[-1]
        k = [q for q in levels if query_symbol(q) == query][0]
        seen.add(k)
        assert set(bits) <= set(BITS) and 4 <= len(bits) <= 6  # k_max … k_max + extra_bits
        value = int(bits[-k:], 2)
        assert answer == answer_symbol(k, int(tables[k][value]))
    assert seen == {2, 4}
    # The tables are the task: the same for every seed of the documents, other ones for another table_seed.
    assert all((lookup_tables(levels, 7)[k] == tables[k]).all() for k in levels)
    assert any((lookup_tables(levels, 8)[k] != tables[k]).any() for k in levels)


def test_documents_are_a_function_of_seed_split_shard_and_index(task_and_tokenizer):
    task, _ = task_and_tokenizer
    a = list(task.iter_shard("train", "train-0001"))
    assert a == list(task.iter_shard("train", "train-0001")) and len(a) == 5
    assert a != list(task.iter_shard("train", "train-0002"))
    assert set(a).isdisjoint(task.iter_shard("validation", "validation-0000"))  # held out
    other = WindowLookup(levels=[1, 3, 5], problems_per_document=6, documents_per_shard=5, seed=1)
    assert a != list(other.iter_shard("train", "train-0001"))
    assert set(a).isdisjoint(task.iter_shard("test", "test-0000"))  # the test split is a stream of its own
    # The tokenizer is trained on the alphabet alone, so the seed does not key its cache.
    assert other.fingerprint() == task.fingerprint()


def test_difficulty_of_hand_written_targets(task_and_tokenizer):
    task, tok = task_and_tokenizer
    q3, a3 = query_symbol(3), answer_symbol(3, 4)
    q1, a1 = query_symbol(1), answer_symbol(1, 0)
    text = "01" + q3 + a3 + ";" + "1101" + q3 + a3 + ";" + "0" + q1 + a1 + ";" + "1"
    ids = np.asarray(tok.encode(text))
    assert ids.size == len(text)  # one token per symbol
    d = task.target_difficulty(ids, tok)
    # Target j is text[j + 1]; the input text[j] decides: Q_k → k (when its k bits are in the chunk), an
    # answer → 0 (the separator follows), anything else → −1.
    expected = [-1, -1, -1, 0, -1, -1, -1, -1, -1, 3, 0, -1, -1, 1, 0, -1]
    assert d.tolist() == expected
    # The first query's window (3 bits) starts before the chunk: its answer is not scored.
    assert d[2] == -1 and d[9] == 3


def test_the_tokenizer_must_be_character_level(task_and_tokenizer, tmp_path):
    task, _ = task_and_tokenizer
    from cyb_lightning.data.tokenizer import CYBTokenizer

    # A BPE with merges of the task's symbols (e.g. "01") breaks the one-symbol-one-token premise.
    text = "".join(task.iter_shard("train", "train-0000")) * 4
    merged = CYBTokenizer.train([text], 400)
    with pytest.raises(ValueError, match="bpe_vocab_size: 256"):
        WindowLookup(levels=[1, 3, 5]).target_difficulty(np.asarray(merged.encode("0101" + query_symbol(1) * 3)),
                                                          merged)  # fmt: skip


def _stream(task, tok, layout, **kw):
    lay = make_layout(layout, 16, tok.vocab, num_pauses=3, seed=0)
    return PackedStream(task, tok, lay, seed=5, **kw)


@pytest.mark.parametrize("layout", ["none", "cyb", "variable"])
def test_stream_carries_difficulty_and_scores_only_task_targets(task_and_tokenizer, layout):
    task, tok = task_and_tokenizer
    examples = [e for _, e in zip(range(12), _stream(task, tok, layout))]
    for e in examples:
        assert e["difficulty"].shape == e["targets"].shape == (16,)
        assert torch.equal(e["target_mask"], e["difficulty"] >= 0)
        # The real tokens of the chunk give the difficulty again (the label is a function of them).
        B, T = 1, 16
        if layout == "variable":
            first = e["input_ids"][e["step_index"][:, 0]]
        else:
            first = e["input_ids"].view(T, -1)[:, 0]
        real = torch.cat((first, e["targets"][-1:])).numpy()
        assert e["difficulty"].tolist() == task.target_difficulty(real, tok).tolist()
    levels = torch.cat([e["difficulty"] for e in examples]).unique().tolist()
    assert {0, 1, 3, 5} <= set(levels)


def test_stream_resumes_with_the_same_difficulties(task_and_tokenizer):
    task, tok = task_and_tokenizer
    full = [e for _, e in zip(range(10), _stream(task, tok, "cyb", batch_size=2))]
    s = _stream(task, tok, "cyb", batch_size=2)
    it = iter(s)
    for _ in range(4):
        next(it)
    state = s.state_dict()
    resumed = _stream(task, tok, "cyb", batch_size=2)
    resumed.load_state_dict(state)
    again = [e for _, e in zip(range(6), resumed)]
    for a, b in zip(full[4:], again):
        for key in ("input_ids", "targets", "difficulty", "target_mask"):
            assert torch.equal(a[key], b[key]), key


def test_validation_padding_carries_no_task_target(task_and_tokenizer):
    task, tok = task_and_tokenizer
    padded = 0
    for docs in (1, 2, 3):  # some split of the validation chunks over 2 ranks leaves rank 1 one short
        ranks = [list(_stream(task, tok, "cyb", split="validation", world_size=2, rank=r, max_documents=docs))
                 for r in (0, 1)]  # fmt: skip
        assert len(ranks[0]) == len(ranks[1])  # padded to the same count: no rank waits on a collective
        for e in ranks[1]:
            if bool((e["input_ids"] == tok.vocab.pad_id).all()):
                padded += 1
                assert not bool(e["target_mask"].any()) and bool((e["difficulty"] == -1).all())
    assert padded >= 1


def test_tbys_random_is_refused_with_a_labelled_source(task_and_tokenizer):
    from cyb_lightning.datamodule import CYBDataModule

    task, _ = task_and_tokenizer
    with pytest.raises(ValueError, match="tbys_random"):
        CYBDataModule(source=task, bpe_vocab_size=256, layout="tbys_random", seq_len=16)
