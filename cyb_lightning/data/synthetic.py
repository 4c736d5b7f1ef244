"""A synthetic task where extra compute steps provably help: the positive control of the pause methods.

Pauses give a token more *parallel width* (more positions that read the context after it), not more
serial depth (docs/method.md §6). The task below has targets that a small decoder answers from one position and
targets whose computation does not fit in one position's feed-forward block, so that a model given K
pauses per token can spread it over K + 1 positions. CYB's claim is that the model learns to ask for the
extra steps exactly there; the difficulty of every target travels with the batch so the evaluation can
check it.

**Window lookup** (``window_lookup``; found by experiment, docs/positive_control.md lists what else was
tried). A document is a run of problems; a problem is

    b_1 … b_R   Q_k   A   ;

R random bits (R uniform in [k_max, k_max + extra_bits]), a query symbol Q_k naming the level k, the
answer A = table_k(b_{R−k+1} … b_R), and a separator. table_k is a fixed random map from the 2^k values
of the last k bits to 10 answer symbols of its own (drawn once from ``table_seed``: it is part of the
task, the same for training and validation). The target after Q_k (the answer) has difficulty k; the
target after A (the separator) has difficulty 0. The bits and the query are random: they are not
scored (difficulty −1, no loss), since no computation predicts them.

Every symbol is one character and the source is read with a character-level tokenizer
(``bpe_vocab_size: 256``: the byte-level BPE with no merges), so each symbol is one token, and the
difficulty of a target is a pure function of the chunk's token ids (:meth:`SyntheticTask.target_difficulty`).
An answer whose window starts before its chunk (the stream cuts documents anywhere) is not scored.

Documents are a pure function of (seed, split, shard, index), so the source is deterministic, resumable
and shardable like every other :class:`~cyb_lightning.data.sources.TextSource`; training and validation
use disjoint seeds (the validation split is held out).
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .sources import SPLITS, TextSource, _check_split

ANSWERS_PER_LEVEL = 10
MAX_LEVEL = 8  # queries Q_1 … Q_8; with 10 answers per level that is 88 symbols besides "0", "1" and ";"
BITS, SEPARATOR = "01", ";"
# One printable, non-space character per symbol: the queries Q_1 … Q_8, then 10 answers per level.
_SYMBOLS = "".join(c for c in string.printable if not c.isspace() and c not in BITS + SEPARATOR)


def query_symbol(k: int) -> str:
    """The character of Q_k."""
    return _SYMBOLS[k - 1]


def answer_symbol(k: int, value: int) -> str:
    """The character of answer ``value`` (0 … 9) of level k."""
    return _SYMBOLS[MAX_LEVEL + (k - 1) * ANSWERS_PER_LEVEL + value]


def lookup_tables(levels: Sequence[int], table_seed: int) -> dict[int, np.ndarray]:
    """table_k: the 2^k values of the last k bits → one of 10 answers, fixed by ``table_seed``."""
    rng = np.random.default_rng([table_seed, 0x7AB1E])
    return {k: rng.integers(0, ANSWERS_PER_LEVEL, 2**k) for k in sorted(set(levels))}


def window_lookup_document(
    rng: np.random.Generator, levels: Sequence[int], tables: dict[int, np.ndarray], problems: int, extra_bits: int
) -> str:
    """One document of ``problems`` problems ``b_1 … b_R Q_k A ;`` (see the module docstring)."""
    k_max = max(levels)
    out: list[str] = []
    for _ in range(problems):
        bits = rng.integers(0, 2, int(rng.integers(k_max, k_max + extra_bits + 1)))
        k = int(levels[int(rng.integers(len(levels)))])
        value = int(bits[-k:] @ (1 << np.arange(k - 1, -1, -1)))  # the last k bits, most significant first
        out.append("".join(BITS[b] for b in bits) + query_symbol(k) + answer_symbol(k, int(tables[k][value])) + SEPARATOR)
    return "".join(out)


class SyntheticTask(TextSource):
    """The window-lookup task as a text source (select it with ``data.source.class_path``).

    Args:
        levels: the difficulty levels k (window lengths, 1 … 8) the queries draw uniformly.
        problems_per_document: problems in one document.
        documents_per_shard: documents in one shard.
        train_shards / validation_shards: shards per split (the stream deals them to ranks and lanes).
        extra_bits: a problem has k_max … k_max + extra_bits bits before its query.
        seed: draws the documents (validation uses a stream of its own: held out).
        table_seed: draws the lookup tables (the task itself; keep it fixed to compare runs).
        root: where the tokenizer built for the task is kept (``root/tokenizer-256``).
    """

    def __init__(
        self,
        levels: list[int] | None = None,
        problems_per_document: int = 32,
        documents_per_shard: int = 2000,
        train_shards: int = 8,
        validation_shards: int = 1,
        extra_bits: int = 2,
        seed: int = 0,
        table_seed: int = 1234,
        root: str = "data/synthetic",
    ):
        levels = [1, 2, 3, 4, 5] if levels is None else list(levels)
        if not levels or any(not 1 <= k <= MAX_LEVEL for k in levels) or len(set(levels)) != len(levels):
            raise ValueError(f"levels must be distinct window lengths in 1 … {MAX_LEVEL}, got {levels}")
        for name, value in (("problems_per_document", problems_per_document), ("documents_per_shard",
                            documents_per_shard), ("train_shards", train_shards),
                            ("validation_shards", validation_shards)):  # fmt: skip
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if extra_bits < 0:
            raise ValueError(f"extra_bits must be >= 0, got {extra_bits}")
        self.levels = sorted(levels)
        self.problems, self.per_shard = problems_per_document, documents_per_shard
        self.num_shards = {"train": train_shards, "validation": validation_shards}
        self.extra_bits, self.seed, self.table_seed, self.root = extra_bits, seed, table_seed, root
        self.tables = lookup_tables(self.levels, table_seed)
        self._id_tables: tuple[int, np.ndarray, np.ndarray] | None = None  # (tokenizer id, query level, answer)

    # -- TextSource ---------------------------------------------------------------------------------

    def shards(self, split: str) -> list[str]:
        _check_split(split)
        return [f"{split}-{i:04d}" for i in range(self.num_shards[split])]

    def iter_shard(self, split: str, shard: str) -> Iterator[str]:
        _check_split(split)
        index = int(shard.rsplit("-", 1)[1])
        for doc in range(self.per_shard):
            rng = np.random.default_rng([self.seed, SPLITS.index(split), index, doc])
            yield window_lookup_document(rng, self.levels, self.tables, self.problems, self.extra_bits)

    def num_documents(self, split: str) -> int:
        _check_split(split)
        return self.num_shards[split] * self.per_shard

    def fingerprint(self) -> str:
        params = {"task": "window_lookup", "levels": self.levels, "problems": self.problems,
                  "per_shard": self.per_shard, "shards": self.num_shards, "extra_bits": self.extra_bits,
                  "seed": self.seed, "table_seed": self.table_seed}  # fmt: skip
        return "synthetic:" + hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()

    def default_tokenizer_dir(self, vocab_size: int) -> str:
        return str(Path(self.root) / f"tokenizer-{vocab_size}")

    def tokenizer_texts(self, max_documents: int | None):
        # Every symbol, once: the character-level tokenizer needs no more (and trains in no time).
        alphabet = BITS + SEPARATOR + "".join(query_symbol(k) for k in range(1, MAX_LEVEL + 1)) + "".join(
            answer_symbol(k, v) for k in range(1, MAX_LEVEL + 1) for v in range(ANSWERS_PER_LEVEL))
        return lambda: iter([alphabet])

    def describe(self) -> str:
        return (f"SyntheticTask window_lookup (levels {self.levels}, {self.problems} problems/document, "
                f"train {self.num_documents('train')} / validation {self.num_documents('validation')} documents)")  # fmt: skip

    # -- difficulty of every target -----------------------------------------------------------------

    def _tables_for(self, tokenizer) -> tuple[np.ndarray, np.ndarray]:
        """Per token id: the level of a query id (−1 otherwise), and whether the id is an answer."""
        if self._id_tables is None or self._id_tables[0] != id(tokenizer):
            size = tokenizer.vocab.size
            query_level = np.full(size, -1, dtype=np.int64)
            is_answer = np.zeros(size, dtype=bool)

            sample = next(self.iter_shard("train", self.shards("train")[0]))
            if len(tokenizer.encode(sample)) != len(sample):
                raise ValueError(
                    f"SyntheticTask needs one token per symbol, but {tokenizer} merges symbols ({len(sample)} symbols "
                    f"→ {len(tokenizer.encode(sample))} tokens): use the character-level tokenizer "
                    "(data.bpe_vocab_size: 256, and no data.tokenizer)"
                )

            def one_id(ch: str) -> int:
                return tokenizer.encode(ch)[0]

            for k in self.levels:
                query_level[one_id(query_symbol(k))] = k
                for v in range(ANSWERS_PER_LEVEL):
                    is_answer[one_id(answer_symbol(k, v))] = True
            self._id_tables = (id(tokenizer), query_level, is_answer)
        return self._id_tables[1], self._id_tables[2]

    def target_difficulty(self, tokens: np.ndarray, tokenizer) -> np.ndarray:
        """Long ``[n − 1]`` for the ``n`` real tokens of a chunk: the difficulty of target j (``tokens[j + 1]``).

        k for an answer (the input is Q_k) whose k window bits lie inside the chunk, 0 for a separator (the
        input is an answer), −1 for everything else (random bits and queries, the end of a document).
        """
        query_level, is_answer = self._tables_for(tokenizer)
        inputs = np.asarray(tokens, dtype=np.int64)[:-1]
        level = query_level[inputs]
        level = np.where(level > np.arange(inputs.size), -1, level)  # window before the chunk's start
        return np.where(is_answer[inputs], 0, level)
