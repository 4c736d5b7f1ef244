"""Metric values on hand-built logits where the answer is known, and the reduction across 2 processes."""

from __future__ import annotations

import math

import pytest
import torch

from cyb_lightning.evaluation.tokens import quadrants
from cyb_lightning.losses import CYBAP, TBYSPerToken
from cyb_lightning.metrics import (
    CalibrationSpearman,
    ReadoutAccuracy,
    StoppingStats,
    TokenPauseStats,
    step_statistics,
    stopping_readout,
    token_table,
)

V, DK = 6, 2  # ids 0..5, DK = 2; targets are 4 or 5


def hand_logits(d: list[list[float]], t: list[list[float]], targets: list[int]) -> torch.Tensor:
    """float64 logits ``[N, W, V]`` whose steps have exactly d_i = p_i(DK) and t_i = p_i(y | not DK).

    Non-DK ids other than y share the rest equally: z_y = log t, z_v = log((1 − t)/(V − 2)), and the DK
    logit is log(d/(1 − d)) (the non-DK logits' LSE is 0).
    """
    d_, t_ = torch.tensor(d, dtype=torch.float64), torch.tensor(t, dtype=torch.float64)
    N, W = d_.shape
    z = ((1 - t_) / (V - 2)).log()[..., None].expand(N, W, V).clone()
    y = torch.tensor(targets)
    z.scatter_(-1, y.view(-1, 1, 1).expand(N, W, 1), t_.log()[..., None])
    z[..., DK] = (d_ / (1 - d_)).log()
    return z


D = [[0.5, 0.25, 0.9], [0.1, 0.8, 0.3], [0.9, 0.9, 0.5]]
T = [[0.2, 0.4, 0.6], [0.5, 0.5, 0.9], [0.1, 0.3, 0.8]]
Y = [4, 5, 4]


def expected_stop(d):
    d1, d2, _ = d
    return [1 - d1, d1 * (1 - d2), d1 * d2]


def test_latency_distribution_and_perplexity_on_hand_built_logits():
    loss = CYBAP(omega=[0, 0, 1], psi_dk=None)
    stats = step_statistics(hand_logits(D, T, Y), torch.tensor(Y), DK, loss)
    s = torch.tensor([expected_stop(d) for d in D], dtype=torch.float64)
    torch.testing.assert_close(stats.stop.double(), s)
    metric = StoppingStats(3)
    metric.update(stats)
    out = metric.compute()
    torch.testing.assert_close(out["p_stop"], s.mean(0))
    mean_pauses = float((s @ torch.tensor([0.0, 1, 2], dtype=torch.float64)).mean())
    assert math.isclose(float(out["extra_pauses"]), mean_pauses, rel_tol=1e-12)
    nll = -(s * torch.tensor(T, dtype=torch.float64)).sum(1).log()
    assert math.isclose(float(out["ppl"]), math.exp(float(nll.mean())), rel_tol=1e-9)
    torch.testing.assert_close(out["dk_rate"], torch.tensor(D, dtype=torch.float64).mean(0))


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    # Every non-DK id equally likely at every step: Σ_i s_i t_i = 1 / (V − 1) whatever d is.
    logits = torch.zeros(5, 3, V)
    logits[..., DK] = torch.randn(5, 3)
    metric = StoppingStats(3)
    metric.update(step_statistics(logits, torch.full((5,), 4), DK, CYBAP(omega=[0, 0, 1], psi_dk=None)))
    assert math.isclose(float(metric.compute()["ppl"]), V - 1, rel_tol=1e-6)


def test_baseline_perplexity_is_ordinary_perplexity():
    logits = torch.randn(8, 3, V)
    y = torch.randint(3, V, (8,))
    metric = StoppingStats(3)
    metric.update(step_statistics(logits, y, DK, TBYSPerToken()))
    out = metric.compute()
    z = logits[:, -1].double().clone()
    z[:, DK] = -math.inf
    ce = torch.nn.functional.cross_entropy(z, y)
    assert math.isclose(float(out["ppl"]), math.exp(float(ce)), rel_tol=1e-6)
    assert out["p_stop"].tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("sign", [1, -1])
def test_calibration_spearman_sign(sign):
    # d_1 rises with the gain t_2 − t_1 (a calibrated model) or falls with it; step 2 is noise.
    gains = torch.linspace(-0.3, 0.5, 9, dtype=torch.float64)
    d1 = 0.5 + sign * 0.4 * gains
    t1 = torch.full_like(gains, 0.4)
    d = torch.stack([d1, torch.rand(9, dtype=torch.float64) * 0.8 + 0.1, torch.full_like(gains, 0.5)], 1)
    t = torch.stack([t1, t1 + gains, torch.rand(9, dtype=torch.float64) * 0.8 + 0.1], 1)
    y = [4] * 9
    stats = step_statistics(hand_logits(d.tolist(), t.tolist(), y), torch.tensor(y), DK, CYBAP([0, 0, 1], psi_dk=None))
    metric = CalibrationSpearman(3)
    metric.update(stats)
    rho = metric.compute()
    assert rho.shape == (2,)
    assert math.isclose(float(rho[0]), float(sign), abs_tol=1e-6)
    assert -1 <= float(rho[1]) <= 1


