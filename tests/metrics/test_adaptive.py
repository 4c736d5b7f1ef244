"""AdaptiveReadout: what the adaptive reader did, on hand-made traces."""

from __future__ import annotations

import math

import pytest
import torch

from cyb_lightning.metrics.adaptive import AdaptiveReadout, readout_summary


def test_totals_per_level_and_spearman_on_known_values():
    steps = torch.tensor([[1, 1, 4, 2], [1, 3, 4, 1]])
    correct = torch.tensor([[True, True, False, True], [True, False, True, True]])
    nll = torch.tensor([[0.1, 0.2, 2.0, 0.5], [0.1, 1.0, 0.3, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    difficulty = torch.tensor([[1, 1, 3, 2], [1, 2, 3, -1]])
    m = AdaptiveReadout(4, max_level=5)
    m.update(steps, correct, nll, mask, difficulty, calls=9)
    r = m.compute()
    assert r["tokens"] == 7 and math.isclose(r["accuracy"], 5 / 7)
    assert math.isclose(r["steps_per_token"], 16 / 7) and math.isclose(r["nll"], 4.2 / 7)
    assert r["p_pauses"].tolist() == pytest.approx([3 / 7, 1 / 7, 1 / 7, 2 / 7])
    assert math.isclose(r["batch_steps_per_token"], 9 * 2 / 8)  # every row at every call, masked ones included
    assert r["level_tokens"][[1, 2, 3]].tolist() == [3, 2, 2]
    assert r["level_accuracy"][[1, 2, 3]].tolist() == pytest.approx([1.0, 0.5, 0.5])
    assert r["level_steps"][[1, 2, 3]].tolist() == pytest.approx([1.0, 2.5, 4.0])
    assert r["level_p_pauses"][2].tolist() == pytest.approx([0.0, 0.5, 0.5, 0.0])
    assert math.isnan(r["level_accuracy"][4])
    # Pauses rise with difficulty: level (1, 1, 3, 2, 1, 2, 3) vs pauses (0, 0, 3, 1, 0, 2, 3), scipy's value.
    assert math.isclose(float(r["spearman"]), 0.9901475429766743, rel_tol=1e-6)
    summary = readout_summary(r)
    assert sorted(summary["by_difficulty"]) == [1, 2, 3] and summary["fixed_steps"] == 4.0
    assert summary["by_difficulty"][2]["steps_per_token"] == 2.5 and summary["spearman"] == pytest.approx(0.99014754)


def test_without_labels_there_is_no_level_breakdown():
    m = AdaptiveReadout(2)
    m.update(torch.tensor([[1, 2]]), torch.tensor([[True, False]]), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool))
    s = readout_summary(m.compute())
    assert "by_difficulty" not in s and s["steps_per_token"] == 1.5 and s["compute_saved"] == 0.25
