"""CYBDataModule: attributes right after __init__, the batch contract, config errors, Lightning wiring."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from cyb_lightning.data import LocalShards, QuickstartCorpus
from cyb_lightning.data.quickstart import write_shard
from cyb_lightning.datamodule import CYBDataModule, LaggedStateLoader

T, B = 6, 3
TINY_VOCAB = 512  # the session tokenizer's BPE size (conftest); the same value reuses its cache


def _dm(tiny_source, **kw):
    return CYBDataModule(**{"source": tiny_source, "bpe_vocab_size": TINY_VOCAB, "seq_len": T, "batch_size": B, **kw})


def test_fixture_vocab_size(tiny_vocab_size):
    assert tiny_vocab_size == TINY_VOCAB


@pytest.mark.parametrize(
    "layout, k, w, pauses",
    [("none", 3, 1, ()), ("cyb", 0, 1, ()), ("cyb", 3, 4, (3, 4, 5)), ("tbys_random", 3, 1, (3,))],
)
def test_attributes_after_init(tiny_source, tiny_quickstart, layout, k, w, pauses):
    dm = _dm(tiny_source, layout=layout, num_pauses=k)
    assert dm.vocab == tiny_quickstart.tokenizer.vocab
    assert dm.vocab_size == dm.vocab.size == TINY_VOCAB + 11
    assert (dm.pad_id, dm.eot_id, dm.dk_id) == (0, 1, 2)
    assert dm.pause_ids == pauses and dm.steps_per_token == w
    assert dm.tokenizer.encode("hello") == tiny_quickstart.tokenizer.encode("hello")
    assert dm.tokenizer_dir == str(tiny_quickstart.tokenizer_dir)  # the cached one, not a rebuild


@pytest.mark.parametrize("layout, k", [("none", 0), ("cyb", 2), ("tbys_random", 0), ("pause_groups", 2)])
def test_batch_contract(tiny_source, layout, k):
    dm = _dm(tiny_source, layout=layout, num_pauses=k, val_batch_size=2)
    w = dm.steps_per_token
    for loader, bs in ((dm.train_dataloader(), B), (dm.val_dataloader(), 2)):
        batch = next(iter(loader))
        assert set(batch) == {"input_ids", "position_ids", "targets", "target_mask"}
        assert batch["input_ids"].shape == batch["position_ids"].shape == (bs, T * w)
        assert batch["targets"].shape == batch["target_mask"].shape == (bs, T)
        assert batch["input_ids"].dtype == batch["position_ids"].dtype == batch["targets"].dtype == torch.long
        assert batch["target_mask"].dtype == torch.bool
        if layout == "tbys_random":
            assert torch.equal(batch["position_ids"], torch.arange(T).expand(bs, T))
            # Scored: real targets after the first real input (the chunk's context, scored by the chunk before).
            first = (batch["input_ids"] != dm.vocab.pause_ids[0]).int().argmax(1, keepdim=True)
            scored = (batch["targets"] != dm.vocab.pause_ids[0]) & (torch.arange(T) >= first)
            assert torch.equal(batch["target_mask"], scored)
        elif layout == "pause_groups":
            pause_ids = torch.tensor(dm.pause_ids)
            pause = torch.isin(batch["input_ids"], pause_ids)
            assert pause.any() and torch.equal(batch["target_mask"], ~torch.isin(batch["targets"], pause_ids))
            # A real token one position past the one before it, a pause at the position before it.
            step = batch["position_ids"].diff(dim=1)
            assert torch.equal(step, (~pause[:, 1:]).long())
        else:
            assert torch.equal(batch["position_ids"], torch.arange(T).repeat_interleave(w).expand(bs, -1))
            assert batch["target_mask"].all()
            groups = batch["input_ids"].view(bs, T, w)
            assert torch.equal(groups[:, :, 1:], torch.tensor(dm.pause_ids).expand(bs, T, w - 1))
            assert torch.equal(groups[:, 1:, 0], batch["targets"][:, :-1])  # next real token


def test_validation_is_fixed(tiny_source):
    dm = _dm(tiny_source, layout="cyb", num_pauses=1, val_documents=2)
    a, b = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert len(a) == len(b) > 0
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert len(list(_dm(tiny_source, val_documents=None).val_dataloader())) > len(a)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layout="pauses"), "unknown layout"),
        (dict(num_pauses=9), "num_pauses=9"),
        (dict(seq_len=0), "seq_len"),
        (dict(batch_size=0), "batch_size"),
        (dict(num_workers=-1), "num_workers"),
        (dict(val_documents=0), "val_documents"),
        (dict(layout="tbys_random", pause_fraction=1.5), "pause_fraction"),
    ],
)
def test_bad_config_errors(tiny_source, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _dm(tiny_source, **kwargs)


def test_local_shards_need_and_build_a_tokenizer(tmp_path):
    for split, n in (("train", 30), ("validation", 3)):
        write_shard(tmp_path / f"c4-{split}.00000-of-00001.json.gz", [f"{split} text {i} " * 20 for i in range(n)])
    with pytest.raises(ValueError, match="tokenizer_dir is required"):
        CYBDataModule(source=LocalShards(str(tmp_path)), bpe_vocab_size=300)
    dm = CYBDataModule(source=LocalShards(str(tmp_path)), tokenizer_dir=str(tmp_path / "tok"), bpe_vocab_size=300,
                       seq_len=T, batch_size=B)  # fmt: skip
    assert (tmp_path / "tok" / "tokenizer.json").is_file() and dm.vocab_size <= 311
    assert next(iter(dm.train_dataloader()))["input_ids"].shape == (B, T * 4)


def test_lagged_loader_state(tiny_source):
    dm = _dm(tiny_source)
    plain, lagged = dm.train_dataloader(), LaggedStateLoader(dm.stream("train"), batch_size=B, lookahead=1)
    a, b = iter(plain), iter(lagged)
    for _ in range(3):
        next(a), next(b)
    assert lagged.state_dict()["dataset_state"]["index"] == 2 * B  # the prefetched third batch is not counted
    assert plain.state_dict()["dataset_state"]["index"] == 3 * B


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_loader_state_resumes_exactly(tiny_source, num_workers):
    dm = _dm(tiny_source, layout="tbys_random", num_workers=num_workers)
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    expected = [next(it) for _ in range(4)]
    del it
    fresh = dm.train_dataloader()
    fresh.load_state_dict(state)
    got = [b for _, b in zip(range(4), fresh)]
    for x, y in zip(got, expected):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["target_mask"], y["target_mask"])


def test_jsonargparse_builds_it_from_config(tiny_source):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(CYBDataModule, "data")
    cfg = parser.parse_object({"data": {
        "source": {"class_path": "cyb_lightning.data.QuickstartCorpus",
                   "init_args": {"root": tiny_source.root, **tiny_source.build_kwargs}},
        "bpe_vocab_size": TINY_VOCAB, "layout": "cyb", "num_pauses": 2, "seq_len": T,
    }})  # fmt: skip
    dm = parser.instantiate(cfg).data
    assert isinstance(dm.source, QuickstartCorpus) and dm.steps_per_token == 3


class _TinyLM(L.LightningModule):
    """Just enough model to drive the loaders through a Trainer; remembers the batches it trained on."""

    def __init__(self, vocab_size: int, steps_per_token: int):
        super().__init__()
        self.w = steps_per_token
        self.emb = torch.nn.Embedding(vocab_size, 8)
        self.out = torch.nn.Linear(8, vocab_size)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, _):
        self.seen.append(batch["input_ids"].clone())
        b, t = batch["targets"].shape
        logits = self.out(self.emb(batch["input_ids"])).view(b, t, self.w, -1)[:, :, -1]
        m = batch["target_mask"]
        return torch.nn.functional.cross_entropy(logits[m], batch["targets"][m])

    def validation_step(self, batch, _):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _RecordingLM(_TinyLM):
    """Saves the batches each rank trained on (ddp_spawn runs the fit in child processes)."""

    def __init__(self, vocab_size: int, steps_per_token: int, out: str):
        super().__init__(vocab_size, steps_per_token)
        self.out_path = out

    def on_train_end(self):
        torch.save(self.seen, f"{self.out_path}.rank{self.global_rank}.pt")


def _fit(tiny_source, root, run, max_steps, ckpt_path=None, num_workers=0, devices=1, **dm_kw):
    """Fit the tiny model, checkpointing every 3 steps under root/run; returns per-rank trained batches."""
    dm = _dm(tiny_source, layout="tbys_random", num_workers=num_workers, **dm_kw)
    model = _RecordingLM(dm.vocab_size, dm.steps_per_token, str(root / run))
    save = L.pytorch.callbacks.ModelCheckpoint(root / run, "{step}", every_n_train_steps=3, save_top_k=-1)
    trainer = L.Trainer(
        max_steps=max_steps, limit_val_batches=0, logger=False, callbacks=[save], enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, accelerator="cpu", devices=devices,
        strategy="ddp" if devices > 1 else "auto",
    )  # fmt: skip
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    trainer.strategy.barrier()
    return [torch.load(f"{root / run}.rank{r}.pt") for r in range(devices)]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _check_resume_twice(tiny_source, root, devices, workers_first, workers_then):
    """9 steps straight vs 3 → resume to 6 → resume to 9: each rank trains on exactly the same batches."""
    straight = _fit(tiny_source, root, "straight", 9, num_workers=workers_first, devices=devices)
    once = _fit(tiny_source, root, "once", 6, root / "straight" / "step=3.ckpt", workers_then, devices)
    twice = _fit(tiny_source, root, "twice", 9, root / "once" / "step=6.ckpt", workers_first, devices)
    for r in range(devices):
        assert len(straight[r]) == 9 and len(once[r]) == 3 and len(twice[r]) == 3
        assert _same(straight[r][3:6], once[r]), f"rank {r}: first resume"
        assert _same(straight[r][6:9], twice[r]), f"rank {r}: second resume"
    if devices > 1:  # the ranks trained on different data
        assert not any(torch.equal(x, y) for x, y in zip(straight[0], straight[1]))
    return straight


@pytest.mark.parametrize("workers", [(0, 0), pytest.param((2, 2), marks=pytest.mark.slow), (2, 0)])
def test_trainer_resumes_exactly_twice_in_a_row(tiny_source, tmp_path, workers):
    """One process: the loader state survives Lightning's one-batch prefetch, a second resume, and a change
    of the number of DataLoader workers (the saved state is worker independent)."""
    _check_resume_twice(tiny_source, tmp_path, 1, *workers)


def _ddp_process(rank, world, port, tiny_source, root):
    """One DDP rank started by the test itself (LOCAL_RANK set: Lightning launches nothing) that runs all
    three fits in turn: one process start instead of three keeps the test within a minute."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")  # fmt: skip
    torch.set_num_threads(1)
    _check_resume_twice(tiny_source, root, world, 2, 0)


