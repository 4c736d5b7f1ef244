"""The vocabulary: reserved ids unreachable from text, exact round trips, stable save/load."""

from __future__ import annotations

import pytest

from cyb_lightning.data import MAX_PAUSES, CYBTokenizer, Vocab, reserved_tokens

NASTY = [
    "<pause1>",
    "<pause1><pause2><pause3>",
    "see <dk> and <eot> and <pad> and <pause8> inline",
    "<|endoftext|> <s></s> [PAD] [CLS]",
    "control \x00\x01\x02\x1b[31m\x7f bytes",
    "emoji 🎉👍🏽 👩‍👩‍👧 and CJK 漢字 and RTL שלום",
    "  leading and trailing spaces  \r\n\ttabs\n\n",
    "",
    "x",
]


def test_vocab_layout(tiny_tokenizer):
    v = tiny_tokenizer.vocab
    assert (v.pad_id, v.eot_id, v.dk_id) == (0, 1, 2)
    assert v.pause_ids == tuple(range(3, 3 + MAX_PAUSES))
    assert tiny_tokenizer.num_reserved == v.num_reserved == 3 + MAX_PAUSES
    assert v.size == tiny_tokenizer.num_reserved + 512
    assert reserved_tokens()[:4] == ("<pad>", "<eot>", "<dk>", "<pause1>")


@pytest.mark.parametrize("text", NASTY)
def test_reserved_ids_never_come_from_text(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert all(tiny_tokenizer.num_reserved <= i < tiny_tokenizer.vocab.size for i in ids), ids
    assert tiny_tokenizer.decode(ids) == text


def test_literal_reserved_names_are_several_text_tokens(tiny_tokenizer):
    # A 512-id BPE cannot have "<pause1>" as one token; it must be spelled out of ordinary pieces.
    assert len(tiny_tokenizer.encode("<pause1>")) > 1


def test_encode_batch_matches_encode(tiny_tokenizer):
    batch = tiny_tokenizer.encode_batch(NASTY)
    assert batch == [tiny_tokenizer.encode(t) for t in NASTY]
    assert [list(a) for a in tiny_tokenizer.encode_batch_np(NASTY)] == batch


def test_decode_names_reserved_ids(tiny_tokenizer):
    hello = tiny_tokenizer.encode("hello")
    v = tiny_tokenizer.vocab
    ids = [v.pause_ids[0], *hello, v.pause_ids[2], v.dk_id, v.eot_id, v.pad_id]
    assert tiny_tokenizer.decode(ids) == "<pause1>hello<pause3><dk><eot><pad>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_tokenizer.decode([v.size])


def test_save_load_identical(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path)
    loaded = CYBTokenizer.load(tmp_path)
    assert loaded.vocab == tiny_tokenizer.vocab
    assert loaded.encode_batch(NASTY) == tiny_tokenizer.encode_batch(NASTY)


def test_load_missing_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        CYBTokenizer.load(tmp_path)


def test_train_small(tmp_path):
    tok = CYBTokenizer.train(["abc abc abd " * 20, "xyz"], 300, max_pauses=2)
    assert tok.vocab == Vocab(0, 1, 2, (3, 4), 5 + tok._bpe.get_vocab_size())
    assert tok.decode(tok.encode("abc xyz ☃")) == "abc xyz ☃"
    with pytest.raises(ValueError, match=">= 256"):
        CYBTokenizer.train(["abc"], 100)
