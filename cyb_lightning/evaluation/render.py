"""Text with every token coloured by its (expected) extra pauses: HTML and PNG."""

from __future__ import annotations

import html
import os
from collections.abc import Sequence


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text of each token, as the growing prefix decodes it (multi-byte characters stay whole)."""
    pieces, prev = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1])
        pieces.append(text[len(prev) :] if text.startswith(prev) else tokenizer.decode([ids[i]]))
        prev = text
    return pieces


def colour(value: float, vmax: float) -> tuple[int, int, int]:
    """White (0 pauses) → orange → red (``vmax`` pauses)."""
    x = 0.0 if vmax <= 0 else min(max(value / vmax, 0.0), 1.0)
    return 255, int(255 - 175 * x), int(255 - 255 * min(1.0, 1.6 * x))


def to_html(pieces: Sequence[str], values: Sequence[float], vmax: float, title: str = "") -> str:
    spans = []
    for piece, v in zip(pieces, values):
        r, g, b = colour(v, vmax)
        text = html.escape(piece).replace("\n", "↵<br>")
        spans.append(f'<span title="{v:.2f} pauses" style="background:rgb({r},{g},{b})">{text}</span>')
    legend = " ".join(
        f'<span style="background:rgb{colour(k, vmax)};padding:0 6px">{k}</span>' for k in range(int(vmax) + 1)
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
        f"<body style='font-family:monospace;max-width:60em'><h3>{html.escape(title)}</h3>"
        f"<p>expected extra pauses after each token: {legend}</p>"
        f"<pre style='white-space:pre-wrap'>{''.join(spans)}</pre></body></html>"
    )


def write_html(path: str | os.PathLike, pieces, values, vmax: float, title: str = "") -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(to_html(pieces, values, vmax, title))


def text_figure(pieces: Sequence[str], values: Sequence[float], vmax: float, title: str = "", width: int = 90):
    """A matplotlib figure of the coloured text (monospace, wrapped at ``width`` characters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: list[list[tuple[str, float]]] = [[]]
    col = 0
    for piece, v in zip(pieces, values):
        for k, part in enumerate(piece.split("\n")):
            if k:
                lines.append([])
                col = 0
            if col + len(part) > width and col:
                lines.append([])
                col = 0
            lines[-1].append((part.replace("\t", "    "), v))
            col += len(part)
    n = max(1, len(lines))
    fig = plt.figure(figsize=((width + 2) * 0.0753, 0.2 * (n + 2)))  # one x unit = one 9 pt monospace char
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width + 2)
    ax.set_ylim(n + 2, 0)
    ax.axis("off")
    ax.text(1, 0.9, title or "expected extra pauses per token", fontsize=10, weight="bold")
    for row, line in enumerate(lines):
        x = 1
        for part, v in line:
            if part:
                rgb = tuple(c / 255 for c in colour(v, vmax))
                ax.add_patch(plt.Rectangle((x, row + 1.1), len(part), 1.0, color=rgb, lw=0))
                ax.text(x, row + 1.85, part, family="monospace", fontsize=9)
                x += len(part)
    return fig


def write_png(path: str | os.PathLike, pieces, values, vmax: float, title: str = "") -> None:
    import matplotlib.pyplot as plt

    fig = text_figure(pieces, values, vmax, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
