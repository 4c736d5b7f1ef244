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

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from cyb_lightning.data.batch import LaidOutBatch
from cyb_lightning.provenance import machine
from cyb_lightning.evaluation.tokens import QUADRANTS, quadrants
from cyb_lightning.metrics import (
    CalibrationSpearman,
    DifficultyStats,
    ReadoutAccuracy,
    StoppingStats,
    TokenPauseStats,
)

FILES = ("report.json", "report.md", "latency.png", "dk_rate.png", "calibration.png", "token_quadrants.png",
         "text.html", "text.png")  # fmt: skip


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
            sample = {"ids": stats.inputs[: min(n0, sample_tokens)].tolist(),
                      "expected_pauses": stats.extra_pauses[: min(n0, sample_tokens)].tolist()}  # fmt: skip
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
        row = {k: float(result[k][level]) for k in ("accuracy", "sampled_accuracy", "first_step_accuracy",
                                                    "last_step_accuracy", "extra_pauses", "readout_steps")}  # fmt: skip
        levels[level] = {"tokens": int(result["tokens"][level]), **row, "p_stop": result["p_stop"][level].tolist()}
    return {"levels": levels, "spearman": float(result["spearman"])}


def comparators(report: dict, module, datamodule, args) -> dict:
    """What an adaptive reader is measured against (spec §5), on the same held-out tokens as the adaptive
    runs: the same model's step mixture in its training context (every token given all K pauses), and, with
    ``--baseline_ckpt``, a no-pause model (its perplexity at 1 forward step per token)."""
    from cyb_lightning.evaluation.loading import load_run
    from cyb_lightning.generation import PausePolicy, Sampling, adaptive_evaluate, runner_for

    # On the very tokens the adaptive runs read (their first --adaptive_batches batches).
    m = evaluate(module, datamodule.val_dataloader(), max_batches=args.adaptive_batches)["metrics"]
    out = {"step_mixture": {"ppl": m["ppl"], "steps_per_token": float(module.hparams.steps_per_token),
                            "expected_steps_per_token": 1.0 + m["extra_pauses"], "tokens": m["tokens"]}}  # fmt: skip
    if args.baseline_ckpt:
        base, base_dm = load_run(args.baseline_ckpt)
        if base.hparams.steps_per_token != 1 or base_dm.tokenizer.vocab != datamodule.tokenizer.vocab:
            raise ValueError(
                f"--baseline_ckpt {args.baseline_ckpt} must be a no-pause run (layout none) with this run's "
                f"tokenizer; it has {base.hparams.steps_per_token} steps per token and "
                f"{'the same' if base_dm.tokenizer.vocab == datamodule.tokenizer.vocab else 'another'} vocabulary"
            )
        runner = runner_for(base, PausePolicy("none"), Sampling(0.0), datamodule.pause_ids)
        # This run's validation batches: the very same tokens; the runner reads only their real tokens.
        r = adaptive_evaluate(runner, datamodule.val_dataloader(), args.adaptive_batches)
        out["baseline"] = {"checkpoint": str(args.baseline_ckpt), "ppl": r["ppl"], "accuracy": r["accuracy"],
                           "steps_per_token": r["steps_per_token"], "tokens": r["tokens"]}  # fmt: skip
        if "by_difficulty" in r:
            out["baseline"]["by_difficulty"] = {k: {"tokens": v["tokens"], "accuracy": v["accuracy"]}
                                                for k, v in r["by_difficulty"].items()}  # fmt: skip
    return out


def level_table(levels: dict, baseline: dict | None = None) -> str:
    """Per difficulty level: the adaptive reader's accuracy and pauses taken, beside a no-pause model's accuracy."""
    lines = ["    level   accuracy   pauses taken" + ("   no-pause model" if baseline else "")]
    for level, r in levels.items():
        line = f"    {level:5}   {100 * r['accuracy']:6.1f} %   {r['steps_per_token'] - 1:12.2f}"
        if baseline and level in baseline:
            line += f"   {100 * baseline[level]['accuracy']:12.1f} %"
        lines.append(line)
    return "\n".join(lines)


