"""The offline corpus: deterministic, disjoint splits, cached (and race-free), clear errors."""

from __future__ import annotations

import gzip
import json
import sys
import threading
from pathlib import Path

import pytest

from cyb_lightning.data import build_corpus, build_quickstart
from cyb_lightning.data.quickstart import unit_hash, stdlib_files

SMALL = dict(include_topics=False, max_stdlib_files=6, num_train_shards=3)


def _texts(paths):
    out = []
    for p in paths:
        with gzip.open(p, "rt", encoding="utf-8") as f:
            out += [json.loads(line)["text"] for line in f]
    return out


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def extra(tmp_path):
    d = tmp_path / "extra"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("First paragraph of a.\nStill first.\n\n  \nSecond paragraph of a.\n\n" * 3)
    (d / "sub" / "b.md").write_text("# B\n\nSome markdown text that is long enough to be kept as a document.\n")
    (d / "sub" / "dup.rst").write_text("# B\n\nSome markdown text that is long enough to be kept as a document.\n")
    (d / "ignored.py").write_text("print('not text')\n")
    return d


def test_deterministic_and_disjoint(tmp_path, extra):
    a = build_quickstart(tmp_path / "a", 300, extra_dirs=[str(extra)], **SMALL)
    b = build_quickstart(tmp_path / "b", 300, extra_dirs=[str(extra)], **SMALL)
    assert _files(a.corpus.directory) == _files(b.corpus.directory)  # byte-identical shards + manifest
    assert _files(a.tokenizer_dir) == _files(b.tokenizer_dir)
    assert [p.name for p in a.corpus.shards("train")] == [f"c4-train.0000{i}-of-00003.json.gz" for i in range(3)]
    assert [p.name for p in a.corpus.shards("validation")] == ["c4-validation.00000-of-00001.json.gz"]

    train, val = _texts(a.corpus.shards("train")), _texts(a.corpus.shards("validation"))
    stats = a.corpus.manifest["stats"]
    assert (len(train), len(val)) == (stats["train_documents"], stats["validation_documents"])
    assert not set(train) & set(val)
    assert len(set(train)) == len(train)  # de-duplicated: dup.rst is b.md again
    assert sum("Some markdown text" in t for t in train + val) == 1
    # Content-addressed: validation is the hash range [0, 0.05), or its nearest document when that is empty.
    cut = max(0.05, *map(unit_hash, val))
    assert all(unit_hash(t) <= cut for t in val) and all(unit_hash(t) > cut for t in train)
    assert stats["train_chars"] == sum(map(len, train))
    assert "tokens" in a.summary() and f"{len(train)} docs" in a.summary()


def test_cache_reused_and_invalidated(tmp_path, extra):
    kw = dict(extra_dirs=[str(extra)], **SMALL)
    first = build_corpus(tmp_path, **kw)
    mtimes = {p: p.stat().st_mtime_ns for p in first.directory.iterdir()}
    again = build_corpus(tmp_path, **kw)
    assert first.built and not again.built
    assert {p: p.stat().st_mtime_ns for p in again.directory.iterdir()} == mtimes
    (extra / "a.txt").write_text("Edited text, long enough to count as a document of its own right here.\n")
    edited = build_corpus(tmp_path, **kw)  # content hash of the folder is part of the cache key
    assert edited.built
    assert any("Edited text" in t for t in _texts(edited.shards("train") + edited.shards("validation")))
    assert not build_corpus(tmp_path, **{**kw, "extra_split": "file"}).built
    assert build_corpus(tmp_path, **{**kw, "val_fraction": 0.5}).built


def test_paragraph_split(tmp_path, extra):
    c = build_corpus(tmp_path, extra_dirs=[str(extra)], extra_split="paragraph", include_stdlib=False,
                     include_topics=False, min_chars=1)  # fmt: skip
    texts = _texts(c.shards("train") + c.shards("validation"))
    assert sorted(texts) == sorted(["First paragraph of a.\nStill first.", "Second paragraph of a.", "# B",
                                    "Some markdown text that is long enough to be kept as a document."])  # fmt: skip


def test_concurrent_builds_build_once(tmp_path, extra):
    results = []
    kw = dict(extra_dirs=[str(extra)], **SMALL)
    threads = [threading.Thread(target=lambda: results.append(build_corpus(tmp_path, **kw))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.built for r in results) == [False, True]
    assert results[0].manifest == results[1].manifest
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []  # no leftovers


@pytest.mark.parametrize("content", [None, {"x.py": "print()"}, {"empty.txt": "  \n\n"}])
def test_bad_extra_folder_is_a_clear_error(tmp_path, content):
    folder = tmp_path / "texts"
    folder.mkdir()
    for name, text in (content or {}).items():
        (folder / name).write_text(text)
    with pytest.raises(ValueError, match=str(folder)):
        build_corpus(tmp_path / "out", extra_dirs=[str(folder)], **SMALL)


def test_missing_extra_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        build_corpus(tmp_path, extra_dirs=[str(tmp_path / "nope")], **SMALL)


def test_stdlib_walk_is_safe():
    files = stdlib_files()
    names = {f.name for f in files}
    parts = {p for f in files for p in f.parts}
    assert {"json", "email"} <= parts and "__init__.py" in names
    assert not {"antigravity.py", "this.py", "turtle.py"} & names
    assert not {"idlelib", "tkinter", "test", "site-packages", "turtledemo"} & parts
    assert files == stdlib_files()  # a fixed order
    # Docstrings are parsed, never imported: building must not have run module code.
    assert "antigravity" not in sys.modules and "this" not in sys.modules


def test_tiny_fixture_report(tiny_quickstart):
    s = tiny_quickstart.corpus.manifest["stats"]
    assert s["train_documents"] > 50 and s["validation_documents"] >= 1
    assert tiny_quickstart.tokenizer_manifest["stats"]["train_tokens"] > 10_000
    assert tiny_quickstart.tokenizer.vocab.size == 512 + tiny_quickstart.tokenizer.num_reserved


def test_cache_never_overwrites_foreign_folders(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a cache built here"):
        build_corpus(tmp_path, **SMALL)
    assert (tmp_path / "corpus" / "precious.txt").read_text() == "keep me"
