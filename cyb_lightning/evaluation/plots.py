"""The pictures of the evaluation: the figures of ``report`` and the training callbacks, and the stopping-time
histograms they write to TensorBoard (one place, so a report and a fit draw the same views)."""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from cyb_lightning.evaluation.tokens import QUADRANTS


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_figure(p_stop: list[float], mean: float):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    k = list(range(len(p_stop)))
    ax.bar(k, p_stop, color="#d95f02")
    for x, p in zip(k, p_stop):
        ax.text(x, p, f"{p:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set(
        xlabel="extra pauses",
        ylabel="P",
        title=f"latency distribution (mean {mean:.2f} pauses/token)",
        xticks=k,
        ylim=(0, max(p_stop + [0.01]) * 1.15),
    )
    fig.tight_layout()
    return fig


def bars_figure(values: list[float] | None, title: str, ylabel: str, first_step: int = 1, signed: bool = False):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    if values:
        steps = list(range(first_step, first_step + len(values)))
        shown = [0.0 if (v is None or math.isnan(v)) else v for v in values]
        ax.bar(steps, shown, color="#1b9e77")
        for x, v in zip(steps, values):
            ax.text(
                x,
                0 if v is None or math.isnan(v) else v,
                "n/a" if v is None or math.isnan(v) else f"{v:.2f}",
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(steps)
        if signed:
            ax.axhline(0, color="black", lw=0.8)
            ax.set_ylim(-1, 1)
    else:
        ax.text(
            0.5, 0.5, "not applicable\n(the loss has no DK output)", ha="center", va="center", transform=ax.transAxes
        )
    ax.set(xlabel="step i", ylabel=ylabel, title=title)
    fig.tight_layout()
    return fig


def quadrant_figure(analysis: dict, label_top: int = 4):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    tokens = analysis["tokens"]
    if tokens:
        ax.scatter(
            [t["median"] for t in tokens],
            [t["variance"] for t in tokens],
            s=[8 + 2 * math.sqrt(t["count"]) for t in tokens],
            alpha=0.35,
            color="grey",
        )
        split = analysis["split"]
        ax.axvline(split["median"], color="black", lw=0.7, ls="--")
        ax.axhline(split["variance"], color="black", lw=0.7, ls="--")
        colours = dict(zip(QUADRANTS, ("#d95f02", "#7570b3", "#e7298a", "#1b9e77")))
        for q, rows in analysis["quadrants"].items():
            for t in rows[:label_top]:
                ax.scatter([t["median"]], [t["variance"]], color=colours[q], s=18)
                ax.annotate(
                    repr(t["text"])[1:-1],
                    (t["median"], t["variance"]),
                    fontsize=7,
                    color=colours[q],
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    else:
        ax.text(0.5, 0.5, f"no token seen {analysis['min_count']}+ times", ha="center", transform=ax.transAxes)
    ax.set(xlabel="median expected extra pauses", ylabel="variance", title="tokens by pausing (CYB Table 3)")
    fig.tight_layout()
    return fig


def write_histograms(writer, stage: str, pauses: Tensor, stop_sum: Tensor, step: int) -> None:
    """Write both histograms with a ``SummaryWriter``; bucket k of ``stop_step`` is P(k extra pauses)."""
    steps = stop_sum.numel()
    edges = np.linspace(-0.5, steps - 0.5, 8 * steps + 1)  # 8 bins per pause count: fine but readable
    writer.add_histogram(f"{stage}/pauses/expected_per_token", pauses.numpy(), step, bins=edges)
    write_stop_histogram(writer, f"{stage}/pauses/stop_step", stop_sum, step)


def write_stop_histogram(writer, tag: str, stop_sum: Tensor, step: int) -> None:
    """The latency distribution as a histogram: bucket k holds P(k extra pauses) (Σ s normalised)."""
    steps = stop_sum.numel()
    probs = (stop_sum / stop_sum.sum().clamp_min(1e-12)).numpy()
    k = np.arange(steps, dtype=np.float64)
    writer.add_histogram_raw(
        tag,
        min=0.0,
        max=float(steps - 1),
        num=float(probs.sum()),
        sum=float((probs * k).sum()),
        sum_squares=float((probs * k * k).sum()),
        bucket_limits=(k + 0.5).tolist(),
        bucket_counts=probs.tolist(),
        global_step=step,
    )
