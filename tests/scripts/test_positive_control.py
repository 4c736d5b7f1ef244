"""scripts/positive_control.py: the page and the gates it states, on hand-made results (the runs themselves
are a benchmark, not a test)."""

from __future__ import annotations


import pytest

from tests.conftest import load_script

@pytest.fixture(scope="module")
def script():
    return load_script("scripts/positive_control.py")


def result(method, seed, hard, easy=1.0, pauses=(0.0, 0.0), rho=0.8, adaptive=None):
    levels = {k: {"tokens": 10, "accuracy": easy if k < 2 else hard, "extra_pauses": pauses[0] if k < 2 else pauses[1],
                  "first_step_accuracy": 0.5, "last_step_accuracy": hard} for k in range(6)}  # fmt: skip
    return {"method": method, "label": method, "seed": seed, "levels": levels, "spearman": rho,
            "easy_accuracy": easy, "hard_accuracy": hard, "easy_pauses": pauses[0], "hard_pauses": pauses[1],
            "hard_first_step_accuracy": 0.5, "hard_last_step_accuracy": hard, "ppl": 2.0, "extra_pauses": 0.5,
            "p_stop": [0.5, 0.2, 0.2, 0.1], "adaptive": adaptive or {}, "fit_s": 1.0, "eval_s": 1.0}  # fmt: skip


def adaptive(hard_threshold, hard_fixed, steps):
    return {"threshold": {"hard_accuracy": hard_threshold, "steps_per_token": steps, "hard_steps_per_token": steps,
                          "batch_steps_per_token": steps},
            "fixed": {"hard_accuracy": hard_fixed, "steps_per_token": 4.0, "hard_steps_per_token": 4.0,
                      "batch_steps_per_token": 4.0}}  # fmt: skip


META = {"command": "python scripts/positive_control.py", "machine": "test", "date": "today", "seeds": [0, 1],
        "steps": 10, "wall_s": 60.0, "load": "none"}


def test_gates_are_met_only_when_every_seed_meets_them(script):
    good = [result("baseline", s, 0.5) for s in (0, 1)] + [result("tbys3", s, 0.9) for s in (0, 1)]
    good += [result("cyb_ap", s, 0.89, pauses=(0.1, 2.0), adaptive=adaptive(0.88, 0.9, 1.9)) for s in (0, 1)]
    text = script.page(good, META, [], None)
    assert "gap per seed +40.0, +40.0 points" in text and text.count("**met**") == 2
    bad = good[:3] + [result("tbys3", 1, 0.6)] + good[4:]  # seed 1: TBYS-3 only 10 points above the baseline
    text = script.page(bad, META, [], None)
    assert "+40.0, +10.0 points" in text and "Gate 1" in text and "**not met**" in text
    # Without gate 1 the task does not need pauses: gate 2 is not judged (it would pass against weak readers).
    assert "**not testable**" in text and text.count("**met**") == 0
    greedy = good[:4] + [result("cyb_ap", s, 0.89, pauses=(0.5, 2.0), adaptive=adaptive(0.88, 0.9, 1.9)) for s in (0, 1)]
    assert "easy pauses 0.50, 0.50 (≤ 0.2)" in script.page(greedy, META, [], None)


def test_a_hand_written_reading_survives_regeneration(script):
    runs = [result("baseline", 0, 0.5), result("tbys3", 0, 0.9)]
    first = script.page(runs, META, [], "Our reading.")
    assert script.KEEP_START + "\nOur reading.\n" + script.KEEP_END in first
