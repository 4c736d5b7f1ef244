"""Decoders: our GPT and the Hugging Face backend, each a :class:`Decoder` built by a :class:`DecoderSpec`
(``spec.py``: the contract)."""

from cyb_lightning.model.gpt import GPT, GPTConfig
from cyb_lightning.model.hf import HFCausalLM, HFDecoder, PositionIdsIgnored
from cyb_lightning.model.spec import Decoder, DecoderSpec

__all__ = ["GPT", "Decoder", "DecoderSpec", "GPTConfig", "HFCausalLM", "HFDecoder", "PositionIdsIgnored"]
