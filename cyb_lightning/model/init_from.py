"""``init_from``: the decoder weights of one of our own checkpoints, loaded into a fresh (maybe sharded) decoder.

The paper's protocol end to end with our own decoder: pretrain with ``baseline.yaml`` (no pauses), then
fine-tune with any CYB or TBYS config starting from those weights. Only the decoder is taken (no
optimizer, schedule, step count or data position: a fine-tune starts fresh); the shapes must match, so
use the same decoder config and tokenizer (the reserved ids are part of every vocabulary we build).

Loading goes through ``torch.distributed.checkpoint.state_dict.set_model_state_dict`` with a full state
dict, which fills plain modules and FSDP2-sharded ones (DTensor parameters) alike and ignores wrapper
prefixes (activation checkpointing).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

PREFIX = "decoder."


def decoder_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full decoder state dict (``decoder.`` prefix removed) from a ``.ckpt`` file or a DCP folder."""
    path = os.fspath(path)
    if os.path.isdir(path):  # a distributed checkpoint (ModelParallelStrategy's default format)
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        checkpoint = _load_distributed_checkpoint(Path(path))
    elif os.path.isfile(path):
        # Our checkpoints pickle their hyperparameters (decoder spec, loss): not a weights-only file.
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    else:
        raise FileNotFoundError(f"init_from: no checkpoint at {path}")
    state = checkpoint.get("state_dict", checkpoint.get("model", checkpoint))
    decoder = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    if not decoder:
        raise ValueError(f"init_from: {path} holds no decoder weights (no '{PREFIX}*' keys); is it one of our runs?")
    return decoder


def set_decoder_state_dict(decoder: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``decoder`` in place (strict: every weight present, every shape equal)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    own = {k: v.shape for k, v in decoder.state_dict().items()}
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k])}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k])  # DTensor shapes are global shapes
    ]
    if mismatched:
        raise ValueError(
            "init_from: the checkpoint's decoder does not match this run's (use the same decoder config and "
            "tokenizer): " + "; ".join(mismatched[:5])
        )
    set_model_state_dict(decoder, state, options=StateDictOptions(full_state_dict=True, strict=True))
