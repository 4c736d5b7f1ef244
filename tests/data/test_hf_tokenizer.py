"""HFTokenizer: a pretrained model's tokenizer with CYB's DK and pause ids (offline: a tiny saved tokenizer)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

pytest.importorskip("transformers")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from cyb_lightning.data.hf_tokenizer import HFTokenizer  # noqa: E402
from tests.conftest import TINY_QUICKSTART  # noqa: E402

TEXTS = ["the cat sat on the mat", "a dog <unused0> ran <pause1> far", "hello world " * 3, "<eos> <bos> <dk>"]
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unused0>", "<unused1>", "<unused2>", "<unused3>"]
# Text that spells every reserved or special token literally: none of it may become a reserved id.
NASTY = "x <unused0><unused1> <unused2><unused3> <pause1> <dk> <eos><bos><pad> y"


def save_tiny_tokenizer(path, special=SPECIAL, bos="<bos>", chat_template=None) -> int:
    """A byte-level BPE with Gemma-like ``<unusedN>`` special tokens, saved like a Hub tokenizer."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(special), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TEXTS * 5, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>", bos_token=bos)
    hf.chat_template = chat_template
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


def test_add_ids_adds_new_dk_and_pause_ids_even_where_tokens_are_named(tok_dir):
    """The switch of a config that repurposes (``--data.tokenizer.init_args.add_ids true``): DK + K new ids."""
    named = dict(dk_token="<unused3>", pause_tokens=["<unused0>", "<unused1>", "<unused2>"])
    tok = HFTokenizer(str(tok_dir), **named, add_ids=True, num_pauses=2, model_vocab_size=0)
    base = tok.base_size
    assert tok.num_added == 3 and tok.vocab.size == base + 3  # exactly DK + 2 pauses, no pad id
    assert tok.vocab.dk_id == base and tok.vocab.pause_ids == (base + 1, base + 2)
    assert HFTokenizer(str(tok_dir), **named).num_added == 0  # without the switch: repurposed


def test_the_cli_adds_exactly_the_pause_ids_the_run_uses(tok_dir, tiny_quickstart, tmp_path):
    """``data.num_pauses`` (K, stated once) decides how many pause ids the tokenizer adds: DK + K rows."""
    from cyb_lightning.cli import CYBLightningCLI
    from cyb_lightning.datamodule import CYBDataModule
    from cyb_lightning.module import CYBModule

    tokenizer = {"class_path": "cyb_lightning.data.hf_tokenizer.HFTokenizer",
                 "init_args": {"name_or_path": str(tok_dir), "dk_token": "<unused3>",
                               "pause_tokens": ["<unused0>", "<unused1>", "<unused2>"]}}
    source = {"class_path": "cyb_lightning.data.sources.QuickstartCorpus",
              "init_args": {"root": str(tiny_quickstart.corpus.directory.parent), **TINY_QUICKSTART}}
    cli = CYBLightningCLI(
        CYBModule, CYBDataModule, run=False, save_config_callback=None,
        args=["--config", "conf/quickstart.yaml", "--trainer.logger", "false", "--trainer.callbacks", "[]",
              "--trainer.default_root_dir", str(tmp_path), "--data.source", json.dumps(source),
              "--data.tokenizer", json.dumps(tokenizer), "--data.tokenizer.init_args.add_ids", "true",
              "--data.num_pauses", "2", "--model.loss.init_args.omega", "[0, 0, 1]"],
    )
    tok = cli.datamodule.tokenizer
    assert tok.num_added == 3 and tok.vocab.pause_ids == (tok.base_size + 1, tok.base_size + 2)
    assert cli.model.hparams.vocab_size == tok.base_size + 3 and cli.model.hparams.steps_per_token == 3


def test_a_chat_turn_bos_is_not_prepended_to_plain_text(tmp_path):
    """BOS by default only when it is not a chat-turn marker (literally in the chat template): SmolLM2's
    ``<|im_start|>`` wraps chat turns, Llama 3's and Gemma's BOS is written ``{{ bos_token }}`` once."""
    turn = tmp_path / "chatml"
    save_tiny_tokenizer(turn, chat_template="{% for m in messages %}<bos>{{ m['content'] }}<eos>{% endfor %}")
    assert HFTokenizer(str(turn), num_pauses=1).bos_id is None
    assert HFTokenizer(str(turn), num_pauses=1, add_bos=True).bos_id is not None  # asked for: prepended
    once = tmp_path / "llama3"
    save_tiny_tokenizer(once, chat_template="{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tok = HFTokenizer(str(once), num_pauses=1)
    assert tok.encode("the cat")[0] == tok._tok.token_to_id("<bos>")


def test_eot_token_names_the_document_separator(tok_dir, tmp_path, caplog):
    tok = HFTokenizer(str(tok_dir), num_pauses=1, eot_token="<unused2>")
    assert tok.vocab.eot_id == tok._tok.token_to_id("<unused2>")
    assert tok.vocab.eot_id not in tok.encode_batch(["a <unused2> b"])[0]  # text never yields the separator
    with pytest.raises(ValueError, match="ordinary vocabulary entry"):
        HFTokenizer(str(tok_dir), num_pauses=1, eot_token="the")
    with pytest.raises(ValueError, match="not in the vocabulary.*unset to use the EOS"):
        HFTokenizer(str(tok_dir), num_pauses=1, eot_token="<|endoftext|>")
    chat = tmp_path / "chat"
    save_tiny_tokenizer(chat, chat_template="{% for m in messages %}{{ m['content'] }}<eos>{% endfor %}")
    with caplog.at_level("WARNING"):
        HFTokenizer(str(tok_dir), num_pauses=1)
        assert "chat-turn marker" not in caplog.text
        HFTokenizer(str(chat), num_pauses=1)  # the EOS ends chat turns: warn and name the fix
    assert "chat-turn marker" in caplog.text and "eot_token" in caplog.text


def test_pause_fillers_are_one_token_each_and_one_per_pause(tok_dir):
    from cyb_lightning.datamodule import filler_ids

    tok = HFTokenizer(str(tok_dir), num_pauses=3, model_vocab_size=0, add_bos=True)
    ids = filler_ids(tok, [" ", "a", "t"], tok.vocab.pause_ids)
    assert ids == tuple(tok._tok.token_to_id(t) for t in ("Ġ", "a", "t"))  # the text token, not the BOS
    with pytest.raises(ValueError, match="3 pause ids; give one filler per pause"):
        filler_ids(tok, [" ", "a"], tok.vocab.pause_ids)
    with pytest.raises(ValueError, match="'zqxv' is [0-9]+ tokens .* must be exactly one token"):
        filler_ids(tok, [" ", "a", "zqxv"], tok.vocab.pause_ids)
