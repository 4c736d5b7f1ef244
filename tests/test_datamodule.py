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


@pytest.mark.parametrize("layout, k", [("none", 0), ("cyb", 2), ("tbys_random", 0)])
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
            assert torch.equal(batch["target_mask"], batch["targets"] != dm.vocab.pause_ids[0])
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


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_trainer_resumes_the_stream_from_a_checkpoint(tiny_source, tmp_path, num_workers):
    """Lightning saves the loader state in the checkpoint and restores it on ckpt_path, without losing the
    batch its loop had prefetched."""

    def fit(run, ckpt_path=None):
        dm = _dm(tiny_source, layout="cyb", num_pauses=1, num_workers=num_workers)
        model = _TinyLM(dm.vocab_size, dm.steps_per_token)
        save = L.pytorch.callbacks.ModelCheckpoint(tmp_path / run, "{step}", every_n_train_steps=3, save_top_k=-1)
        trainer = L.Trainer(
            max_steps=6, limit_val_batches=0, logger=False, callbacks=[save], enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model.seen

    straight = fit("straight")
    resumed = fit("resumed", tmp_path / "straight" / "step=3.ckpt")
    assert len(straight) == 6 and len(resumed) == 3
    assert all(torch.equal(a, b) for a, b in zip(straight[3:], resumed))
    assert not torch.equal(straight[0], resumed[0])
