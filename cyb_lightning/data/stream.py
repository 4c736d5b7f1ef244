"""One stateful IterableDataset: documents → tokens → packed chunks → laid-out examples.

Packing ("concatenate then split"): each document's tokens are followed by ``<eot>`` and everything is
concatenated into one token stream. Example g takes the C real tokens starting at g·(C − 1) (C = T + 1
for ``none``/``cyb``): consecutive chunks share one token, so every token but the very first is a
target exactly once. Training repeats forever, epoch after epoch (shard order shuffled by (seed,
epoch)), and packs straight across epoch boundaries; validation is the first ``max_documents``
documents of the validation split, finite and identical on every pass, its last chunk padded.

Sharding (OLMo style): examples are numbered globally (g = 0, 1, …) over the stream every reader sees.
Rank r of R owns g ≡ r (mod R), its local index being j = g // R; worker w of n owns the rank's local
*batches* b = j // batch_size with b ≡ w (mod n). DataLoader takes batches round robin from its
workers, so the rank sees its examples in local order j = 0, 1, 2, … whatever n is, and the resume index
(j of the next example) does not depend on n. Every reader tokenizes the whole stream and keeps its
slice: simple and exact, at the price of redundant tokenization with many ranks × workers (a later
issue can hand out whole shards instead without changing the example order contract).

State: ``{"index": j, "cursor": {...}}`` where j is the rank-local index of the next example this reader
would yield and the cursor (epoch, document, token offset, global example) marks where in the stream an
example at or before it starts. Resuming reads (but does not tokenize) the documents before the cursor
and then drops examples below j. With DataLoader workers each worker's copy reports its own state
(``torchdata``'s StatefulDataLoader saves and restores them one by one); :meth:`PackedStream.merge_states`
folds them into one state that any number of workers can resume from.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.utils.data

from .layout import Layout
from .sources import TextSource
from .tokenizer import CYBTokenizer

_STATE_VERSION = 1


def _start_cursor(epoch: int) -> dict:
    return {"epoch": epoch, "doc": 0, "offset": 0, "example": 0}


def _cursor_key(c: dict) -> tuple[int, int, int]:
    return (c["epoch"], c["doc"], c["offset"])


class PackedStream(torch.utils.data.IterableDataset):
    """Yields dicts of tensors in the layout's batch contract (see ``layout.py``).

    ``rank``/``world_size`` are the data-parallel coordinates (the DataModule passes the trainer's);
    ``batch_size`` is the block of consecutive local examples one DataLoader worker produces (it must be
    the loader's batch size for workers to keep the rank's order). ``max_documents`` caps the split (the
    fixed validation set). ``infinite``/``shuffle`` default to True for "train", False otherwise.
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
        max_documents: int | None = None,
        infinite: bool | None = None,
        shuffle: bool | None = None,
        tokenize_batch: int = 64,
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < 1 or tokenize_batch < 1:
            raise ValueError(f"batch_size and tokenize_batch must be >= 1, got {batch_size}, {tokenize_batch}")
        if max_documents is not None and max_documents < 1:
            raise ValueError(f"max_documents must be >= 1 or None, got {max_documents}")
        if layout.real_tokens < 2:
            raise ValueError(f"layout {layout.name} consumes {layout.real_tokens} real tokens; need >= 2")
        self.source, self.tokenizer, self.layout = source, tokenizer, layout
        self.split, self.seed = split, seed
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.max_documents = max_documents
        self.infinite = split == "train" if infinite is None else infinite
        self.shuffle = split == "train" if shuffle is None else shuffle
        self.tokenize_batch = tokenize_batch
        self.set_epoch(0)

    # -- state ----------------------------------------------------------------------------------------

    def _signature(self) -> dict:
        """What a saved position means; resuming under a different one would silently change the data."""
        lay = self.layout
        return {
            "split": self.split,
            "seed": self.seed,
            "world_size": self.world_size,
            "rank": self.rank,
            "layout": [lay.name, lay.seq_len, lay.real_tokens, list(lay.pause_ids)],
            "max_documents": self.max_documents,
        }

    def set_epoch(self, epoch: int) -> None:
        """Restart at the first example of ``epoch`` (example numbering restarts at 0)."""
        self._start = {"index": 0, "cursor": _start_cursor(epoch)}
        self._state = copy.deepcopy(self._start)

    def state_dict(self) -> dict:
        """Position after the last example this reader yielded (see the module docstring)."""
        return {"version": _STATE_VERSION, "signature": self._signature(), **copy.deepcopy(self._state)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"stream state has version {state.get('version')!r}, this code reads {_STATE_VERSION}")
        if state["signature"] != self._signature():
            raise ValueError(
                "cannot resume this stream: its state was saved with a different data config\n"
                f"  saved: {state['signature']}\n  now:   {self._signature()}\n"
                "restore the old settings (seed, world size, layout, seq_len, …) or start the data afresh"
            )
        self._start = {"index": int(state["index"]), "cursor": dict(state["cursor"])}
        self._state = copy.deepcopy(self._start)

    @staticmethod
    def merge_states(states: Sequence[dict]) -> dict:
        """One rank-level state from the states of all of a rank's workers (snapshots taken at the same
        consumed batch): examples below the furthest index were all consumed, since the rank consumes
        in order, and the earliest cursor lies before every one not yet consumed."""
        if not states:
            raise ValueError("merge_states needs at least one state")
        if any(s["signature"] != states[0]["signature"] for s in states):
            raise ValueError("cannot merge stream states of different data configs")
        merged = copy.deepcopy(states[0])
        merged["index"] = max(s["index"] for s in states)
        merged["cursor"] = copy.deepcopy(min((s["cursor"] for s in states), key=_cursor_key))
        return merged

    # -- iteration ------------------------------------------------------------------------------------

    def _documents(self, cursor: dict) -> Iterator[tuple[int, int, str]]:
        """(epoch, doc_index, text) from the cursor's document on; forever when infinite."""
        epoch, start = cursor["epoch"], cursor["doc"]
        while True:
            found = False
            for i, text in self.source.iter_documents(
                self.split, epoch=epoch, shuffle_seed=self.seed if self.shuffle else None, start=start
            ):
                if self.max_documents is not None and i >= self.max_documents:
                    break
                found = True
                yield epoch, i, text
            if not self.infinite:
                return
            if not found and start == 0:
                raise RuntimeError(f"the {self.split} split of {type(self.source).__name__} has no documents")
            epoch, start = epoch + 1, 0

    def _token_batches(self, cursor: dict) -> Iterator[list[tuple[int, int, np.ndarray]]]:
        """Batches of (epoch, doc, tokens + <eot>); the cursor's first document loses ``offset`` tokens."""
        eot = np.array([self.tokenizer.vocab.eot_id], dtype=np.int64)
        batch: list[tuple[int, int, str]] = []
        first = True

        def encode(batch):
            nonlocal first
            ids = self.tokenizer.encode_batch_np([t for _, _, t in batch])
            out = [(e, d, np.concatenate([x, eot])) for (e, d, _), x in zip(batch, ids)]
            if first:
                e, d, x = out[0]
                out[0] = (e, d, x[cursor["offset"] :])
                first = False
            return out

        for item in self._documents(cursor):
            batch.append(item)
            if len(batch) == self.tokenize_batch:
                yield encode(batch)
                batch = []
        if batch:
            yield encode(batch)

    def _chunks(self, cursor: dict) -> Iterator[tuple[int, np.ndarray, dict]]:
        """(global example index, real tokens, cursor of its first token), packed from ``cursor`` on."""
        size = self.layout.real_tokens
        step = size - 1
        g = cursor["example"]
        pos = 0  # stream position of example g's first token, counted from the cursor
        buf, buf_pos = np.zeros(0, dtype=np.int64), 0
        # (stream position where a document starts, epoch, doc, its token offset there)
        starts: deque[tuple[int, int, int, int]] = deque()
        doc_offset = cursor["offset"]
        for batch in self._token_batches(cursor):
            parts = [buf[pos - buf_pos :]]
            end = buf_pos + buf.size
            for epoch, doc, tokens in batch:
                starts.append((end, epoch, doc, doc_offset))
                doc_offset = 0
                parts.append(tokens)
                end += tokens.size
            buf, buf_pos = np.concatenate(parts), pos
            while pos + size <= end:
                while len(starts) > 1 and starts[1][0] <= pos:
                    starts.popleft()
                s, epoch, doc, off = starts[0]
                yield g, buf[pos - buf_pos : pos - buf_pos + size], {
                    "epoch": epoch, "doc": doc, "offset": off + pos - s, "example": g,
                }  # fmt: skip
                g, pos = g + 1, pos + step
        tail = buf[pos - buf_pos :]
        if tail.size >= 2:  # the end of a finite stream: a short chunk, padded by the layout
            while len(starts) > 1 and starts[1][0] <= pos:
                starts.popleft()
            s, epoch, doc, off = starts[0]
            yield g, tail, {"epoch": epoch, "doc": doc, "offset": off + pos - s, "example": g}

    def _worker(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _mine(self, j: int, worker: int, num_workers: int) -> bool:
        return (j // self.batch_size) % num_workers == worker

    @staticmethod
    def _tensors(example: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in example.items()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # Training continues from where the last pass stopped; a finite pass always replays from its start
        # (a sanity-check pass must not shift the validation set).
        if not self.infinite:
            self._state = copy.deepcopy(self._start)
        start = copy.deepcopy(self._state)
        first_j = start["index"]
        worker, num_workers = self._worker()
        total = start["cursor"]["example"]
        for g, tokens, cursor in self._chunks(start["cursor"]):
            total = g + 1
            if g % self.world_size != self.rank:
                continue
            j = g // self.world_size
            if j < first_j or not self._mine(j, worker, num_workers):
                continue
            self._state = {"index": j + 1, "cursor": cursor}
            yield self._tensors(self.layout(tokens, g))
        # Finite: pad every rank to the same number of examples, so no rank waits on a collective that
        # another rank never reaches (DDP validation).
        per_rank = -(-total // self.world_size)
        mine = (total - self.rank + self.world_size - 1) // self.world_size
        for j in range(max(mine, first_j), per_rank):
            if self._mine(j, worker, num_workers):
                self._state = {"index": j + 1, "cursor": self._state["cursor"]}
                yield self._tensors(self.layout.empty_example())
