"""The Hugging Face decoder backend on tiny random models that the tests build and save (offline).

Per family: our logits equal the plain ``transformers`` forward with the ``none`` layout; with the CYB
layout the first real token (which sees no pause) matches it, later outputs change because pauses are
attended, and shared position ids give different outputs from consecutive ones (they are honoured).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from cyb_lightning.data.layout import layout_cyb, layout_none  # noqa: E402
from cyb_lightning.losses import CYBAP  # noqa: E402
from cyb_lightning.model import HFCausalLM, HFDecoder, PositionIdsIgnored  # noqa: E402
from cyb_lightning.model.hf import check_position_ids  # noqa: E402
from cyb_lightning.model.init_from import rows_like  # noqa: E402
from cyb_lightning.module import CYBModule  # noqa: E402

V, T, K = 96, 6, 3
_LM = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
           num_key_value_heads=1, max_position_embeddings=128)


def tiny_config(family: str):
    """hidden 32, 2 layers: a few thousand parameters per family."""
    if family == "llama":
        return transformers.LlamaConfig(**_LM, tie_word_embeddings=False)  # untied output layer
    if family == "gemma":
        return transformers.GemmaConfig(**_LM, head_dim=16)  # Gemma-1, tied (the CYB paper's family)
    if family == "gemma2":
        return transformers.Gemma2Config(**_LM, head_dim=16)
    if family == "gemma3":
        return transformers.Gemma3TextConfig(**_LM, head_dim=16)
    if family == "qwen2":
        return transformers.Qwen2Config(**_LM)
    if family == "mistral":
        return transformers.MistralConfig(**_LM)
    if family == "gpt2":  # learned absolute positions, tied
        return transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                       bos_token_id=0, eos_token_id=0)
    if family == "pythia":
        return transformers.GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, max_position_embeddings=128)
    if family == "bloom":
        return transformers.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=2)
    raise KeyError(family)


FAMILIES = ["llama", "gemma", "gemma2", "gemma3", "qwen2", "mistral", "gpt2", "pythia"]


def save_tiny(path, family: str, vocab_size: int = V) -> str:
    torch.manual_seed(0)
    config = tiny_config(family)
    config.vocab_size = vocab_size
    AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            cache[family] = save_tiny(tmp_path_factory.mktemp(family), family)
        return cache[family]

    return get


def plain(path: str) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(path).eval()


def batch_of(example: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(example["input_ids"])[None], torch.as_tensor(example["position_ids"])[None]


@pytest.mark.parametrize("family", FAMILIES)
def test_none_layout_equals_plain_transformers(saved, family):
    path = saved(family)
    ours = HFDecoder(path).build(V).eval()
    real = torch.randint(0, V, (T + 1,), generator=torch.Generator().manual_seed(1))
    ids, pos = batch_of(layout_none(real, T, pad_id=0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pos), plain(path)(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_cyb_layout_attends_pauses_at_shared_positions(saved, family):
    path = saved(family)
    ours = HFDecoder(path).build(V + K).eval()  # K new pause ids past the pretrained vocabulary
    pauses = tuple(range(V, V + K))
    real = torch.randint(0, V, (T + 1,), generator=torch.Generator().manual_seed(2))
    ids, pos = batch_of(layout_cyb(real, T, pauses, pad_id=0))
    with torch.no_grad():
        ref = plain(path)(real[None, :T]).logits  # [1, T, V]
        out = ours(ids, pos).view(1, T, K + 1, V + K)[..., :V]
        consecutive = ours(ids, torch.arange(ids.shape[1])[None]).view(1, T, K + 1, V + K)[..., :V]
        changed = ids.clone()
        changed[0, 0] = (changed[0, 0] + 1) % V  # another first token
        out_changed = ours(changed, pos).view(1, T, K + 1, V + K)
    # x_0 sees no pause: its output is the plain model's. Every later real token has attended pauses.
    torch.testing.assert_close(out[:, 0, 0], ref[:, 0], rtol=1e-5, atol=1e-5)
    for t in range(1, T):
        assert not torch.allclose(out[:, t, 0], ref[:, t], atol=1e-4), f"token {t} ignores the pauses"
        # Shared positions are honoured: consecutive ones give other outputs.
        assert not torch.allclose(out[:, t], consecutive[:, t], atol=1e-4), f"token {t} ignores position_ids"
    # Attention is causal over the whole laid-out sequence (not block-diagonal per position group).
    assert not torch.allclose(out_changed[:, T - 1, :, :V], out[:, T - 1], atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"], ids=["untied", "tied"])
def test_added_tokens_are_distinct_rows_and_old_rows_are_unchanged(saved, family):
    path = saved(family)
    before = plain(path)
    grown = HFDecoder(path).build(V + 1 + K).model  # DK + K pauses
    for seed, get in enumerate(("get_input_embeddings", "get_output_embeddings")):
        old, new = getattr(before, get)().weight, getattr(grown, get)().weight
        assert new.shape == (V + 1 + K, old.shape[1])  # grows by exactly the reserved ids
        torch.testing.assert_close(new[:V], old, rtol=0, atol=0)
        # Drawn from N(mean, covariance) of the old rows: as far apart as real tokens' rows (all equal to the
        # mean they had a pairwise cosine of 1: K identical pauses, DK's output row one of them).
        torch.testing.assert_close(new[V:], rows_like(old, 1 + K, seed=0 if family == "gpt2" else seed))
        x = torch.nn.functional.normalize(new[V:], dim=-1)
        assert ((x @ x.T).sum() - (1 + K)) / ((1 + K) * K) < 0.5
    tied = grown.get_output_embeddings().weight is grown.get_input_embeddings().weight
    assert tied == (family == "gpt2")
    assert grown.config.vocab_size == V + 1 + K


def test_families_that_ignore_position_ids_are_refused(saved, tmp_path):
    with pytest.raises(PositionIdsIgnored, match="ALiBi"):
        HFDecoder(save_tiny(tmp_path, "bloom")).build(V)

    class NoPositions(nn.Module):  # e.g. an unknown family that takes position_ids and drops them
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def forward(self, input_ids, position_ids=None, **kwargs):
            return self.inner(input_ids=input_ids, position_ids=None, **kwargs)

    with pytest.raises(PositionIdsIgnored, match="ignores position_ids"):
        check_position_ids(HFCausalLM(NoPositions(plain(saved("llama")))))
    check_position_ids(HFCausalLM(plain(saved("llama"))))  # a family that honours them passes


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "pythia"])
def test_block_types_are_the_decoder_layers_fsdp_wraps(saved, family):
    spec = HFDecoder(saved(family))
    blocks = spec.block_types()  # from the config alone, before any weights are loaded
    built = spec.build(V)
    assert sum(isinstance(m, blocks) for m in built.modules()) == 2  # one per layer
    assert spec.flops_per_token(V, 16) > 0


def test_weights_are_real_even_inside_a_meta_device_init_context(saved):
    """A sharding strategy may build under ``torch.device("meta")``: pretrained weights must survive it."""
    path = saved("qwen2")
    with torch.device("meta"):
        built = HFDecoder(path).build(V)
    ref = plain(path)
    assert all(not p.is_meta for p in built.parameters())
    torch.testing.assert_close(built.model.get_input_embeddings().weight, ref.get_input_embeddings().weight)


def test_learned_positions_bound_the_sequence_length(saved):
    spec = HFDecoder(saved("gpt2"))
    assert spec.max_position == 128 and HFDecoder(saved("llama")).max_position is None  # rotary: no bound
    with pytest.raises(ValueError, match="max_position"):
        CYBModule(spec, CYBAP(), vocab_size=V + 4, dk_id=V, steps_per_token=4, seq_len=129)


# -- end to end: the data module with the model's tokenizer, a CPU fit, checkpoint and reload ------------


def save_tiny_tokenizer(path) -> int:
    """A byte-level BPE (every text encodes) with Gemma-like ``<unusedN>`` tokens; returns its length."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<pad>", "<eos>", "<bos>", "<unused0>", "<unused1>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["def f(x): return x + 1"] * 10, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    hf.save_pretrained(str(path))
    return len(hf)


