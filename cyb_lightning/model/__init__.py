"""Decoders: each returns logits ``[B, L, V]`` from ``input_ids`` and ``position_ids``."""

from cyb_lightning.model.gpt import GPT, GPTConfig
from cyb_lightning.model.hf import HFCausalLM, HFDecoder, PositionIdsIgnored
from cyb_lightning.model.spec import DecoderSpec

__all__ = ["GPT", "DecoderSpec", "GPTConfig", "HFCausalLM", "HFDecoder", "PositionIdsIgnored"]
