"""The results page of the CYB reproduction: ``OUT/runs/*/result.json`` → a markdown file + PNG plots.

    python -m cyb_lightning experiment --results-only --out runs/cyb_repro --results docs/results.md

Tables in the paper's form beside the paper's numbers (``docs/method.md`` §7), the seed spread, data
efficiency (CYB Fig. 6) and how much data each method needs to match the others, every result also
against laid-out tokens (forward positions) and training wall time, latency distributions, calibration,
token quadrants, adaptive inference, loss-vs-tokens plots for every run, and the exact commands, commit,
machine, dates and wall times. Every number in the tables is printed from a result file (3 decimals for
perplexities), so the page can be checked against them.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

CURVE_COLOURS = (
    "#1b9e77",
    "#d95f02",
    "#7570b3",
    "#e7298a",
    "#66a61e",
    "#e6ab02",
    "#a6761d",
    "#666666",
    "#1f78b4",
    "#b2182b",
)


def load_results(out: Path) -> tuple[dict, list[dict]]:
    meta = json.loads((out / "experiment.json").read_text())
    results = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))]
    return meta, results


def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return "(1 seed)"
    return f"± {statistics.stdev(values):.3f} (min {min(values):.3f}, max {max(values):.3f})"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve_plot(result: dict, path: Path) -> None:
    """Training loss and held-out perplexity against real tokens (top axis: laid-out tokens)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    train, val = result["curve"]["train"], result["curve"]["val"]
    if train:
        ax.plot(
            [p["real_tokens"] for p in train],
            [p["loss"] for p in train],
            color="#1b9e77",
            lw=1,
            label="training loss (the run's own objective)",
        )
    ax.set(xlabel="real tokens", ylabel="loss (nats)", title=f"{result['name']}: {result['label']}")
    if val:
        ax2 = ax.twinx()
        ax2.plot(
            [p["real_tokens"] for p in val],
            [p["ppl"] for p in val],
            "o-",
            color="#d95f02",
            ms=3,
            label="held-out ppl (step mixture)",
        )
        ax2.set_ylabel("held-out perplexity", color="#d95f02")
    ax.text(
        0.99,
        0.97,
        f"W = {result['W']}: laid-out tokens = {result['W']} × real",
        transform=ax.transAxes,
        ha="right",
        va="top",
        fontsize=7,
    )
    ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def comparison_plot(
    results: list[dict], x_key: str, xlabel: str, path: Path, title: str, start: float | None = None
) -> None:
    """Held-out ppl during training of every fine-tune run against ``x_key`` (one colour per method);
    ``start``: the pretrained model's ppl, where every fine-tune begins (a dashed line)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if start is not None:
        ax.axhline(start, color="black", lw=0.8, ls="--", label=f"pretrained, before fine-tuning ({start:.1f})")
    methods = list(dict.fromkeys(r["method"] for r in results))
    for r in results:
        val = r["curve"]["val"]
        if not val:
            continue
        colour = CURVE_COLOURS[methods.index(r["method"]) % len(CURVE_COLOURS)]
        style = "-" if r["name"].startswith("ft-") else ":"
        first = r is next(x for x in results if x["method"] == r["method"] and x["curve"]["val"])
        ax.plot(
            [p[x_key] for p in val],
            [p["ppl"] for p in val],
            style,
            marker=".",
            color=colour,
            lw=1,
            label=r["label"] if first else None,
        )
    ax.set(xlabel=xlabel, ylabel="held-out perplexity", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def data_to_match(points: list[tuple[float, float]], target: float) -> float | None:
    """Data factor at which a method's ppl (points: (factor, ppl), one pass each) reaches ``target``,
    interpolated linearly in log data; None when it does not within the measured range."""
    points = sorted(points)
    if not points:
        return None
    if points[0][1] <= target:
        return points[0][0]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y1 <= target:
            t = (y0 - target) / (y0 - y1) if y0 != y1 else 1.0
            return math.exp(math.log(x0) + t * (math.log(x1) - math.log(x0)))
    return None


DISCUSSION_START = "<!-- discussion: written by hand, kept when this page is rewritten -->"
DISCUSSION_END = "<!-- /discussion -->"


def kept_discussion(md_path: Path) -> str | None:
    """The hand-written block (between the discussion markers) of an existing page, so that rewriting the
    page from new result files keeps the author's reading of them."""
    if not md_path.is_file():
        return None
    text = md_path.read_text(encoding="utf-8")
    start, end = text.find(DISCUSSION_START), text.find(DISCUSSION_END)
    return text[start : end + len(DISCUSSION_END)] if 0 <= start < end else None


