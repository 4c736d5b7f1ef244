"""``init_from``: the decoder weights of one of our own checkpoints, loaded into a fresh (maybe sharded) decoder.

The paper's protocol end to end with our own decoder: pretrain with ``baseline.yaml`` (no pauses), then
fine-tune with any CYB or TBYS config starting from those weights. Only the decoder is taken (no
optimizer, schedule, step count or data position: a fine-tune starts fresh); the shapes must match, so
use the same decoder config and tokenizer (the reserved ids are part of every vocabulary we build).

Reserved rows the checkpoint's run never trained (DK unless its loss trained DK, pause ids it never read)
are drawn afresh (:func:`rows_like`) before loading: with tied embeddings every row that is never a
target is pushed to one shared direction in pretraining (a 2×32 baseline: mean pairwise cosine of those
rows 0.997 after 400 steps), so the K pauses would start fine-tuning identical and DK's output row would
equal the pause input rows. A checkpoint records the rows its run (and the runs it started from) trained
under ``TRAINED_ROWS``; for one written before that record its hyperparameters say it (the pause ids its
layout inserted, DK where its loss had a DK output: :func:`trained_rows_of`).

Loading goes through ``torch.distributed.checkpoint.state_dict.set_model_state_dict`` with a full state
dict, which fills plain modules and FSDP2-sharded ones (DTensor parameters) alike and ignores wrapper
prefixes (activation checkpointing).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

PREFIX = "decoder."
TRAINED_ROWS = "trained_rows"  # checkpoint key: reserved ids (DK, pauses) the run's losses and inputs trained


@torch.no_grad()
def rows_like(weight: torch.Tensor, n: int, exclude: Sequence[int] = (), seed: int = 0) -> torch.Tensor:
    """``n`` rows drawn from N(μ, Σ), the mean and covariance of ``weight``'s rows (``exclude`` left out).

    Drawn as μ + Cᵀz/√N with C the N centred rows and z ~ N(0, I_N): covariance exactly Σ without a d×d
    matrix (transformers' ``mean_resizing`` draws from N(μ, 10⁻⁹Σ), rows a cosine of ≈ 1 apart). New rows
    are then as far apart as real tokens' rows, and each one's logit is distributed like a real token's.
    Float32, on ``weight``'s device; the same ``seed`` gives the same rows on every rank.
    """
    if exclude:
        keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        keep[list(exclude)] = False
        weight = weight[keep]
    ref = weight.float()
    mean = ref.mean(0)
    z = torch.randn(n, ref.shape[0], generator=torch.Generator().manual_seed(seed)).to(ref.device)
    # z @ (ref − mean) without a centred copy of a (maybe 256k-row) matrix
    return mean + (z @ ref - z.sum(1, keepdim=True) * mean) / math.sqrt(ref.shape[0])


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A ``.ckpt`` file or a DCP folder, as the dict Lightning saved."""
    path = os.fspath(path)
    if os.path.isdir(path):  # a distributed checkpoint (ModelParallelStrategy's default format)
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        checkpoint = _load_distributed_checkpoint(Path(path))
    elif os.path.isfile(path):
        # Our checkpoints pickle their hyperparameters (decoder spec, loss): not a weights-only file.
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    else:
        raise FileNotFoundError(f"init_from: no checkpoint at {path}")
    return checkpoint


def trained_rows_of(checkpoint: dict) -> set[int]:
    """The reserved rows (DK, pause ids) the checkpoint's runs trained: its ``TRAINED_ROWS`` record, or, for a
    checkpoint written before that record, what its hyperparameters say (the pause ids its layout inserted,
    DK where its loss had a DK output); none when neither is known."""
    if TRAINED_ROWS in checkpoint:
        return set(checkpoint[TRAINED_ROWS])
    hp = checkpoint.get("hyper_parameters") or {}
    rows = set(hp.get("pause_ids") or ())
    loss = hp.get("loss")
    if isinstance(loss, dict) and "class_path" in loss:  # the config form: the class says whether it reads DK
        import importlib

        module, name = loss["class_path"].rsplit(".", 1)
        loss = getattr(importlib.import_module(module), name, None)
    if getattr(loss, "uses_dk", False) and hp.get("dk_id") is not None:
        rows.add(int(hp["dk_id"]))
    return rows


def decoder_state_dict(checkpoint: dict, path: str | os.PathLike = "the checkpoint") -> dict[str, torch.Tensor]:
    """The full decoder state dict (``decoder.`` prefix removed) of a checkpoint from :func:`read_checkpoint`."""
    state = checkpoint.get("state_dict", checkpoint.get("model", checkpoint))
    decoder = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
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


def embedding_keys(decoder: nn.Module) -> list[list[str]]:
    """State-dict keys of the input embedding and of the output layer: one group per matrix (one group
    with both keys when they are tied)."""
    inp = decoder.input_embeddings().weight
    out = decoder.output_head().weight
    names: dict[int, list[str]] = {}
    for name, p in decoder.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name.replace("_checkpoint_wrapped_module.", ""))
    return [names[id(inp)]] + ([names[id(out)]] if out is not inp else [])


def redraw_rows(
    decoder: nn.Module, state: dict[str, torch.Tensor], rows: Sequence[int], reserved: Sequence[int] = ()
) -> dict[str, torch.Tensor]:
    """``state`` with ``rows`` of the input embedding and output layer drawn afresh (:func:`rows_like`) from
    the statistics of the rows that are neither ``rows`` nor ``reserved`` (collapsed rows would skew them)."""
    exclude = sorted(set(rows) | set(reserved))
    rows = sorted(rows)
    if not rows:
        return state
    state = dict(state)
    for seed, keys in enumerate(embedding_keys(decoder)):
        new = state[keys[0]].clone()
        new[rows] = rows_like(new, len(rows), exclude=exclude, seed=seed).to(new.dtype)
        state.update(dict.fromkeys(keys, new))
    return state


def filler_rows(
    decoder: nn.Module, state: dict[str, torch.Tensor], rows: Sequence[int], fillers: Sequence[int]
) -> dict[str, torch.Tensor]:
    """``state`` with input-embedding row ``rows[i]`` set to row ``fillers[i]`` (a text the model already reads
    as "nothing new": a space, a newline, ``...``), the other start for pause rows than :func:`rows_like`.

    Only the input embedding: the output rows of pause ids stay as drawn, except under tied embeddings,
    where the one matrix is both (a pause id then starts as likely an output as its filler)."""
    if len(rows) != len(fillers):
        raise ValueError(f"{len(rows)} pause rows but {len(fillers)} filler ids: give one filler per pause")
    if not rows:
        return state
    state = dict(state)
    keys = embedding_keys(decoder)[0]
    new = state[keys[0]].clone()
    new[list(rows)] = new[list(fillers)]
    state.update(dict.fromkeys(keys, new))
    return state
