"""Where documents come from: a tiny interface and three implementations.

A :class:`TextSource` is an ordered list of *shards* per split, each an ordered sequence of documents.
Everything downstream depends only on that order, which is what makes the stream deterministic and
sliceable: document i of (split, epoch) is the same on every rank, worker and restart. Training shuffles
at the shard level by (seed, epoch) (C4 shards are ~350k documents, too large to shuffle in memory; its
documents are already in random order within a shard).

- :class:`QuickstartCorpus`: the offline corpus of ``quickstart.py`` (the default);
- :class:`LocalShards`: C4-format ``.json`` / ``.json.gz`` shards on disk (e.g. a clone of allenai/c4);
- :class:`HubC4`: C4 streamed from the Hugging Face Hub with ``datasets``; fails fast offline.

Subclasses take plain init arguments only, so LightningCLI can pick one with ``class_path``.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import hashlib
import json
import logging
import os
import time
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import quickstart
from .tokenizer import TOKENIZER_FILE, CYBTokenizer

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
_MAX_WARNINGS = 5


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Exceptions worth retrying while streaming: I/O and network errors (requests' are OSErrors)."""
    errors: list[type[BaseException]] = [OSError]
    try:
        import aiohttp  # datasets' streaming client (through fsspec)

        errors.append(aiohttp.ClientError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


# Errors that no retry fixes: the file is not there or not readable.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def document_problem(text: str) -> tuple[str, str] | None:
    """(what is wrong, its counter) for a text that cannot be a training document; None when it can."""
    if not text or text.isspace():
        return "empty or whitespace-only document", "empty_documents"
    if not valid_text(text):
        return "text UTF-8 cannot encode (a lone surrogate escape such as \\ud800)", "invalid_text"
    return None


def valid_text(text: str) -> bool:
    """True when ``text`` can be tokenized: no lone surrogates (JSON ``"\\ud800"`` escapes decode to
    them and UTF-8 cannot encode them)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class TextSource(ABC):
    """Ordered shards of documents per split ("train", "validation").

    :meth:`read_shard` is what the stream reads through: it drops empty or whitespace-only documents
    and text that cannot be encoded (both counted in :attr:`stats` and logged), and retries transient
    read errors with exponential backoff, resuming the shard where it broke off. Counts are per process:
    DataLoader workers count their own.
    """

    trains_tokenizer = True  # False: documents a BPE must not be trained on (fine-tuning pairs)
    splits: tuple[str, ...] = SPLITS  # the synthetic tasks add a test split

    @property
    def stats(self) -> dict[str, int]:
        """Skipped-input counters: ``empty_documents``, ``invalid_text``, ``retries`` (+ the source's own)."""
        if "_stats" not in self.__dict__:
            self._stats = {"empty_documents": 0, "invalid_text": 0, "retries": 0}
        return self._stats

    @property
    def shard_problems(self) -> dict[str, str]:
        """The last problem warned about per shard (kept after warnings stop being logged): the stream's
        error for a lane without data quotes them."""
        if "_shard_problems" not in self.__dict__:
            self._shard_problems = {}
        return self._shard_problems

    def _warn(self, message: str, counter: str, shard: str | None = None) -> None:
        self.stats[counter] = self.stats.get(counter, 0) + 1
        if shard is not None:
            self.shard_problems[shard] = message
        if self.stats[counter] <= _MAX_WARNINGS:
            log.warning(message + ("" if self.stats[counter] < _MAX_WARNINGS else " (further ones not shown)"))

    def read_shard(
        self, split: str, shard: str, start: int = 0, *, retries: int = 5, backoff_s: float = 1.0
    ) -> Iterator[tuple[int, str]]:
        """``(index in shard, text)`` of the shard's usable documents from index ``start`` on.

        Empty/whitespace-only documents and text with lone surrogates are skipped and counted (they get
        no index). A transient error (I/O, network) reopens the shard after ``backoff_s``·2^k seconds
        and skips what was already returned; after ``retries`` failures in a row it raises.
        """
        done, failures = start, 0
        while True:
            index = 0
            try:
                for record, item in enumerate(self.iter_shard(split, shard), 1):
                    # A source may say where each text is ("line 12"); otherwise its record number.
                    where, text = item if isinstance(item, tuple) else (f"record {record}", item)
                    problem = document_problem(text)
                    if problem is not None:
                        if index >= done:
                            self._warn(f"{shard}, {where}: {problem[0]}; skipped", problem[1], shard)
                        continue
                    if index >= done:
                        yield index, text
                        done, failures = index + 1, 0
                    index += 1
                return
            except _PERMANENT:
                raise
            except _transient_errors() as e:
                failures += 1
                if failures > retries:
                    raise RuntimeError(
                        f"reading {shard} failed {failures} times in a row (last error: {e!r}); giving up"
                    ) from e
                delay = backoff_s * 2 ** (failures - 1)
                self._warn(f"{shard}: read error {e!r}; retry {failures}/{retries} in {delay:.1f}s", "retries", shard)
                time.sleep(delay)

    def prepare(self) -> None:
        """Build or check whatever the source needs (a cache, the network). Idempotent, cheap when done."""

    @abstractmethod
    def shards(self, split: str) -> list[str]:
        """Shard ids of ``split`` in their canonical order (opaque strings, e.g. file paths)."""

    @abstractmethod
    def iter_shard(self, split: str, shard: str) -> Iterator[str]:
        """The documents of one shard, in order."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A string that changes when the training data changes (keys the tokenizer cache)."""

    def default_tokenizer_dir(self, vocab_size: int) -> str | None:
        """Where to keep a tokenizer trained on this source when none is configured (None: must be set)."""
        return None

    def describe(self) -> str:
        """One line for the log."""
        return type(self).__name__

    def shard_order(self, split: str, *, epoch: int = 0, shuffle_seed: int | None = None) -> list[str]:
        """Shards in reading order: canonical, or permuted by (shuffle_seed, epoch)."""
        if split not in self.splits:
            raise ValueError(f"split must be one of {self.splits}, got {split!r}")
        order = list(self.shards(split))
        if shuffle_seed is not None:
            perm = np.random.default_rng([shuffle_seed, epoch]).permutation(len(order))
            order = [order[i] for i in perm]
        return order

    def iter_documents(
        self, split: str, *, epoch: int = 0, shuffle_seed: int | None = None, start: int = 0
    ) -> Iterator[tuple[int, str]]:
        """``(doc_index, text)`` in reading order, from document ``start`` on (earlier ones are read
        but not returned: a resume skips tokenization, the expensive part)."""
        index = 0
        for shard in self.shard_order(split, epoch=epoch, shuffle_seed=shuffle_seed):
            for _, text in self.read_shard(split, shard):
                if index >= start:
                    yield index, text
                index += 1

    def num_documents(self, split: str) -> int | None:
        """How many documents ``split`` has, when known without reading it all (None otherwise)."""
        return None

    def tokenizer_texts(self, max_documents: int | None) -> Callable[[], Iterator[str]]:
        """A restartable iterator factory over the first ``max_documents`` training documents."""

        def texts() -> Iterator[str]:
            for i, text in self.iter_documents("train"):
                if max_documents is not None and i >= max_documents:
                    return
                yield text

        return texts


class LocalShards(TextSource):
    """C4-format shards on disk: one JSON object per line, only its ``"text"`` field is read.

    ``path`` is a folder (files matched by the split's pattern inside it) or a glob (files matched by the
    glob, then by the split's pattern on the file name). Files end in ``.json``/``.jsonl`` or, gzipped,
    ``.json.gz``/``.jsonl.gz``. Malformed lines (bad JSON or UTF-8, no string ``"text"``) are skipped and
    counted in ``stats["malformed_lines"]``; a truncated gzip ends its shard (``stats["broken_shards"]``).
    Counts are per process: DataLoader workers count their own. ``tokenizer_root``: where a tokenizer
    trained on these shards is kept by default (``<tokenizer_root>/tokenizer-<bpe_vocab_size>``); None:
    the DataModule's ``tokenizer_dir`` must be set.
    """

    _BROKEN = (EOFError, gzip.BadGzipFile, zlib.error)

    def __init__(
        self,
        path: str,
        train_pattern: str = "*train*.json*",
        validation_pattern: str = "*validation*.json*",
        tokenizer_root: str | None = None,
    ):
        self.path = path
        self.patterns = {"train": train_pattern, "validation": validation_pattern}
        self.tokenizer_root = tokenizer_root
        self.stats.update(malformed_lines=0, broken_shards=0)

    def shards(self, split: str) -> list[str]:
        _check_split(split)
        pattern = self.patterns[split]
        if os.path.isdir(self.path):
            files = glob.glob(os.path.join(glob.escape(self.path), pattern))
        else:
            files = [f for f in glob.glob(self.path) if fnmatch.fnmatch(os.path.basename(f), pattern)]
        files = sorted(f for f in files if os.path.isfile(f))
        if not files and not glob.glob(self.path):
            raise FileNotFoundError(
                f"LocalShards: {self.path!r} does not exist. Create the local C4 mirror with "
                "`python -m cyb_lightning download-c4 --out DIR --shards N` where the Hub is reachable, or fix path"
            )
        if not files:
            raise FileNotFoundError(
                f"LocalShards found no {split} shards: path={self.path!r}, {split}_pattern={pattern!r}; "
                "point path at a folder of C4 files (e.g. c4/en with c4-train.*.json.gz) or fix the pattern"
            )
        return files

    def prepare(self) -> None:
        # Fail on a missing or empty folder before anything else is asked of the source (tokenizer, stream).
        self.shards("train")

    def iter_shard(self, split: str, shard: str) -> Iterator[tuple[str, str]]:
        """``("line <n>", text)`` of each record with a string ``"text"`` (``read_shard`` names the line)."""
        opener = gzip.open if shard.endswith(".gz") else open
        lineno = 0
        broken = self._BROKEN  # bound here: a generator closed at interpreter exit sees no module globals
        with opener(shard, "rb") as f:
            try:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    text, problem = self._text(line)
                    if text is None:
                        message = f"{shard}, line {lineno}: malformed line skipped ({problem})"
                        self._warn(message, "malformed_lines", shard)
                    else:
                        yield f"line {lineno}", text
            except broken as e:
                message = f"{shard}: unreadable after line {lineno}, rest of shard skipped ({e})"
                self._warn(message, "broken_shards", shard)

    def _text(self, line: bytes) -> tuple[str | None, str]:
        """(the record's document, '') or (None, what is wrong with the line)."""
        try:
            record = json.loads(line)
        except UnicodeDecodeError:
            return None, "not UTF-8"
        except ValueError as e:
            return None, f"not JSON: {e}"
        return self._document(record)

    @staticmethod
    def _document(record: Any) -> tuple[str | None, str]:
        """(the text of a C4 record, '') or (None, what is wrong with it)."""
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            got = f"keys {sorted(record)[:5]}" if isinstance(record, dict) else f"a JSON {type(record).__name__}"
            return None, f"no string 'text' field ({got})"
        return record["text"], ""

    def fingerprint(self) -> str:
        # Names and sizes: cheap, and C4 shards are never edited in place.
        entries = [(os.path.basename(f), os.path.getsize(f)) for f in self.shards("train")]
        return "local:" + hashlib.sha256(json.dumps(entries).encode()).hexdigest()

    def default_tokenizer_dir(self, vocab_size: int) -> str | None:
        return None if self.tokenizer_root is None else str(Path(self.tokenizer_root) / f"tokenizer-{vocab_size}")

    def describe(self) -> str:
        return f"LocalShards {self.path} ({len(self.shards('train'))} train shards)"


class QuickstartCorpus(LocalShards):
    """The offline corpus (``quickstart.py``), built on first use and cached under ``root/corpus``.

    Args (all forwarded to :func:`~cyb_lightning.data.quickstart.build_corpus`; changing any rebuilds):
        root: cache folder (the tokenizer defaults to ``root/tokenizer-<vocab_size>``).
        extra_dirs: folders of ``*.txt``/``*.md``/``*.rst`` files to add.
        extra_split: one document per ``file``, or per blank-line separated ``paragraph``.
        include_topics / include_stdlib: the pydoc help topics / the stdlib docstrings.
        max_stdlib_files: cap on stdlib modules read (deterministic: the first ones in sorted order).
        val_fraction: hash share of documents in validation.
        num_train_shards: training shard files (more shards, finer shuffling between epochs).
        min_chars: shorter documents are dropped.
    """

    def __init__(
        self,
        root: str = quickstart.QUICKSTART_DIR,
        extra_dirs: list[str] | None = None,
        extra_split: Literal["file", "paragraph"] = "file",
        include_topics: bool = True,
        include_stdlib: bool = True,
        max_stdlib_files: int | None = None,
        val_fraction: float = 0.05,
        num_train_shards: int = 8,
        min_chars: int = 64,
    ):
        super().__init__(str(Path(root) / "corpus"))
        self.root = root
        self.build_kwargs: dict[str, Any] = dict(
            extra_dirs=list(extra_dirs or ()),
            extra_split=extra_split,
            include_topics=include_topics,
            include_stdlib=include_stdlib,
            max_stdlib_files=max_stdlib_files,
            val_fraction=val_fraction,
            num_train_shards=num_train_shards,
            min_chars=min_chars,
        )
        self.build: quickstart.CorpusBuild | None = None

    def prepare(self) -> None:
        if self.build is None:
            self.build = quickstart.build_corpus(self.root, **self.build_kwargs)

    def shards(self, split: str) -> list[str]:
        _check_split(split)
        self.prepare()
        return [str(p) for p in self.build.shards(split)]

    def fingerprint(self) -> str:
        self.prepare()
        return "quickstart:" + self.build.fingerprint

    def default_tokenizer_dir(self, vocab_size: int) -> str:
        return str(Path(self.root) / f"tokenizer-{vocab_size}")

    def describe(self) -> str:
        self.prepare()
        s = self.build.manifest["stats"]
        return (
            f"QuickstartCorpus {self.build.directory} ({'built now' if self.build.built else 'cached'}; "
            f"train {s['train_documents']} docs / {s['train_chars']:,} chars, "
            f"validation {s['validation_documents']} docs / {s['validation_chars']:,} chars)"
        )

    def num_documents(self, split: str) -> int:
        _check_split(split)
        self.prepare()
        return self.build.manifest["stats"][f"{split}_documents"]


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def source_tokenizer(
    source: TextSource,
    vocab_size: int,
    tokenizer_dir: str | None = None,
    max_documents: int | None = None,
) -> tuple[CYBTokenizer, str, dict]:
    """The tokenizer for ``source``: loaded from ``tokenizer_dir`` (default: the source's choice), or
    trained there on the first ``max_documents`` training documents (None: all) and cached.

    Returns (tokenizer, folder, manifest). The cache key is the source's fingerprint plus the document
    limit, normalised so that "first N" of a source with at most N documents equals "all".
    """
    source.prepare()
    if not source.trains_tokenizer:
        # Fine-tuning data (prompt/completion pairs): the model's own tokenizer, never one trained on it.
        if tokenizer_dir is None or not (Path(tokenizer_dir) / TOKENIZER_FILE).is_file():
            raise ValueError(
                f"{type(source).__name__} trains no tokenizer: set data.tokenizer_dir to the folder of the "
                f"tokenizer the model was pretrained with (that run's data.tokenizer_dir; got {tokenizer_dir!r}), "
                "or data.tokenizer to a pretrained model's tokenizer"
            )
        return CYBTokenizer.load(tokenizer_dir), str(tokenizer_dir), {}
    directory = tokenizer_dir or source.default_tokenizer_dir(vocab_size)
    if directory is None:
        raise ValueError(
            f"tokenizer_dir is required with {type(source).__name__}: set it to a folder holding a tokenizer, "
            "or to an empty one where it is built from the training split (e.g. data/tokenizer-c4-8192)"
        )
    total = source.num_documents("train")
    if max_documents is not None and total is not None and max_documents >= total:
        max_documents = None
    fingerprint = f"{source.fingerprint()}|first={max_documents}"
    tokenizer, manifest = quickstart.build_tokenizer(
        directory, source.tokenizer_texts(max_documents), vocab_size, fingerprint
    )
    return tokenizer, str(directory), manifest


def hub_problem(timeout_s: float, path: str = "api/datasets/allenai/c4") -> str | None:
    """Why the Hugging Face Hub cannot be used now (offline mode, no answer within ``timeout_s``, an answer
    that is not the dataset), or None.

    One HTTPS request for the dataset's description (``path``): usable only when it comes back as the Hub's
    JSON for that dataset. A proxy's or mirror's 404, an error page or a captive portal's HTML is a
    problem like DNS, TLS and timeout errors. (A bare TCP connect is not enough: sandboxes and proxies
    accept those.)
    """
    import urllib.error
    import urllib.request

    flags = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if _env_true(v)]
    from huggingface_hub import constants

    if flags or constants.HF_HUB_OFFLINE:
        return f"{' / '.join(flags) or 'HF_HUB_OFFLINE'} is set (offline mode)"
    url = f"{constants.ENDPOINT.rstrip('/')}/{path}"
    try:
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            body = reply.read(1 << 20)
    except urllib.error.HTTPError as e:
        return f"{url} answered HTTP {e.code} {e.reason}, not the dataset (a proxy or mirror without it?)"
    except (OSError, ValueError) as e:  # URLError, socket.timeout, ssl errors are OSErrors
        return f"cannot reach {constants.ENDPOINT} within {timeout_s:g}s ({getattr(e, 'reason', e)})"
    try:
        info = json.loads(body)
    except ValueError:
        info = None
    dataset = path.removeprefix("api/datasets/")
    if not isinstance(info, dict) or info.get("id") != dataset:
        return f"{url} answered, but not with the description of {dataset} (a proxy or captive portal page?)"
    return None


class HubC4(TextSource):
    """C4 streamed from the Hugging Face Hub (``datasets.load_dataset(..., streaming=True)``).

    Shards are the Hub dataset's own file shards (1024 for C4 en train, 8 for validation), each read
    on its own (``IterableDataset.shard(..., contiguous=True)``), so the document order is fixed and the
    stream hands whole shards to ranks and lanes (the semantics of ``split_dataset_by_node``: whole
    shards when their count is a multiple of the world size). ``tokenizer_root``: the default home of a
    tokenizer trained on it (``<tokenizer_root>/tokenizer-<bpe_vocab_size>``). Offline
    (``HF_HUB_OFFLINE=1``) or with the Hub unreachable, :meth:`prepare` fails within ``probe_timeout_s``
    instead of letting ``datasets`` retry for minutes.
    """

    def __init__(
        self,
        name: str = "allenai/c4",
        config: str | None = "en",
        revision: str | None = None,
        probe_timeout_s: float = 5.0,
        tokenizer_root: str = "data/tokenizers/c4-hub",
    ):
        self.name, self.config, self.revision = name, config, revision
        self.tokenizer_root = tokenizer_root
        self.probe_timeout_s = probe_timeout_s
        self._datasets: dict[str, Any] = {}
        self._checked = False

    def __getstate__(self) -> dict:
        # Workers reopen the streams themselves; open ones hold file handles and HTTP sessions.
        return {**self.__dict__, "_datasets": {}}

    def _hint(self) -> str:
        return (
            f"HubC4({self.name!r}, {self.config!r}) needs the Hugging Face Hub. Use the local C4 mirror "
            "instead: `--data.source conf/data/c4_local.yaml` (LocalShards over json.gz shards, filled where "
            "the Hub is reachable by `python -m cyb_lightning download-c4 --out data/c4 --shards N`), or the "
            "offline QuickstartCorpus"
        )

    def prepare(self) -> None:
        if self._checked:
            return
        problem = hub_problem(self.probe_timeout_s, f"api/datasets/{self.name}")
        if problem:
            raise RuntimeError(f"{problem}. {self._hint()}")
        self._checked = True

    def _dataset(self, split: str):
        _check_split(split)
        if split not in self._datasets:
            self.prepare()
            import datasets

            self._datasets[split] = datasets.load_dataset(
                self.name, self.config, split=split, streaming=True, revision=self.revision
            )
        return self._datasets[split]

    def shards(self, split: str) -> list[str]:
        return [str(i) for i in range(self._dataset(split).num_shards)]

    def iter_shard(self, split: str, shard: str) -> Iterator[str]:
        ds = self._dataset(split)
        for k, record in enumerate(ds.shard(num_shards=ds.num_shards, index=int(shard), contiguous=True), 1):
            text = record.get("text") if isinstance(record, dict) else None
            if isinstance(text, str):
                yield f"record {k}", text
            else:
                message = f"{self.name} shard {shard}, record {k}: no string 'text' field; skipped"
                self._warn(message, "malformed_lines", shard)

    def default_tokenizer_dir(self, vocab_size: int) -> str:
        return str(Path(self.tokenizer_root) / f"tokenizer-{vocab_size}")

    def fingerprint(self) -> str:
        return f"hub:{self.name}:{self.config}:{self.revision}"

    def describe(self) -> str:
        return f"HubC4 {self.name} ({self.config}, revision {self.revision or 'main'}, streaming)"


# -- prompt/completion pairs (TBYS pause fine-tuning, layout ``tbys_finetune``) ---------------------------


def pair_document(prompt: str, completion: str) -> str:
    """One prompt/completion pair as the one string a document is (JSON, ASCII: it survives every reader)."""
    return json.dumps([prompt, completion])


def document_pair(document: str) -> tuple[str, str]:
    """The inverse of :func:`pair_document`."""
    prompt, completion = json.loads(document)
    return prompt, completion


class PromptCompletionSource(TextSource):
    """Documents that are prompt/completion pairs (``prompt``/``completion`` string fields of each record).

    A pair travels through the stream as one document (:func:`pair_document`), so reading, sharding by rank
    and worker, and exact resume are those of every other source; the ``tbys_finetune`` layout reads it
    back. A record whose fields are not strings, whose completion is empty or whose text UTF-8 cannot
    encode is skipped and counted in ``stats["malformed_lines"]``. No tokenizer is trained on pairs: the
    model's own (``data.tokenizer_dir`` of the pretraining run, or ``data.tokenizer``) is loaded as is.
    """

    trains_tokenizer = False

    def __init__(self, prompt_field: str = "prompt", completion_field: str = "completion"):
        self.prompt_field, self.completion_field = prompt_field, completion_field
        self.stats.setdefault("malformed_lines", 0)

    def _pair(self, record: Any) -> str | None:
        """The pair document of one record, or None when it is malformed."""
        if not isinstance(record, dict):
            return None
        prompt, completion = record.get(self.prompt_field), record.get(self.completion_field)
        if not (isinstance(prompt, str) and isinstance(completion, str)) or not completion.strip():
            return None
        if not (valid_text(prompt) and valid_text(completion)):
            return None
        return pair_document(prompt, completion)

    def default_tokenizer_dir(self, vocab_size: int) -> str | None:
        return None


class LocalPromptCompletion(PromptCompletionSource, LocalShards):
    """Prompt/completion JSON lines on disk (``.jsonl``/``.json``, or gzipped ``.jsonl.gz``/``.json.gz``).

    ``path`` is a folder (files matched by the split's pattern inside it) or a glob, as in
    :class:`LocalShards`; every file is a shard, so several files spread over ranks and workers.
    """

    def __init__(
        self,
        path: str,
        train_pattern: str = "*train*.json*",
        validation_pattern: str = "*validation*.json*",
        prompt_field: str = "prompt",
        completion_field: str = "completion",
    ):
        LocalShards.__init__(self, path, train_pattern, validation_pattern)
        PromptCompletionSource.__init__(self, prompt_field, completion_field)

    def shards(self, split: str) -> list[str]:
        try:
            return LocalShards.shards(self, split)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"LocalPromptCompletion found no {split} files: path={self.path!r}, "
                f"{split}_pattern={self.patterns[split]!r}; point path at a folder (or glob) of JSON lines with "
                f"{self.prompt_field!r} and {self.completion_field!r} fields, or fix the pattern"
            ) from None

    def _document(self, record: Any) -> tuple[str | None, str]:
        """(the pair's document, '') or (None, what is wrong with the record)."""
        pair = self._pair(record)
        if pair is None:
            return None, (
                f"no string {self.prompt_field!r} and non-empty string {self.completion_field!r} "
                "(or text UTF-8 cannot encode)"
            )
        return pair, ""

    def fingerprint(self) -> str:
        return "pairs-" + LocalShards.fingerprint(self)

    def describe(self) -> str:
        return f"LocalPromptCompletion {self.path} ({len(self.shards('train'))} train files)"


