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
from tests.conftest import assert_cache_contract  # noqa: E402

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


@pytest.mark.parametrize("family", ["llama", "gpt2"], ids=["untied", "tied"])
def test_pause_rows_start_as_their_filler_tokens_when_asked(saved, family):
    """``data.pause_fillers`` → ``pause_filler_ids``: each added pause input row is a copy of its filler's row
    (a token the model already reads); DK and every text row are as without fillers."""
    path = saved(family)
    pauses, fillers = tuple(range(V + 1, V + 1 + K)), (7, 8, 9)
    kw = dict(vocab_size=V + 1 + K, dk_id=V, steps_per_token=K + 1, seq_len=T, pause_ids=pauses)
    drawn = CYBModule(HFDecoder(path), CYBAP(), **kw)
    drawn.configure_model()
    filled = CYBModule(HFDecoder(path), CYBAP(), pause_filler_ids=fillers, **kw)
    filled.configure_model()
    a, b = drawn.decoder.model, filled.decoder.model
    emb = b.get_input_embeddings().weight
    torch.testing.assert_close(emb[list(pauses)], emb[list(fillers)], rtol=0, atol=0)
    assert not torch.allclose(a.get_input_embeddings().weight[list(pauses)], emb[list(pauses)])
    others = [i for i in range(V + 1 + K) if i not in pauses]
    torch.testing.assert_close(emb[others], a.get_input_embeddings().weight[others], rtol=0, atol=0)
    if family == "llama":  # untied: the output rows of the pause ids stay drawn
        torch.testing.assert_close(b.get_output_embeddings().weight, a.get_output_embeddings().weight, rtol=0, atol=0)


def test_a_logit_transform_the_head_does_not_model_is_refused(saved, monkeypatch):
    """The loss reads hidden states @ the output head; a family whose own logits differ (here: the head's output
    doubled by a hook, as an unmodelled multiplier would) is refused at build instead of training wrongly."""
    from cyb_lightning.model.hf import check_output_head

    decoder = HFDecoder(saved("llama")).build(V)
    check_output_head(decoder)  # the plain family passes
    decoder.model.get_output_embeddings().register_forward_hook(lambda mod, inp, out: out * 2)
    with pytest.raises(ValueError, match="differ from the model's own logits .* cannot be trained here"):
        check_output_head(decoder, "doubled")


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


# -- adaptive generation with transformers' KV cache (the runner of cyb_lightning.generation) ------------

DK, PAUSES = V, tuple(range(V + 1, V + 1 + K))  # added ids at the end of the vocabulary, as HFTokenizer adds them
GEN_FAMILIES = ["llama", "gemma", "qwen2", "gpt2"]
GEN_CASES = [("greedy", 0.5), ("threshold", 0.5), ("threshold", 0.2), ("sample", 0.5), ("fixed", 0.5), ("none", 0.5)]
PROMPT = [1, 7, 8, 9, 13, 21]


@pytest.fixture(scope="module")
def pausing(saved):
    """(decoder, DK prior) per family: a random DK output row large enough that d depends on the context, and
    the prior that puts the median d at 1/2, so the policies under test pause some tokens and not others."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            decoder = HFDecoder(saved(family)).build(V + 1 + K).eval()
            g = torch.Generator().manual_seed(3)
            with torch.no_grad():
                head = decoder.model.get_output_embeddings().weight
                head[DK] = torch.randn(head.shape[1], generator=g) * head.std() * 8
                z = decoder(torch.randint(0, V, (1, 32), generator=g)).float()[0]
            log_odds = z[:, DK] - torch.cat((z[:, :DK], z[:, DK + 1 :]), -1).logsumexp(-1)
            cache[family] = decoder, -float(log_odds.median())
        return cache[family]

    return get


def gen_runner(pausing, family, kind, threshold=0.5, use_cache=True, seed=1):
    from cyb_lightning.generation import AdaptiveRunner, PausePolicy, Sampling

    decoder, bias = pausing(family)
    return AdaptiveRunner(decoder, DK, PAUSES, 0, bias, PausePolicy(kind, threshold), Sampling(0.0),
                          use_cache=use_cache, generator=torch.Generator().manual_seed(seed))  # fmt: skip


@pytest.mark.parametrize("family", GEN_FAMILIES)
def test_kv_cache_generation_equals_full_recomputation_per_family(pausing, family, one_thread):
    """Every policy (sample with a fixed seed): the same tokens, pauses and answer NLLs as recomputing it all."""
    spent = []
    for kind, threshold in GEN_CASES:
        cached = gen_runner(pausing, family, kind, threshold).generate(PROMPT, 12)
        full = gen_runner(pausing, family, kind, threshold, use_cache=False).generate(PROMPT, 12)
        assert cached.tokens.tolist() == full.tokens.tolist(), kind
        assert cached.steps.tolist() == full.steps.tolist(), kind
        torch.testing.assert_close(cached.nll, full.nll, rtol=1e-4, atol=1e-4)
        assert cached.tokens.shape[1] == len(PROMPT) + 12 and DK not in cached.tokens[0].tolist()
        spent.append(cached.steps[0])
    # The adaptive policies did pause some tokens and not others; fixed-K always pauses K times, none never.
    for adaptive in (spent[1], spent[3]):  # threshold 0.5, sample
        assert (adaptive == 1).any() and (adaptive > 1).any()
    assert (spent[4] == K + 1).all() and (spent[5] == 1).all()


@pytest.mark.parametrize("family", GEN_FAMILIES)
def test_batch_rows_pausing_differently_each_see_their_own_context(pausing, family, one_thread):
    # Rows that wait while another pauses feed inputs that the attention mask hides: each row = run alone.
    real = torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(4))
    together = gen_runner(pausing, family, "threshold", 0.5).run(real, length=9)
    assert (together.steps[0] != together.steps[1]).any() or (together.steps[0] != together.steps[2]).any()
    for b in range(3):
        alone = gen_runner(pausing, family, "threshold", 0.5, use_cache=False).run(real[b : b + 1], length=9)
        assert alone.steps.tolist() == together.steps[b : b + 1].tolist()
        torch.testing.assert_close(alone.nll, together.nll[b : b + 1], rtol=1e-4, atol=1e-4)


def test_hf_cache_chunks_and_hidden_inputs(saved):
    """The cache contract of our GPT: chunks continue the cached inputs; a hidden input is as if never fed."""
    decoder = HFDecoder(saved("llama")).build(V).eval()
    ids = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(6))
    pos = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 4, 5]).expand(2, -1)  # shared positions, as the layout has
    assert_cache_contract(decoder, ids, pos, filler_id=0)
    with pytest.raises(ValueError, match="needs a cache"):
        decoder(ids, pos, key_mask=torch.ones(2, 11, dtype=torch.bool))


# -- FlashAttention: shared positions are never read as sequence boundaries -------------------------------


class FlashKernels:
    """Stand-ins for the flash-attn kernels (pure torch, same signatures) that record the sequence boundaries
    transformers hands them: transformers' own dispatch (``_flash_attention_forward``) runs unchanged."""

    def __init__(self):
        self.boundaries: list[list[int] | None] = []

    @staticmethod
    def attend(q, k, v, causal, scale):  # [B, L, H, D]; causal is aligned bottom-right, as in flash-attn >= 2.1
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        Lq, Lk = q.shape[2], k.shape[2]
        mask = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq) if causal else None
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        return out.transpose(1, 2)

    def flash(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        self.boundaries.append(None)
        return self.attend(q, k, v, causal, softmax_scale)

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
               softmax_scale=None, causal=False):  # fmt: skip
        self.boundaries.append(cu_seqlens_q.tolist())
        bounds = zip(cu_seqlens_q[:-1], cu_seqlens_q[1:], cu_seqlens_k[:-1], cu_seqlens_k[1:])
        return torch.cat([self.attend(q[None, a:b], k[None, c:d], v[None, c:d], causal, softmax_scale)[0]
                          for a, b, c, d in bounds])  # fmt: skip


