"""The vocabulary: a byte-level BPE whose ids are shifted past a block of reserved ids.

Reserved ids (spec ``docs/method.md`` §2): ``<pad>``, ``<eot>`` (end of text), ``<dk>`` (don't know, an
*output* id) and ``<pause1>`` … ``<pauseK_max>`` (input ids). They must never come out of raw text, so
that a document quoting "<pause1>" cannot inject a pause. This holds *by construction*: the BPE is trained
with no special tokens at all (so it has nothing that could match "<pause1>" as one token), and every text
id is offset by R = number of reserved ids, so ids [0, R) are unreachable from ``encode``.

The byte-level pre-tokenizer and decoder make ``decode(encode(text)) == text`` for every Unicode string
(control bytes and emoji included): every byte has an id, and nothing is normalised.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

MAX_PAUSES = 8
"""How many distinct pause ids are reserved; a run uses the first K ≤ MAX_PAUSES of them."""

TOKENIZER_FILE = "tokenizer.json"
RESERVED_FILE = "reserved.json"
_FORMAT = 1


def reserved_tokens(max_pauses: int = MAX_PAUSES) -> tuple[str, ...]:
    """Display names of the reserved ids, in id order: pad, eot, dk, pause1 … pause{max_pauses}."""
    return ("<pad>", "<eot>", "<dk>", *(f"<pause{i}>" for i in range(1, max_pauses + 1)))


@dataclass(frozen=True)
class Vocab:
    """The id layout a model needs: reserved ids plus ``size`` = total number of ids (embedding rows).

    ``pause_ids`` lists every reserved pause id (``<pause1>`` first); a layout with K pauses uses the
    first K of them.
    """

    pad_id: int
    eot_id: int
    dk_id: int
    pause_ids: tuple[int, ...]
    size: int

    @property
    def num_reserved(self) -> int:
        """R: text ids start here."""
        return 3 + len(self.pause_ids)

    @property
    def max_pauses(self) -> int:
        return len(self.pause_ids)


def _reserved_vocab(max_pauses: int, text_vocab_size: int) -> Vocab:
    return Vocab(
        pad_id=0,
        eot_id=1,
        dk_id=2,
        pause_ids=tuple(range(3, 3 + max_pauses)),
        size=3 + max_pauses + text_vocab_size,
    )


def standard_vocab(text_vocab_size: int = 0) -> Vocab:
    """The reserved-id layout every tokenizer built here has (to check a config before building one)."""
    return _reserved_vocab(MAX_PAUSES, text_vocab_size)


class TextTokenizer:
    """What the stream needs of a tokenizer: ``vocab`` (the reserved ids), ``num_reserved``, a batched
    ``encode_batch_np`` that never yields a reserved id, and ``decode`` for display. Implemented by our
    BPE (:class:`CYBTokenizer`) and by the Hugging Face adapter (``data.hf_tokenizer.HFTokenizer``).
    """

    vocab: Vocab

    @property
    def num_reserved(self) -> int:
        raise NotImplementedError

    @property
    def role_ids(self) -> frozenset[int]:
        """The ids that stand for a role, not for text: padding, end of text, DK and every pause id.

        Select reserved ids by this, never by an id range: an HF vocabulary's added ids sit at its end.
        """
        v = self.vocab
        return frozenset((v.pad_id, v.eot_id, v.dk_id, *v.pause_ids))

    def encode_batch_np(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text as int64 arrays (what the stream packs)."""
        raise NotImplementedError

    def reserved_name(self, i: int) -> str | None:
        """Display name of a reserved id (``<dk>``, ``<pause1>``…), None for a text id."""
        raise NotImplementedError

    def decode_text(self, ids: list[int]) -> str:
        """Text of a run of (non-reserved) ids."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """Text for ``ids``; reserved ids are shown by name (``<pause1>``, ``<dk>``…), for display only."""
        out: list[str] = []
        run: list[int] = []
        for i in map(int, ids):
            if not 0 <= i < self.vocab.size:
                raise ValueError(f"id {i} is outside the vocabulary [0, {self.vocab.size})")
            name = self.reserved_name(i)
            if name is None:
                run.append(i)
                continue
            if run:
                out.append(self.decode_text(run))
                run = []
            out.append(name)
        if run:
            out.append(self.decode_text(run))
        return "".join(out)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text; never a reserved id."""
        return [ids.tolist() for ids in self.encode_batch_np(texts)]


