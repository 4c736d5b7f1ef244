"""A tiny trained run (a few CPU steps) shared by the report and generation tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_VOCAB


def tiny_run_config(tiny_source, root: Path, max_steps: int = 4) -> dict:
    return {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": max_steps,
            "val_check_interval": max_steps, "limit_val_batches": 2, "num_sanity_val_steps": 0,
            "log_every_n_steps": 2, "enable_progress_bar": False, "enable_model_summary": False,
            "default_root_dir": str(root),
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(root), "name": "tiny"}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"save_last": True}},
                          {"class_path": "cyb_lightning.callbacks.TokenPauseReport", "init_args": {"min_count": 2}}],
        },
        "model": {
            "decoder": {"class_path": "cyb_lightning.model.GPTConfig",
                        "init_args": {"n_layer": 1, "n_head": 2, "d_model": 32, "max_position": 64}},
            "loss": {"class_path": "cyb_lightning.losses.CYBAP", "init_args": {"omega": [0, 0, 1], "psi_dk": 0.9}},
            "lr": 3.0e-3, "warmup_steps": 1,
        },
        "data": {
            "source": {"class_path": "cyb_lightning.data.QuickstartCorpus",
                       "init_args": {"root": tiny_source.root, **tiny_source.build_kwargs}},
            "bpe_vocab_size": TINY_VOCAB, "layout": "cyb", "num_pauses": 2, "seq_len": 16, "batch_size": 4,
            "val_documents": 6,
        },
    }  # fmt: skip


@pytest.fixture(scope="session")
def tiny_run(tiny_quickstart, tmp_path_factory):
    """(checkpoint path, config path) of a 4-step CYB-AP run with K = 2."""
    from cyb_lightning.cli import main
    from cyb_lightning.data import QuickstartCorpus
    from tests.conftest import TINY_QUICKSTART

    source = QuickstartCorpus(str(tiny_quickstart.corpus.directory.parent), **TINY_QUICKSTART)
    root = tmp_path_factory.mktemp("tiny_run")
    config = root / "fit.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(source, root)))
    main(["fit", "--config", str(config)])
    ckpt = root / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt, root / "tiny" / "version_0" / "config.yaml"