@pytest.fixture
def flash(monkeypatch):
    fa = pytest.importorskip("transformers.modeling_flash_attention_utils")
    kernels = FlashKernels()
    monkeypatch.setattr(fa, "_lazy_imports", lambda *a, **k: (kernels.flash, kernels.varlen, None, fa._pad_input,
                                                              fa._unpad_input))  # fmt: skip
    monkeypatch.setattr(fa, "_loaded_implementation", None)
    return kernels


@pytest.mark.parametrize("family", GEN_FAMILIES)
def test_flash_attention_at_batch_one_never_reads_shared_positions_as_boundaries(saved, flash, family, monkeypatch):
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

    decoder = HFDecoder(saved(family), dtype="bfloat16").build(V + K).eval()  # flash attention runs in half precision
    real = torch.randint(0, V, (5,), generator=torch.Generator().manual_seed(7))
    ids, pos = batch_of(layout_cyb(real, 4, tuple(range(V, V + K)), pad_id=0))  # 16 inputs, positions 0,0,0,0,1,…
    # The hazard: transformers' own detection reads the CYB positions of one row as four packed sequences.
    assert bool(_is_packed_sequence(pos, batch_size=1))
    assert prepare_fa_kwargs_from_position_ids(pos)[0][0].tolist() == [0, 1, 2, 3, 16]
    with torch.no_grad():
        sdpa = decoder(ids, pos).float()
        monkeypatch.setattr(decoder.model.config, "_attn_implementation", "flash_attention_2")
        ours = decoder(ids, pos).float()
        hidden = decoder.hidden_states(ids, pos)  # the chunked loss's path
    layers = decoder.model.config.get_text_config().num_hidden_layers
    # Every layer of both calls attended over one 16-input sequence, so the logits are SDPA's.
    assert flash.boundaries == [[0, 16]] * (2 * layers)
    assert hidden.shape == (1, 16, decoder.model.get_input_embeddings().weight.shape[1])
    torch.testing.assert_close(ours, sdpa, rtol=2e-2, atol=2e-2)


def test_flash_attention_cache_takes_one_input_per_call_and_generates_like_sdpa(pausing, flash, one_thread,
                                                                              monkeypatch):  # fmt: skip
    decoder = pausing("llama")[0]
    real = torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(4))
    sdpa = gen_runner(pausing, "llama", "threshold", 0.5).run(real, length=9)
    monkeypatch.setattr(decoder.model.config, "_attn_implementation", "flash_attention_2")
    ours = gen_runner(pausing, "llama", "threshold", 0.5).run(real, length=9)
    # Rows paused differently (hidden inputs: the masked kernel path) and together (the mask-free one).
    assert None in flash.boundaries and any(b is not None for b in flash.boundaries)
    assert ours.steps.tolist() == sdpa.steps.tolist()
    torch.testing.assert_close(ours.nll, sdpa.nll, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="one input per call"):
        decoder(real, cache=decoder.new_cache())