class CYBTokenizer(TextTokenizer):
    """Byte-level BPE with reserved ids in front; build with :meth:`train` or :meth:`load`.

    ``encode_batch`` is the fast path (Rust, batched); ``decode`` is for display and tests.
    """

    def __init__(self, bpe: Tokenizer, max_pauses: int = MAX_PAUSES):
        if not 0 <= max_pauses:
            raise ValueError(f"max_pauses must be >= 0, got {max_pauses}")
        if bpe.get_vocab_size(with_added_tokens=True) != bpe.get_vocab_size(with_added_tokens=False):
            # Added/special tokens would match literal text such as "<pause1>" and break the guarantee.
            raise ValueError("the BPE must have no added or special tokens; reserved ids live outside it")
        self._bpe = bpe
        self.vocab = _reserved_vocab(max_pauses, bpe.get_vocab_size())
        self._offset = self.vocab.num_reserved
        self._reserved_names = reserved_tokens(max_pauses)
        self._byte_ids = self._byte_table()

    def _byte_table(self) -> np.ndarray | None:
        """With no merges (the 256 byte ids alone: the synthetic tasks' character-level tokenizer) a text's
        ids are its UTF-8 bytes looked up in a table, which is ~50x faster than the BPE's batch call on short
        rows. The table is read off the BPE itself (every byte valid UTF-8 can hold) and checked on a probe;
        None for any other tokenizer."""
        if self._bpe.get_vocab_size() != 256:
            return None
        table = np.full(256, -1, dtype=np.int64)
        # Every lead byte: 1 and 2 bytes (< 0x800), 3 bytes (0x800, 0x1000·k: E0 … EF), 4 bytes (F0 … F4).
        chars = [chr(c) for c in range(0x800)] + [chr(0x800)] + [chr(0x1000 * k) for k in range(1, 16)]
        chars += [chr(0x10000 * k) for k in (1, 4, 8, 12, 16)]
        for char, enc in zip(chars, self._bpe.encode_batch_fast(chars, add_special_tokens=False)):
            data = char.encode("utf-8")
            if len(enc.ids) != len(data):
                return None
            table[np.frombuffer(data, dtype=np.uint8)] = enc.ids
        probe = "the 1st probe: é, €, 😀, \t\n" + "".join(chars[::37])
        if (table[np.frombuffer(probe.encode("utf-8"), dtype=np.uint8)] != self._bpe.encode(probe).ids).any():
            return None
        return table + self._offset

    # -- building -------------------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        min_frequency: int = 2,
        max_pauses: int = MAX_PAUSES,
    ) -> CYBTokenizer:
        """Train a byte-level BPE of at most ``vocab_size`` text ids (the 256 byte ids included).

        A small corpus may stop short of ``vocab_size`` (no pair left above ``min_frequency``);
        ``vocab.size`` always reports the real total, reserved ids included.
        """
        if vocab_size < 256:
            raise ValueError(f"vocab_size must be >= 256 (one id per byte), got {vocab_size}")
        bpe = Tokenizer(models.BPE())
        # No normaliser and add_prefix_space=False: decoding gives back the exact input string.
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        bpe.train_from_iterator(texts, trainer)
        return cls(bpe, max_pauses)

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` (the BPE) and ``reserved.json`` (the reserved-id layout)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._bpe.save(str(d / TOKENIZER_FILE))
        meta = {
            "format": _FORMAT,
            "offset": self._offset,
            "max_pauses": self.vocab.max_pauses,
            "reserved": list(self._reserved_names),
            "size": self.vocab.size,
        }
        (d / RESERVED_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> CYBTokenizer:
        d = Path(directory)
        tok_file, meta_file = d / TOKENIZER_FILE, d / RESERVED_FILE
        if not tok_file.is_file() or not meta_file.is_file():
            raise FileNotFoundError(
                f"no tokenizer in {d}: expected {TOKENIZER_FILE} and {RESERVED_FILE} (build one with "
                "CYBTokenizer.train(...).save(dir), or let the data module build it)"
            )
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{meta_file} has format {meta.get('format')!r}, this code reads {_FORMAT}")
        tok = cls(Tokenizer.from_file(str(tok_file)), int(meta["max_pauses"]))
        if tok._offset != meta["offset"] or tok.vocab.size != meta["size"]:
            raise ValueError(f"{meta_file} does not match {tok_file} (offset/size differ); rebuild the tokenizer")
        return tok

    # -- use ------------------------------------------------------------------------------------------

    @property
    def num_reserved(self) -> int:
        return self._offset

    def encode_batch_np(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids as int64 arrays, offset past the reserved block: never an id below ``num_reserved``."""
        if self._byte_ids is not None:
            return [self._byte_ids[np.frombuffer(t.encode("utf-8"), dtype=np.uint8)] for t in texts]
        encs = self._bpe.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) + self._offset for e in encs]

    def reserved_name(self, i: int) -> str | None:
        return self._reserved_names[i] if i < self._offset else None

    def decode_text(self, ids: list[int]) -> str:
        return self._bpe.decode([i - self._offset for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"CYBTokenizer(size={self.vocab.size}, reserved={self._offset})"
