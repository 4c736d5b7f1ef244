"""HFTokenizer: a pretrained model's tokenizer with CYB's DK and pause ids (offline: a tiny saved tokenizer)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

pytest.importorskip("transformers")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from cyb_lightning.data.hf_tokenizer import HFTokenizer  # noqa: E402

TEXTS = ["the cat sat on the mat", "a dog <unused0> ran <pause1> far", "hello world " * 3, "<eos> <bos> <dk>"]
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unused0>", "<unused1>", "<unused2>", "<unused3>"]
# Text that spells every reserved or special token literally: none of it may become a reserved id.
NASTY = "x <unused0><unused1> <unused2><unused3> <pause1> <dk> <eos><bos><pad> y"


def save_tiny_tokenizer(path, special=SPECIAL, bos="<bos>") -> int:
    """A byte-level BPE with Gemma-like ``<unusedN>`` special tokens, saved like a Hub tokenizer."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(special), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TEXTS * 5, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>", bos_token=bos)
    hf.save_pretrained(str(path))
    return len(hf)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_tok")
    save_tiny_tokenizer(path)
    return path


def test_added_ids_grow_the_vocabulary_by_exactly_the_reserved_ids(tok_dir):
    tok = HFTokenizer(str(tok_dir), num_pauses=3, model_vocab_size=0)
    base = tok.base_size
    assert tok.num_added == 4 and tok.num_reserved == 4
    assert tok.vocab.size == base + 4
    assert tok.vocab.dk_id == base and tok.vocab.pause_ids == (base + 1, base + 2, base + 3)
    assert tok.vocab.eot_id == tok._tok.token_to_id("<eos>") and tok.vocab.pad_id == tok._tok.token_to_id("<pad>")
    ids = np.concatenate(tok.encode_batch_np(TEXTS + [NASTY]))
    assert ids.max() < base  # new ids are unknown to the tokenizer: text never yields them
    assert tok.decode([tok.vocab.dk_id, *tok.vocab.pause_ids]) == "<dk><pause1><pause2><pause3>"


def test_new_ids_start_after_the_models_padding_rows(tok_dir):
    n = len(PreTrainedTokenizerFast.from_pretrained(str(tok_dir)))
    tok = HFTokenizer(str(tok_dir), num_pauses=2, model_vocab_size=n + 10)  # e.g. Qwen2: rows > tokens
    assert tok.vocab.dk_id == n + 10 and tok.vocab.size == n + 13


def test_repurposed_unused_tokens_never_come_out_of_text(tok_dir):
    tok = HFTokenizer(str(tok_dir), dk_token="<unused3>", pause_tokens=["<unused0>", "<unused1>", "<unused2>"])
    t = tok._tok
    assert tok.vocab.dk_id == t.token_to_id("<unused3>")
    assert tok.vocab.pause_ids == tuple(t.token_to_id(f"<unused{i}>") for i in range(3))
    assert tok.num_added == 0 and tok.vocab.size == tok.base_size  # the vocabulary does not grow
    reserved = {tok.vocab.dk_id, *tok.vocab.pause_ids}
    for ids in tok.encode_batch(TEXTS + [NASTY, "<unused0>", "<unused3>"]):
        assert not reserved & set(ids)
        # Other special tokens are not matched in text either: the stream adds <eot> itself.
        assert tok.vocab.eot_id not in ids[1:]
    assert tok.dropped_reserved == 0  # split by the tokenizer, not filtered afterwards
    assert tok.decode(tok.encode("hello world")[1:]) == "hello world"
    assert tok.decode([tok.vocab.pause_ids[0], tok.vocab.dk_id]) == "<pause1><dk>"


def test_bos_is_prepended_when_distinct_from_eos(tok_dir, tmp_path):
    tok = HFTokenizer(str(tok_dir), num_pauses=1)
    assert tok.encode("the cat")[0] == tok._tok.token_to_id("<bos>")
    assert HFTokenizer(str(tok_dir), num_pauses=1, add_bos=False).encode("the cat")[0] != tok.bos_id
    save_tiny_tokenizer(tmp_path, bos="<eos>")  # GPT-2 style: BOS is EOS, documents get no BOS
    assert HFTokenizer(str(tmp_path), num_pauses=1).bos_id is None


def test_bad_reserved_names_fail_clearly(tok_dir):
    with pytest.raises(ValueError, match="not in the vocabulary"):
        HFTokenizer(str(tok_dir), dk_token="<unused99>")
    with pytest.raises(ValueError, match="ordinary vocabulary entry"):
        HFTokenizer(str(tok_dir), dk_token="the")  # a token text produces
    with pytest.raises(ValueError, match="distinct"):
        HFTokenizer(str(tok_dir), dk_token="<unused0>", pause_tokens=["<unused0>"])
    with pytest.raises(ValueError, match="eos"):
        HFTokenizer(str(tok_dir), dk_token="<eos>")


def test_pickles_for_dataloader_workers(tok_dir):
    tok = HFTokenizer(str(tok_dir), dk_token="<unused3>", pause_tokens=["<unused0>"])
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.encode_batch(TEXTS + [NASTY]) == tok.encode_batch(TEXTS + [NASTY])
    assert copy.vocab == tok.vocab
