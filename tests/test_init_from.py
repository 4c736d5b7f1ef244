"""``init_from``: fine-tune from the decoder of one of our own runs (the paper's protocol, our own decoder)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from cyb_lightning.losses import CYBAP, CrossEntropy, TBYSPerToken
from cyb_lightning.model import GPTConfig
from cyb_lightning.module import CYBModule

V, DK, PAUSES, T = 40, 2, (3, 4, 5), 8
RESERVED = (DK, *PAUSES)  # DK and every pause id of this vocabulary: never text, never a pretraining target


def laid_out(real: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The CYB layout of one row of T + 1 real tokens (k = 0: the plain baseline)."""
    w = k + 1
    ids = torch.empty(T, w, dtype=torch.long)
    ids[:, 0] = real[:-1]
    ids[:, 1:] = torch.tensor(PAUSES[:k], dtype=torch.long)
    return {"input_ids": ids.reshape(-1), "position_ids": torch.arange(T).repeat_interleave(w),
            "targets": real[1:].clone(), "target_mask": torch.ones(T, dtype=torch.bool)}


class Rows(Dataset):
    def __init__(self, k: int, n: int = 16):
        g = torch.Generator().manual_seed(0)
        self.rows = [laid_out(torch.randint(6, V, (T + 1,), generator=g), k) for _ in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def make(loss, k: int, **kw) -> CYBModule:
    return CYBModule(GPTConfig(n_layer=2, n_head=2, d_model=32, max_position=64), loss, vocab_size=V, dk_id=DK,
                     steps_per_token=k + 1, seq_len=T, warmup_steps=1, **kw)


def fit(module, k, tmp_path, steps, ckpt_path=None, callbacks=()):
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=tmp_path, callbacks=list(callbacks))
    trainer.fit(module, DataLoader(Rows(k), batch_size=4), ckpt_path=ckpt_path, weights_only=False)
    return trainer


