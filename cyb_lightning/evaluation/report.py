"""``python -m cyb_lightning report --ckpt_path RUN/checkpoints/last.ckpt``: one command, every analysis.

Runs the model over the validation set (the data config of the run, overridable) and writes a folder:

    report.json          every number below
    report.md            a markdown summary (tables + the pictures)
    latency.png          P(0 … K extra pauses) and the mean pauses per token
    dk_rate.png          mean d_i per step
    calibration.png      Spearman ρ(d_i, t_{i+1} − t_i) per step
    token_quadrants.png  per-token median vs variance of expected pauses, the four quadrants labelled
    text.html, text.png  a validation text with each token coloured by its expected extra pauses
    tensorboard/         the same as histograms, a markdown table and images

The numbers come from the same torchmetrics Metrics the LightningModule logs during validation, so
``report.json`` agrees with ``val/ppl`` etc. of ``python -m cyb_lightning validate``. With ``--adaptive``
policies it also runs the teacher-forced adaptive evaluation (:mod:`cyb_lightning.generation`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from cyb_lightning.data.batch import LaidOutBatch
from cyb_lightning.evaluation.plots import bars_figure, latency_figure, pyplot, quadrant_figure, write_histograms
from cyb_lightning.evaluation.tokens import quadrants
from cyb_lightning.metrics import (
    CalibrationSpearman,
    DifficultyStats,
    ReadoutAccuracy,
    StoppingStats,
    TokenPauseStats,
)

FILES = (
    "report.json",
    "report.md",
    "latency.png",
    "dk_rate.png",
    "calibration.png",
    "token_quadrants.png",
    "text.html",
    "text.png",
)


@torch.no_grad()
def evaluate(module, batches, *, min_count: int = 5, max_batches: int | None = None, sample_tokens: int = 240):
    """Metrics over ``batches`` (laid-out validation batches) → a dict of plain numbers and tensors."""
    W = module.hparams.steps_per_token
    stats_m, acc_m, loss_m = StoppingStats(W), ReadoutAccuracy(W), MeanMetric()
    calib_m = CalibrationSpearman(W) if module.loss_fn.uses_dk and W > 1 else None
    token_m = TokenPauseStats(min_count)
    difficulty_m = DifficultyStats(W)  # used when the batches label their targets' difficulty
    sample = None
    for b, batch in enumerate(batches):
        if max_batches is not None and b >= max_batches:
            break
        batch = LaidOutBatch.of({k: v.to(module.device) for k, v in batch.items()})
        if not bool(batch.target_mask.any()):
            continue
        per_token, stats = module.evaluation_outputs(batch)  # exactly what validation computes
        for m in (stats_m, acc_m, token_m) + ((calib_m,) if calib_m is not None else ()):
            m.update(stats)
        loss_m.update(per_token)
        if batch.difficulty is not None:
            difficulty_m.update(stats, batch.difficulty)
        if sample is None:
            n0 = int(batch.target_mask[0].sum())
            sample = {
                "ids": stats.inputs[: min(n0, sample_tokens)].tolist(),
                "expected_pauses": stats.extra_pauses[: min(n0, sample_tokens)].tolist(),
            }
    stop = stats_m.compute()
    acc = acc_m.compute()
    table = token_m.table()
    metrics = {
        "loss": float(loss_m.compute()),
        "ppl": float(stop["ppl"]),
        "nll": float(stop["nll"]),
        "p_stop": stop["p_stop"].reshape(-1).tolist(),  # reshape: with W = 1 the metric returns 0-d tensors
        "extra_pauses": float(stop["extra_pauses"]),
        "dk_rate": stop["dk_rate"].reshape(-1).tolist() if module.loss_fn.uses_dk else None,
        "calibration_spearman": calib_m.compute().reshape(-1).tolist() if calib_m is not None else None,
        "accuracy": float(acc["accuracy"]),
        "sampled_accuracy": float(acc["sampled_accuracy"]),
        "accuracy_per_step": acc["per_step"].reshape(-1).tolist(),
        "readout_steps": float(acc["readout_steps"]),
        "tokens": int(stop["tokens"]),
    }
    if difficulty_m.update_count:
        metrics["by_difficulty"] = difficulty_table(difficulty_m.compute())
    all_pauses = torch.cat(token_m.pauses) if token_m.pauses else torch.zeros(0)
    return {"metrics": metrics, "table": table, "sample": sample, "pauses": all_pauses, "stop_sum": stats_m.stop_sum}


def difficulty_table(result: dict[str, Tensor]) -> dict:
    """``DifficultyStats.compute()`` as JSON: {"levels": {level: {metric: value}}, "spearman": ρ}."""
    levels = {}
    for level in torch.nonzero(result["tokens"] > 0).flatten().tolist():
        row = {
            k: float(result[k][level])
            for k in (
                "accuracy",
                "sampled_accuracy",
                "first_step_accuracy",
                "last_step_accuracy",
                "extra_pauses",
                "readout_steps",
            )
        }
        levels[level] = {"tokens": int(result["tokens"][level]), **row, "p_stop": result["p_stop"][level].tolist()}
    return {"levels": levels, "spearman": float(result["spearman"])}


def token_analysis(table: dict[str, Tensor], tokenizer, min_count: int, top: int) -> dict:
    """The JSON view of the token table and its quadrants (token text included)."""

    def row(j: int) -> dict:
        tid = int(table["ids"][j])
        return {
            "id": tid,
            "text": tokenizer.decode([tid]),
            "count": int(table["count"][j]),
            "median": float(table["median"][j]),
            "variance": float(table["variance"][j]),
            "mean": float(table["mean"][j]),
        }

    quads = quadrants(table, top)
    return {
        "min_count": min_count,
        "top": top,
        "split": {
            "median": float(table["median"].median()) if table["ids"].numel() else None,
            "variance": float(table["variance"].median()) if table["ids"].numel() else None,
        },
        "quadrants": {q: [row(j) for j in rows] for q, rows in quads.items()},
        "tokens": [row(j) for j in range(table["ids"].numel())],
    }


# -- writing --------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    m, a = report["metrics"], report["token_analysis"]
    K = len(m["p_stop"]) - 1
    lines = [
        f"# Evaluation report: `{report['checkpoint']}`",
        "",
        f"{report['loss']} · W = {K + 1} steps per token · {m['tokens']:,} validation tokens · "
        f"step {report['global_step']} · {report['date']} on {report['machine']}",
        "",
    ]
    if report.get("adaptive"):  # first: what a deployed model does
        lines += [
            "## Adaptive inference (teacher-forced; each token gets only the pauses it asks for)",
            "",
            "The compute actually spent. threshold and sample follow the stopping rule the loss trains; greedy "
            "(pause while DK is the argmax) does not. *Batch steps*: what a batch computes per token, rows waiting "
            "for others included.",
            "",
            "| policy | ppl at the answering step | accuracy | forward steps / token | batch steps / token "
            "| P(0…K pauses) | tokens |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in report["adaptive"].items():
            lines.append(
                f"| {name} | {r['ppl']:.3f} | {r['accuracy']:.3f} | {r['steps_per_token']:.3f} | "
                f"{r['batch_steps_per_token']:.3f} | {' / '.join(f'{p:.2f}' for p in r['p_pauses'])} "
                f"| {r['tokens']:,} |"
            )
        first = next(iter(report["adaptive"].values()))
        if first.get("by_difficulty"):
            rho = first.get("spearman")
            lines += [
                "",
                f"Per difficulty level, policy {next(iter(report['adaptive']))} (Spearman ρ(difficulty, pauses "
                f"taken) = {'n/a' if rho is None else f'{rho:.3f}'}):",
                "",
                "| level | tokens | accuracy | pauses taken | P(0…K pauses) |",
                "|---|---|---|---|---|",
            ]
            for level, r in first["by_difficulty"].items():
                lines.append(
                    f"| {level} | {r['tokens']:,} | {r['accuracy']:.3f} | {r['steps_per_token'] - 1:.3f} | "
                    f"{' / '.join(f'{p:.2f}' for p in r['p_pauses'])} |"
                )
        lines.append("")
    lines += [
        "## The full layout (every token keeps its K pauses, as in training: an upper bound)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| perplexity (step mixture, γ = 1) | {m['ppl']:.3f} |",
        f"| validation loss | {m['loss']:.4f} |",
        f"| mean extra pauses per token | {m['extra_pauses']:.3f} |",
        f"| P(0…{K} extra pauses) | {' / '.join(f'{p:.3f}' for p in m['p_stop'])} |",
        f"| DK rate per step | {_fmt(m['dk_rate'])} |",
        f"| calibration Spearman ρ(d_i, t_(i+1) − t_i), steps 1…{K} | {_fmt(m['calibration_spearman'])} |",
        f"| next-token accuracy by the trained rule (answer at the first d_i < 0.5) | {m['accuracy']:.4f} |",
        f"| next-token accuracy, stopping with probability 1 − d_i (Σ s_i · correct_i) | {m['sampled_accuracy']:.4f} |",
        f"| accuracy per step | {_fmt(m['accuracy_per_step'])} |",
        f"| forward steps per token of the trained rule | {m['readout_steps']:.3f} |",
        "",
    ]
    if m.get("by_difficulty"):
        lines += [
            "### Per difficulty level (full layout)",
            "",
            f"Spearman ρ(difficulty, expected pauses) = {m['by_difficulty']['spearman']:.3f}",
            "",
            "| level | tokens | accuracy (trained rule) | accuracy, no pause | accuracy, K pauses "
            "| expected pauses | forward steps (trained rule) |",
            "|---|---|---|---|---|---|---|",
        ]
        for level, r in m["by_difficulty"]["levels"].items():
            lines.append(
                f"| {level} | {r['tokens']:,} | {r['accuracy']:.3f} | {r['first_step_accuracy']:.3f} | "
                f"{r['last_step_accuracy']:.3f} | {r['extra_pauses']:.3f} | {r['readout_steps']:.3f} |"
            )
        lines.append("")
    comp = report.get("comparators") or {}
    if comp:
        lines += [
            "## Against what (the tokens of the adaptive runs above)",
            "",
            "| reader | ppl | forward steps / token |",
            "|---|---|---|",
            f"| this model's step mixture, all {K} pauses given (its training context) | "
            f"{comp['step_mixture']['ppl']:.3f} | {comp['step_mixture']['steps_per_token']:.0f} computed, "
            f"{comp['step_mixture']['expected_steps_per_token']:.2f} expected |",
        ]
        if "baseline" in comp:
            b = comp["baseline"]
            lines.append(
                f"| no-pause baseline `{b['checkpoint']}` (same tokens as the adaptive runs above) | "
                f"{b['ppl']:.3f} | {b['steps_per_token']:.2f} |"
            )
        lines.append("")
    lines += [f"## Tokens (seen at least {a['min_count']} times: {len(a['tokens'])})", ""]
    for q, rows in a["quadrants"].items():
        listed = ", ".join(f"`{_md(t['text'])}` ({t['median']:.3f}, {t['variance']:.1e}, n={t['count']})" for t in rows)
        lines += [f"**{q.replace('_', ' ')}**: " + (listed or "none"), ""]
    lines += ["(median, variance of the expected extra pauses after the token, occurrences)", ""]
    lines += ["## Pictures", ""] + [f"![{f}]({f})" for f in FILES if f.endswith(".png")]
    lines += ["", "Coloured text (HTML): [text.html](text.html)", ""]
    return "\n".join(lines)


def _fmt(values) -> str:
    if values is None:
        return "n/a (no DK output)"
    return " / ".join("nan" if v is None or math.isnan(v) else f"{v:.3f}" for v in values)


def _md(text: str) -> str:
    return repr(text)[1:-1].replace("`", "'").replace("|", "\\|")


def write_report(out: Path, report: dict, result: dict, tokenizer) -> list[Path]:
    """Write every file of the report folder (and the TensorBoard view); returns the paths."""
    from cyb_lightning.evaluation import render

    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    m, W = report["metrics"], len(report["metrics"]["p_stop"])
    figures = {
        "latency.png": latency_figure(m["p_stop"], m["extra_pauses"]),
        "dk_rate.png": bars_figure(m["dk_rate"], "DK rate per step", "mean d_i"),
        "calibration.png": bars_figure(
            m["calibration_spearman"], "calibration: Spearman ρ(d_i, t_(i+1) − t_i)", "ρ", signed=True
        ),
        "token_quadrants.png": quadrant_figure(report["token_analysis"]),
    }
    sample = result["sample"] or {"ids": [], "expected_pauses": []}
    pieces = render.token_pieces(tokenizer, sample["ids"])
    title = f"expected extra pauses after each token (0 … {W - 1})"
    figures["text.png"] = render.text_figure(pieces, sample["expected_pauses"], W - 1, title)
    render.write_html(out / "text.html", pieces, sample["expected_pauses"], W - 1, title)
    report["sample"] = {"tokens": pieces, "expected_pauses": sample["expected_pauses"]}
    report["files"] = list(FILES) + ["tensorboard/"]
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110)
    md = markdown(report)
    (out / "report.md").write_text(md, encoding="utf-8")
    (out / "report.json").write_text(json.dumps(report, indent=1, allow_nan=True), encoding="utf-8")
    _tensorboard(out / "tensorboard", report, result, figures, md)
    for fig in figures.values():
        plt.close(fig)
    return [out / f for f in FILES]


def _tensorboard(logdir: Path, report: dict, result: dict, figures: dict, md: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    step = int(report["global_step"])
    with SummaryWriter(str(logdir)) as writer:
        if result["pauses"].numel():
            write_histograms(writer, "report", result["pauses"].float(), result["stop_sum"].cpu(), step)
        writer.add_text("report/summary", md, step)
        for name, fig in figures.items():
            writer.add_figure(f"report/{name[:-4]}", fig, step, close=False)
        for key in ("ppl", "extra_pauses", "accuracy"):
            writer.add_scalar(f"report/{key}", report["metrics"][key], step)
