"""Synthetic tasks whose targets carry a difficulty: the positive controls of the pause methods.

Design notes: docs/internals.md, section `cyb_lightning/data/synthetic.py`.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .sources import TextSource

SPLITS = ("train", "validation", "test")


class SyntheticSource(TextSource):
    """What the synthetic tasks share: shards of generated documents, the character-level tokenizer and
    the token-id tables their :meth:`target_difficulty` reads. Subclasses define the documents."""

    splits = SPLITS
    one_example_per_document = False  # True: a document is one row (one problem), never packed

    def __init__(
        self,
        levels: Sequence[int],
        max_level: int,
        documents_per_shard: int,
        train_shards: int,
        eval_shards: int,
        seed: int,
        root: str,
    ) -> None:
        if not levels or any(not 1 <= k <= max_level for k in levels) or len(set(levels)) != len(levels):
            raise ValueError(f"levels must be distinct difficulty levels in 1 … {max_level}, got {list(levels)}")
        for name, value in (
            ("documents_per_shard", documents_per_shard),
            ("train_shards", train_shards),
            ("eval_shards", eval_shards),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.levels = sorted(levels)
        self.per_shard, self.seed, self.root = documents_per_shard, seed, root
        self.num_shards = {"train": train_shards, "validation": eval_shards, "test": eval_shards}
        self._ids: tuple[int, dict[str, int]] | None = None  # (id of the tokenizer, symbol → token id)

    # -- what a task defines ------------------------------------------------------------------------

    def alphabet(self) -> str:  # pragma: no cover - abstract
        """Every symbol of the task, once."""
        raise NotImplementedError

    def documents(self, rng: np.random.Generator, count: int) -> Iterator[str]:  # pragma: no cover - abstract
        """``count`` documents drawn in order from ``rng`` (one generator per shard)."""
        raise NotImplementedError

    def target_difficulty(self, tokens: np.ndarray, tokenizer) -> np.ndarray:  # pragma: no cover - abstract
        """Long ``[n − 1]`` for ``n`` real tokens: the level of target j (``tokens[j + 1]``), −1 = not scored."""
        raise NotImplementedError

    def row_levels(self, rows: list[np.ndarray], tokenizer) -> np.ndarray:
        """The hardest level scored in each row (−1: none), for the curriculum; a task may do it faster at once."""
        return np.array([self.target_difficulty(r, tokenizer).max(initial=-1) for r in rows], dtype=np.int64)

    # -- TextSource ---------------------------------------------------------------------------------

    def _check(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"split must be one of {self.splits}, got {split!r}")

    def shards(self, split: str) -> list[str]:
        self._check(split)
        return [f"{split}-{i:04d}" for i in range(self.num_shards[split])]

    def iter_shard(self, split: str, shard: str) -> Iterator[str]:
        self._check(split)
        index = int(shard.rsplit("-", 1)[1])
        yield from self.documents(np.random.default_rng([self.seed, self.splits.index(split), index]), self.per_shard)

    def num_documents(self, split: str) -> int:
        self._check(split)
        return self.num_shards[split] * self.per_shard

    def fingerprint(self) -> str:
        # The tokenizer is trained on the alphabet alone (tokenizer_texts): it is all that keys the cache.
        return "synthetic:" + hashlib.sha256(json.dumps(sorted(self.alphabet())).encode()).hexdigest()

    def default_tokenizer_dir(self, vocab_size: int) -> str:
        return str(Path(self.root) / f"tokenizer-{vocab_size}")

    def tokenizer_texts(self, max_documents: int | None):
        return lambda: iter([self.alphabet()])

    def describe(self) -> str:
        return (
            f"{type(self).__name__} (levels {self.levels}; train {self.num_documents('train')} / validation "
            f"{self.num_documents('validation')} / test {self.num_documents('test')} documents)"
        )

    # -- token ids ----------------------------------------------------------------------------------

    def symbol_ids(self, tokenizer) -> dict[str, int]:
        """Symbol → token id; checks that the tokenizer reads every symbol as one token."""
        if self._ids is None or self._ids[0] != id(tokenizer):
            alphabet = self.alphabet()
            probe = alphabet + next(self.iter_shard("train", self.shards("train")[0]))  # symbols, then a document
            if len(tokenizer.encode(probe)) != len(probe):
                raise ValueError(
                    f"{type(self).__name__} needs one token per symbol, but {tokenizer} merges symbols "
                    f"({len(probe)} symbols → {len(tokenizer.encode(probe))} tokens): use the character-level "
                    "tokenizer (data.bpe_vocab_size: 256, and no data.tokenizer)"
                )
            self._ids = (id(tokenizer), {c: tokenizer.encode(c)[0] for c in alphabet})
        return self._ids[1]


# -- digit sum: the positive control --------------------------------------------------------------------

BOS, EQUALS, DIGITS, ANSWERS = "^", "=", string.digits, string.ascii_uppercase


def sum_table(max_sum: int, classes: int, table_seed: int) -> np.ndarray:
    """The answer class of every digit sum 0 … ``max_sum``, fixed by ``table_seed`` (the task itself)."""
    return np.random.default_rng([table_seed, 0xD5]).integers(0, classes, max_sum + 1)


class DigitSum(SyntheticSource):
    """``^ d_1 … d_n = A`` with A = table(Σ d_i), one problem per row (see the module docstring).

    Args:
        levels: the numbers of digits n (difficulty levels) drawn uniformly; default 1 … 8.
        max_digit: digits are 0 … max_digit (≤ 9).
        classes: answer symbols (≤ 26).
        documents_per_shard, train_shards: the training split (documents are problems).
        eval_shards: shards of the validation split and of the test split each.
        seed: draws the problems (validation and test use streams of their own: held out).
        table_seed: draws the sum → answer table (the task itself; keep it fixed to compare runs).
        root: where the character-level tokenizer is kept (``root/tokenizer-256``).
    """

    one_example_per_document = True

    def __init__(
        self,
        levels: list[int] | None = None,
        max_digit: int = 5,
        classes: int = 10,
        documents_per_shard: int = 100_000,
        train_shards: int = 8,
        eval_shards: int = 1,
        seed: int = 0,
        table_seed: int = 1234,
        root: str = "data/synthetic",
    ) -> None:
        super().__init__(
            list(range(1, 9)) if levels is None else levels,
            32,
            documents_per_shard,
            train_shards,
            eval_shards,
            seed,
            root,
        )
        if not 1 <= max_digit <= 9 or not 2 <= classes <= len(ANSWERS):
            raise ValueError(f"need 1 <= max_digit <= 9 and 2 <= classes <= {len(ANSWERS)}; got {max_digit}, {classes}")
        self.max_digit, self.classes, self.table_seed = max_digit, classes, table_seed
        self.table = sum_table(max_digit * max(self.levels), classes, table_seed)

    @property
    def row_tokens(self) -> int:
        """Tokens of the longest row: ``^``, the digits, ``=``, the answer and the end of text."""
        return max(self.levels) + 4

    def alphabet(self) -> str:
        return BOS + EQUALS + DIGITS[: self.max_digit + 1] + ANSWERS[: self.classes]

    def answer(self, digits: Sequence[int]) -> str:
        return ANSWERS[int(self.table[int(sum(digits))])]

    def documents(self, rng: np.random.Generator, count: int, block: int = 4096) -> Iterator[str]:
        top = max(self.levels)
        for start in range(0, count, block):  # drawn a block at a time: a training run reads millions
            size = min(block, count - start)
            n = np.asarray(self.levels)[rng.integers(len(self.levels), size=size)]
            digits = rng.integers(0, self.max_digit + 1, (size, top))
            digits[np.arange(top)[None, :] >= n[:, None]] = 0
            answers = self.table[digits.sum(1)]
            for k in range(size):
                yield BOS + "".join(DIGITS[d] for d in digits[k, : n[k]]) + EQUALS + ANSWERS[answers[k]]

    def target_difficulty(self, tokens: np.ndarray, tokenizer) -> np.ndarray:
        """n for the answer (the input is ``=`` after ``^`` and n digits in the chunk), −1 for every other target."""
        ids = self.symbol_ids(tokenizer)
        inputs = np.asarray(tokens, dtype=np.int64)[:-1]
        where = np.arange(inputs.size)
        last_bos = np.maximum.accumulate(np.where(inputs == ids[BOS], where, -1))  # the problem's start
        return np.where((inputs == ids[EQUALS]) & (last_bos >= 0), where - last_bos - 1, -1)

    def row_levels(self, rows: list[np.ndarray], tokenizer) -> np.ndarray:
        """n of each row (``^ d_1 … d_n = A``): the place of ``=`` after ``^``, for a whole batch at once (the
        curriculum reads every row drawn, up to 8 for each it keeps early on)."""
        ids = self.symbol_ids(tokenizer)
        grid = np.full((len(rows), max((r.size for r in rows), default=0)), -1, dtype=np.int64)
        for k, r in enumerate(rows):
            grid[k, : r.size] = r
        equals, bos = grid == ids[EQUALS], grid == ids[BOS]
        found = equals.any(1) & bos.any(1)
        return np.where(found, equals.argmax(1) - bos.argmax(1) - 1, -1)

    def describe(self) -> str:
        return f"{super().describe()}, digits 0 … {self.max_digit}, {self.classes} answer classes"


# -- window lookup: the first design --------------------------------------------------------------------

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
        out.append(
            "".join(BITS[b] for b in bits) + query_symbol(k) + answer_symbol(k, int(tables[k][value])) + SEPARATOR
        )
    return "".join(out)


class WindowLookup(SyntheticSource):
    """The window-lookup task, packed like text (see the module docstring).

    Args:
        levels: the window lengths k (1 … 8) the queries draw uniformly.
        problems_per_document: problems in one document.
        documents_per_shard, train_shards, eval_shards, seed, table_seed, root: as :class:`DigitSum`.
        extra_bits: a problem has k_max … k_max + extra_bits bits before its query.
    """

    def __init__(
        self,
        levels: list[int] | None = None,
        problems_per_document: int = 32,
        documents_per_shard: int = 2000,
        train_shards: int = 8,
        eval_shards: int = 1,
        extra_bits: int = 2,
        seed: int = 0,
        table_seed: int = 1234,
        root: str = "data/synthetic",
    ) -> None:
        super().__init__(
            [1, 2, 3, 4, 5] if levels is None else levels,
            MAX_LEVEL,
            documents_per_shard,
            train_shards,
            eval_shards,
            seed,
            root,
        )
        if problems_per_document < 1 or extra_bits < 0:
            raise ValueError(
                f"need problems_per_document >= 1 and extra_bits >= 0, got {problems_per_document}, {extra_bits}"
            )
        self.problems, self.extra_bits, self.table_seed = problems_per_document, extra_bits, table_seed
        self.tables = lookup_tables(self.levels, table_seed)

    def alphabet(self) -> str:
        return (
            BITS
            + SEPARATOR
            + "".join(query_symbol(k) for k in range(1, MAX_LEVEL + 1))
            + "".join(answer_symbol(k, v) for k in range(1, MAX_LEVEL + 1) for v in range(ANSWERS_PER_LEVEL))
        )

    def documents(self, rng: np.random.Generator, count: int) -> Iterator[str]:
        for _ in range(count):
            yield window_lookup_document(rng, self.levels, self.tables, self.problems, self.extra_bits)

    def target_difficulty(self, tokens: np.ndarray, tokenizer) -> np.ndarray:
        """k for an answer (the input is Q_k) whose k window bits lie inside the chunk, 0 for a separator (the
        input is an answer), −1 for everything else (random bits and queries, the end of a document)."""
        ids = self.symbol_ids(tokenizer)
        size = max(ids.values()) + 1
        query_level = np.full(size, -1, dtype=np.int64)
        is_answer = np.zeros(size, dtype=bool)
        for k in self.levels:
            query_level[ids[query_symbol(k)]] = k
            is_answer[[ids[answer_symbol(k, v)] for v in range(ANSWERS_PER_LEVEL)]] = True
        inputs = np.asarray(tokens, dtype=np.int64)[:-1]
        inside = inputs < size  # ids of other symbols (pauses, end of text) are none of these
        level = np.where(inside, query_level[np.minimum(inputs, size - 1)], -1)
        level = np.where(level > np.arange(inputs.size), -1, level)  # window before the chunk's start
        return np.where(inside & is_answer[np.minimum(inputs, size - 1)], 0, level)
