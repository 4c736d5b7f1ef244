"""Sequence layouts: pure functions from a chunk of real tokens to one training example, and the
:class:`Layout` classes that build themselves from the config (one registered class per name).

The batch contract (the LightningModule relies on it exactly): ``input_ids``, ``position_ids`` long [L] with
L = T · W, ``targets`` long [T], ``target_mask`` bool [T]; inputs t·W … t·W+W−1 form group t, whose W outputs
are the steps for ``targets[t]``; a masked target holds a valid index and never counts. The layouts (``none``,
``cyb``, ``tbys_random``, ``pause_groups``, ``tbys_finetune``, ``variable``, ``answer_pauses``), drawn out with
examples, are docs/method.md §2. A new layout is one function plus one :class:`Layout` subclass.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..losses.functional import check_weights
from .tokenizer import Vocab

Example = dict[str, np.ndarray]


def _as_chunk(tokens, capacity: int) -> np.ndarray:
    chunk = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if chunk.size < 1:
        raise ValueError("a chunk needs at least one real token")
    return chunk[:capacity]


def layout_cyb(tokens, seq_len: int, pause_ids: Sequence[int], pad_id: int) -> Example:
    """K = len(pause_ids) pauses after every real token; ``tokens`` holds up to T + 1 real tokens."""
    t_len, w = seq_len, 1 + len(pause_ids)
    chunk = _as_chunk(tokens, t_len + 1)
    n = chunk.size
    real = np.full(t_len + 1, pad_id, dtype=np.int64)
    real[:n] = chunk
    groups = np.empty((t_len, w), dtype=np.int64)
    groups[:, 0] = real[:t_len]
    groups[:, 1:] = np.asarray(pause_ids, dtype=np.int64)
    groups[n:, 1:] = pad_id  # a group with no real token is all padding
    return {
        "input_ids": groups.reshape(-1),
        "position_ids": np.repeat(np.arange(t_len, dtype=np.int64), w),
        "targets": real[1:].copy(),
        "target_mask": np.arange(t_len) < n - 1,
    }


def layout_none(tokens, seq_len: int, pad_id: int) -> Example:
    """The plain next-token baseline (``cyb`` with no pauses)."""
    return layout_cyb(tokens, seq_len, (), pad_id)


def random_pause_slots(seq_len: int, num_pauses: int, seed: int, index: int) -> np.ndarray:
    """Bool ``[T + 1]``: where the pauses go in example ``index``; the same for the same (seed, index)."""
    rng = np.random.default_rng([seed, index])
    slots = np.zeros(seq_len + 1, dtype=bool)
    slots[rng.choice(seq_len + 1, size=num_pauses, replace=False)] = True
    return slots


def layout_tbys_random(
    tokens, seq_len: int, pause_id: int, pad_id: int, num_pauses: int, seed: int, index: int
) -> Example:
    """TBYS pause pretraining: ``num_pauses`` pauses at random slots, real tokens fill the rest in order."""
    t_len = seq_len
    is_pause = random_pause_slots(t_len, num_pauses, seed, index)
    real_slots = np.flatnonzero(~is_pause)
    chunk = _as_chunk(tokens, real_slots.size)  # more real tokens than slots: trim the tail
    n = chunk.size
    seq = np.full(t_len + 1, pause_id, dtype=np.int64)
    seq[real_slots[:n]] = chunk
    valid = np.ones(t_len + 1, dtype=bool)
    if n < real_slots.size:  # a short final chunk: everything after its last real token is padding
        valid[real_slots[n - 1] + 1 :] = False
        seq[~valid] = pad_id
    # The first real token is the chunk's context, never a target: the previous chunk scored it (chunks
    # overlap by one token), and from slot 0 being a pause it would be predicted from pauses alone.
    after_first = np.arange(1, t_len + 1) > real_slots[0]
    return {
        "input_ids": seq[:t_len].copy(),
        "position_ids": np.arange(t_len, dtype=np.int64),
        "targets": seq[1:].copy(),
        "target_mask": ~is_pause[1:] & valid[1:] & after_first,
    }


def pause_group_tokens(num_real: int, num_groups: int, seed: int, index: int) -> np.ndarray:
    """Bool ``[num_real]``: which real tokens a group of pauses follows in example ``index`` (never the
    last one, whose group would predict nothing); the same for the same (seed, index)."""
    rng = np.random.default_rng([seed, index, 0x6A05])  # a stream of its own, apart from the other layouts'
    grouped = np.zeros(num_real, dtype=bool)
    grouped[rng.choice(num_real - 1, size=num_groups, replace=False)] = True
    return grouped


def layout_pause_groups(
    tokens, seq_len: int, pause_ids: Sequence[int], pad_id: int, num_groups: int, seed: int, index: int
) -> Example:
    """``num_groups`` groups ``P1..PK`` after random real tokens, each pause at its token's position.

    ``tokens`` holds up to T + 1 − num_groups·K real tokens (more: the tail is trimmed).
    """
    t_len, k = seq_len, len(pause_ids)
    num_real = t_len + 1 - num_groups * k
    chunk = _as_chunk(tokens, num_real)
    n = chunk.size
    grouped = pause_group_tokens(num_real, num_groups, seed, index)[:n]
    grouped[n - 1] = False  # a short final chunk: nothing follows its last real token
    starts = np.concatenate(([0], np.cumsum(1 + k * grouped)[:-1]))  # laid-out slot of each real token
    used = int(starts[-1]) + 1
    seq = np.full(t_len + 1, pad_id, dtype=np.int64)
    seq[starts] = chunk
    pause_slots = (starts[grouped, None] + 1 + np.arange(k)).reshape(-1)
    seq[pause_slots] = np.tile(np.asarray(pause_ids, dtype=np.int64), int(grouped.sum()))
    positions = np.arange(t_len + 1, dtype=np.int64) - (used - n)  # the padded tail continues after the last token
    positions[:used] = np.repeat(np.arange(n, dtype=np.int64), 1 + k * grouped)
    is_real = np.zeros(t_len + 1, dtype=bool)
    is_real[starts] = True
    return {
        "input_ids": seq[:t_len].copy(),
        "position_ids": positions[:t_len].copy(),
        "targets": seq[1:].copy(),
        "target_mask": is_real[1:].copy(),
    }


def layout_tbys_finetune(prompt, completion, seq_len: int, pause_id: int, num_pauses: int, pad_id: int) -> Example:
    """TBYS pause fine-tuning: ``prompt`` + ``num_pauses`` × ``pause_id`` + ``completion``, padded to T + 1.

    The output at the last pause predicts the first completion token; earlier outputs are not scored.
    A pair longer than T + 1 loses prompt tokens at its start (one is kept), then completion tokens at
    its end.
    """
    t_len = seq_len
    prompt, completion = _as_chunk(prompt, t_len + 1), _as_chunk(completion, t_len + 1)
    room = t_len + 1 - num_pauses  # slots for prompt and completion
    if room < 2:
        raise ValueError(f"{num_pauses} pauses leave no room for a prompt and a completion in {t_len + 1} slots")
    prompt = prompt[prompt.size - min(prompt.size, max(1, room - completion.size)) :]
    completion = completion[: room - prompt.size]
    first = prompt.size + num_pauses  # slot of the first completion token
    end = first + completion.size
    seq = np.full(t_len + 1, pad_id, dtype=np.int64)
    seq[: prompt.size] = prompt
    seq[prompt.size : first] = pause_id
    seq[first:end] = completion
    slot = np.arange(1, t_len + 1)  # the slot of each target
    return {
        "input_ids": seq[:t_len].copy(),
        "position_ids": np.arange(t_len, dtype=np.int64),
        "targets": seq[1:].copy(),
        "target_mask": (slot >= first) & (slot < end),
    }


@dataclass(frozen=True)
class Layout:
    """A layout with its parameters bound (picklable, so DataLoader workers get a copy); one subclass per
    layout, each a call of its function above. A subclass registers itself under its ``name``
    (``LAYOUT_CLASSES``) and builds itself from the config (:meth:`from_config`, which checks it); what the
    rest of the code needs to know about a layout is a fact the class states. :func:`make_layout` looks the
    name up.

    ``real_tokens`` is how many real tokens one full example consumes (C); consecutive chunks overlap
    by one token, so the stream advances by C − 1.
    """

    name: ClassVar[str]
    per_token_groups: ClassVar[bool] = (
        False  # every real token is a group of itself + its pauses: W = 1 + K (cyb, variable)
    )
    inserts_pauses: ClassVar[bool] = False  # pauses take slots of the T + 1 (tbys_random, pause_groups, …)
    pairs: ClassVar[bool] = False  # an example is one prompt/completion pair (tokens = (prompt, completion))
    answers_only: ClassVar[bool] = False  # pauses only before scored targets (needs ``scored``; answer_pauses)
    aligned_targets: ClassVar[bool] = True  # target j is the chunk's token j + 1 (difficulty labels fit)

    seq_len: int
    pad_id: int
    pause_ids: tuple[int, ...] = ()
    num_random_pauses: int = 0  # ``tbys_random``/``pause_groups``/``tbys_finetune``: pauses per example
    seed: int = 0
    omega: tuple[float, ...] = ()  # ``variable``: the world distribution over granted steps 1 … W

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # a concrete layout: known by its name from now on
            LAYOUT_CLASSES[cls.name] = cls

    @classmethod
    def from_config(  # pragma: no cover - abstract
        cls,
        seq_len: int,
        vocab: Vocab,
        *,
        num_pauses: int,
        pause_fraction: float,
        seed: int,
        omega: Sequence[float] | None,
    ) -> Layout:
        """The layout of a data config, checked: errors say what is wrong and how to fix it."""
        raise NotImplementedError

    @property
    def steps_per_token(self) -> int:
        return 1 + len(self.pause_ids) if self.per_token_groups else 1

    @property
    def length(self) -> int:
        """L = T · W, the input length."""
        return self.seq_len * self.steps_per_token

    @property
    def real_tokens(self) -> int:
        return self.seq_len + 1 - (self.num_random_pauses if self.inserts_pauses else 0)

    @property
    def prompt_pauses(self) -> int:
        """Pauses a prompt gets after its last token (``tbys_finetune``'s M_ft; 0 for the others)."""
        return 0

    def for_evaluation(self) -> Layout:
        """The layout validation and test read (the model's own DK decides where it may pause)."""
        return self

    def __call__(self, tokens, index: int, scored: np.ndarray | None = None) -> Example:  # pragma: no cover
        """Example number ``index`` (the global example index: it seeds the random layouts). ``scored``: bool,
        target j of the chunk counts (a source that labels its targets gives it; ``answer_pauses`` reads it)."""
        raise NotImplementedError

    def empty_example(self) -> Example:
        """All padding, nothing to score: fills a rank's last batches so every rank runs as many."""
        return {
            "input_ids": np.full(self.length, self.pad_id, dtype=np.int64),
            "position_ids": np.repeat(np.arange(self.seq_len, dtype=np.int64), self.steps_per_token),
            "targets": np.full(self.seq_len, self.pad_id, dtype=np.int64),
            "target_mask": np.zeros(self.seq_len, dtype=bool),
        }


LAYOUT_CLASSES: dict[str, type[Layout]] = {}  # name → class, filled as each subclass is defined


def _check_k(name: str, num_pauses: int, vocab: Vocab, low: int = 1) -> None:
    if not low <= num_pauses <= vocab.max_pauses:
        raise ValueError(
            f"{name} needs {low} <= num_pauses <= {vocab.max_pauses} (the pause ids the tokenizer reserves), got "
            f"num_pauses={num_pauses}" + ("; 0 is the no-pause baseline" if low == 0 else "")
        )


def _needs_a_pause_id(name: str, vocab: Vocab) -> None:
    if not vocab.pause_ids:
        raise ValueError(f"{name} needs a pause id, but the tokenizer reserves none (max_pauses=0)")


def _check_fraction(pause_fraction: float) -> None:
    if not 0.0 <= pause_fraction < 1.0:
        raise ValueError(f"pause_fraction must lie in [0, 1), got {pause_fraction} (TBYS uses 0.1)")


class NoPauses(Layout):
    name = "none"

    @classmethod
    def from_config(cls, seq_len, vocab, **_) -> Layout:
        return cls(seq_len, vocab.pad_id)

    def __call__(self, tokens, index: int, scored: np.ndarray | None = None) -> Example:
        return layout_none(tokens, self.seq_len, self.pad_id)


class CYBPauses(Layout):
    name = "cyb"
    per_token_groups = True

    @classmethod
    def from_config(cls, seq_len, vocab, *, num_pauses, **_) -> Layout:
        _check_k(cls.name, num_pauses, vocab, low=0)
        return cls(seq_len, vocab.pad_id, pause_ids=vocab.pause_ids[:num_pauses])

    def __call__(self, tokens, index: int, scored: np.ndarray | None = None) -> Example:
        return layout_cyb(tokens, self.seq_len, self.pause_ids, self.pad_id)


class TBYSRandom(Layout):
    name = "tbys_random"
    inserts_pauses = True
    aligned_targets = False

    @classmethod
    def from_config(cls, seq_len, vocab, *, pause_fraction, seed, **_) -> Layout:
        _needs_a_pause_id(cls.name, vocab)
        _check_fraction(pause_fraction)
        m = round(pause_fraction * seq_len)
        if seq_len + 1 - m < 2:
            raise ValueError(
                f"pause_fraction={pause_fraction} leaves fewer than 2 real tokens in {seq_len + 1} slots; "
                "lower pause_fraction or raise seq_len"
            )
        return cls(seq_len, vocab.pad_id, pause_ids=vocab.pause_ids[:1], num_random_pauses=m, seed=seed)

    def __call__(self, tokens, index: int, scored: np.ndarray | None = None) -> Example:
        return layout_tbys_random(
            tokens, self.seq_len, self.pause_ids[0], self.pad_id, self.num_random_pauses, self.seed, index
        )


class PauseGroups(Layout):
    name = "pause_groups"
    inserts_pauses = True
    aligned_targets = False

    @classmethod
    def from_config(cls, seq_len, vocab, *, num_pauses, pause_fraction, seed, **_) -> Layout:
        _check_k(cls.name, num_pauses, vocab)
        _check_fraction(pause_fraction)
        # G groups among N = T + 1 − G·K real tokens, G ≈ fraction · N.
        groups = round(pause_fraction * (seq_len + 1) / (1 + pause_fraction * num_pauses))
        if groups + 1 > seq_len + 1 - groups * num_pauses:  # every group needs a real token before and after
            raise ValueError(
                f"pause_fraction={pause_fraction} with num_pauses={num_pauses} does not fit {seq_len + 1} slots "
                f"({groups} groups need {groups + 1} real tokens besides their {groups * num_pauses} pauses); "
                "lower pause_fraction or num_pauses, or raise seq_len"
            )
        return cls(
            seq_len,
            vocab.pad_id,
            pause_ids=vocab.pause_ids[:num_pauses],
            num_random_pauses=groups * num_pauses,
            seed=seed,
        )

    def __call__(self, tokens, index: int, scored: np.ndarray | None = None) -> Example:
        groups = self.num_random_pauses // len(self.pause_ids)
        return layout_pause_groups(tokens, self.seq_len, self.pause_ids, self.pad_id, groups, self.seed, index)


class TBYSFinetune(Layout):
    name = "tbys_finetune"
    inserts_pauses = True
    pairs = True
    aligned_targets = False

    @classmethod
    def from_config(cls, seq_len, vocab, *, num_pauses, **_) -> Layout:
        _needs_a_pause_id(cls.name, vocab)
        if not 1 <= num_pauses <= seq_len - 1:
            raise ValueError(
                f"tbys_finetune appends num_pauses={num_pauses} pauses (M_ft) after each prompt; choose "
                f"1 <= num_pauses <= seq_len - 1 = {seq_len - 1} (TBYS uses 10 or 50)"
            )
        return cls(seq_len, vocab.pad_id, pause_ids=vocab.pause_ids[:1], num_random_pauses=num_pauses)

    @property
    def prompt_pauses(self) -> int:
        return self.num_random_pauses

    def __call__(self, tokens, index: int, scored: np.ndarray | None = None) -> Example:
        prompt, completion = tokens
        return layout_tbys_finetune(
            prompt, completion, self.seq_len, self.pause_ids[0], self.num_random_pauses, self.pad_id
        )


class _GrantedPauses(Layout):
    """Layouts whose tokens get different numbers of pauses, packed back to back (:func:`layout_granted`)."""

    per_token_groups = True

    def empty_example(self) -> Example:
        w = self.steps_per_token
        return {
            **super().empty_example(),
            "step_mask": np.zeros((self.seq_len, w), dtype=bool),
            "step_index": np.repeat(np.arange(self.seq_len, dtype=np.int64) * w, w).reshape(-1, w),
        }


class VariablePauses(_GrantedPauses):
    name = "variable"

    @classmethod
    def from_config(cls, seq_len, vocab, *, num_pauses, seed, omega, **_) -> Layout:
        _check_k(cls.name, num_pauses, vocab)
        w = num_pauses + 1
        # ω: the world distribution over 1 … W granted steps, checked and normalised as the losses do.
        omega_t = tuple(check_weights([1.0] * w if omega is None else omega, "omega", w, normalise=True).tolist())
        return cls(seq_len, vocab.pad_id, pause_ids=vocab.pause_ids[:num_pauses], seed=seed, omega=omega_t)

    def for_evaluation(self) -> Layout:
        # Every token may use all K pauses, so the model's own DK decides, as at inference.
        return CYBPauses(self.seq_len, self.pad_id, pause_ids=self.pause_ids)

    def __call__(self, tokens, index: int, scored: np.ndarray | None = None) -> Example:
        return layout_variable(tokens, self.seq_len, self.pause_ids, self.pad_id, self.omega, self.seed, index)


class AnswerPauses(_GrantedPauses):
    name = "answer_pauses"
    answers_only = True

    @classmethod
    def from_config(cls, seq_len, vocab, *, num_pauses, **_) -> Layout:
        _check_k(cls.name, num_pauses, vocab)
        return cls(seq_len, vocab.pad_id, pause_ids=vocab.pause_ids[:num_pauses])

    def __call__(self, tokens, index: int, scored: np.ndarray | None = None) -> Example:
        if scored is None:
            raise ValueError(
                "answer_pauses puts pauses before the scored targets, but none were given: it needs a "
                "source that labels its targets (DigitSum, WindowLookup)"
            )
        return layout_answer_pauses(tokens, self.seq_len, self.pause_ids, self.pad_id, scored)


def make_layout(
    name: str,
    seq_len: int,
    vocab: Vocab,
    *,
    num_pauses: int = 3,
    pause_fraction: float = 0.1,
    seed: int = 0,
    omega: Sequence[float] | None = None,
) -> Layout:
    """The layout class registered as ``name``, built from the config (:meth:`Layout.from_config`)."""
    if name not in LAYOUT_CLASSES:
        raise ValueError(f"unknown layout {name!r}; choose one of {', '.join(LAYOUT_CLASSES)}")
    if seq_len < 1:
        raise ValueError(f"seq_len (T, real tokens per example) must be >= 1, got {seq_len}")
    return LAYOUT_CLASSES[name].from_config(
        seq_len, vocab, num_pauses=num_pauses, pause_fraction=pause_fraction, seed=seed, omega=omega
    )


# -- variable pauses ("recipe 2" of CYB: proposed there, never run) -------------------------------------


def variable_pause_counts(seq_len: int, omega: Sequence[float], seed: int, index: int) -> np.ndarray:
    """Long ``[T]``: extra pauses granted to each real token of example ``index``, k_t + 1 ~ ω.

    ω_i = Pr(the world grants exactly i steps), i = 1 … W; a function of (seed, index) alone.
    """
    p = np.asarray(omega, dtype=np.float64)
    rng = np.random.default_rng([seed, index, 0x5AD5])  # a stream of its own, apart from tbys_random's
    return rng.choice(p.size, size=seq_len, p=p / p.sum()).astype(np.int64)


def layout_granted(tokens, seq_len: int, pause_ids: Sequence[int], pad_id: int, granted: np.ndarray) -> Example:
    """Real token x_t followed by its first k_t = ``granted[t]`` pauses ``P1..Pk_t``.

    The groups are packed back to back (no gaps, so the model sees exactly what adaptive inference feeds
    it) and padded at the end to L = T·W. Two extra keys map the packed inputs onto the ``[T, W]`` grid:
    ``step_index [T, W]`` (input slot of step i of group t; steps past k_t repeat the last granted slot) and
    ``step_mask [T, W]`` (step i was granted). The loss forces d = 0 at the last granted step.
    """
    t_len, w = seq_len, 1 + len(pause_ids)
    chunk = _as_chunk(tokens, t_len + 1)
    n = chunk.size
    granted = np.array(granted, dtype=np.int64)
    granted[max(n - 1, 0) :] = 0  # groups without a target need no pauses
    source, position_ids, step_mask, slots = _granted_plan(t_len, w, granted.tobytes())
    # Every input is a real token (index < T + 1), a pause (T + 1 … T + K) or padding (T + K + 1).
    pool = np.empty(t_len + w + 1, dtype=np.int64)
    pool[:n] = chunk
    pool[n : t_len + 1] = pad_id
    pool[t_len + 1 : t_len + w] = pause_ids
    pool[-1] = pad_id
    return {
        "input_ids": pool[source],
        "position_ids": position_ids.copy(),
        "targets": pool[1 : t_len + 1].copy(),
        "target_mask": np.arange(t_len) < n - 1,
        "step_mask": step_mask.copy(),
        "step_index": slots.copy(),
    }


@functools.lru_cache(maxsize=4096)
def _granted_plan(t_len: int, w: int, granted_bytes: bytes) -> tuple[np.ndarray, ...]:
    """Where each input of :func:`layout_granted` comes from, for one pattern of grants (few patterns recur:
    one per problem length with pauses only before answers), and its positions, step mask and step slots."""
    granted = np.frombuffer(granted_bytes, dtype=np.int64)
    sizes = granted + 1
    starts = np.cumsum(sizes) - sizes  # input slot of each real token
    step = np.arange(w)
    step_mask = step <= granted[:, None]
    slots = starts[:, None] + np.minimum(step, granted[:, None])
    grid = np.empty((t_len, w), dtype=np.int64)  # what step i of group t reads: x_t, then P1 … PK
    grid[:, 0] = np.arange(t_len)
    grid[:, 1:] = t_len + np.arange(1, w)
    source = np.full(t_len * w, t_len + w, dtype=np.int64)  # padding
    source[slots[step_mask]] = grid[step_mask]
    position_ids = np.repeat(np.arange(t_len, dtype=np.int64), w)  # the tail (padding) keeps the cyb pattern
    position_ids[: starts[-1] + sizes[-1]] = np.repeat(np.arange(t_len, dtype=np.int64), sizes)
    return source, position_ids, step_mask, slots


def layout_variable(
    tokens, seq_len: int, pause_ids: Sequence[int], pad_id: int, omega: Sequence[float], seed: int, index: int
) -> Example:
    """Variable pauses: k_t from :func:`variable_pause_counts`, laid out by :func:`layout_granted`."""
    if len(omega) != 1 + len(pause_ids):
        raise ValueError(
            f"omega has {len(omega)} entries but there are W={1 + len(pause_ids)} steps (1 + {len(pause_ids)} pauses)"
        )
    granted = variable_pause_counts(seq_len, omega, seed, index)
    return layout_granted(tokens, seq_len, pause_ids, pad_id, granted)


def layout_answer_pauses(tokens, seq_len: int, pause_ids: Sequence[int], pad_id: int, scored) -> Example:
    """The K pauses after every input whose target is ``scored`` (bool, one per target), none elsewhere."""
    granted = np.zeros(seq_len, dtype=np.int64)
    n = min(seq_len, len(scored))
    granted[:n] = np.where(np.asarray(scored[:n], dtype=bool), len(pause_ids), 0)
    return layout_granted(tokens, seq_len, pause_ids, pad_id, granted)