def token_analysis(table: dict[str, Tensor], tokenizer, min_count: int, top: int) -> dict:
    """The JSON view of the token table and its quadrants (token text included)."""

    def row(j: int) -> dict:
        tid = int(table["ids"][j])
        return {"id": tid, "text": tokenizer.decode([tid]), "count": int(table["count"][j]),
                "median": float(table["median"][j]), "variance": float(table["variance"][j]),
                "mean": float(table["mean"][j])}  # fmt: skip

    quads = quadrants(table, top)
    return {
        "min_count": min_count,
        "top": top,
        "split": {"median": float(table["median"].median()) if table["ids"].numel() else None,
                  "variance": float(table["variance"].median()) if table["ids"].numel() else None},  # fmt: skip
        "quadrants": {q: [row(j) for j in rows] for q, rows in quads.items()},
        "tokens": [row(j) for j in range(table["ids"].numel())],
    }


# -- pictures -------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_figure(p_stop: list[float], mean: float):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    k = list(range(len(p_stop)))
    ax.bar(k, p_stop, color="#d95f02")
    for x, p in zip(k, p_stop):
        ax.text(x, p, f"{p:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set(xlabel="extra pauses", ylabel="P", title=f"latency distribution (mean {mean:.2f} pauses/token)",
           xticks=k, ylim=(0, max(p_stop + [0.01]) * 1.15))  # fmt: skip
    fig.tight_layout()
    return fig


def bars_figure(values: list[float] | None, title: str, ylabel: str, first_step: int = 1, signed: bool = False):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    if values:
        steps = list(range(first_step, first_step + len(values)))
        shown = [0.0 if (v is None or math.isnan(v)) else v for v in values]
        ax.bar(steps, shown, color="#1b9e77")
        for x, v in zip(steps, values):
            ax.text(x, 0 if v is None or math.isnan(v) else v, "n/a" if v is None or math.isnan(v) else f"{v:.2f}",
                    ha="center", va="bottom", fontsize=8)  # fmt: skip
        ax.set_xticks(steps)
        if signed:
            ax.axhline(0, color="black", lw=0.8)
            ax.set_ylim(-1, 1)
    else:
        ax.text(0.5, 0.5, "not applicable\n(the loss has no DK output)", ha="center", va="center",
                transform=ax.transAxes)  # fmt: skip
    ax.set(xlabel="step i", ylabel=ylabel, title=title)
    fig.tight_layout()
    return fig