def de_factors(de: dict) -> list[list[int]]:
    """The data-efficiency columns: 1x1, the common factors, then every method's extra ones."""
    out = [[1, 1]]
    for f in de.get("factors", []) + sum((de.get("extra") or {}).values(), []):
        if list(f) not in out:
            out.append(list(f))
    return out


def compare(a: list[float], b: list[float]) -> str:
    """'a' against 'b' (ppl per seed): the mean difference and whether it exceeds the seed spread, i.e.
    |Δ| > 2 × the larger sample std (a crude bar with 2 seeds, and said so on the page)."""
    d = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return f"{d:+.3f} (1 seed, no spread)"
    noise = max(statistics.stdev(a), statistics.stdev(b))
    verdict = ("**lower**" if d < 0 else "**higher**") if abs(d) > 2 * noise else "within the seed spread"
    return f"{d:+.3f}: {verdict} (std {noise:.3f})"


def lr_table(plan: dict, by_name: dict) -> dict[str, dict[float, float]]:
    """Held-out ppl per method and fine-tuning learning rate: the sweep's runs and the main run (first seed)."""
    sweep, seed = plan.get("lr_sweep") or {}, plan["seeds"][0]
    table: dict[str, dict[float, float]] = {}
    for method in sweep.get("methods", []):
        names = [f"ft-{method}-s{seed}"] + [f"lr-{method}-{lr:.0e}-s{seed}" for lr in sweep["lrs"]]
        for r in (by_name[n] for n in names if n in by_name and by_name[n].get("lr") is not None):
            table.setdefault(method, {})[float(r["lr"])] = r["eval"]["ppl"]
    return table


def orderings(table: dict[str, dict[float, float]]) -> dict[float, list[str]]:
    """Per learning rate that every method of ``table`` ran at: the methods from best to worst ppl."""
    rates = set.intersection(*(set(v) for v in table.values())) if table else set()
    return {lr: sorted(table, key=lambda m: table[m][lr]) for lr in sorted(rates)}


