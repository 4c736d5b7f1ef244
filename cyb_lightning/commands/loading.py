"""Rebuild a run (model + data module) from its checkpoint and the config LightningCLI saved next to it."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch
import yaml


def find_config(ckpt_path: str | os.PathLike) -> Path:
    """``RUN/config.yaml`` for ``RUN/checkpoints/x.ckpt`` (LightningCLI saves it in the log dir)."""
    ckpt = Path(ckpt_path).resolve()
    for parent in list(ckpt.parents)[:3]:
        if (parent / "config.yaml").is_file():
            return parent / "config.yaml"
    raise FileNotFoundError(
        f"no config.yaml next to {ckpt_path} (looked in its three parent folders); pass --config with the "
        "YAML the run was trained with"
    )


def load_run(ckpt_path: str, config: str | None = None, overrides: list[str] | None = None):
    """``(module, datamodule)`` in eval mode with the checkpoint's weights, on the CPU.

    ``overrides`` are LightningCLI arguments (``--data.val_documents 50``, ``--data.layout cyb``…).
    """
    from cyb_lightning.cli import CYBLightningCLI
    from cyb_lightning.datamodule import CYBDataModule
    from cyb_lightning.module import CYBModule

    if not Path(ckpt_path).is_file():
        near = sorted(str(p) for p in Path(ckpt_path).parent.glob("*.ckpt")) if Path(ckpt_path).parent.is_dir() else []
        raise FileNotFoundError(
            f"no checkpoint at {ckpt_path}"
            + (
                f"; the folder has {', '.join(near[:5])}"
                if near
                else "; check the path (runs/<name>/version_<n>/"
                "checkpoints/last.ckpt) or pick one with `python -m cyb_lightning pick-checkpoint RUN_DIR`"
            )
        )
    cfg = yaml.safe_load(Path(config or find_config(ckpt_path)).read_text())
    # Keep what builds the model and the data; drop the fit subcommand's own keys (ckpt_path, weights_only…).
    cfg = {k: v for k, v in cfg.items() if k in ("seed_everything", "trainer", "model", "data")}
    trainer = cfg.setdefault("trainer", {})
    # Only the model and the data are wanted: no logger, callbacks or devices beyond the CPU.
    trainer.update(logger=False, callbacks=None, accelerator="cpu", devices=1, strategy="auto")
    trainer.pop("plugins", None)
    quiet = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in quiet]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # Building a Trainer we never run: its banners ("GPU available…") and the args warning are noise.
        warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
        for lg in quiet:
            lg.setLevel(logging.WARNING)
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cli = CYBLightningCLI(
            CYBModule,
            CYBDataModule,
            args=["--config", str(path), *(overrides or [])],
            run=False,
            seed_everything_default=1234,
            parser_kwargs={"parser_mode": "omegaconf"},
            save_config_callback=None,
        )
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    module, datamodule = cli.model, cli.datamodule
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    module.configure_model()
    missing, unexpected = module.load_state_dict(state["state_dict"], strict=False)
    missing = [k for k in missing if "rope_" not in k]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not fit the config's model: missing {missing}, unexpected {unexpected}")
    return module.eval(), datamodule
