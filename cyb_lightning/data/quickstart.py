"""An offline corpus built from text that ships with every Python, plus the tokenizer trained on it.

Design notes: docs/internals.md, section `cyb_lightning/data/quickstart.py`.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import sysconfig
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock

from .tokenizer import MAX_PAUSES, TOKENIZER_FILE, CYBTokenizer

log = logging.getLogger(__name__)

QUICKSTART_DIR = "data/quickstart"
MANIFEST = "manifest.json"
TEXT_SUFFIXES = (".txt", ".md", ".rst")

# Packages whose docstrings are GUI or test scaffolding rather than prose, or that are not the stdlib.
_SKIP_DIRS = frozenset(
    {
        "__pycache__",
        "site-packages",
        "dist-packages",
        "lib-dynload",
        "idlelib",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "pydoc_data",
        "__phello__",
        "test",
        "tests",
    }
)
_SKIP_FILES = frozenset({"antigravity.py", "this.py", "turtle.py"})


# -- shard files ----------------------------------------------------------------------------------------


def shard_name(split: str, index: int, count: int) -> str:
    """C4's file naming, e.g. ``c4-train.00003-of-01024.json.gz``."""
    return f"c4-{split}.{index:05d}-of-{count:05d}.json.gz"


def write_shard(path: Path, texts: Iterable[str]) -> None:
    """Write ``{"text": ...}`` lines, gzipped with a zero timestamp and no file name in the header,
    so that the same texts always give the same bytes (gzip stores both by default)."""
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        for text in texts:
            gz.write(json.dumps({"text": text}, ensure_ascii=False).encode("utf-8") + b"\n")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- documents ------------------------------------------------------------------------------------------


def topic_documents() -> list[str]:
    """The pydoc help topics, sorted by topic name."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def stdlib_files(max_files: int | None = None) -> list[Path]:
    """The stdlib ``.py`` files that give documents, in a fixed (sorted) order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting dirnames in place fixes os.walk's order; filtering it prunes the walk.
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(("test", "config-", "turtle"))
        )
        for name in sorted(filenames):
            if name.endswith(".py") and name not in _SKIP_FILES and not name.startswith("test"):
                files.append(Path(dirpath) / name)
                if max_files is not None and len(files) >= max_files:
                    return files
    return files


def _docstring_blocks(body: Sequence[ast.stmt], prefix: str) -> Iterator[str]:
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}.{node.name}"
            doc = ast.get_docstring(node)
            if doc:
                yield f"{name}\n\n{doc}"
            yield from _docstring_blocks(node.body, name)


def module_document(path: Path, module: str) -> str | None:
    """One module's docstrings (module, then classes and functions in source order), or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # old escape sequences in docstrings raise SyntaxWarning
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return None
    blocks = []
    doc = ast.get_docstring(tree)
    if doc:
        blocks.append(f"{module}\n\n{doc}")
    blocks.extend(_docstring_blocks(tree.body, module))
    return "\n\n".join(blocks) if blocks else None


def stdlib_documents(max_files: int | None = None) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in stdlib_files(max_files):
        rel = path.relative_to(root).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        doc = module_document(path, ".".join(parts))
        if doc:
            docs.append(doc)
    return docs


def folder_files(folder: str | os.PathLike) -> list[Path]:
    """Text files under ``folder`` (recursive), sorted; a clear error if there are none."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"extra text folder {str(folder)!r} does not exist or is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise ValueError(
            f"extra text folder {str(folder)!r} has no {', '.join('*' + s for s in TEXT_SUFFIXES)} files; "
            "add text files to it or remove it from extra_dirs"
        )
    return files


def folder_documents(folder: str | os.PathLike, split: Literal["file", "paragraph"] = "file") -> list[str]:
    """One document per file, or per block of lines separated by blank lines (``split="paragraph"``)."""
    if split not in ("file", "paragraph"):
        raise ValueError(f"extra_split must be 'file' or 'paragraph', got {split!r}")
    docs: list[str] = []
    for path in folder_files(folder):
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.extend(re.split(r"\n[ \t]*\n", text) if split == "paragraph" else [text])
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"extra text folder {str(folder)!r} has text files but they are all empty")
    return docs


