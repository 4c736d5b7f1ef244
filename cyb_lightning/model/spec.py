"""The model contract: what ``model.decoder`` names in a config (a :class:`DecoderSpec`), and the decoder it
builds (a :class:`Decoder`), which is everything the LightningModule, adaptive generation and ``init_from``
use of a model. Our GPT (``gpt.py``) and the Hugging Face backend (``hf.py``) implement both.

The LightningModule calls ``build`` inside ``configure_model``, so sharded strategies can build the
decoder on the meta device and materialise only their own shard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from cyb_lightning.losses.head import OutputHead


@runtime_checkable
class Decoder(Protocol):
    """A decoder as the rest of the package uses it (an ``nn.Module``)."""

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        cache: Any = None,
        key_mask: Tensor | None = None,
        head_fn: Callable[[Tensor, OutputHead], Any] | None = None,
    ) -> Any:
        """``[B, L]`` ids and positions → logits ``[B, L, V]``; with ``head_fn``, ``head_fn(final hidden states
        [B, L, d], output_head())`` instead, computed inside ``forward`` (where FSDP2 has the head gathered).
        With ``cache`` (from :meth:`new_cache`) the inputs continue the cached ones, and ``key_mask`` (bool
        ``[B, L]``) hides inputs from every later query (rows that wait while another row pauses)."""
        ...

    def new_cache(self) -> Any:
        """An empty KV cache for incremental decoding (it grows in place and has a ``len``)."""
        ...

    def output_head(self) -> OutputHead:
        """The output layer (weight, bias, soft cap, logit scale): logits = head of the final hidden states."""
        ...

    def input_embeddings(self) -> nn.Embedding:
        """The input embedding (its rows for DK and pauses are drawn or copied at ``init_from``)."""
        ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


class DecoderSpec:
    """Base class of decoder specs (``class_path`` in YAML). Subclasses are dataclasses or plain classes."""

    max_position: int | None = None  # the largest position index the decoder takes (None: no limit)

    def build(self, vocab_size: int) -> Decoder:
        """The decoder (a :class:`Decoder`) with ``vocab_size`` output ids."""
        raise NotImplementedError

    def block_types(self) -> tuple[type[nn.Module], ...]:
        """The repeated transformer block classes: the unit of FSDP sharding and activation checkpointing."""
        raise NotImplementedError

    def flops_per_token(self, vocab_size: int, context: int) -> int | None:
        """Training FLOPs per laid-out token, for MFU; None where unknown."""
        return None


def missing_methods(decoder: nn.Module) -> list[str]:
    """The :class:`Decoder` methods ``decoder`` lacks, or whose ``forward`` takes none of the contract's
    keywords (empty: it fulfils the contract)."""
    import inspect

    missing = [
        name for name in ("new_cache", "output_head", "input_embeddings") if not callable(getattr(decoder, name, None))
    ]
    params = inspect.signature(decoder.forward).parameters
    missing += [f"forward(..., {k}=)" for k in ("position_ids", "cache", "key_mask", "head_fn") if k not in params]
    return missing