def quadrant_figure(analysis: dict, label_top: int = 4):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    tokens = analysis["tokens"]
    if tokens:
        ax.scatter([t["median"] for t in tokens], [t["variance"] for t in tokens],
                   s=[8 + 2 * math.sqrt(t["count"]) for t in tokens], alpha=0.35, color="grey")  # fmt: skip
        split = analysis["split"]
        ax.axvline(split["median"], color="black", lw=0.7, ls="--")
        ax.axhline(split["variance"], color="black", lw=0.7, ls="--")
        colours = dict(zip(QUADRANTS, ("#d95f02", "#7570b3", "#e7298a", "#1b9e77")))
        for q, rows in analysis["quadrants"].items():
            for t in rows[:label_top]:
                ax.scatter([t["median"]], [t["variance"]], color=colours[q], s=18)
                ax.annotate(repr(t["text"])[1:-1], (t["median"], t["variance"]), fontsize=7, color=colours[q],
                            xytext=(3, 3), textcoords="offset points")  # fmt: skip
    else:
        ax.text(0.5, 0.5, f"no token seen {analysis['min_count']}+ times", ha="center", transform=ax.transAxes)
    ax.set(xlabel="median expected extra pauses", ylabel="variance", title="tokens by pausing (CYB Table 3)")
    fig.tight_layout()
    return fig


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
        lines += ["## Adaptive inference (teacher-forced; each token gets only the pauses it asks for)", "",
                  "The compute actually spent. threshold and sample follow the stopping rule the loss trains; greedy "
                  "(pause while DK is the argmax) does not. *Batch steps*: what a batch computes per token, rows waiting "
                  "for others included.", "",
                  "| policy | ppl at the answering step | accuracy | forward steps / token | batch steps / token "
                  "| P(0…K pauses) | tokens |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, r in report["adaptive"].items():
            lines.append(f"| {name} | {r['ppl']:.3f} | {r['accuracy']:.3f} | {r['steps_per_token']:.3f} | "
                         f"{r['batch_steps_per_token']:.3f} | {' / '.join(f'{p:.2f}' for p in r['p_pauses'])} "
                         f"| {r['tokens']:,} |")  # fmt: skip
        first = next(iter(report["adaptive"].values()))
        if first.get("by_difficulty"):
            rho = first.get("spearman")
            lines += ["", f"Per difficulty level, policy {next(iter(report['adaptive']))} (Spearman ρ(difficulty, pauses "
                      f"taken) = {'n/a' if rho is None else f'{rho:.3f}'}):", "",
                      "| level | tokens | accuracy | pauses taken | P(0…K pauses) |", "|---|---|---|---|---|"]  # fmt: skip
            for level, r in first["by_difficulty"].items():
                lines.append(f"| {level} | {r['tokens']:,} | {r['accuracy']:.3f} | {r['steps_per_token'] - 1:.3f} | "
                             f"{' / '.join(f'{p:.2f}' for p in r['p_pauses'])} |")  # fmt: skip
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
        lines += ["### Per difficulty level (full layout)", "",
                  f"Spearman ρ(difficulty, expected pauses) = {m['by_difficulty']['spearman']:.3f}", "",
                  "| level | tokens | accuracy (trained rule) | accuracy, no pause | accuracy, K pauses "
                  "| expected pauses | forward steps (trained rule) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for level, r in m["by_difficulty"]["levels"].items():
            lines.append(f"| {level} | {r['tokens']:,} | {r['accuracy']:.3f} | {r['first_step_accuracy']:.3f} | "
                         f"{r['last_step_accuracy']:.3f} | {r['extra_pauses']:.3f} | {r['readout_steps']:.3f} |")  # fmt: skip
        lines.append("")
    comp = report.get("comparators") or {}
    if comp:
        lines += ["## Against what (the tokens of the adaptive runs above)", "",
                  "| reader | ppl | forward steps / token |", "|---|---|---|",
                  f"| this model's step mixture, all {K} pauses given (its training context) | "
                  f"{comp['step_mixture']['ppl']:.3f} | {comp['step_mixture']['steps_per_token']:.0f} computed, "
                  f"{comp['step_mixture']['expected_steps_per_token']:.2f} expected |"]  # fmt: skip
        if "baseline" in comp:
            b = comp["baseline"]
            lines.append(f"| no-pause baseline `{b['checkpoint']}` (same tokens as the adaptive runs above) | "
                         f"{b['ppl']:.3f} | {b['steps_per_token']:.2f} |")  # fmt: skip
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

    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    m, W = report["metrics"], len(report["metrics"]["p_stop"])
    figures = {
        "latency.png": latency_figure(m["p_stop"], m["extra_pauses"]),
        "dk_rate.png": bars_figure(m["dk_rate"], "DK rate per step", "mean d_i"),
        "calibration.png": bars_figure(m["calibration_spearman"], "calibration: Spearman ρ(d_i, t_(i+1) − t_i)",
                                       "ρ", signed=True),  # fmt: skip
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

    from cyb_lightning.callbacks.stopping_time import write_histograms

    step = int(report["global_step"])
    with SummaryWriter(str(logdir)) as writer:
        if result["pauses"].numel():
            write_histograms(writer, "report", result["pauses"].float(), result["stop_sum"].cpu(), step)
        writer.add_text("report/summary", md, step)
        for name, fig in figures.items():
            writer.add_figure(f"report/{name[:-4]}", fig, step, close=False)
        for key in ("ppl", "extra_pauses", "accuracy"):
            writer.add_scalar(f"report/{key}", report["metrics"][key], step)


# -- command --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    """``python -m cyb_lightning report --ckpt_path RUN/checkpoints/last.ckpt [--out DIR] [--data.* …]``."""
    parser = argparse.ArgumentParser(prog="python -m cyb_lightning report", description=main.__doc__)
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--config", help="the run's config.yaml (default: found next to the checkpoint)")
    parser.add_argument("--out", help="report folder (default: RUN/report next to the checkpoint folder)")
    parser.add_argument("--max_batches", type=int, default=None, help="validation batches to read (default: all)")
    parser.add_argument("--min_count", type=int, default=5, help="token analysis: minimum occurrences")
    parser.add_argument("--top", type=int, default=10, help="tokens listed per quadrant")
    parser.add_argument("--adaptive", default="threshold,sample,greedy,fixed,none",
                        help="comma-separated pause policies for the teacher-forced adaptive evaluation ('' = skip); "
                        "threshold and sample follow the trained stopping rule, greedy does not")
    parser.add_argument("--threshold", type=float, default=0.5, help="τ of the threshold policy")
    parser.add_argument("--adaptive_batches", type=int, default=2, help="validation batches the adaptive runs read")
    parser.add_argument("--baseline_ckpt", help="a no-pause checkpoint (layout none) to compare with: its perplexity "
                        "on the same held-out tokens, at 1 forward step per token")
    args, overrides = parser.parse_known_args(argv)

    from cyb_lightning.evaluation.loading import load_run
    from cyb_lightning.generation import PausePolicy, Sampling, adaptive_evaluate, runner_for

    started = time.time()
    module, datamodule = load_run(args.ckpt_path, args.config, overrides)
    ckpt = torch.load(args.ckpt_path, map_location="cpu", weights_only=False)
    result = evaluate(module, datamodule.val_dataloader(), min_count=args.min_count, max_batches=args.max_batches)
    report = {
        "checkpoint": str(args.ckpt_path),
        "global_step": int(ckpt.get("global_step", 0)),
        "loss": type(module.loss_fn).__name__,
        "steps_per_token": module.hparams.steps_per_token,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "metrics": result["metrics"],
        "token_analysis": token_analysis(result["table"], datamodule.tokenizer, args.min_count, args.top),
        "adaptive": {},
    }
    for kind in [k for k in args.adaptive.split(",") if k]:
        runner = runner_for(module, PausePolicy(kind, args.threshold), Sampling(0.0), datamodule.pause_ids,
                            generator=torch.Generator().manual_seed(0))  # ``sample``: the same draws every run
        report["adaptive"][kind] = adaptive_evaluate(runner, datamodule.val_dataloader(), args.adaptive_batches)
    report["comparators"] = comparators(report, module, datamodule, args)
    out = Path(args.out) if args.out else Path(args.ckpt_path).resolve().parent.parent / "report"
    write_report(out, report, result, datamodule.tokenizer)
    report["seconds"] = round(time.time() - started, 1)
    m = report["metrics"]
    print(f"report: {out}/report.md")
    base = report["comparators"].get("baseline", {})
    for kind, r in report["adaptive"].items():
        print(f"  adaptive {kind:9s} accuracy {r['accuracy']:.3f}, ppl {r['ppl']:.3f} at {r['steps_per_token']:.2f} "
              f"steps/token ({r['batch_steps_per_token']:.2f} computed by the batch)")  # fmt: skip
        if r.get("by_difficulty"):
            print(level_table(r["by_difficulty"], base.get("by_difficulty")))
    print(f"  full layout (every token keeps its K pauses): step-mixture ppl {m['ppl']:.3f}, {m['extra_pauses']:.3f} "
          f"expected pauses/token, P(0..K) = {' / '.join(f'{p:.2f}' for p in m['p_stop'])}, accuracy of the trained rule "
          f"{m['accuracy']:.3f}")  # fmt: skip
    if "baseline" in report["comparators"]:
        b = report["comparators"]["baseline"]
        print(f"  no-pause baseline ppl {b['ppl']:.3f} at 1.00 steps/token on the same tokens")
    return report