class Snapshot(L.Callback):
    """The decoder weights when training starts (after init_from and any checkpoint restore)."""

    def on_train_start(self, trainer, module):
        self.state = {k: v.detach().clone() for k, v in module.decoder.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_but_rows(a: dict, b: dict, rows) -> bool:
    """Equal except ``rows`` of the (tied) embedding, which differ in every one of them."""
    rows = list(rows)
    keep = [i for i in range(V) if i not in rows]
    emb = ("embed.weight", "head.weight")
    return (same({k: v for k, v in a.items() if k not in emb}, {k: v for k, v in b.items() if k not in emb})
            and all(torch.equal(a[k][keep], b[k][keep]) and (a[k][rows] != b[k][rows]).any(-1).all() for k in emb))


def mean_cos(weight: torch.Tensor, ids) -> float:
    x = torch.nn.functional.normalize(weight[list(ids)].float(), dim=-1)
    return float(((x @ x.T).sum() - len(ids)) / (len(ids) * (len(ids) - 1)))


def pretrained_baseline(tmp, steps: int):
    """(checkpoint, decoder weights) of our own no-pause baseline run (CrossEntropy, layout none)."""
    torch.manual_seed(0)
    module = make(CrossEntropy(), 0, lr=1e-2)
    trainer = fit(module, 0, tmp, steps=steps)
    path = tmp / "baseline.ckpt"
    trainer.save_checkpoint(path)
    return path, {k: v.detach().clone() for k, v in module.decoder.state_dict().items()}


@pytest.fixture(scope="module")
def baseline_ckpt(tmp_path_factory):
    """A short baseline run."""
    return pretrained_baseline(tmp_path_factory.mktemp("baseline"), steps=3)


@pytest.mark.parametrize("loss", [CYBAP(), TBYSPerToken()], ids=["cyb_ap", "tbys"])
def test_finetune_with_pauses_starts_from_the_baseline_decoder(baseline_ckpt, loss, tmp_path):
    path, weights = baseline_ckpt
    torch.manual_seed(1)  # a different random init, which init_from must replace
    module = make(loss, 3, init_from=str(path), lr=1e-2)
    snap = Snapshot()
    fit(module, 3, tmp_path, steps=2, callbacks=[snap])
    assert same_but_rows(snap.state, weights, [DK])  # DK, which the baseline never trained, is drawn afresh
    assert not same(module.decoder.state_dict(), snap.state)  # and it trained from there


def test_resuming_ignores_init_from(baseline_ckpt, tmp_path):
    path, weights = baseline_ckpt
    module = make(CYBAP(), 3, init_from=str(path), lr=1e-2)
    trainer = fit(module, 3, tmp_path, steps=2)
    trainer.save_checkpoint(tmp_path / "cyb.ckpt")
    resumed_from = {k: v.detach().clone() for k, v in module.decoder.state_dict().items()}

    snap = Snapshot()
    fit(make(CYBAP(), 3, init_from=str(path), lr=1e-2), 3, tmp_path, steps=4, ckpt_path=tmp_path / "cyb.ckpt",
        callbacks=[snap])
    assert same(snap.state, resumed_from) and not same(snap.state, weights)

    # load_from_checkpoint, then a new fit: the loaded weights win too.
    loaded = CYBModule.load_from_checkpoint(tmp_path / "cyb.ckpt", weights_only=False)
    snap = Snapshot()
    fit(loaded, 3, tmp_path, steps=1, callbacks=[snap])
    assert same(snap.state, resumed_from)


def test_init_from_a_mismatched_decoder_fails_clearly(baseline_ckpt, tmp_path):
    path, _ = baseline_ckpt
    module = CYBModule(GPTConfig(n_layer=2, n_head=2, d_model=48), CYBAP(), vocab_size=V, dk_id=DK,
                       steps_per_token=4, seq_len=T, init_from=str(path))
    module.configure_model()
    with pytest.raises(ValueError, match="does not match"):
        module.load_decoder_weights(str(path))
    with pytest.raises(FileNotFoundError):
        module.load_decoder_weights(str(tmp_path / "missing.ckpt"))


def test_init_from_a_distributed_checkpoint_folder(baseline_ckpt, tmp_path):
    """FSDP2 runs (ModelParallelStrategy) save a torch.distributed.checkpoint folder: {"state_dict": …}."""
    import torch.distributed.checkpoint as dcp

    path, weights = baseline_ckpt
    state = {"state_dict": torch.load(path, weights_only=False)["state_dict"]}
    folder = tmp_path / "baseline_dcp"
    dcp.save(state, checkpoint_id=folder)
    module = make(CYBAP(), 3, init_from=str(folder))
    module.configure_model()
    module.load_decoder_weights(str(folder))
    assert same_but_rows(module.decoder.state_dict(), weights, [DK])


@pytest.fixture(scope="module")
def collapsed_ckpt(tmp_path_factory):
    """A baseline pretrained until the rows that are never a target collapse (our GPT ties its embeddings)."""
    return pretrained_baseline(tmp_path_factory.mktemp("collapsed"), steps=80)


def test_pause_and_dk_rows_are_distinct_at_the_start_of_finetuning(collapsed_ckpt, tmp_path):
    path, weights = collapsed_ckpt
    assert mean_cos(weights["embed.weight"], RESERVED) > 0.9  # collapsed in pretraining (random init: ≈ 0)
    module = make(CYBAP(), 3, init_from=str(path), lr=1e-2, pause_ids=PAUSES, reserved_ids=RESERVED)
    snap = Snapshot()
    fit(module, 3, tmp_path, steps=1, callbacks=[snap])
    emb, head = snap.state["embed.weight"], snap.state["head.weight"]
    assert mean_cos(emb, PAUSES) < 0.3  # the K pauses start distinct …
    dk_out = torch.nn.functional.normalize(head[DK], dim=0)
    for p in PAUSES:  # … and DK's output row is not a pause input row in disguise
        assert abs(float(dk_out @ torch.nn.functional.normalize(emb[p], dim=0))) < 0.5
    text = [i for i in range(V) if i not in RESERVED]
    norms = emb[list(RESERVED)].norm(dim=-1).mean() / emb[text].norm(dim=-1).mean()
    assert 0.5 < norms < 2  # drawn like the text rows, from their mean and covariance
    assert same_but_rows(snap.state, weights, RESERVED)  # the rest is the pretrained decoder


def test_init_from_keeps_the_reserved_rows_its_checkpoint_trained(collapsed_ckpt, tmp_path):
    path, _ = collapsed_ckpt
    tuned = make(CYBAP(), 3, init_from=str(path), lr=1e-2, pause_ids=PAUSES, reserved_ids=RESERVED)
    fit(tuned, 3, tmp_path, steps=2).save_checkpoint(tmp_path / "cyb.ckpt")
    assert torch.load(tmp_path / "cyb.ckpt", weights_only=False)["trained_rows"] == list(RESERVED)
    again = make(CYBAP(), 3, pause_ids=PAUSES, reserved_ids=RESERVED)  # continue the CYB fine-tune: all kept
    again.configure_model()
    again.load_decoder_weights(str(tmp_path / "cyb.ckpt"))
    assert same(again.decoder.state_dict(), tuned.decoder.state_dict())

    # A TBYS pause-pretraining run read <pause1> and trained no DK: a CYB fine-tune keeps <pause1> only.
    pre = make(CrossEntropy(), 0, lr=1e-2, pause_ids=PAUSES[:1], reserved_ids=RESERVED)
    fit(pre, 0, tmp_path, steps=1).save_checkpoint(tmp_path / "pre.ckpt")
    cyb = make(CYBAP(), 3, pause_ids=PAUSES, reserved_ids=RESERVED)
    cyb.configure_model()
    cyb.load_decoder_weights(str(tmp_path / "pre.ckpt"))
    assert same_but_rows(cyb.decoder.state_dict(), pre.decoder.state_dict(), [DK, *PAUSES[1:]])


def test_untrained_pause_rows_start_as_their_fillers_at_init_from(collapsed_ckpt, tmp_path):
    path, weights = collapsed_ckpt
    fillers = (10, 11, 12)
    module = make(CYBAP(), 3, init_from=str(path), pause_ids=PAUSES, reserved_ids=RESERVED, pause_filler_ids=fillers)
    module.configure_model()
    module.load_decoder_weights(str(path))
    emb = module.decoder.state_dict()["embed.weight"]
    torch.testing.assert_close(emb[list(PAUSES)], weights["embed.weight"][list(fillers)], rtol=0, atol=0)
    assert same_but_rows(module.decoder.state_dict(), weights, RESERVED)  # DK drawn; text rows as pretrained
    assert not torch.allclose(emb[DK], weights["embed.weight"][DK])


def test_a_checkpoint_from_before_the_trained_rows_record_keeps_the_rows_its_settings_trained(collapsed_ckpt, tmp_path):
    """A CYB checkpoint written before ``trained_rows`` existed: its hyperparameters (a DK loss, the pause ids
    its layout inserted) say which reserved rows it trained, and a later fine-tune keeps them."""
    path, _ = collapsed_ckpt
    tuned = make(CYBAP(), 3, init_from=str(path), lr=1e-2, pause_ids=PAUSES, reserved_ids=RESERVED)
    fit(tuned, 3, tmp_path, steps=2).save_checkpoint(tmp_path / "cyb.ckpt")
    old = torch.load(tmp_path / "cyb.ckpt", weights_only=False)
    del old["trained_rows"]
    torch.save(old, tmp_path / "old.ckpt")
    again = make(CYBAP(), 3, pause_ids=PAUSES, reserved_ids=RESERVED)
    again.configure_model()
    again.load_decoder_weights(str(tmp_path / "old.ckpt"))
    assert same(again.decoder.state_dict(), tuned.decoder.state_dict())  # nothing redrawn
