"""The LightningModule on hand-built batches that follow the layout contract (no data module needed)."""

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from cyb_lightning.data.batch import LaidOutBatch
from cyb_lightning.losses import CYBAP, CYBDP, CrossEntropy, TBYSPerToken
from cyb_lightning.losses import functional as F
from cyb_lightning.model import GPTConfig
from cyb_lightning.module import CYBModule, warmup_cosine

V, DK, PAUSES = 40, 2, (3, 4, 5)


def cyb_batch(real: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The CYB layout of ``real`` [B, T+1] by hand: x P1..Pk per token, shared positions."""
    B, T = real.shape[0], real.shape[1] - 1
    W = k + 1
    ids = torch.empty(B, T, W, dtype=torch.long)
    ids[:, :, 0] = real[:, :-1]
    for i in range(k):
        ids[:, :, i + 1] = PAUSES[i]
    return {
        "input_ids": ids.view(B, T * W),
        "position_ids": torch.arange(T).repeat_interleave(W).expand(B, -1).clone(),
        "targets": real[:, 1:].clone(),
        "target_mask": torch.ones(B, T, dtype=torch.bool),
    }


def module(loss, k=3, **kw) -> CYBModule:
    torch.manual_seed(0)
    m = CYBModule(GPTConfig(n_layer=2, n_head=2, d_model=32), loss, vocab_size=V, dk_id=DK,
                  steps_per_token=k + 1, seq_len=8, warmup_steps=2, **kw)
    m.configure_model()
    return m


def grouped_logits(m: CYBModule, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Full logits of the counted groups ``[N, W, V]`` and their targets, through the batch's one gather."""
    b = LaidOutBatch.of(batch)
    return b.groups(m(b.input_ids, b.position_ids)), b.targets


def test_grouped_logits_follow_the_layout():
    m = module(CYBAP())
    real = torch.randint(6, V, (2, 9))
    batch = cyb_batch(real, 3)
    batch["target_mask"][1, 5:] = False  # e.g. padding at the end of the validation set
    logits, targets = grouped_logits(m, batch)
    full = m(batch["input_ids"], batch["position_ids"])
    assert logits.shape == (8 + 5, 4, V)
    # Token t of row 1 is laid out at positions 4t … 4t+3.
    torch.testing.assert_close(logits[8 + 2], full[1, 8:12])
    assert targets.tolist() == real[0, 1:].tolist() + real[1, 1:6].tolist()


def test_cyb_layout_first_step_sees_no_pause_of_its_own_group():
    # Step 1 of token t is the output at x_t; it must not depend on token t's pauses, only on earlier ones.
    m = module(CYBAP())
    batch = cyb_batch(torch.randint(6, V, (1, 5)), 3)
    logits, _ = grouped_logits(m, batch)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][0, 4 * 2 + 1 :] = PAUSES[0]  # rewrite every pause from token 2 on
    logits2, _ = grouped_logits(m, changed)
    torch.testing.assert_close(logits2[:2], logits[:2])
    torch.testing.assert_close(logits2[2, 0], logits[2, 0])
    assert not torch.allclose(logits2[2, 1:], logits[2, 1:])


@pytest.mark.parametrize("loss", [CYBAP(), CYBDP(), TBYSPerToken()])
def test_training_loss_is_the_token_mean_of_the_functional(loss):
    m = module(loss)
    batch = cyb_batch(torch.randint(6, V, (2, 9)), 3)
    out = m.training_step(batch, 0)
    logits, targets = grouped_logits(m, batch)
    expected = loss(logits, targets, DK).mean()
    torch.testing.assert_close(out["loss"], expected)


def test_baseline_cross_entropy_is_ordinary_cross_entropy():
    m = module(CrossEntropy(), k=0)
    batch = cyb_batch(torch.randint(6, V, (2, 9)), 0)
    logits, targets = grouped_logits(m, batch)
    ref = torch.nn.functional.cross_entropy(m(batch["input_ids"], batch["position_ids"]).flatten(0, 1),
                                            batch["targets"].flatten())
    torch.testing.assert_close(CrossEntropy()(logits, targets, DK).mean(), ref)


def test_steps_mismatch_and_missing_vocab_fail_clearly():
    with pytest.raises(ValueError, match="num_pauses"):
        CYBModule(GPTConfig(n_layer=1, n_head=2, d_model=16), CYBAP(omega=[0, 1]), vocab_size=V, dk_id=DK,
                  steps_per_token=4)
    with pytest.raises(ValueError, match="data module"):
        CYBModule(GPTConfig(n_layer=1, n_head=2, d_model=16), CYBAP(), steps_per_token=4)
    with pytest.raises(ValueError, match="max_position"):
        CYBModule(GPTConfig(n_layer=1, n_head=2, d_model=16, max_position=8), CYBAP(), vocab_size=V,
                  dk_id=DK, steps_per_token=4, seq_len=9)


def test_lr_schedule_warms_up_then_decays_to_one_percent():
    f = [warmup_cosine(s, 10, 110, 0.01) for s in range(200)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f[110] == pytest.approx(0.01) and f[199] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))


