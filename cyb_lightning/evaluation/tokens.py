"""CYB's Table 3: which tokens make the model pause, split into four quadrants (pure functions)."""

from __future__ import annotations

import torch
from torch import Tensor

QUADRANTS = (
    "high_median_high_variance",
    "high_median_low_variance",
    "low_median_high_variance",
    "low_median_low_variance",
)


def quadrants(table: dict[str, Tensor], top: int = 10) -> dict[str, list[int]]:
    """Row indices of ``table`` (from ``metrics.token_table``) in each quadrant, top-``top`` each.

    Splits are the medians (over tokens) of the per-token median and of the per-token variance; a value
    equal to the split counts as low. Within a quadrant tokens are ranked by their median in the quadrant's
    direction (highest first for "high", lowest first for "low"), ties broken by the variance likewise.
    """
    med, var = table["median"].double(), table["variance"].double()
    if med.numel() == 0:
        return {q: [] for q in QUADRANTS}
    med_split, var_split = med.median(), var.median()
    hi_m, hi_v = med > med_split, var > var_split
    out = {}
    for q in QUADRANTS:
        want_m, want_v = q.startswith("high_median"), q.endswith("high_variance")
        rows = torch.nonzero((hi_m == want_m) & (hi_v == want_v)).flatten()
        sm = med[rows] if want_m else -med[rows]
        sv = var[rows] if want_v else -var[rows]
        # Sort by the median score, then the variance score (both descending): a lexicographic key.
        order = sorted(range(rows.numel()), key=lambda j: (-float(sm[j]), -float(sv[j])))
        out[q] = [int(rows[j]) for j in order[:top]]
    return out