def _folder_fingerprint(folder: str | os.PathLike) -> str:
    """Content hash of a folder's text files: editing a file invalidates the cache."""
    root = Path(folder)
    h = hashlib.sha256()
    for path in folder_files(folder):
        h.update(str(path.relative_to(root)).encode() + b"\0" + _sha256_file(path).encode() + b"\0")
    return h.hexdigest()


def unit_hash(text: str) -> float:
    """A document's position in [0, 1), from its content alone."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def is_validation(text: str, val_fraction: float) -> bool:
    """Content-addressed split: stable under reordering and under adding other documents."""
    return unit_hash(text) < val_fraction


# -- caching ----------------------------------------------------------------------------------------------


def _read_manifest(directory: Path, params: dict) -> dict | None:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("params") == params else None


def cached_build(target: str | os.PathLike, params: dict, build: Callable[[Path], dict]) -> tuple[dict, bool]:
    """Return ``(manifest, built)`` for the folder ``target``, building it with ``build(tmp_dir)`` unless a
    manifest with exactly these ``params`` is already there.

    ``build`` fills a fresh temporary folder and returns stats for the manifest; the folder is renamed
    into place only when complete (the manifest is written last), under ``target + ".lock"``, so a
    second process waits and then reuses the result. The lock needs a filesystem with working locks
    (any local disk; shared filesystems vary), which is why the lock sits next to the cache.
    """
    target = Path(target)
    params = json.loads(json.dumps(params))  # compare as JSON round-trips it (tuples → lists)
    if (manifest := _read_manifest(target, params)) is not None:
        return manifest, False
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).is_file():
        # Never delete what we did not build (e.g. a tokenizer_dir pointing at a folder of other files).
        raise FileExistsError(
            f"{target} is not empty and holds no {MANIFEST}, so it is not a cache built here; "
            "point the cache at a new or empty folder"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (manifest := _read_manifest(target, params)) is not None:
            return manifest, False  # another process built it while we waited
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is meant to be shared
        try:
            manifest = {"params": params, **build(tmp)}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
            if target.exists():  # a stale cache of ours (other params): move it aside, then drop it
                stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, stale / "x")
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return manifest, True


# -- the corpus -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusBuild:
    """Where a built corpus lives and what is in it (``manifest`` holds params and stats)."""

    directory: Path
    manifest: dict
    built: bool

    def shards(self, split: str) -> list[Path]:
        return [self.directory / name for name in self.manifest["shards"][split]]

    @property
    def fingerprint(self) -> str:
        """Hash of the shard contents: what a tokenizer trained on this corpus depends on."""
        return hashlib.sha256(json.dumps(self.manifest["sha256"], sort_keys=True).encode()).hexdigest()


def build_corpus(
    root: str | os.PathLike = QUICKSTART_DIR,
    *,
    extra_dirs: Sequence[str] = (),
    extra_split: Literal["file", "paragraph"] = "file",
    include_topics: bool = True,
    include_stdlib: bool = True,
    max_stdlib_files: int | None = None,
    val_fraction: float = 0.05,
    num_train_shards: int = 8,
    min_chars: int = 64,
) -> CorpusBuild:
    """Build (or reuse) the quickstart corpus under ``root/corpus``."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    if num_train_shards < 1:
        raise ValueError(f"num_train_shards must be >= 1, got {num_train_shards}")
    if not (include_topics or include_stdlib or extra_dirs):
        raise ValueError("the quickstart corpus is empty: enable include_topics/include_stdlib or give extra_dirs")
    params: dict[str, Any] = {
        "format": 1,
        "python": platform.python_version(),
        "include_topics": include_topics,
        "include_stdlib": include_stdlib,
        "max_stdlib_files": max_stdlib_files,
        # Resolved paths and content hashes: a moved or edited folder is a different corpus.
        "extra_dirs": [[str(Path(d).resolve()), _folder_fingerprint(d)] for d in extra_dirs],
        "extra_split": extra_split,
        "val_fraction": val_fraction,
        "num_train_shards": num_train_shards,
        "min_chars": min_chars,
    }

    def build(tmp: Path) -> dict:
        docs: list[str] = []
        if include_topics:
            docs += topic_documents()
        if include_stdlib:
            docs += stdlib_documents(max_stdlib_files)
        for d in extra_dirs:
            docs += folder_documents(d, extra_split)
        seen: set[str] = set()
        unique = []
        for text in (d.strip() for d in docs):
            if len(text) >= min_chars and text not in seen:
                seen.add(text)
                unique.append(text)
        splits = {"train": [], "validation": []}
        for text in unique:
            splits["validation" if is_validation(text, val_fraction) else "train"].append(text)
        if not splits["validation"] and len(unique) >= 2:
            # A tiny corpus can miss the hash range; the document nearest to it keeps the split non-empty.
            nearest = min(splits["train"], key=unit_hash)
            splits["train"].remove(nearest)
            splits["validation"].append(nearest)
        for split, texts in splits.items():
            if not texts:
                raise ValueError(
                    f"the quickstart corpus has no {split} documents ({len(unique)} in all); add text "
                    "(include_stdlib=True, extra_dirs) or change val_fraction"
                )
        n = min(num_train_shards, len(splits["train"]))
        names: dict[str, list[str]] = {"train": [], "validation": [shard_name("validation", 0, 1)]}
        for i in range(n):  # round robin: shards of similar size, every one non-empty
            names["train"].append(shard_name("train", i, n))
            write_shard(tmp / names["train"][-1], splits["train"][i::n])
        write_shard(tmp / names["validation"][0], splits["validation"])
        return {
            "shards": names,
            "sha256": {f: _sha256_file(tmp / f) for split in names.values() for f in split},
            "stats": {
                "documents_found": len(docs),
                "duplicates_or_short_dropped": len(docs) - len(unique),
                **{f"{s}_documents": len(t) for s, t in splits.items()},
                **{f"{s}_chars": sum(map(len, t)) for s, t in splits.items()},
            },
        }

    manifest, built = cached_build(Path(root) / "corpus", params, build)
    return CorpusBuild(Path(root) / "corpus", manifest, built)


