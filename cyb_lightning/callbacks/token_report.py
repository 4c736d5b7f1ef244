"""TensorBoard views of *which* tokens make the model pause (CYB Table 3), after every validation run.

Accumulates the per-token statistics the module returns from ``validation_step`` in a
:class:`~cyb_lightning.metrics.TokenPauseStats` (gathered across ranks), then writes from rank 0:
``val/tokens/quadrants`` (a markdown table of the four quadrants), ``val/tokens/quadrants_plot`` and
``val/latency`` (images). ``python -m cyb_lightning report`` writes the same views for a checkpoint.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from cyb_lightning.metrics import StoppingStats, TokenPauseStats
from cyb_lightning.metrics.stopping import TokenStats


class TokenPauseReport(L.Callback):
    """Args: min_count: occurrences a token needs; top: tokens per quadrant; max_tokens: per-rank cap."""

    def __init__(self, min_count: int = 5, top: int = 10, max_tokens: int = 1_000_000) -> None:
        self.min_count, self.top = min_count, top
        self.metric = TokenPauseStats(min_count, max_tokens=max_tokens)
        self.latency: StoppingStats | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        stats = outputs.get("stats") if isinstance(outputs, dict) else None
        if isinstance(stats, TokenStats) and stats.inputs is not None:
            if self.latency is None:
                self.latency = StoppingStats(pl_module.hparams.steps_per_token)
            self.metric.to(pl_module.device).update(stats)
            self.latency.to(pl_module.device).update(stats)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.latency is None:
            self.metric.reset()
            self.latency = None
            return
        table = self.metric.to(pl_module.device).table()  # every rank takes part in the gather
        probs = self.latency.compute()["p_stop"].reshape(-1).tolist()  # W = 1 (no pauses): 0-d from the metric
        self.metric.reset()
        self.latency = None
        if not trainer.is_global_zero:
            return
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not writers:
            return
        from cyb_lightning.evaluation.plots import latency_figure, pyplot, quadrant_figure
        from cyb_lightning.evaluation.report import token_analysis

        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
        analysis = token_analysis(table, tokenizer or _IdNames(), self.min_count, self.top)
        figures = {
            "val/tokens/quadrants_plot": quadrant_figure(analysis),
            "val/latency": latency_figure(probs, sum(k * p for k, p in enumerate(probs))),
        }
        md = quadrant_markdown(analysis)
        for writer in writers:
            writer.add_text("val/tokens/quadrants", md, trainer.global_step)
            for tag, fig in figures.items():
                writer.add_figure(tag, fig, trainer.global_step, close=False)
        for fig in figures.values():
            pyplot().close(fig)


class _IdNames:
    def decode(self, ids) -> str:
        return " ".join(f"#{i}" for i in ids)


def quadrant_markdown(analysis: dict) -> str:
    """One markdown table per quadrant: token, median, variance, count."""
    lines = [f"tokens seen at least {analysis['min_count']} times: {len(analysis['tokens'])}", ""]
    for q, rows in analysis["quadrants"].items():
        lines += [f"**{q.replace('_', ' ')}**", "", "| token | median | variance | count |", "|---|---|---|---|"]
        lines += [
            f"| `{repr(t['text'])[1:-1]}` | {t['median']:.3f} | {t['variance']:.4f} | {t['count']} |" for t in rows
        ]
        lines.append("")
    return "\n".join(lines)
