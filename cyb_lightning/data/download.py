"""``python -m cyb_lightning download-c4``: fill a local C4 mirror (json.gz shards) from the Hub.

    python -m cyb_lightning download-c4 --out data/c4 --shards 16 --validation-shards 1

downloads ``en/c4-train.00000-of-01024.json.gz`` … and ``en/c4-validation.00000-of-00008.json.gz`` … of
``allenai/c4`` into ``--out`` (flat, C4's file names), skipping files already there. Train then with
``--data.source conf/data/c4_local.yaml`` (``LocalShards(path=data/c4)``). Pick a shard count that is a
multiple of the number of training processes, so each one reads its own shards.

Offline (``HF_HUB_OFFLINE=1``) or with the Hub unreachable it stops within ``--timeout`` seconds and
says so, instead of letting the download retry for minutes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

C4_SHARDS = {"train": 1024, "validation": 8}


def shard_file(variant: str, split: str, index: int) -> str:
    """The Hub path of one C4 shard, e.g. ``en/c4-train.00003-of-01024.json.gz``."""
    return f"{variant}/c4-{split}.{index:05d}-of-{C4_SHARDS[split]:05d}.json.gz"


def check_hub(timeout_s: float) -> None:
    """Raise SystemExit with an explanation unless the Hub's endpoint answers within ``timeout_s``."""
    from .sources import hub_problem

    hint = (
        "download-c4 needs the Hugging Face Hub. Run it on a machine with network access and copy the folder, "
        "or get the files elsewhere (git clone https://huggingface.co/datasets/allenai/c4 with "
        'GIT_LFS_SKIP_SMUDGE=1, then git lfs pull --include "en/c4-train.0000*"); any folder of C4 json.gz '
        "shards works with --data.source conf/data/c4_local.yaml"
    )
    problem = hub_problem(timeout_s)
    if problem:
        raise SystemExit(f"error: {problem}. {hint}")


def download(
    out: Path, shards: int, validation_shards: int, variant: str = "en", revision: str | None = None
) -> list[Path]:
    """Download the first ``shards`` train and ``validation_shards`` validation shards into ``out``."""
    from huggingface_hub import hf_hub_download

    out.mkdir(parents=True, exist_ok=True)
    wanted = [("train", i) for i in range(shards)] + [("validation", i) for i in range(validation_shards)]
    paths = []
    for n, (split, i) in enumerate(wanted, 1):
        name = shard_file(variant, split, i)
        target = out / Path(name).name
        if target.is_file():
            print(f"[{n}/{len(wanted)}] {target} already there")
        else:
            with tempfile.TemporaryDirectory(dir=out) as tmp:  # never leaves a half-written shard in out
                got = hf_hub_download("allenai/c4", name, repo_type="dataset", revision=revision, local_dir=tmp)
                shutil.move(got, target)
            print(f"[{n}/{len(wanted)}] {target} ({target.stat().st_size / 2**20:.0f} MiB)")
        paths.append(target)
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cyb_lightning download-c4", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/c4", help="folder for the shards (data/c4: what c4_local.yaml reads)")
    p.add_argument("--shards", type=int, default=8, help="train shards, the first N of 1024 (~320 MB each)")
    p.add_argument("--validation-shards", type=int, default=1, help="validation shards, the first N of 8")
    p.add_argument("--variant", default="en", help="C4 variant folder on the Hub (en, en.noblocklist, …)")
    p.add_argument("--revision", default=None, help="a Hub revision (commit) to pin")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the Hub before giving up")
    args = p.parse_args(argv)
    if not 1 <= args.shards <= C4_SHARDS["train"] or not 0 <= args.validation_shards <= C4_SHARDS["validation"]:
        p.error(f"--shards must be in 1..{C4_SHARDS['train']}, --validation-shards in 0..{C4_SHARDS['validation']}")
    check_hub(args.timeout)
    paths = download(Path(args.out), args.shards, args.validation_shards, args.variant, args.revision)
    print(
        f"{len(paths)} shards in {args.out}; train with --data.source conf/data/c4_local.yaml "
        f"(LocalShards path={args.out})",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