class HubPromptCompletion(PromptCompletionSource, HubC4):
    """A prompt/completion dataset streamed from the Hugging Face Hub (e.g. ``trl-lib/tldr``).

    Shards are the dataset's file shards, as in :class:`HubC4`. ``train_split``/``validation_split`` name
    the dataset's splits that serve as ours (many have ``test`` instead of ``validation``); ``data_files``
    is passed to ``datasets.load_dataset`` (to choose files of the repository).
    """

    def __init__(
        self,
        name: str,
        config: str | None = None,
        revision: str | None = None,
        train_split: str = "train",
        validation_split: str = "validation",
        data_files: dict[str, str | list[str]] | None = None,
        prompt_field: str = "prompt",
        completion_field: str = "completion",
        probe_timeout_s: float = 5.0,
    ):
        HubC4.__init__(self, name, config, revision, probe_timeout_s, tokenizer_root="")
        PromptCompletionSource.__init__(self, prompt_field, completion_field)
        self.splits = {"train": train_split, "validation": validation_split}
        self.data_files = data_files

    def _hint(self) -> str:
        return (
            f"HubPromptCompletion({self.name!r}) needs the Hugging Face Hub. Offline, write the pairs as JSON "
            "lines and use cyb_lightning.data.sources.LocalPromptCompletion"
        )

    def _dataset(self, split: str):
        _check_split(split)
        if split not in self._datasets:
            self.prepare()
            import datasets

            self._datasets[split] = datasets.load_dataset(
                self.name,
                self.config,
                split=self.splits[split],
                streaming=True,
                revision=self.revision,
                data_files=self.data_files,
            )
        return self._datasets[split]

    def iter_shard(self, split: str, shard: str) -> Iterator[str]:
        ds = self._dataset(split)
        for record in ds.shard(num_shards=ds.num_shards, index=int(shard), contiguous=True):
            document = self._pair(record)
            if document is None:
                self._warn(
                    f"{self.name} shard {shard}: record without string prompt/completion skipped", "malformed_lines"
                )
            else:
                yield document

    def fingerprint(self) -> str:
        return f"hub-pairs:{self.name}:{self.config}:{self.revision}:{self.data_files}"

    def describe(self) -> str:
        return f"HubPromptCompletion {self.name} ({self.config}, revision {self.revision or 'main'}, streaming)"


