"""What ``model.decoder`` names in a config: a spec that builds the decoder once the vocabulary is known.

The LightningModule calls ``build`` inside ``configure_model``, so sharded strategies can build the
decoder on the meta device and materialise only their own shard.
"""

from __future__ import annotations

from torch import nn


class DecoderSpec:
    """Base class of decoder specs (``class_path`` in YAML). Subclasses are dataclasses or plain classes."""

    def build(self, vocab_size: int) -> nn.Module:
        """A module mapping ``(input_ids [B, L], position_ids [B, L])`` to logits ``[B, L, vocab_size]``."""
        raise NotImplementedError

    def block_types(self) -> tuple[type[nn.Module], ...]:
        """The repeated transformer block classes: the unit of FSDP sharding and activation checkpointing."""
        raise NotImplementedError

    def flops_per_token(self, vocab_size: int, context: int) -> int | None:
        """Training FLOPs per laid-out token, for MFU; None where unknown."""
        return None
