"""Which checkpoint a restarted run resumes from, and what it takes from it.

:func:`pick_checkpoint` is the one resume picker: ``scripts/slurm/train.sbatch`` calls it
(``python -m cyb_lightning pick-checkpoint RUN_DIR``) and so does the CLI for every automatic resume
(``--ckpt_path last``, and a fit under SLURM without ``--ckpt_path``, where Lightning would otherwise load
the newest ``hpc_ckpt_<n>.ckpt`` unchecked). Candidates are ``RUN_DIR/hpc_ckpt_*.ckpt`` and
``RUN_DIR/checkpoints/*.ckpt`` (files, or FSDP2 folders), never ``*.consolidated.ckpt`` (no optimizer
state: made for evaluation). Each is validated (:func:`inspect`) before it is chosen; the valid one with
the most optimizer steps wins (the newest file on a tie), so a ``last.ckpt`` is never taken over a step
checkpoint that is further on. An invalid candidate newer than the choice is named in a warning; when
candidates exist but none is valid the picker refuses (starting afresh would overwrite the run).
Temporary files of killed saves (``.<name>.partial``) are removed: no save runs while a run starts.

:func:`resolved_differences` compares the settings a resumed run was given with the checkpoint's, for
``--ckpt_path`` (see ``cli.py``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cyb_lightning.checkpoint import METADATA_FILE, PARTIAL_SUFFIX, is_sharded

CONSOLIDATED_SUFFIX = ".consolidated.ckpt"
REQUIRED_KEYS = ("global_step", "loops", "optimizer_states", "state_dict")


@dataclass
class Candidate:
    path: Path
    mtime: float
    step: int | None = None  # None: invalid
    problem: str = ""


def load_metadata(path: str | Path) -> dict[str, Any]:
    """A checkpoint's non-tensor part: the file (tensors memory-mapped, not read) or a folder's ``meta.pt``.

    Our own run's files: their hyperparameters may pickle the decoder spec and the loss, hence a full load.
    """
    path = Path(path)
    if path.is_dir():
        return torch.load(path / METADATA_FILE, map_location="cpu", weights_only=False)
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def _check_sharded(folder: Path) -> str:
    """What is missing from a distributed checkpoint folder ('' when every shard byte it names is there)."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (folder / ".metadata").is_file():
        return "no .metadata (not a finished distributed checkpoint)"
    metadata = FileSystemReader(folder).read_metadata()
    needed: dict[str, int] = {}
    for item in (metadata.storage_data or {}).values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(needed.items()):
        shard = folder / name
        if not shard.is_file():
            return f"shard {name} is missing"
        if shard.stat().st_size < size:
            return f"shard {name} is truncated ({shard.stat().st_size} of {size} bytes)"
    return ""


def inspect(path: str | Path) -> Candidate:
    """A candidate with its global step, or with ``problem`` saying why it cannot be resumed from."""
    path = Path(path)
    c = Candidate(path, path.stat().st_mtime)
    try:
        if path.is_dir():
            if not is_sharded(path):
                c.problem = "a folder without .metadata (an unfinished or foreign checkpoint)"
                return c
            c.problem = _check_sharded(path)
            if c.problem:
                return c
            meta = load_metadata(path)
            # The tensors (weights, optimizer states) live in the shards; meta.pt holds the rest.
            missing = [k for k in REQUIRED_KEYS if k not in meta and k not in ("state_dict", "optimizer_states")]
        else:
            meta = load_metadata(path)
            missing = [k for k in REQUIRED_KEYS if k not in meta]
    except Exception as e:  # any unreadable file: say what the loader said
        c.problem = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        return c
    if missing:
        c.problem = f"not a training checkpoint (no {', '.join(missing)})"
        return c
    c.step = int(meta["global_step"])
    return c


def candidates(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    paths = [*run_dir.glob("hpc_ckpt_*.ckpt"), *(run_dir / "checkpoints").glob("*.ckpt")]
    return sorted(p for p in paths if not p.name.endswith(CONSOLIDATED_SUFFIX) and not p.name.startswith("."))


def remove_partial_saves(run_dir: str | Path) -> list[Path]:
    """Delete what killed saves left (``.<name>.partial`` and ``.<name>.old``); returns what was removed."""
    run_dir = Path(run_dir)
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        for p in folder.glob(".*.ckpt*"):
            if p.name.endswith((PARTIAL_SUFFIX, ".old")):
                try:  # every rank of a starting run may be doing the same
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                except FileNotFoundError:
                    continue
                removed.append(p)
    return removed


# Model settings the data module fills in (linked by the CLI): compared through the data settings instead.
LINKED_MODEL_KEYS = ("vocab_size", "dk_id", "steps_per_token", "seq_len")


def _flatten(d: Any, prefix: str) -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            if not str(k).startswith("_"):
                out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: list(d) if isinstance(d, tuple) else d}


