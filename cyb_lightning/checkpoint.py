"""``python -m cyb_lightning consolidate CKPT_DIR [-o OUT]``: a sharded checkpoint → one Lightning file.

FSDP2 runs (``cyb_lightning.parallel.FSDP2Strategy``) save a *distributed checkpoint*: a folder (named
like ``last.ckpt``) with one ``__<rank>_0.distcp`` shard per rank, torch's ``.metadata`` and Lightning's
``meta.pt`` (step, loops, callbacks, data-loader position, hyperparameters). This command reads every
shard on one CPU process (torch.distributed.checkpoint with ``no_dist=True``, no process group)
and writes an ordinary single-file Lightning checkpoint, loadable anywhere::

    python -m cyb_lightning consolidate runs/c4/checkpoints/last.ckpt      # → last.consolidated.ckpt
    model = CYBModule.load_from_checkpoint("…/last.consolidated.ckpt", map_location="cpu", weights_only=False)

Optimizer states are dropped unless ``--keep-optimizer`` (they are keyed by parameter name, as
``torch.distributed.checkpoint.state_dict`` writes them, under ``optimizer_states``); the file is meant for
evaluation and export. Resuming training goes through the sharded folder itself (``--ckpt_path``).

Writing checkpoints: :func:`atomic_torch_save` (files, via :class:`AtomicCheckpointIO`, which the CLI gives
every trainer) and ``FSDP2Strategy.save_checkpoint`` (folders) write under a temporary name *in the
destination folder* (``.<name>.partial``), fsync, and rename: a save killed at any moment leaves the
previous checkpoint intact under its name, whatever ``TMPDIR`` is (Lightning's own save goes through a
temporary file in ``TMPDIR``, and across filesystems its final "move" is a copy onto the checkpoint).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

METADATA_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint
PARTIAL_SUFFIX = ".partial"


def partial_path(path: str | Path) -> Path:
    """Where a save of ``path`` is written before its rename: hidden, same folder, so same filesystem."""
    path = Path(path)
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


def fsync_path(path: str | Path) -> None:
    """Flush a file, or a folder's entries (a rename is durable only once its folder is), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` that never leaves a half-written file under ``path``, whatever ``TMPDIR`` is."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def replace_folder(tmp: Path, path: Path) -> None:
    """Move a complete checkpoint folder ``tmp`` to ``path``, replacing what is there.

    A folder cannot be renamed over a non-empty one, so the old one is first renamed aside: a kill between
    the two renames leaves no ``path`` (the resume picker then takes the newest other valid checkpoint),
    never a mixture of two checkpoints.
    """
    for root, _, files in os.walk(tmp):
        for name in files:
            fsync_path(Path(root) / name)
    old = path.with_name(f".{path.name}.old")
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    fsync_path(path.parent)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with :func:`atomic_torch_save` for local paths (remote ones: as is)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


def is_sharded(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file()


def load_sharded(folder: str | Path, keep_optimizer: bool = False) -> dict[str, Any]:
    """The whole checkpoint in one process's memory: ``state_dict`` (full tensors) + Lightning's metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    folder = Path(folder)
    if not is_sharded(folder):
        raise ValueError(f"{folder} is not a sharded (torch.distributed.checkpoint) checkpoint folder")
    tensors: dict[str, Any] = {}
    # The empty-state planner fills `tensors` with everything the checkpoint holds: what torch's own
    # dcp_to_torch_save and Lightning's consolidate_checkpoint do; no_dist: one process, no process group.
    reader = FileSystemReader(folder)
    _load_state_dict(tensors, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    if "state_dict" not in tensors:  # flat keys ("state_dict.decoder.embed.weight"): nest them back
        from torch.distributed.checkpoint._nested_dict import unflatten_state_dict

        tensors = unflatten_state_dict(tensors, reader.read_metadata().planner_data)
    meta_file = folder / METADATA_FILE
    # Our own file: its hyperparameters pickle the decoder spec and the loss, so a full unpickle.
    checkpoint = torch.load(meta_file, map_location="cpu", weights_only=False) if meta_file.is_file() else {}
    checkpoint["state_dict"] = tensors.pop("state_dict")
    optimizers = [tensors.pop(k) for k in sorted(k for k in list(tensors) if k.startswith("optimizer_"))]
    if keep_optimizer:
        checkpoint["optimizer_states"] = optimizers
    else:
        checkpoint.pop("optimizer_states", None)
    checkpoint.update(tensors)  # anything else saved alongside, as is
    return checkpoint


def consolidate(folder: str | Path, output: str | Path | None = None, keep_optimizer: bool = False) -> Path:
    """Write ``folder`` (a sharded checkpoint) as one file; returns its path (default ``<name>.consolidated.ckpt``)."""
    folder = Path(folder)
    if output is None:
        output = folder.with_name(f"{folder.name.removesuffix('.ckpt')}.consolidated.ckpt")
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"{output} exists; choose another --output or remove it")
    checkpoint = load_sharded(folder, keep_optimizer=keep_optimizer)
    atomic_torch_save(checkpoint, output)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cyb_lightning consolidate",
        description="Turn a sharded (FSDP2 / torch.distributed.checkpoint) checkpoint folder into one "
        "Lightning checkpoint file that loads on a single CPU process.",
    )
    parser.add_argument("checkpoint", help="the sharded checkpoint folder, e.g. runs/<name>/checkpoints/last.ckpt")
    parser.add_argument("-o", "--output", help="output file (default: <name>.consolidated.ckpt next to it)")
    parser.add_argument("--keep-optimizer", action="store_true", help="keep the optimizer states too")
    args = parser.parse_args(argv)
    if Path(args.checkpoint).is_file():
        parser.error(f"{args.checkpoint} is already a single-file checkpoint")
    out = consolidate(args.checkpoint, args.output, keep_optimizer=args.keep_optimizer)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
