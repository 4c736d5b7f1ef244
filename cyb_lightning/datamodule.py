"""The LightningDataModule: a text source, a tokenizer, a layout and the packed stream, wired together.

Everything the model needs to size itself (vocabulary ids, steps per token) is an attribute right after
``__init__``, because LightningCLI links them into the model with ``apply_on="instantiate"``; so the
corpus and tokenizer are built (or, normally, loaded from their cache) in ``__init__``. Both caches are
file-locked, so every DDP process may call it.

Batches follow the contract in ``cyb_lightning/data/layout.py``: ``input_ids``/``position_ids`` long
``[B, T·W]``, ``targets`` long ``[B, T]``, ``target_mask`` bool ``[B, T]``.
"""

from __future__ import annotations

import copy
import os
from collections import deque
from collections.abc import Iterator
from typing import Any, Literal

import lightning as L
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchdata.stateful_dataloader import StatefulDataLoader

from .data.curriculum import Curriculum
from .data.hf_tokenizer import HFTokenizer
from .data.layout import LAYOUT_CLASSES, make_layout
from .data.sources import QuickstartCorpus, TextSource, source_tokenizer
from .data.stream import PackedStream, check_pairs
from .data.tokenizer import standard_vocab


class LaggedStateLoader(StatefulDataLoader):
    """A StatefulDataLoader whose ``state_dict()`` lags ``lookahead`` batches behind what it yielded.

    Lightning's training loop fetches one batch ahead (to know whether the next one is the last), so when
    it checkpoints after training on batch k the loader has already handed out batch k + 1, and resuming
    from that state would silently skip a batch. With ``lookahead=1`` the saved state is the one right
    after batch k: what the model actually consumed. ``lookahead=0`` is a plain StatefulDataLoader.
    """

    def __init__(self, *args: Any, lookahead: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        self.lookahead = lookahead
        self._history: deque[dict] = deque(maxlen=lookahead + 1)

    def __iter__(self) -> Iterator:
        iterator = super().__iter__()
        return self._tracked(iterator) if self.lookahead else iterator

    def _tracked(self, iterator: Iterator) -> Iterator:
        self._history.clear()
        self._history.append(copy.deepcopy(super().state_dict()))
        for batch in iterator:
            self._history.append(copy.deepcopy(super().state_dict()))
            yield batch

    def state_dict(self) -> dict[str, Any]:
        if self.lookahead and self._history:
            return copy.deepcopy(self._history[0])
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if getattr(self, "resumed_by_datamodule", False):
            # The DataModule already put this rank's own stream state in (Lightning would load rank 0's).
            return
        # Not StatefulDataLoader's own restore: that puts each worker back at its own position and the
        # round robin at the saved worker, which ties the state to the worker count. The stream's merged
        # state resumes with any number of workers, and a fresh loader starts at worker 0 as it expects.
        self._history.clear()
        self.dataset.load_state_dict(self.merged_stream_state(state_dict))

    @staticmethod
    def merged_stream_state(state: dict[str, Any]) -> dict:
        """The stream state inside a StatefulDataLoader state, merged over its workers."""
        if "dataset_state" in state:  # no workers
            return copy.deepcopy(state["dataset_state"])
        workers = state["_snapshot"]["_worker_snapshots"]
        return PackedStream.merge_states([workers[k]["dataset_state"] for k in sorted(workers)])

    def stream_state(self) -> dict:
        """The stream's state as of :meth:`state_dict`, merged over workers: any worker count resumes it."""
        return self.merged_stream_state(self.state_dict())

    def skipped(self) -> dict[str, int]:
        """What this process's stream and its workers skipped so far, per reason (the sources' counters)."""
        return dict(self.stream_state().get("skipped", {}))


def filler_ids(tokenizer, fillers: list[str], pause_ids: tuple[int, ...]) -> tuple[int, ...]:
    """The one text id of each filler (``data.pause_fillers``), one per pause the layout inserts."""
    if len(fillers) != len(pause_ids):
        raise ValueError(
            f"data.pause_fillers has {len(fillers)} texts but the layout inserts {len(pause_ids)} pause ids; "
            "give one filler per pause (or none, to draw the rows)"
        )
    out = []
    for text in fillers:
        ids = [i for i in tokenizer.encode(text) if i not in tokenizer.role_ids]  # no BOS
        if len(ids) != 1:
            raise ValueError(
                f"data.pause_fillers: {text!r} is {len(ids)} tokens ({ids}) for this tokenizer; each filler "
                "must be exactly one token (try a space, a newline, '...' or '.')"
            )
        out.append(ids[0])
    return tuple(out)


class CYBDataModule(L.LightningDataModule):
    """C4-style text (quickstart corpus by default) packed into layout examples.

    Args:
        source: where documents come from (``class_path`` of a :class:`TextSource`); None → the offline
            :class:`QuickstartCorpus` with its defaults.
        tokenizer_dir: where the tokenizer is found, or built from the source's training split when
            absent; None → the source's default (``data/quickstart/tokenizer-<bpe_vocab_size>`` for the
            quickstart corpus; other sources need it set).
        bpe_vocab_size: BPE size to train (text ids). The attribute ``vocab_size`` is the total number
            of ids, reserved ones included (what the embedding needs).
        layout: ``none`` (baseline), ``cyb`` (K pauses after every token), ``tbys_random`` (TBYS pause
            pretraining), ``pause_groups`` (pause pretraining with the K distinct pauses at shared positions
            that CYB fine-tuning reads, after ``pause_fraction`` of the tokens), ``variable`` (CYB "recipe 2":
            each token is granted 0 … K pauses drawn from ``omega``; validation and test then grant all K, so
            the model's own DK decides, as at inference), ``tbys_finetune`` (TBYS pause fine-tuning on the
            prompt/completion pairs of a ``PromptCompletionSource``: M_ft pauses after the prompt, loss on
            the completion), ``answer_pauses`` (the K pauses only before the scored targets of a source that
            labels them, e.g. the answer of a ``DigitSum`` problem: the answer's own pauses).
        num_pauses: K for ``cyb``, ``pause_groups`` and ``variable`` (0 … 8; CYB uses 3); M_ft, the pauses
            appended after each prompt, for ``tbys_finetune`` (TBYS: 10 or 50). Ignored by the others.
        omega: ``variable`` only: the world's distribution over granted steps 1 … K+1 (None: uniform).
        pause_fraction: share of ``tbys_random``'s sequence that is pauses (TBYS: 0.1); share of the real
            tokens that a ``pause_groups`` group follows.
        seq_len: T, real tokens per example (inputs are T·W long).
        batch_size / val_batch_size: per-device batch sizes (val defaults to batch_size).
        num_workers: DataLoader workers per device.
        seed: shard order per epoch and the random pause slots (``tbys_random``, ``pause_groups``, ``variable``).
        val_documents: size of the fixed validation set (first documents of the validation split);
            None → all of it.
        tokenizer_train_documents: how many training documents train the BPE (None → all).
        tokenize_batch: documents per tokenizer call in the stream.
        lanes: independent packing streams per rank (see ``data/stream.py``): DataLoader workers share
            them out, so use a ``num_workers`` that divides ``lanes``; changing it changes the data order
            (a resumed run must keep it). Capped at the rank's shard count.
        max_document_chars: longer documents are tokenized in pieces of this many characters.
        tokenizer: a pretrained model's tokenizer (``class_path: cyb_lightning.data.hf_tokenizer.HFTokenizer``)
            to fine-tune that model (docs/finetune.md); None → our own BPE (``tokenizer_dir``,
            ``bpe_vocab_size`` and ``tokenizer_train_documents`` apply only then).
        pause_fillers: one text per pause id (e.g. ``[" ", "\n", "..."]``), each a single token of the
            tokenizer: the pause rows a pretrained model never read start as copies of these tokens' input
            rows (a filler it already reads as "nothing new") instead of draws from the embedding's
            statistics. None: drawn. Linked into the model as ``pause_filler_ids``.
        curriculum: ``{start, ramp_steps}`` (``data/curriculum.py``): training draws rows of level ≤ a cap that
            rises linearly with the optimizer step; needs a source with one labelled problem per row
            (``DigitSum``). Part of the stream's order: a resumed run draws exactly the same rows.
    """

    def __init__(
        self,
        source: TextSource | None = None,
        tokenizer_dir: str | None = None,
        bpe_vocab_size: int = 8192,
        layout: str = "cyb",
        num_pauses: int = 3,
        pause_fraction: float = 0.1,
        omega: list[float] | None = None,
        seq_len: int = 256,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 1234,
        val_documents: int | None = 1000,
        tokenizer_train_documents: int | None = 200_000,
        tokenize_batch: int = 64,
        lanes: int = 8,
        max_document_chars: int = 100_000,
        tokenizer: HFTokenizer | None = None,
        pause_fillers: list[str] | None = None,
        curriculum: Curriculum | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["source", "tokenizer"])  # objects; the CLI saves their config
        # Check the layout config against the standard reserved ids before any (slow) build.
        check_vocab = standard_vocab() if tokenizer is None else tokenizer.vocab
        checked = make_layout(
            layout, seq_len, check_vocab, num_pauses=num_pauses, pause_fraction=pause_fraction, omega=omega
        )
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("tokenize_batch", tokenize_batch)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"val_batch_size must be >= 1 or None, got {val_batch_size}")
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes}")
        if max_document_chars < 16:
            raise ValueError(f"max_document_chars must be >= 16, got {max_document_chars}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if val_documents is not None and val_documents < 1:
            raise ValueError(f"val_documents must be >= 1 or None (all), got {val_documents}")
        if tokenizer_train_documents is not None and tokenizer_train_documents < 1:
            raise ValueError(f"tokenizer_train_documents must be >= 1 or None (all), got {tokenizer_train_documents}")
        if bpe_vocab_size < 256:
            raise ValueError(f"bpe_vocab_size must be >= 256, one id per byte; got {bpe_vocab_size}")

        self.source = source if source is not None else QuickstartCorpus()
        labelled = hasattr(self.source, "target_difficulty")
        if labelled and not checked.aligned_targets:
            aligned = ", ".join(n for n, c in LAYOUT_CLASSES.items() if c.aligned_targets)
            raise ValueError(
                f"{type(self.source).__name__} labels each target with its difficulty, which needs targets aligned "
                f"with the chunk's tokens; {layout} moves them. Use one of the layouts {aligned}"
            )
        if checked.answers_only and not labelled:
            raise ValueError(
                f"layout {layout} puts pauses only before the scored targets, which {type(self.source).__name__} "
                "does not label: use a source that labels them (DigitSum, WindowLookup) or layout cyb"
            )
        row = getattr(self.source, "row_tokens", None)
        if getattr(self.source, "one_example_per_document", False) and row is not None and row > seq_len + 1:
            raise ValueError(
                f"{type(self.source).__name__} rows have up to {row} tokens (end of text included) but data.seq_len="
                f"{seq_len} holds {seq_len + 1}: set data.seq_len to at least {row - 1}"
            )
        check_pairs(self.source, checked)
        if tokenizer is not None:
            self.tokenizer, self.tokenizer_dir, manifest = tokenizer, tokenizer.name_or_path, {}
        else:
            self.tokenizer, self.tokenizer_dir, manifest = source_tokenizer(
                self.source, bpe_vocab_size, tokenizer_dir, tokenizer_train_documents
            )
        self.layout_spec = make_layout(
            layout,
            seq_len,
            self.tokenizer.vocab,
            num_pauses=num_pauses,
            pause_fraction=pause_fraction,
            seed=seed,
            omega=omega,
        )
        # What validation and test read (a variable-pause model: every token may use all K, its own DK decides).
        self.eval_layout_spec = self.layout_spec.for_evaluation()

        # The attributes the CLI links into the model.
        self.vocab = self.tokenizer.vocab
        self.vocab_size = self.vocab.size
        self.bpe_vocab_size = bpe_vocab_size
        self.pad_id, self.eot_id, self.dk_id = self.vocab.pad_id, self.vocab.eot_id, self.vocab.dk_id
        self.pause_ids = self.layout_spec.pause_ids  # the pause ids this layout inserts (vocab has them all)
        self.reserved_ids = (self.dk_id, *self.vocab.pause_ids)  # never text, never a target in pretraining
        self.steps_per_token = self.layout_spec.steps_per_token
        self.pause_filler_ids = filler_ids(self.tokenizer, pause_fillers, self.pause_ids) if pause_fillers else ()

        self.layout, self.num_pauses, self.pause_fraction = layout, num_pauses, pause_fraction
        self.seq_len, self.batch_size = seq_len, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.val_documents, self.tokenize_batch = val_documents, tokenize_batch
        self.curriculum = curriculum
        self.lanes, self.max_document_chars = lanes, max_document_chars
        self._train_loader: LaggedStateLoader | None = None
        self._resume_stream: dict | None = None  # this rank's train stream state from a checkpoint
        stats = manifest.get("stats", {})
        rank_zero_info(
            f"CYBDataModule: {self.source.describe()}; tokenizer {self.tokenizer_dir} "
            f"({self.vocab_size} ids, {self.tokenizer.num_reserved} reserved"
            + (f", trained on {stats['train_tokens']:,} tokens" if "train_tokens" in stats else "")
            + f"), layout {layout} (W={self.steps_per_token}), T={seq_len}"
        )

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def stream(self, split: Literal["train", "validation", "test"]) -> PackedStream:
        """A fresh stream for ``split`` on this process's rank (also useful outside a Trainer)."""
        rank, world = self._rank_world()
        train = split == "train"
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        return PackedStream(
            self.source,
            self.tokenizer,
            self.layout_spec if train else self.eval_layout_spec,
            split=split,
            seed=self.seed,
            rank=rank,
            world_size=world,
            batch_size=self.batch_size if train else self.val_batch_size,
            lanes=self.lanes,
            max_documents=None if train else self.val_documents,
            tokenize_batch=self.tokenize_batch,
            max_document_chars=self.max_document_chars,
            curriculum=self.curriculum if train else None,
            batches_per_step=accumulate if train else 1,
        )

    def _loader(self, stream: PackedStream, train: bool) -> LaggedStateLoader:
        if self.num_workers > 0:
            # Forked workers cannot use the tokenizer's thread pool once the parent has; saying so up front
            # silences the tokenizers warning and the (rare) deadlock it guards against.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return LaggedStateLoader(
            stream,
            batch_size=stream.batch_size,
            num_workers=self.num_workers,
            # Train: workers keep their position between Lightning "epochs" of the infinite stream.
            persistent_workers=train and self.num_workers > 0,
            # Under a Trainer the saved state must lag Lightning's one-batch prefetch (see the class).
            lookahead=1 if train and self.trainer is not None else 0,
        )

    def train_dataloader(self) -> LaggedStateLoader:
        stream = self.stream("train")
        for message in stream.plan_warnings(self.num_workers):
            rank_zero_warn(message)
        resumed = self._resume_stream is not None
        if resumed:
            stream.load_state_dict(self._resume_stream)  # raises on any other data config
            self._resume_stream = None
        loader = self._loader(stream, train=True)
        loader.resumed_by_datamodule = resumed
        self._train_loader = loader
        return loader

    # -- checkpointing: every rank's stream state ---------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Every rank's training-stream state (Lightning itself saves the loader state of rank 0 only).

        Called on every rank while a checkpoint is assembled, so the gather is a collective all ranks
        reach. The states are worker independent (merged), so a run may resume with other ``num_workers``.
        """
        if self._train_loader is None:
            return {}
        own = self._train_loader.stream_state()
        rank, world = self._rank_world()
        states: list[Any] = [own]
        if world > 1 and dist.is_available() and dist.is_initialized():
            states = [None] * world
            dist.all_gather_object(states, own)
        return {"version": 1, "world_size": world, "train_streams": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        rank, world = self._rank_world()
        if state_dict.get("version") != 1:
            raise ValueError(f"data module state has version {state_dict.get('version')!r}; this code reads 1")
        saved = state_dict["world_size"]
        if saved != world:
            raise RuntimeError(
                f"this checkpoint's data streams were saved by {saved} processes but the run now has {world}: "
                "exact resume needs the same world size (devices x nodes). Resume with the old world size, or "
                "start the data afresh (load only the weights, e.g. a new run with model weights from the ckpt)"
            )
        self._resume_stream = state_dict["train_streams"][rank]

    def val_dataloader(self) -> LaggedStateLoader:
        return self._loader(self.stream("validation"), train=False)

    def test_dataloader(self) -> LaggedStateLoader:
        """The test split where the source has one (the synthetic tasks: held out from validation, where
        settings are chosen), else the fixed validation set again (C4 has no test split; CYB reports on C4
        validation). The first ``val_documents`` documents either way."""
        return self._loader(self.stream("test" if "test" in self.source.splits else "validation"), train=False)