def answer_lines(plan: dict, by_name: dict) -> list[str]:
    """The issue's question, answered from the result files: CYB vs TBYS vs the no-pause baseline at equal
    data (same real tokens) and at equal compute (same laid-out tokens), and the data CYB saves."""
    seeds, methods = plan["seeds"], plan["methods"]
    ppl = {m: [by_name[f"ft-{m}-s{s}"]["eval"]["ppl"] for s in seeds if f"ft-{m}-s{s}" in by_name] for m in methods}
    ppl = {m: v for m, v in ppl.items() if v}
    if "baseline" not in ppl:
        return []
    label = lambda m: methods[m]["label"]  # noqa: E731
    cyb = [m for m in ppl if m.startswith("cyb")]
    tbys = [m for m in ppl if m.startswith("tbys")]
    L = [
        "## The answer, from the result files",
        "",
        f"**Equal data** (one pass over fine-tuning set A, the same real tokens and steps; mean held-out ppl over "
        f"seeds {seeds}; 'beyond the seed spread' = |Δ| > 2 × the larger sample std):",
        "",
    ]
    for m in sorted(ppl, key=lambda m: statistics.fmean(ppl[m])):
        L.append(f"- {label(m)}: {statistics.fmean(ppl[m]):.3f}")
    L.append("")
    others = ["baseline"] + tbys
    L += ["| CYB run, Δ ppl against → | " + " | ".join(label(o) for o in others) + " |", "|---|" + "---|" * len(others)]
    for c in cyb:
        L.append(f"| {label(c)} | " + " | ".join(compare(ppl[c], ppl[o]) for o in others) + " |")
    base_runs = [r for r in by_name.values() if r["method"] == "baseline" and r["seed"] == seeds[0]]
    if not {b["laid_out_tokens"] for b in base_runs} & {r["laid_out_tokens"] for r in by_name.values() if r["W"] > 1}:
        L += [
            "",
            "**Equal compute**: this plan has no baseline run given the pause runs' laid-out tokens; compare "
            "against laid-out tokens in the plots below.",
        ]
        base_runs = []  # no table
    else:
        L += [
            "",
            "**Equal compute** (the same laid-out tokens, i.e. forward positions: a run with K pauses per "
            "token against the no-pause baseline given K + 1 times the steps, on more passes or more data):",
            "",
            "| pause run (1×1, seed 0) | laid-out tokens | ppl | baseline run, same laid-out tokens | its ppl | Δ ppl "
            "| training wall s (pause / baseline) |",
            "|---|---|---|---|---|---|---|",
        ]
    for m in tbys + cyb if base_runs else []:
        r = by_name.get(f"ft-{m}-s{seeds[0]}")
        if not r:
            continue
        same = [b for b in base_runs if b["laid_out_tokens"] == r["laid_out_tokens"]]
        for b in same or [None]:
            if b is None:
                L.append(f"| {r['name']} | {r['laid_out_tokens']:,} | {_f(r['eval']['ppl'])} | – | – | – | – |")
                continue
            L.append(
                f"| {r['name']} | {r['laid_out_tokens']:,} | {_f(r['eval']['ppl'])} | {b['name']} "
                f"({b['epochs']} pass(es) over {b['data']}× data) | {_f(b['eval']['ppl'])} "
                f"| {r['eval']['ppl'] - b['eval']['ppl']:+.3f} | {r['train_wall_s']:.0f} / {b['train_wall_s']:.0f} |"
            )
    de = plan.get("data_efficiency") or {}
    pts = (
        lambda m: (
            [(1, by_name[f"ft-{m}-s{seeds[0]}"]["eval"]["ppl"])]
            + [  # noqa: E731
                (d, by_name[f"de-{m}-1x{d}-s{seeds[0]}"]["eval"]["ppl"])
                for e, d in de_factors(de)[1:]
                if e == 1 and f"de-{m}-1x{d}-s{seeds[0]}" in by_name
            ]
        )
    )
    lines = []
    for c in [m for m in de.get("methods", []) if m.startswith("cyb") and f"ft-{m}-s{seeds[0]}" in by_name]:
        goal = by_name[f"ft-{c}-s{seeds[0]}"]["eval"]["ppl"]
        for o in [m for m in de.get("methods", []) if not m.startswith("cyb") and f"ft-{m}-s{seeds[0]}" in by_name]:
            p = pts(o)
            x = data_to_match(p, goal)
            if p[0][1] <= goal:
                lines.append(
                    f"- {label(o)} needs no more data: at 1× it is already at {p[0][1]:.3f} ≤ {label(c)}'s "
                    f"{goal:.3f}, so {label(c)} saves none."
                )
            elif x is None:
                lines.append(
                    f"- {label(o)} does not reach {label(c)}'s 1× ppl {goal:.3f} with up to "
                    f"{max(d for d, _ in p)}× data: {label(c)} saves more than that."
                )
            else:
                lines.append(
                    f"- {label(o)} needs {x:.2f}× the data to reach {label(c)}'s 1× ppl {goal:.3f}: "
                    f"{label(c)} saves {100 * (1 - 1 / x):.0f} % of the data."
                )
    if lines:
        L += ["", f"**Data saved** (fresh data, one pass; seed {seeds[0]}; interpolated in log data):", ""] + lines
    order = orderings(lr_table(plan, by_name))
    if len(order) > 1:
        text = lambda o: " < ".join(label(m) for m in o)  # noqa: E731
        same = len({tuple(o) for o in order.values()}) == 1
        L += [
            "",
            f"**Learning rate** (the 1×1 fine-tune at {len(order)} rates, seed {seeds[0]}): "
            + (
                f"the same ordering at every rate: {text(next(iter(order.values())))} (held-out ppl)."
                if same
                else "the ordering depends on the rate: "
                + "; ".join(f"lr {lr:g}: {text(o)}" for lr, o in order.items())
                + " (held-out ppl)."
            ),
        ]
    return L + [""]