@dataclass(frozen=True)
class QuickstartBuild:
    corpus: quickstart.CorpusBuild
    tokenizer: CYBTokenizer
    tokenizer_dir: Path
    tokenizer_manifest: dict

    def summary(self) -> str:
        s = self.corpus.manifest["stats"]
        t = self.tokenizer_manifest.get("stats", {})
        return (
            f"quickstart corpus {self.corpus.directory} ({'built' if self.corpus.built else 'cached'}): "
            f"train {s['train_documents']} docs / {s['train_chars']:,} chars"
            + (f" / {t['train_tokens']:,} tokens" if "train_tokens" in t else "")
            + f", validation {s['validation_documents']} docs / {s['validation_chars']:,} chars; "
            f"tokenizer {self.tokenizer_dir}: {self.tokenizer.vocab.size} ids "
            f"({self.tokenizer.num_reserved} reserved)"
        )


def build_quickstart(
    root: str | os.PathLike = quickstart.QUICKSTART_DIR,
    vocab_size: int = 8192,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    **corpus_kwargs: Any,
) -> QuickstartBuild:
    """Corpus under ``root/corpus``, tokenizer (trained on the train split) under ``root/tokenizer-V``.

    Goes through :class:`~cyb_lightning.data.sources.QuickstartCorpus`, exactly like the DataModule, so
    both find the same caches. ``corpus_kwargs`` are :func:`~cyb_lightning.data.quickstart.build_corpus`'s.
    """
    source = QuickstartCorpus(str(root), **corpus_kwargs)
    tokenizer, tok_dir, tok_manifest = source_tokenizer(
        source, vocab_size, None if tokenizer_dir is None else str(tokenizer_dir)
    )
    result = QuickstartBuild(source.build, tokenizer, Path(tok_dir), tok_manifest)
    log.info(result.summary())
    return result
