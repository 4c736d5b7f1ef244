"""The model contract (``model/spec.py``): our GPT and the Hugging Face backend are Decoders, and a spec that
builds anything else is refused by name when the module is built."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cyb_lightning.losses import CrossEntropy
from cyb_lightning.model import Decoder, DecoderSpec, GPTConfig, HFDecoder
from cyb_lightning.model.spec import missing_methods
from cyb_lightning.module import CYBModule
from tests.model.test_hf import save_tiny


def test_gpt_and_the_hf_backend_fulfil_the_contract(tmp_path):
    gpt = GPTConfig(n_layer=1, n_head=2, d_model=16).build(40)
    hf = HFDecoder(save_tiny(tmp_path, "llama")).build(40)
    for decoder in (gpt, hf):
        assert isinstance(decoder, Decoder) and missing_methods(decoder) == []
        assert decoder.input_embeddings().weight.shape[0] >= 40
        assert decoder.output_head().weight.shape[0] >= 40
        ids = torch.randint(0, 40, (2, 5))
        with torch.no_grad():
            hidden_and_head = decoder(ids, torch.arange(5).expand(2, 5), head_fn=lambda h, head: head.logits(h))
            torch.testing.assert_close(hidden_and_head, decoder(ids, torch.arange(5).expand(2, 5)))
    assert GPTConfig().max_position == 4096 and DecoderSpec.max_position is None


class _Plain(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)

    def forward(self, input_ids, position_ids=None):
        return self.embed(input_ids)


class _PlainSpec(DecoderSpec):
    def build(self, vocab_size: int) -> nn.Module:
        return _Plain(vocab_size)


def test_a_decoder_outside_the_contract_is_refused_naming_what_it_lacks():
    assert not isinstance(_Plain(4), Decoder)
    module = CYBModule(_PlainSpec(), CrossEntropy(), vocab_size=20, dk_id=2, steps_per_token=1, seq_len=4)
    with pytest.raises(TypeError, match=r"lacks new_cache, output_head, input_embeddings, forward\(\.\.\., cache=\)"):
        module.configure_model()