def write_results(out: Path, md_path: Path, img_dir: Path | None = None) -> Path:
    """Write ``md_path`` and its PNGs (default: ``img/results`` beside it) from ``out``'s result files."""
    out, md_path = Path(out), Path(md_path)
    img_dir = Path(img_dir) if img_dir else md_path.parent / "img" / md_path.stem  # docs/img/results for results.md
    img_dir.mkdir(parents=True, exist_ok=True)
    meta, results = load_results(out)
    plan = meta["plan"]
    by_name = {r["name"]: r for r in results}
    rel = lambda p: os.path.relpath(p, md_path.parent)  # noqa: E731
    paper = plan.get("paper", {})
    s = plan["sizes"]
    seeds = plan["seeds"]
    L: list[str] = []
    inv = meta["invocations"]
    total_wall = sum(i.get("wall_s", 0) for i in inv)
    L += [
        "# " + plan.get("title", "Results: the CYB comparison at small scale"),
        "",
        f"Produced by `{inv[0]['command']}` (docs/experiments.md) and written from its result files by "
        "`cyb_lightning/experiments/results.py`. Paper numbers: CYB v1 (Gemma-1 2B fine-tuned on C4, read off the "
        "paper's figures, `docs/method.md` §7). "
        + plan.get(
            "description",
            "Ours: held-out perplexity of the step mixture (γ = 1, ω = (0,…,0,1); "
            "ordinary perplexity without pauses) on this corpus, so the absolute values are not comparable "
            "with C4's; the orderings and relative gaps are.",
        ),
        "",
    ]
    L += answer_lines(plan, by_name)
    kept = kept_discussion(md_path)
    if kept:
        L += [kept, ""]
    L += ["## How it was run", "", "| | |", "|---|---|"]
    for i, v in enumerate(inv):
        L.append(
            f"| invocation {i + 1} | `{v['command']}` — {v['started']} → {v.get('finished', 'interrupted')}, "
            f"{v.get('wall_s', 0) / 60:.1f} min, {len(v['ran'])} runs ran, {len(v['skipped'])} skipped, load average "
            f"{v.get('load_average_at_start', ['?'])[0]} at start, {v.get('load_average_now', ['?'])[0]} at the end |"
        )
    L += [
        f"| commit | {inv[-1]['commit']} |",
        f"| machine | {inv[-1]['machine']} |",
        f"| total wall time | {total_wall / 60:.1f} min (all invocations) |",
        f"| sizes | T = {s['seq_len']} real tokens, batch {s['batch_size']}, "
        + (f"pretraining {s['pretrain_steps']} steps, " if plan.get("pretrain") else "no pretraining stage, ")
        + f"fine-tuning {s['finetune_steps']} steps (1×1), seeds {seeds} |",
        "",
    ]
    c = meta["corpus"]
    tok = c["params"].get("tokenizer")
    L += [
        "Corpus (`OUT/corpus/manifest.json`): "
        + ", ".join(f"{k}: {v:,} documents" for k, v in c["sources"].items())
        + (
            f"; tokens of the pretrained model's own tokenizer ({tok['init_args']['name_or_path']}, "
            f"{c['vocab_size']:,} ids with DK and the pauses)."
            if tok
            else f"; BPE of {c['vocab_size']:,} ids trained on the pretraining part."
        ),
        "",
        "| part | documents | tokens |",
        "|---|---|---|",
    ]
    L += [f"| {k} | {v['documents']:,} | {v['tokens']:,} |" for k, v in c["parts"].items()] + [""]

    # -- main comparison -----------------------------------------------------------------------------------
    L += [
        "## Main comparison (CYB §6 table)",
        "",
        "Every fine-tune starts from the same pretrained decoder and reads the same real tokens in the same "
        f"number of steps ({s['finetune_steps']}); ppl per seed, then mean and spread (sample std over seeds).",
        "The trained-rule reader is teacher-forced adaptive inference that stops at the first step with "
        "d < 0.5 (its forward steps per token are its inference compute against the baseline's 1); laid-out "
        "tokens are training compute (forward positions: FLOPs of the same decoder, attention aside).",
        "",
        "| model | paper C4 ppl | ours: held-out ppl (mean) | spread over seeds | per seed | extra pauses / token "
        "| trained-rule reader: ppl / steps per token (mean) | real tokens | laid-out tokens | training wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    pre = by_name.get("pretrain")
    if pre:
        L.append(
            f"| pretrained, no finetuning | {_f(paper.get('pretrained'), 2)} | {_f(pre['eval']['ppl'])} | – | – "
            f"| 0 | – | {pre['real_tokens']:,} | {pre['laid_out_tokens']:,} | {pre['train_wall_s']:.1f} |"
        )
    means: dict[str, float] = {}
    for method, m in plan["methods"].items():
        runs = [by_name[f"ft-{method}-s{sd}"] for sd in seeds if f"ft-{method}-s{sd}" in by_name]
        if not runs:
            continue
        ppl = [r["eval"]["ppl"] for r in runs]
        means[method] = statistics.fmean(ppl)
        reader = [r["adaptive"]["threshold"] for r in runs if "threshold" in (r.get("adaptive") or {})]
        read = (
            f"{statistics.fmean(a['ppl'] for a in reader):.3f} / {statistics.fmean(a['steps_per_token'] for a in reader):.2f}"
            if reader
            else "–"
        )
        L.append(
            f"| {m['label']} | {_f(m.get('paper'), 2)} | {_f(means[method])} | {_spread(ppl)} | "
            + " / ".join(_f(x) for x in ppl)
            + f" | {statistics.fmean(r['eval']['extra_pauses'] for r in runs):.3f} "
            f"| {read} | {runs[0]['real_tokens']:,} | {runs[0]['laid_out_tokens']:,} "
            f"| {statistics.fmean(r['train_wall_s'] for r in runs):.1f} |"
        )
    L.append("")
    if "baseline" in means:
        b = means["baseline"]
        L += [
            "Relative to the no-pause baseline (mean ppl; paper: relative to 12.17):",
            "",
            "| model | ours Δppl | ours Δ% | paper Δ% |",
            "|---|---|---|---|",
        ]
        for method, v in means.items():
            pp = plan["methods"][method].get("paper")
            paper_rel = f"{100 * (pp / plan['methods']['baseline']['paper'] - 1):+.1f} %" if pp else "–"
            L.append(
                f"| {plan['methods'][method]['label']} | {v - b:+.3f} | {100 * (v / b - 1):+.1f} % | {paper_rel} |"
            )
        L.append("")

    # -- data efficiency --------------------------------------------------------------------------------
    de = plan.get("data_efficiency") or {}
    if de.get("methods"):
        factors = de_factors(de)
        L += [
            "## Data efficiency (CYB Fig. 6)",
            "",
            "E×D: D times the data of 1×1 (disjoint sets A, B, C), E passes over it; the steps grow with both. "
            "Seed " + str(seeds[0]) + "; – where the plan has no such run.",
            "",
            "| method | " + " | ".join(f"{e}×{d}" for e, d in factors) + " |",
            "|---|" + "---|" * len(factors),
        ]
        de_ppl: dict[str, dict[str, float]] = {}
        for method in de["methods"]:
            cells = []
            for e, d in factors:
                name = f"ft-{method}-s{seeds[0]}" if (e, d) == (1, 1) else f"de-{method}-{e}x{d}-s{seeds[0]}"
                r = by_name.get(name)
                key = f"{e}x{d}"
                pp = (de.get("paper") or {}).get(method, {}).get(key)
                if r:
                    de_ppl.setdefault(method, {})[key] = r["eval"]["ppl"]
                cells.append((_f(r["eval"]["ppl"]) if r else "–") + (f" (paper {pp:.2f})" if pp else ""))
            L.append(f"| {plan['methods'][method]['label']} | " + " | ".join(cells) + " |")
        L += [
            "",
            "Laid-out tokens (forward positions) and training wall time of the same runs:",
            "",
            "| method | " + " | ".join(f"{e}×{d}" for e, d in factors) + " |",
            "|---|" + "---|" * len(factors),
        ]
        for method in de["methods"]:
            cells = []
            for e, d in factors:
                name = f"ft-{method}-s{seeds[0]}" if (e, d) == (1, 1) else f"de-{method}-{e}x{d}-s{seeds[0]}"
                r = by_name.get(name)
                cells.append(f"{r['laid_out_tokens']:,} / {r['train_wall_s']:.0f} s" if r else "–")
            L.append(f"| {plan['methods'][method]['label']} | " + " | ".join(cells) + " |")
        L += [
            "",
            "How much fresh data (1×D, one pass) each method needs to reach another's 1×1 perplexity "
            "(interpolated in log data; '> 3×' when not reached):",
            "",
            "| method | " + " | ".join(f"to reach {plan['methods'][t]['label']} 1×1" for t in de["methods"]) + " |",
            "|---|" + "---|" * len(de["methods"]),
        ]
        for method in de["methods"]:
            pts = [(d, v) for key, v in de_ppl.get(method, {}).items() for e, d in [map(int, key.split("x"))] if e == 1]
            cells = []
            for target in de["methods"]:
                goal = de_ppl.get(target, {}).get("1x1")
                x = data_to_match(pts, goal) if goal is not None else None
                top = max((p[0] for p in pts), default=1)
                cells.append("–" if goal is None else (f"{x:.2f}×" if x is not None else f"> {top}×"))
            L.append(f"| {plan['methods'][method]['label']} | " + " | ".join(cells) + " |")
        L.append("")

    # -- learning rate ------------------------------------------------------------------------------------
    table = lr_table(plan, by_name)
    if table:
        rates = sorted({lr for v in table.values() for lr in v})
        main_lr = next(
            (by_name[f"ft-{m}-s{seeds[0]}"].get("lr") for m in table if f"ft-{m}-s{seeds[0]}" in by_name), None
        )
        L += [
            "## Fine-tuning learning rate",
            "",
            "The main comparison fine-tunes at "
            + (f"lr {main_lr:g}" if main_lr else "the rate of")
            + " (`conf/experiments/layers/finetune.yaml`; "
            "pretraining: `layers/pretrain.yaml`"
            + (f", lr {pre['lr']:g}" if pre and pre.get("lr") else "")
            + "; both warm up, then decay "
            "along a cosine to 1 %). The same 1×1 fine-tune at other rates "
            f"(seed {seeds[0]}; held-out ppl; the pretrained model before fine-tuning: "
            f"{_f(pre['eval']['ppl']) if pre else '–'}):",
            "",
            "| method | " + " | ".join(f"lr {lr:g}" + (" (main)" if lr == main_lr else "") for lr in rates) + " |",
            "|---|" + "---|" * len(rates),
        ]
        for method, row in table.items():
            L.append(f"| {plan['methods'][method]['label']} | " + " | ".join(_f(row.get(lr)) for lr in rates) + " |")
        L.append("")

    # -- compute --------------------------------------------------------------------------------------------
    ft = [r for r in results if r["kind"] == "finetune" and not r["name"].startswith("lr-")]
    for key, label, fname in (
        ("real_tokens", "real tokens", "ppl_vs_real_tokens.png"),
        ("laid_out_tokens", "laid-out tokens (forward positions)", "ppl_vs_laid_out_tokens.png"),
        ("train_wall_s", "training wall time (s)", "ppl_vs_wall_time.png"),
    ):
        comparison_plot(
            ft, key, label, img_dir / fname, f"held-out perplexity vs {label}", pre["eval"]["ppl"] if pre else None
        )
    L += [
        "## Equal data and equal compute",
        "",
        "Held-out perplexity during fine-tuning (every run; solid: main comparison, dotted: data efficiency) "
        "against real tokens, laid-out tokens (what the decoder computes: K pauses cost K more positions per "
        "token) and training wall time on this machine:",
        "",
        f"![ppl vs real tokens]({rel(img_dir / 'ppl_vs_real_tokens.png')}) "
        f"![ppl vs laid-out tokens]({rel(img_dir / 'ppl_vs_laid_out_tokens.png')}) "
        f"![ppl vs wall time]({rel(img_dir / 'ppl_vs_wall_time.png')})",
        "",
        "| run | held-out ppl | real tokens | laid-out tokens | training wall s | fit wall s | eval wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        L.append(
            f"| {r['name']} | {_f(r['eval']['ppl'])} | {r['real_tokens']:,} | {r['laid_out_tokens']:,} | "
            f"{r['train_wall_s']:.1f} | {r['fit_wall_s']:.1f} | {r['eval_wall_s']:.1f} |"
        )
    L.append("")

    # -- latency, calibration, adaptive ------------------------------------------------------------------
    pause_runs = [r for r in results if r["W"] > 1 and r["eval"].get("dk_rate")]
    if pause_runs:
        K = max(r["W"] for r in pause_runs) - 1
        L += [
            "## Latency distributions and calibration",
            "",
            "P(0 … K extra pauses) = mean stopping distribution s over held-out tokens; calibration = Spearman "
            "ρ(d_i, t_(i+1) − t_i) per step. Paper (chosen CYB-AP model): P = "
            + " / ".join(f"{p:.2f}" for p in paper.get("cyb_ap_latency", []))
            + ", ρ = "
            + " / ".join(f"{p:.2f}" for p in paper.get("cyb_ap_calibration", []))
            + ".",
            "",
            f"| run | P(0…{K} extra pauses) | mean pauses / token | DK rate per step | calibration ρ per step "
            "| accuracy at readout | readout steps / token |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in pause_runs:
            e = r["eval"]
            L.append(
                f"| {r['name']} | {' / '.join(_f(p) for p in e['p_stop'])} | {_f(e['extra_pauses'])} | "
                f"{' / '.join(_f(p) for p in e['dk_rate'])} | "
                f"{' / '.join(_f(p) for p in (e['calibration_spearman'] or []))} | {_f(e['accuracy'])} | "
                f"{_f(e['readout_steps'])} |"
            )
        L.append("")
        ad = [r for r in pause_runs if r.get("adaptive")]
        if ad:
            L += [
                "Teacher-forced adaptive inference (compute actually spent; `cyb_lightning.generation`, "
                f"{s['adaptive_batches']} held-out batches):",
                "",
                "| run | trained rule (d < 0.5): ppl / steps per token | sampled stop (probability 1 − d) "
                "| greedy on DK (not the trained rule) | fixed K: ppl / steps | no pauses: ppl / steps |",
                "|---|---|---|---|---|---|",
            ]
            for r in ad:
                a = r["adaptive"]
                L.append(
                    f"| {r['name']} | "
                    + " | ".join(
                        f"{_f(a[k]['ppl'])} / {a[k]['steps_per_token']:.2f}" if k in a else "not measured"
                        for k in ("threshold", "sample", "greedy", "fixed", "none")
                    )
                    + " |"
                )
            L.append("")
        L += ["Latency pictures (from each run's report folder):", ""]
        for r in pause_runs:
            src = out / r["report_dir"] / "latency.png"
            if src.is_file():
                dst = img_dir / f"latency_{r['name']}.png"
                dst.write_bytes(src.read_bytes())
                L.append(f"![latency {r['name']}]({rel(dst)})")
        L.append("")

    # -- tokens ------------------------------------------------------------------------------------------
    dk_runs = [
        r for r in pause_runs if r["method"].startswith("cyb") and r["name"].startswith("ft-") and r["seed"] == seeds[0]
    ]
    if dk_runs:
        L += [
            "## Token quadrants (CYB Table 3)",
            "",
            "Per vocabulary item (seen ≥ 5 times in the held-out part): median and variance of the expected "
            "extra pauses after it, split at the medians over tokens; the top tokens of each quadrant. Paper: "
            "plural nouns pause most, first pieces of contractions almost never, ambiguous tokens vary.",
            "",
        ]
        for r in dk_runs:
            L += [
                f"**{r['name']}** ({r['tokens_analysed']} tokens analysed)",
                "",
                "| quadrant | tokens (median, variance) |",
                "|---|---|",
            ]
            for q, rows in r["quadrants"].items():
                toks = ", ".join(
                    f"`{repr(t['text'])[1:-1].replace('`', chr(39)).replace('|', '/')}` "
                    f"({t['median']:.2f}, {t['variance']:.2f})"
                    for t in rows[:8]
                )
                L.append(f"| {q.replace('_', ' ')} | {toks or '–'} |")
            src = out / r["report_dir"] / "token_quadrants.png"
            if src.is_file():
                dst = img_dir / f"quadrants_{r['name']}.png"
                dst.write_bytes(src.read_bytes())
                L += ["", f"![token quadrants {r['name']}]({rel(dst)})"]
            L.append("")

    # -- curves and commands ------------------------------------------------------------------------------
    L += ["## Loss against tokens, every run", ""]
    for r in results:
        path = img_dir / f"curve_{r['name']}.png"
        curve_plot(r, path)
        L.append(f"![{r['name']}]({rel(path)})")
    L += [
        "",
        "## Exact commands",
        "",
        "Each run is this command (run in-process by the experiment script; "
        "`run.yaml` is the per-run layer it wrote: data folder, tokenizer, steps, seed, `init_from`):",
        "",
        "| run | command | finished |",
        "|---|---|---|",
    ]
    for r in results:
        L.append(f"| {r['name']} | `{r['command']}` | {r['date']} |")
    L.append("")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(L), encoding="utf-8")
    return md_path