@pytest.mark.slow
def test_ddp_resumes_every_rank_exactly(tiny_source, tmp_path):
    """2-process DDP (gloo): every rank's stream state is in the checkpoint (Lightning alone would save
    rank 0's) and each rank resumes its own, twice in a row, with 2 then 0 then 2 DataLoader workers."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_ddp_process, args=(2, port, tiny_source, tmp_path), nprocs=2, start_method="spawn")


def test_resume_with_another_world_size_is_refused(tiny_source):
    dm = _dm(tiny_source)
    state = {"version": 1, "world_size": 2, "train_streams": [{}, {}]}
    with pytest.raises(RuntimeError, match="saved by 2 processes but the run now has 1"):
        dm.load_state_dict(state)
    dm.load_state_dict({})  # no state (e.g. an old checkpoint): nothing to do


def test_datamodule_state_is_worker_independent(tiny_source):
    """The DataModule's state holds the merged stream state; a fresh stream resumes it with any workers."""
    dm = _dm(tiny_source, num_workers=2)
    loader = dm.train_dataloader()
    it = iter(loader)
    batches = [next(it) for _ in range(7)]
    state = dm.state_dict()
    assert state["world_size"] == 1 and state["train_streams"][0]["index"] == 7 * B
    more = [next(it) for _ in range(3)]
    del it
    for workers in (0, 1, 2):
        fresh = _dm(tiny_source, num_workers=workers)
        fresh.load_state_dict(state)
        got = [b for _, b in zip(range(3), fresh.train_dataloader())]
        assert _same([b["input_ids"] for b in got], [b["input_ids"] for b in more]), workers
    assert batches