class _Batches(torch.utils.data.Dataset):
    def __init__(self, n, k):
        g = torch.Generator().manual_seed(0)
        # A learnable pattern: the next token is the current one plus one (mod the real ids).
        starts = torch.randint(6, V, (n, 1), generator=g)
        real = 6 + (starts - 6 + torch.arange(9)) % (V - 6)
        self.items = [{key: v[0] for key, v in cyb_batch(real[i : i + 1], k).items()} for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_fit_learns_and_dk_prior_shows_in_the_stopping_distribution(tmp_path):
    m = module(CYBAP(), lr=1e-2)
    data = DataLoader(_Batches(64, 3), batch_size=8)
    trainer = L.Trainer(accelerator="cpu", max_steps=60, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        default_root_dir=tmp_path, limit_val_batches=2)
    batch = next(iter(data))
    with torch.no_grad():
        before = m.loss_fn(*grouped_logits(m, batch), DK).mean().item()
        # With the 0.9 DK prior an untrained model says DK almost everywhere: it waits until the end.
        log_s = m.loss_fn.stopping_log_probs(*grouped_logits(m, batch), DK)
        assert log_s.exp()[:, -1].mean() > 0.5
    trainer.fit(m, data, data)
    with torch.no_grad():
        after = m.loss_fn(*grouped_logits(m, batch), DK).mean().item()
    assert after < 0.5 * before
    assert trainer.callback_metrics["val/ppl"] < math.exp(before)
    assert F.dk_prior_bias(V) == pytest.approx(math.log(9 * (V - 1)))


class _Record(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def _fit(loss, chunked: bool, tmp_path, k=3, steps=6):
    m = module(loss, k=k, lr=1e-2, loss_chunk_size=12 if chunked else 0)  # 0: one chunk, the full logits
    record = _Record()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=2,
                        default_root_dir=tmp_path, limit_val_batches=2, val_check_interval=steps,
                        callbacks=[record])
    data = DataLoader(_Batches(48, k), batch_size=8)
    trainer.fit(m, data, data)
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
    return record.losses, metrics, m


@pytest.mark.parametrize("loss, k", [(CYBAP(), 3), (CYBDP(), 3), (TBYSPerToken(), 3), (CrossEntropy(), 0)])
def test_chunked_and_plain_loss_train_the_same(loss, k, tmp_path):
    plain_losses, plain_metrics, plain_model = _fit(loss, False, tmp_path / "plain", k)
    chunked_losses, chunked_metrics, chunked_model = _fit(loss, True, tmp_path / "chunked", k)
    assert (chunked_model.hparams.loss_chunk_size, plain_model.hparams.loss_chunk_size) == (12, 0)
    assert len(chunked_losses) == 6
    torch.testing.assert_close(torch.tensor(chunked_losses), torch.tensor(plain_losses), rtol=1e-4, atol=1e-5)
    assert set(chunked_metrics) == set(plain_metrics)  # the same train/ and val/ metrics are logged
    for key, value in plain_metrics.items():
        assert chunked_metrics[key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
    for (name, p), q in zip(plain_model.named_parameters(), chunked_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4, msg=name)


def test_training_step_chunked_equals_plain_with_masked_targets():
    m = module(CYBAP(), loss_chunk_size=8)
    batch = cyb_batch(torch.randint(6, V, (2, 9)), 3)
    batch["target_mask"][1, 5:] = False
    chunked = m.training_step(batch, 0)["loss"]
    chunked.backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    logits, targets = grouped_logits(m, batch)
    plain = m.loss_fn(logits, targets, DK).mean()
    plain.backward()
    torch.testing.assert_close(chunked, plain)
    for g, p in zip(grads, m.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunked", [True, False])
def test_variable_layout_statistics_count_only_granted_pauses(chunked):
    """``train/extra_pauses`` and the stopping histograms of a variable-pause batch are bounded by the
    pauses the world granted each token (the W-step rule would put mass on steps that do not exist)."""
    from cyb_lightning.data.layout import layout_variable
    from cyb_lightning.data.tokenizer import standard_vocab

    m = module(CYBAP(psi_dk=0.9), loss_chunk_size=5 if chunked else 0)  # a strong DK prior: the model wants every step
    vocab = standard_vocab(V - standard_vocab().num_reserved)
    rows = [layout_variable(torch.randint(11, V, (9,)).numpy(), 8, vocab.pause_ids[:3], vocab.pad_id,
                            (0.4, 0.3, 0.2, 0.1), seed=0, index=i) for i in range(4)]  # fmt: skip
    batch = {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0]}
    with torch.no_grad():
        stats = m.training_step(batch, 0)["stats"]
    granted = batch["step_mask"][batch["target_mask"]]
    assert not bool((stats.stop[~granted] > 0).any())  # no stopping mass on steps never granted
    torch.testing.assert_close(stats.stop.sum(-1), torch.ones(len(stats.stop)))
    assert bool((stats.extra_pauses <= granted.sum(-1) - 1 + 1e-6).all())
    assert float(stats.extra_pauses.mean()) <= float((granted.sum(-1) - 1).float().mean()) + 1e-6
    assert bool((stats.readout <= granted.sum(-1) - 1).all())


def test_earlier_versions_chunked_loss_false_is_the_one_chunk_case():
    """Configs and checkpoints of earlier versions carry ``chunked_loss``; they load, and ``false`` (their plain
    path on full logits) is ``loss_chunk_size: 0``."""
    assert module(CYBAP(), chunked_loss=False).hparams.loss_chunk_size == 0
    assert module(CYBAP(), chunked_loss=True).hparams.loss_chunk_size is None
    # Their default pair (chunked_loss: true, loss_chunk_size: 0) meant the automatic chunk, not full logits.
    assert module(CYBAP(), chunked_loss=True, loss_chunk_size=0).hparams.loss_chunk_size is None
    assert module(CYBAP(), chunked_loss=True, loss_chunk_size=12).hparams.loss_chunk_size == 12