def resolved_differences(ckpt_path: str | Path, model: dict, data: dict, meta: dict | None = None) -> list[str]:
    """One line per setting whose resolved value differs from the checkpoint's, saying which value wins.

    ``model``/``data``: this run's resolved ``model``/``data`` config sections as plain dicts. The model's
    settings come from the checkpoint (the CLI merges its hyperparameters: a resumed run continues that
    model and its training); the data module is built from this run's settings. Raises ``ValueError``
    where resuming cannot be meaningful: another layout, number of pauses or BPE size than the checkpoint's
    model was built for (its steps per token, loss weights and embedding).
    """
    meta = load_metadata(ckpt_path) if meta is None else meta
    lines, refuse = [], []
    saved_model = _flatten(meta.get("hyper_parameters") or {}, "model")
    given_model = _flatten(model, "model")
    for key in sorted(saved_model.keys() & given_model.keys()):
        if key.split(".")[1] not in LINKED_MODEL_KEYS and saved_model[key] != given_model[key]:
            lines.append(f"  {key}: given {given_model[key]!r}, checkpoint {saved_model[key]!r} -> the checkpoint's")
    saved_data = _flatten(meta.get("datamodule_hyper_parameters") or {}, "data")
    given_data = _flatten(data, "data")
    from cyb_lightning.data.layout import LAYOUT_CLASSES

    layouts = {saved_data.get("data.layout"), given_data.get("data.layout")}
    paused = any(LAYOUT_CLASSES[n].per_token_groups for n in layouts if n in LAYOUT_CLASSES)  # K sets W there
    for key in sorted(saved_data.keys() & given_data.keys()):
        if saved_data[key] == given_data[key]:
            continue
        line = f"  {key}: given {given_data[key]!r}, checkpoint {saved_data[key]!r}"
        if key in ("data.layout", "data.bpe_vocab_size") or (key == "data.num_pauses" and paused):
            refuse.append(line)
        else:
            lines.append(line + " -> the given one")
    if refuse:
        raise ValueError(
            f"cannot resume from {ckpt_path}: its model was built for other data:\n" + "\n".join(refuse) + "\n"
            "(the layout and the number of pauses fix the steps per token and the loss weights, the BPE size the "
            "embedding). Resume with the checkpoint's values, or start a new run from its weights with "
            f"--model.init_from {ckpt_path}"
        )
    if not lines:
        return []
    return [
        f"resuming from {ckpt_path}: {len(lines)} setting(s) differ from the checkpoint's:",
        *lines,
        "(a resumed run continues the checkpoint's model and training settings; to train other model settings "
        f"from its weights, start a new run with --model.init_from {ckpt_path})",
    ]


class NoValidCheckpoint(RuntimeError):
    pass


def pick_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a restart of the run in ``run_dir`` resumes from; None when it has none (fresh start).

    Warns (``UserWarning``) about every invalid candidate newer than the one chosen; raises
    :class:`NoValidCheckpoint` when there are candidates and none is valid.
    """
    for p in remove_partial_saves(run_dir):
        warnings.warn(f"removed {p}: left by a checkpoint save that did not finish", stacklevel=2)
    found = [inspect(p) for p in candidates(run_dir)]
    if not found:
        return None
    valid = [c for c in found if c.step is not None]
    if not valid:
        listing = "\n".join(f"  {c.path}: {c.problem}" for c in found)
        raise NoValidCheckpoint(
            f"no checkpoint in {run_dir} can be resumed from:\n{listing}\n"
            "move them away to start this run afresh, or resume from another run's checkpoint with --ckpt_path"
        )
    best = max(valid, key=lambda c: (c.step, c.mtime))
    for c in found:
        if c.step is None and c.mtime > best.mtime:
            warnings.warn(
                f"skipping {c.path}: {c.problem}; resuming from {best.path} (step {best.step}), "
                "the newest valid checkpoint",
                stacklevel=2,
            )
    return best.path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cyb_lightning pick-checkpoint",
        description="Print the checkpoint a restart of RUN_DIR resumes from (nothing: start afresh). "
        "Candidates: RUN_DIR/hpc_ckpt_*.ckpt and RUN_DIR/checkpoints/*.ckpt (not *.consolidated.ckpt); each is "
        "validated, the furthest valid one is printed, invalid newer ones are named on stderr.",
    )
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            chosen = pick_checkpoint(args.run_dir)
        except NoValidCheckpoint as e:
            sys.exit(f"pick-checkpoint: {e}")
    for w in caught:
        print(f"pick-checkpoint: warning: {w.message}", file=sys.stderr)
    if chosen is not None:
        print(chosen)


if __name__ == "__main__":
    main()