def test_readout_accuracy_follows_the_trained_stopping_rule():
    z = torch.zeros(3, 3, V)
    # token 0: d_1 ≈ 0.97 → pauses; step 2 (d ≈ 0.01) answers 4 (correct). token 1: d_1 ≈ 0.01, answers 5 at
    # step 1 (wrong: y = 4). token 2: DK dominates every step → capped at the last step, which answers 4.
    z[0, 0, DK], z[0, 1, 4] = 5.0, 3.0
    z[1, 0, 5] = 3.0
    z[2, :, DK] = 5.0
    z[2, 2, 4] = 1.0
    y = torch.tensor([4, 4, 4])
    stats = step_statistics(z, y, DK, CYBAP([0, 0, 1], psi_dk=None))
    assert stats.readout.tolist() == [1, 0, 2]
    metric = ReadoutAccuracy(3)
    metric.update(stats)
    out = metric.compute()
    assert math.isclose(float(out["accuracy"]), 2 / 3)
    assert math.isclose(float(out["readout_steps"]), (2 + 1 + 3) / 3)
    expected = sum(float((stats.stop[n] * stats.correct[n].double()).sum()) for n in range(3)) / 3
    assert math.isclose(float(out["sampled_accuracy"]), expected, rel_tol=1e-9)


def test_the_readout_answers_where_answering_is_more_likely_than_not_not_where_dk_is_the_argmax():
    """A high-entropy step: DK is the single most likely id (p = 0.2) but the model answers with p = 0.8.

    The loss trains s_1 = 1 − d_1 = 0.8 here; the old greedy rule (pause while DK is the argmax) paused.
    """
    d = [[0.2, 0.1, 0.1], [0.6, 0.3, 0.1], [0.6, 0.7, 0.1]]
    t = [[0.05, 0.9, 0.9]] * 3
    stats = step_statistics(hand_logits(d, t, [4] * 3), torch.tensor([4] * 3), DK, CYBAP([0, 0, 1], psi_dk=None))
    assert stats.readout.tolist() == [0, 1, 2]
    # With granted steps (variable pauses) the last granted step answers whatever d says.
    granted = torch.tensor([[True, True, True], [True, False, False], [True, True, False]])
    assert stopping_readout(stats.log_d, granted).tolist() == [0, 0, 1]


def test_token_table_and_quadrants():
    ids = torch.tensor([7, 7, 7, 9, 9, 9, 9, 11, 12, 12, 13, 13, 14, 14])
    vals = torch.tensor([0.0, 1.0, 2.0, 3.0, 3.0, 3.0, 3.1, 5.0, 0.0, 0.0, 2.9, 0.1, 0.2, 0.4], dtype=torch.float64)
    table = token_table(ids, vals, min_count=2)
    rows = {int(i): j for j, i in enumerate(table["ids"])}
    assert 11 not in rows and table["ids"][0] == 9  # seen once; most frequent first
    assert float(table["median"][rows[7]]) == 1.0
    assert math.isclose(float(table["variance"][rows[7]]), 2 / 3)
    assert math.isclose(float(table["median"][rows[9]]), 3.0)
    q = quadrants(table, top=3)
    names = {k: [int(table["ids"][j]) for j in v] for k, v in q.items()}
    assert names["high_median_low_variance"] == [9]
    assert names["low_median_low_variance"] == [12, 14]
    # Splits: median of the medians {1, 3, 0, 0.1, 0.2} = 0.2, of the variances {2/3, ~0.002, 0, 1.96, 0.01} = 0.01
    # (torch.median: the lower middle value; token 13's median of {2.9, 0.1} is 0.1).
    assert names["high_median_high_variance"] == [7]
    assert names["low_median_high_variance"] == [13]
    assert sorted(sum(names.values(), [])) == sorted(rows)


def test_token_pause_stats_metric_matches_the_table():
    stats = step_statistics(hand_logits(D, T, Y), torch.tensor(Y), DK, CYBAP([0, 0, 1], psi_dk=None))
    stats.inputs = torch.tensor([30, 31, 30])
    metric = TokenPauseStats(min_count=2)
    metric.update(stats)
    out = metric.table()
    assert out["ids"].tolist() == [30]
    e = [sum(k * p for k, p in enumerate(expected_stop(D[i]))) for i in (0, 2)]
    assert math.isclose(float(out["mean"][0]), sum(e) / 2, rel_tol=1e-9)


def test_difficulty_stats_on_known_values():
    from cyb_lightning.metrics import DifficultyStats

    stats = step_statistics(hand_logits(D, T, Y), torch.tensor(Y), DK, CYBAP([0, 0, 1], psi_dk=None))
    metric = DifficultyStats(3, max_level=4)
    metric.update(stats, torch.tensor([2, -1, 2]))  # token 1 is not a task target
    stats2 = step_statistics(hand_logits(D[:1], T[:1], Y[:1]), torch.tensor(Y[:1]), DK, CYBAP([0, 0, 1], psi_dk=None))
    metric.update(stats2, torch.tensor([0]))
    out = metric.compute()
    assert out["tokens"].tolist() == [1, 0, 2, 0, 0]
    e = [sum(k * p for k, p in enumerate(expected_stop(D[i]))) for i in range(3)]
    assert math.isclose(float(out["extra_pauses"][2]), (e[0] + e[2]) / 2, rel_tol=1e-9)
    assert math.isclose(float(out["extra_pauses"][0]), e[0], rel_tol=1e-9)
    assert math.isnan(float(out["accuracy"][1]))  # a level without tokens
    first = stats.correct[:, 0].double()
    assert math.isclose(float(out["first_step_accuracy"][2]), float(first[[0, 2]].mean()))
    readout = stats.readout
    acc = [float(stats.correct[i, readout[i]]) for i in (0, 2)]
    assert math.isclose(float(out["accuracy"][2]), sum(acc) / 2)
    torch.testing.assert_close(out["p_stop"][2].sum(), torch.tensor(1.0, dtype=torch.float64))
    # Spearman over the sampled tokens: levels (2, 2, 0) against their expected pauses.
    from scipy.stats import spearmanr

    assert math.isclose(float(out["spearman"]), spearmanr([2, 2, 0], [e[0], e[2], e[0]]).statistic, abs_tol=1e-6)