# -- the tokenizer ----------------------------------------------------------------------------------------


def build_tokenizer(
    directory: str | os.PathLike,
    texts: Callable[[], Iterable[str]],
    vocab_size: int,
    source_fingerprint: str,
    *,
    min_frequency: int = 2,
    max_pauses: int = MAX_PAUSES,
) -> tuple[CYBTokenizer, dict]:
    """Train (or reuse) the BPE in ``directory`` on ``texts()``; returns the tokenizer and its manifest.

    ``texts`` is called twice (train, then count tokens for the report), so it must restart each time.
    A folder holding ``tokenizer.json`` but no manifest is a tokenizer someone supplied: it is loaded as
    is, never overwritten.
    """
    d = Path(directory)
    if (d / TOKENIZER_FILE).is_file() and not (d / MANIFEST).is_file():
        log.info("using the tokenizer supplied in %s (no manifest: not rebuilt)", d)
        return CYBTokenizer.load(d), {"params": None, "supplied": True}
    params = {
        "format": 1,
        "vocab_size": vocab_size,
        "min_frequency": min_frequency,
        "max_pauses": max_pauses,
        "source": source_fingerprint,
    }

    def build(tmp: Path) -> dict:
        tok = CYBTokenizer.train(texts(), vocab_size, min_frequency=min_frequency, max_pauses=max_pauses)
        tok.save(tmp)
        tokens = docs = 0
        batch: list[str] = []
        for text in texts():
            batch.append(text)
            if len(batch) == 256:
                tokens += sum(len(x) for x in tok.encode_batch_np(batch))
                docs, batch = docs + len(batch), []
        tokens += sum(len(x) for x in tok.encode_batch_np(batch))
        return {"stats": {"total_ids": tok.vocab.size, "train_documents": docs + len(batch), "train_tokens": tokens}}

    manifest, built = cached_build(d, params, build)
    if built:
        log.info("trained tokenizer in %s: %s", d, manifest["stats"])
    return CYBTokenizer.load(d), manifest