def test_cpu_fit_cyb_ap_checkpoint_reload_identical_logits(tmp_path, tiny_source):
    from cyb_lightning.data.hf_tokenizer import HFTokenizer
    from cyb_lightning.datamodule import CYBDataModule

    n = save_tiny_tokenizer(tmp_path / "llama")
    path = save_tiny(tmp_path / "llama", "llama", vocab_size=n)
    tok = HFTokenizer(path, dk_token="<unused0>", num_pauses=K)  # one repurposed id, K added ones
    assert tok.vocab.size == n + K and tok.vocab.pause_ids == tuple(range(n, n + K))
    dm = CYBDataModule(tiny_source, tokenizer=tok, layout="cyb", num_pauses=K, seq_len=8, batch_size=2,
                       val_documents=2)
    module = CYBModule(HFDecoder(path), CYBAP(), vocab_size=dm.vocab_size, dk_id=dm.dk_id,
                       steps_per_token=dm.steps_per_token, seq_len=8, lr=1e-3, warmup_steps=1)
    trainer = L.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 5 and torch.isfinite(trainer.callback_metrics["train/loss"])

    batch = next(iter(dm.val_dataloader()))
    ids = batch["input_ids"].view(2, 8, K + 1)
    assert set(ids[:, :, 1:].unique().tolist()) <= set(tok.vocab.pause_ids) | {tok.vocab.pad_id}
    reserved = torch.tensor([tok.vocab.dk_id, *tok.vocab.pause_ids])
    assert not torch.isin(ids[:, :, 0], reserved).any()  # text never produced DK or a pause

    trainer.save_checkpoint(tmp_path / "cyb.ckpt")
    reloaded = CYBModule.load_from_checkpoint(tmp_path / "cyb.ckpt", weights_only=False)
    module.eval()
    reloaded.eval()
    with torch.no_grad():
        a = module(batch["input_ids"], batch["position_ids"])
        b = reloaded(batch["input_ids"], batch["position_ids"])
    assert a.shape[-1] == n + K
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Training moved the weights away from the pretrained ones (the reload did not just re-read them).
    fresh = HFDecoder(path).build(n + K).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(batch["input_ids"], batch["position_ids"]), a)
