"""One stateful IterableDataset: documents → tokens → packed chunks → laid-out examples.

Documents are packed ("concatenate then split", consecutive chunks share one token so every token but the
first is a target once), sharded by rank, then lane, then DataLoader worker, and resumed exactly from a
per-rank state that does not depend on the worker count. Prompt/completion pairs and one-problem rows of a
synthetic task are one example each; a curriculum skips rows above its level cap at the step that trains on
them. The contracts (example order, state, resume, bad input) are in docs/data.md.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import warnings
from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.utils.data

from .curriculum import Curriculum
from .layout import Layout
from .sources import PromptCompletionSource, TextSource, document_pair
from .tokenizer import CYBTokenizer

log = logging.getLogger(__name__)

_STATE_VERSION = 2


def _start_cursor(epoch: int) -> dict:
    return {"epoch": epoch, "shard": 0, "doc": 0, "n": 0, "offset": 0, "example": 0}


def _cursor_key(c: dict) -> tuple[int, int, int, int]:
    return (c["epoch"], c["shard"], c["doc"], c["offset"])


def example_key(epoch: int, shard_id: int, doc: int, offset: int) -> int:
    """A 63-bit int naming the example that starts at token ``offset`` of a document (seeds layouts)."""
    digest = hashlib.blake2b(f"{epoch}/{shard_id}/{doc}/{offset}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def check_pairs(source: TextSource, layout: Layout) -> None:
    """Prompt/completion sources and the ``tbys_finetune`` layout go together, and only together."""
    if layout.pairs != isinstance(source, PromptCompletionSource):
        raise ValueError(
            f"layout {layout.name} with {type(source).__name__}: the tbys_finetune layout reads prompt/completion "
            "pairs, which only a PromptCompletionSource (LocalPromptCompletion, HubPromptCompletion) gives, and "
            "such a source needs that layout (data.layout: tbys_finetune)"
        )


def split_pieces(text: str, limit: int) -> list[str]:
    """``text`` in consecutive pieces of at most ``limit`` characters, cut before a space where possible."""
    if len(text) <= limit:
        return [text]
    pieces, start = [], 0
    while len(text) - start > limit:
        cut = text.rfind(" ", start + limit // 2, start + limit)
        if cut <= start:
            cut = start + limit
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


class PackedStream(torch.utils.data.IterableDataset):
    """Yields dicts of tensors in the layout's batch contract (see ``layout.py``).

    ``rank``/``world_size`` are the data-parallel coordinates (the DataModule passes the trainer's);
    ``batch_size`` must be the loader's batch size (workers and lanes hand out whole batches).
    ``lanes``: independent packing streams per rank (see the module docstring; capped at the rank's shard
    count; finite streams use 1). ``max_documents`` caps the split (the fixed validation set).
    ``infinite``/``shuffle`` default to True for "train", False otherwise. ``retries``/``backoff_s``:
    transient read errors are retried with exponential backoff (see :meth:`TextSource.read_shard`).
    ``curriculum`` (training rows of a synthetic task only): the level cap per optimizer step, which is
    the rank's batch index // ``batches_per_step`` (gradient accumulation).
    """

    def __init__(
        self,
        source: TextSource,
        tokenizer: CYBTokenizer,
        layout: Layout,
        *,
        split: str = "train",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
        lanes: int = 1,
        max_documents: int | None = None,
        infinite: bool | None = None,
        shuffle: bool | None = None,
        tokenize_batch: int = 64,
        max_document_chars: int = 100_000,
        retries: int = 5,
        backoff_s: float = 1.0,
        curriculum: Curriculum | None = None,
        batches_per_step: int = 1,
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < 1 or tokenize_batch < 1 or lanes < 1:
            raise ValueError(
                f"batch_size, tokenize_batch, lanes must be >= 1, got {batch_size}, {tokenize_batch}, {lanes}"
            )
        if max_document_chars < 16:
            raise ValueError(f"max_document_chars must be >= 16, got {max_document_chars}")
        if max_documents is not None and max_documents < 1:
            raise ValueError(f"max_documents must be >= 1 or None, got {max_documents}")
        if layout.real_tokens < 2:
            raise ValueError(f"layout {layout.name} consumes {layout.real_tokens} real tokens; need >= 2")
        check_pairs(source, layout)
        self.source, self.tokenizer, self.layout = source, tokenizer, layout
        self.split, self.seed = split, seed
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.max_documents = max_documents
        self.infinite = split == "train" if infinite is None else infinite
        self.rows = getattr(source, "one_example_per_document", False)
        if curriculum is not None and not (self.rows and self.infinite and self.scores_difficulty):
            raise ValueError(
                f"a curriculum draws training rows by difficulty: it needs an infinite (training) stream of a source "
                f"with one labelled problem per row (DigitSum), not the {split} split of {type(source).__name__}"
            )
        if batches_per_step < 1:
            raise ValueError(f"batches_per_step must be >= 1, got {batches_per_step}")
        self.curriculum, self.batches_per_step = curriculum, batches_per_step
        self.shuffle = split == "train" if shuffle is None else shuffle
        self.lanes = lanes if self.infinite else 1
        self.tokenize_batch, self.max_document_chars = tokenize_batch, max_document_chars
        self.retries, self.backoff_s = retries, backoff_s
        self._plan_cache: dict | None = None
        self.set_epoch(0)

    # -- the sharding plan ----------------------------------------------------------------------------

    def plan(self) -> dict:
        """``{"mode": "shards"|"examples", "lanes": L, "num_shards": N}`` for this rank (cached)."""
        if self._plan_cache is None:
            shards = self.source.shards(self.split)
            n = len(shards)
            mode = "shards" if self.infinite and n % self.world_size == 0 else "examples"
            per_rank = n // self.world_size if mode == "shards" else n
            self._plan_cache = {
                "mode": mode,
                "lanes": max(1, min(self.lanes, per_rank)),
                "num_shards": n,
                "shard_ids": {s: i for i, s in enumerate(shards)},
            }
        return self._plan_cache

    def plan_warnings(self, num_workers: int = 0) -> list[str]:
        """What is wasteful about this plan (for the log); empty when every shard is read once."""
        p, out = self.plan(), []
        if self.infinite and p["mode"] == "examples" and self.world_size > 1:
            out.append(
                f"{p['num_shards']} {self.split} shards is not a multiple of the world size {self.world_size}: "
                "every rank reads and tokenizes every shard and keeps 1/world_size of the examples "
                f"({self.world_size}x redundant work); use a shard count divisible by the world size"
            )
        if p["lanes"] < self.lanes and self.infinite:
            log.info("%s: %d of %d lanes (the rank has %d shards)", self.split, p["lanes"], self.lanes, p["lanes"])
        n = max(num_workers, 1)
        g = math.gcd(n, p["lanes"])
        if g < n and self.infinite:  # (validation is small: every worker reads it, keeping its batches)
            out.append(
                f"{num_workers} DataLoader workers for {p['lanes']} lanes: each lane is read by {n // g} workers "
                f"(redundant tokenization); use a number of workers that divides the lanes ({p['lanes']})"
            )
        return out

    def _lane_shards(self, epoch: int, lane: int) -> list[str]:
        p = self.plan()
        order = self.source.shard_order(self.split, epoch=epoch, shuffle_seed=self.seed if self.shuffle else None)
        if p["mode"] == "shards":
            order = order[self.rank :: self.world_size]
        return order[lane :: p["lanes"]]

    def lane_index(self, i: int, lane: int) -> int:
        """Lane-local index of the first example of ``lane`` at or after the rank's example ``i``."""
        b, rem = divmod(i, self.batch_size)
        lanes = self.plan()["lanes"]
        before = max(0, -(-(b - lane) // lanes))  # batches b' < b with b' % lanes == lane
        return before * self.batch_size + (rem if b % lanes == lane else 0)

    # -- state ----------------------------------------------------------------------------------------

    def _signature(self) -> dict:
        """What a saved position means; resuming under a different one would silently change the data."""
        lay, p = self.layout, self.plan()
        sig = {
            "split": self.split,
            "seed": self.seed,
            "world_size": self.world_size,
            "rank": self.rank,
            "layout": [lay.name, lay.seq_len, lay.real_tokens, list(lay.pause_ids)],
            "max_documents": self.max_documents,
            "sharding": [p["mode"], p["lanes"], p["num_shards"]],
        }
        if p["lanes"] > 1 or self.curriculum is not None:
            sig["batch_size"] = self.batch_size
        if self.curriculum is not None:  # which rows are skipped depends on the step each one trains at
            sig["curriculum"] = [self.curriculum.start, self.curriculum.ramp_steps, self.batches_per_step]
        return sig

    def set_epoch(self, epoch: int) -> None:
        """Restart at the first example of ``epoch`` (example numbering restarts at 0)."""
        self._start = {"index": 0, "epoch": epoch, "lanes": None}
        self._state = copy.deepcopy(self._start)

    def _full(self, state: dict) -> dict:
        if state["lanes"] is None:
            state = {**state, "lanes": [_start_cursor(state["epoch"]) for _ in range(self.plan()["lanes"])]}
        return state

    def state_dict(self) -> dict:
        """Position after the last example this reader yielded (see the module docstring), and this
        process's skipped-input counters (``skipped``: the source's ``stats``; not restored on resume)."""
        state = self._full(copy.deepcopy(self._state))
        return {"version": _STATE_VERSION, "signature": self._signature(), **state, "skipped": dict(self.source.stats)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"stream state has version {state.get('version')!r}, this code reads {_STATE_VERSION}")
        if state["signature"] != self._signature():
            raise ValueError(
                "cannot resume this stream: its state was saved with a different data config\n"
                f"  saved: {state['signature']}\n  now:   {self._signature()}\n"
                "restore the old settings (seed, world size, layout, seq_len, lanes, shards…) "
                "or start the data afresh"
            )
        self._start = {"index": int(state["index"]), "epoch": state["epoch"], "lanes": copy.deepcopy(state["lanes"])}
        self._state = copy.deepcopy(self._start)

    @staticmethod
    def merge_states(states: Sequence[dict]) -> dict:
        """One rank-level state from the states of all of a rank's workers (snapshots taken at the same
        consumed batch): examples below the furthest index were all consumed, since the rank consumes
        in order, and every worker's lane cursor lies at or before that lane's first unconsumed example
        (so the latest one is taken)."""
        if not states:
            raise ValueError("merge_states needs at least one state")
        if any(s["signature"] != states[0]["signature"] for s in states):
            raise ValueError("cannot merge stream states of different data configs")
        merged = copy.deepcopy(states[0])
        merged["index"] = max(s["index"] for s in states)
        merged["lanes"] = [
            copy.deepcopy(max((s["lanes"][l] for s in states), key=_cursor_key)) for l in range(len(merged["lanes"]))
        ]
        skipped: dict[str, int] = {}  # each worker counts what it read itself
        for s in states:
            for reason, n in s.get("skipped", {}).items():
                skipped[reason] = skipped.get(reason, 0) + n
        merged["skipped"] = skipped
        return merged

    # -- reading and tokenizing -----------------------------------------------------------------------

    def _documents(self, lane: int, cursor: dict) -> Iterator[tuple[tuple, str]]:
        """((epoch, shard position, doc, n, shard id), text) from the cursor's document on; forever when
        infinite. n counts the lane's documents of the epoch (``max_documents`` caps it)."""
        epoch, pos0, doc0, n = cursor["epoch"], cursor["shard"], cursor["doc"], cursor["n"]
        ids = self.plan()["shard_ids"]
        # Shards read since the lane's last document. A lane whose shards of an epoch gave nothing (an
        # unreadable shard alone in it) goes on with the next epoch, whose shard order differs; it has no
        # data left only once it has tried every shard it can be dealt (all of them when shuffled).
        tried: set[str] = set()
        while True:
            shards = self._lane_shards(epoch, lane)
            capped = False
            for pos in range(pos0, len(shards)):
                reader = self.source.read_shard(
                    self.split,
                    shards[pos],
                    start=doc0 if pos == pos0 else 0,
                    retries=self.retries,
                    backoff_s=self.backoff_s,
                )
                for doc, text in reader:
                    if self.max_documents is not None and n >= self.max_documents:
                        reader.close()
                        capped = True
                        break
                    tried.clear()
                    yield (epoch, pos, doc, n, ids[shards[pos]]), text
                    n += 1
                if capped:
                    break
            if not self.infinite:
                return
            if n == 0:
                tried.update(shards)
                where = f"lane {lane} of rank {self.rank} ({self.split} split of {type(self.source).__name__})"
                if tried >= (set(ids) if self.shuffle else set(shards)):
                    causes = "\n".join(
                        f"  {self.source.shard_problems.get(s, f'{s}: no documents in it')}" for s in sorted(tried)
                    )
                    raise RuntimeError(
                        f"{where} has no documents in any shard it can be dealt ({len(tried)}):\n{causes}\n"
                        "fix or remove those files, or use fewer data.lanes (a lane reads 1/lanes of a rank's shards)"
                    )
                self.source._warn(
                    f"{where}: no documents in epoch {epoch} (its shards {shards} gave none, warnings above say "
                    f"why); going on with epoch {epoch + 1}",
                    "empty_lane_epochs",
                )
            epoch, pos0, doc0, n = epoch + 1, 0, 0, 0

    def _token_pieces(self, lane: int, cursor: dict) -> Iterator[list[tuple[tuple, int, np.ndarray]]]:
        """Batches of (document meta, token offset of the piece in its document, tokens); a document's
        last piece ends with ``<eot>``. The cursor's document starts at token ``offset``."""
        eot = np.array([self.tokenizer.vocab.eot_id], dtype=np.int64)
        skip = cursor["offset"]
        limit = self.max_document_chars
        pending: list[tuple[tuple, bool, str]] = []  # (meta, last piece?, text)
        chars = 0
        done = {}  # meta -> tokens emitted so far for a document split in pieces

        def flush():
            nonlocal skip
            ids = self.tokenizer.encode_batch_np([t for _, _, t in pending])
            out = []
            for (meta, last, _), x in zip(pending, ids):
                if last:
                    x = np.concatenate([x, eot])
                start = done.pop(meta, 0)
                if not last:
                    done[meta] = start + x.size
                if skip:  # the resumed document: drop what came before the cursor
                    drop = min(skip, x.size)
                    x, start, skip = x[drop:], start + drop, skip - drop
                if x.size:
                    out.append((meta, start, x))
            pending.clear()
            return out

        for meta, text in self._documents(lane, cursor):
            pieces = split_pieces(text, limit)
            for k, piece in enumerate(pieces):
                pending.append((meta, k == len(pieces) - 1, piece))
                chars += len(piece)
                if len(pending) >= self.tokenize_batch or chars >= limit:
                    batch, chars = flush(), 0
                    if batch:
                        yield batch
        if pending:
            batch = flush()
            if batch:
                yield batch

    def _chunks(self, lane: int, cursor: dict) -> Iterator[tuple[int, np.ndarray, dict]]:
        """(lane example index g, real tokens, cursor of its first token), packed from ``cursor`` on."""
        size = self.layout.real_tokens
        step = size - 1
        g = cursor["example"]
        pos = 0  # stream position of example g's first token, counted from the cursor
        buf, buf_pos = np.zeros(0, dtype=np.int64), 0
        starts: deque[tuple[int, tuple, int]] = deque()  # (stream position, document meta, its token offset)

        def where(g):
            while len(starts) > 1 and starts[1][0] <= pos:
                starts.popleft()
            s, (epoch, shard, doc, n, sid), off = starts[0]
            return {
                "epoch": epoch,
                "shard": shard,
                "doc": doc,
                "n": n,
                "offset": off + pos - s,
                "example": g,
                "sid": sid,
            }

        for batch in self._token_pieces(lane, cursor):
            parts = [buf[pos - buf_pos :]]
            end = buf_pos + buf.size
            for meta, off, tokens in batch:
                starts.append((end, meta, off))
                parts.append(tokens)
                end += tokens.size
            buf, buf_pos = np.concatenate(parts), pos
            while pos + size <= end:
                yield g, buf[pos - buf_pos : pos - buf_pos + size], where(g)
                g, pos = g + 1, pos + step
        tail = buf[pos - buf_pos :]
        if tail.size >= 2:  # the end of a finite stream: a short chunk, padded by the layout
            yield g, tail, where(g)
            g += 1
        self._lane_total = g

    def step_of(self, g: int, lane: int) -> int:
        """The optimizer step that trains on example ``g`` of ``lane``: the rank's batch b = ⌊j / B⌋·L + lane
        (j the rank-local index of g, L the lanes; see ``lane_index``), over ``batches_per_step``."""
        p = self.plan()
        j = g // self.world_size if p["mode"] == "examples" else g
        return ((j // self.batch_size) * p["lanes"] + lane) // self.batches_per_step

    def _per_document(self, lane: int, cursor: dict) -> Iterator[tuple[int, object, dict]]:
        """(lane example index g, example, cursor of its document): one example per document, a prompt/completion
        pair or a row (see the module docstring); rows above the curriculum's cap at their step are skipped."""
        g = cursor["example"]
        top = max(getattr(self.source, "levels", [0]))
        pending: list[tuple[tuple, str]] = []

        def flush() -> list:
            nonlocal g
            out = []
            encoded = (self._encode_pairs if self.layout.pairs else self._encode_rows)([d for _, d in pending])
            # Levels only while the curriculum still holds some back (the cap only rises with the step).
            capped = self.curriculum is not None and self.curriculum.level_cap(self.step_of(g, lane), top) < top
            levels = self.source.row_levels(encoded, self.tokenizer) if capped else None
            for k, (((epoch, shard, doc, n, sid), _), example) in enumerate(zip(pending, encoded)):
                if capped and levels[k] > self.curriculum.level_cap(self.step_of(g, lane), top):
                    continue
                cur = {"epoch": epoch, "shard": shard, "doc": doc, "n": n, "offset": 0, "example": g, "sid": sid}
                out.append((g, example, cur))
                g += 1
            pending.clear()
            return out

        for meta, document in self._documents(lane, cursor):
            pending.append((meta, document))
            if len(pending) >= self.tokenize_batch:
                yield from flush()
        yield from flush()
        self._lane_total = g

    def _encode_pairs(self, documents: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(prompt ids, completion ids) of prompt/completion documents."""
        eot = np.array([self.tokenizer.vocab.eot_id], dtype=np.int64)
        bos = getattr(self.tokenizer, "bos_id", None)  # a pretrained tokenizer's BOS opens a prompt, not a completion
        slots = self.layout.seq_len + 1 - self.layout.num_random_pauses
        pairs = [document_pair(d) for d in documents]
        ids = self.tokenizer.encode_batch_np([p for p, _ in pairs] + [c for _, c in pairs])
        out = []
        for k in range(len(pairs)):
            prompt, completion = ids[k], ids[len(pairs) + k]
            if bos is not None and completion[:1].tolist() == [bos]:
                completion = completion[1:]
            pair = (np.concatenate([eot, prompt]), np.concatenate([completion, eot]))
            if pair[0].size + pair[1].size > slots:
                self.source._warn(
                    f"a prompt/completion pair has more than the {slots} tokens seq_len leaves "
                    "besides the pauses: the prompt's start (then the completion's end) is cut",
                    "truncated_pairs",
                )
            out.append(pair)
        return out

    def _encode_rows(self, documents: list[str]) -> list[np.ndarray]:
        """The tokens + ``<eot>`` of one-problem rows; a row must fit one example whole."""
        eot = np.array([self.tokenizer.vocab.eot_id], dtype=np.int64)
        rows = [np.concatenate([x, eot]) for x in self.tokenizer.encode_batch_np(documents)]
        longest = max((r.size for r in rows), default=0)
        if longest > self.layout.real_tokens:
            raise ValueError(
                f"a row of {type(self.source).__name__} has {longest} tokens (its end of text included) but an example "
                f"holds {self.layout.real_tokens} (data.seq_len + 1): raise data.seq_len to at least {longest - 1}"
            )
        return rows

    def _lane_examples(self, lane: int, cursor: dict, first_j: int) -> Iterator[tuple[int, np.ndarray, dict]]:
        """(lane-local index j, tokens, cursor) of this rank's examples of ``lane``, from j = first_j on."""
        by_example = self.plan()["mode"] == "examples"
        examples = self._per_document if self.layout.pairs or self.rows else self._chunks
        for g, tokens, cur in examples(lane, cursor):
            if by_example:
                if g % self.world_size != self.rank:
                    continue
                j = g // self.world_size
            else:
                j = g
            if j >= first_j:
                yield j, tokens, cur

    # -- iteration ------------------------------------------------------------------------------------

    def _worker(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _tensors(self, tokens: np.ndarray, cur: dict) -> dict[str, torch.Tensor]:
        key = example_key(cur["epoch"], cur["sid"], cur["doc"], cur["offset"])
        if self.scores_difficulty:
            difficulty = self.source.target_difficulty(tokens, self.tokenizer)
            example = self._with_difficulty(self.layout(tokens, key, scored=difficulty >= 0), difficulty)
        else:
            example = self.layout(tokens, key)
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in example.items()}

    @property
    def scores_difficulty(self) -> bool:
        """Whether the source labels every target with a difficulty (the synthetic tasks)."""
        return hasattr(self.source, "target_difficulty")

    def _with_difficulty(self, example: dict, difficulty: np.ndarray | None) -> dict:
        """Adds ``difficulty`` long ``[T]`` (−1: not a task target) and scores only targets with a level ≥ 0."""
        d = np.full(self.layout.seq_len, -1, dtype=np.int64)
        if difficulty is not None:
            n = min(d.size, difficulty.size)
            d[:n] = difficulty[:n]
        return {**example, "difficulty": d, "target_mask": example["target_mask"] & (d >= 0)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # Training continues from where the last pass stopped; a finite pass always replays from its start
        # (a sanity-check pass must not shift the validation set).
        if not self.infinite:
            self._state = copy.deepcopy(self._start)
        start = self._full(copy.deepcopy(self._state))
        self._state = copy.deepcopy(start)
        worker, num_workers = self._worker()
        for message in self.plan_warnings(num_workers if worker == 0 else 0):
            warnings.warn(message, stacklevel=2)
        lanes, bs = self.plan()["lanes"], self.batch_size
        mine_mod = math.gcd(num_workers, lanes)
        iters: dict[int, Iterator] = {}
        i = start["index"]
        b0 = i // bs  # a fresh DataLoader asks worker 0 first: it makes batch b0, worker 1 batch b0 + 1, …
        while True:
            b = i // bs
            if (b - b0) % num_workers != worker:  # not this worker's batch: jump to its next one
                i = (b + (worker + b0 - b) % num_workers) * bs
                continue
            lane = b % lanes
            assert (lane - b0) % mine_mod == worker % mine_mod
            j = (b // lanes) * bs + i % bs
            if lane not in iters:
                iters[lane] = self._lane_examples(lane, start["lanes"][lane], self.lane_index(start["index"], lane))
            item = next(iters[lane], None)
            while item is not None and item[0] < j:
                item = next(iters[lane], None)
            if item is None:  # only a finite stream (one lane) ends
                break
            _, tokens, cur = item
            self._state["index"] = i + 1
            self._state["lanes"][lane] = cur
            yield self._tensors(tokens, cur)
            i += 1
        # Finite: pad every rank to the same number of examples, so no rank waits on a collective that
        # another rank never reaches (DDP validation).
        total = self._lane_total
        per_rank = -(-total // self.world_size)
        for i in range(i, per_rank):
            if (i // bs - b0) % num_workers == worker:
                self._state["index"] = i + 1
                empty = self.layout.empty_example()
                if self.scores_difficulty:
                    empty = self._with_difficulty(empty, None)
                yield {k: torch.from_numpy(v) for k, v in empty.items()}
