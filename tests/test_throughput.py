"""TokenThroughput: real and laid-out tokens per second from Lightning's Throughput meter."""

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger

from cyb_lightning.callbacks import TokenThroughput
from tests.distributed.fit_worker import K, SeededModule, Rows, V, DK, T
from cyb_lightning.losses import CYBAP
from cyb_lightning.model import GPTConfig


def test_logs_real_and_laid_out_tokens_per_second(tmp_path):
    model = SeededModule(GPTConfig(n_layer=1, n_head=2, d_model=32, max_position=64), CYBAP(), vocab_size=V,
                         dk_id=DK, steps_per_token=K + 1, seq_len=T, warmup_steps=2)
    meter = TokenThroughput(window_size=3, log_every_n_steps=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=8, logger=CSVLogger(tmp_path), callbacks=[meter],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, log_every_n_steps=2, use_distributed_sampler=False)
    trainer.fit(model, datamodule=Rows(4 * 8))
    m = meter.last_metrics
    # Every row has T real tokens laid out as T·(K+1): the two rates differ by exactly W = K + 1.
    assert m["throughput/laid_out_tokens_per_sec"] == pytest.approx((K + 1) * m["throughput/tokens_per_sec"])
    assert m["throughput/tokens_per_sec"] == pytest.approx(T * m["throughput/samples_per_sec"])
    assert "throughput/mfu" not in m  # no peak-FLOPs figure for a CPU
    assert m["throughput/device/tflops_per_sec"] > 0  # the spec knows its FLOPs per token
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "throughput/tokens_per_sec" in logged and "throughput/laid_out_tokens_per_sec" in logged
