"""``python -m cyb_lightning {fit,validate,test,predict} --config conf/<name>.yaml`` (LightningCLI).

The data module decides the vocabulary (reserved ids included) and the layout's steps per token; the
CLI links those into the model, so a config never states them twice. A pretrained model's tokenizer
(``HFTokenizer``) that adds new pause ids adds exactly ``data.num_pauses`` of them (plus one DK id).
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from cyb_lightning.datamodule import CYBDataModule
from cyb_lightning.module import CYBModule


class CYBLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        for name in ("vocab_size", "dk_id", "steps_per_token"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
        parser.link_arguments("data.seq_len", "model.seq_len")
        # K, stated once: an HFTokenizer that adds pause ids adds the K the run uses (ignored when repurposing).
        parser.link_arguments("data.num_pauses", "data.tokenizer.init_args.num_pauses")

    def after_fit(self) -> None:
        text = summary(self.trainer)  # trainer.log_dir is a broadcast: every rank must take part
        if self.trainer.is_global_zero:
            print(text)


def summary(trainer) -> str:
    """A few lines for the terminal: where the logs are and what the pause distribution looks like."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    lines = [f"logs and checkpoints: {trainer.log_dir}", f"  tensorboard --logdir {trainer.log_dir}"]
    if "val/ppl" in metrics:
        lines.append(f"validation perplexity: {metrics['val/ppl']:.2f}")
    p_stop = [metrics[k] for k in sorted(m for m in metrics if m.startswith("val/p_stop/step"))]
    if p_stop:
        dist = " / ".join(f"{p:.2f}" for p in p_stop)
        lines.append(f"P(0..{len(p_stop) - 1} extra pauses) = {dist}; mean {metrics['val/extra_pauses']:.2f} per token")
    return "\n".join(lines)


def main(args: list[str] | None = None) -> CYBLightningCLI:
    return CYBLightningCLI(
        CYBModule,
        CYBDataModule,
        args=args,
        seed_everything_default=1234,
        parser_kwargs={"parser_mode": "omegaconf"},
        # A requeued or restarted job writes its config again: overwriting it must not fail the run.
        save_config_kwargs={"overwrite": True},
    )
