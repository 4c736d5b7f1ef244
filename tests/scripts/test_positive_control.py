"""scripts/positive_control.py: the plan, the run commands, and the gates and page it writes, on hand-made
results (the runs themselves are an experiment, not a test)."""

from __future__ import annotations

import pytest

from tests.conftest import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("scripts/positive_control.py")


@pytest.fixture(scope="module")
def plan(script):
    return script.load_plan(script.PLAN)


def reader(easy_acc, hard_acc, easy_pauses=0.0, hard_pauses=0.0, rho=0.8, steps=1.0) -> dict:
    levels = {str(k): {"tokens": 10, "accuracy": easy_acc if k == 1 else hard_acc,
                       "pauses": easy_pauses if k == 1 else hard_pauses} for k in range(1, 9)}  # fmt: skip
    return {"easy_accuracy": easy_acc, "hard_accuracy": hard_acc, "easy_pauses": easy_pauses,
            "hard_pauses": hard_pauses, "spearman": rho, "steps_per_token": steps, "levels": levels}  # fmt: skip


def result(method, seed, hard, easy=1.0, pauses=(0.0, 0.0), rho=0.8, steps=1.0) -> dict:
    adaptive = reader(easy, hard, *pauses, rho=rho, steps=steps)
    readers = {k: {"accuracy": hard, "steps_per_token": s, "batch_steps_per_token": s, "hard_accuracy": hard,
                   "p_pauses": [1.0, 0.0, 0.0, 0.0]} for k, s in (("threshold", steps), ("fixed", 4.0), ("none", 1.0))}  # fmt: skip
    test = {"adaptive": adaptive, "full_layout": reader(easy, hard), "readers": readers, "p_stop": [1, 0, 0, 0],
            "tokens": 80}  # fmt: skip
    return {"method": method, "seed": seed, "lr": 3e-3, "steps": 9000, "fit_s": 100.0, "load": 2.0,
            "evaluation": {"test": test}}  # fmt: skip


META = {"command": "python scripts/positive_control.py", "out": "runs/x", "machine": "test", "commit": "abc",
        "timing": "", "tokens": 80, "sweep": None}  # fmt: skip


def test_the_plan_names_existing_layers_and_fits_the_gates(script, plan):
    from pathlib import Path

    for m in plan["methods"].values():
        assert all((script.REPO / layer).is_file() for layer in m["layers"])
    assert Path(script.REPO / plan["base"]).is_file() and len(plan["seeds"]) >= 5
    names = set(plan["methods"])
    assert {plan["gates"]["gate1"]["pause"], plan["gates"]["gate1"]["baseline"]} <= names
    assert set(plan["gates"]["gate2"]["methods"]) <= names and plan["gates"]["gate2"]["reference"] in names
    assert all(plan["methods"][m].get("init_from", m) in names for m in names)


def test_run_commands_differ_only_in_method_seed_and_rate(script, plan, tmp_path):
    a = script.fit_command(plan, "baseline", 3e-3, 0, tmp_path, None)
    b = script.fit_command(plan, "tbys3_answer", 1e-2, 4, tmp_path, None)
    assert a[a.index("--trainer.max_steps") + 1] == str(plan["steps"])
    assert a[a.index("--seed_everything") + 1] == "0" and b[b.index("--data.source.init_args.seed") + 1] == "4"
    assert b[b.index("--model.lr") + 1] == "0.01" and "conf/positive_control/tbys3_answer.yaml" in b
    assert script.spec_hash(a) != script.spec_hash(b) and script.spec_hash(a) == script.spec_hash(list(a))
    # The fine-tuning stage keeps its own schedule and starts from its parent's checkpoint.
    ft = script.fit_command(plan, "cyb_ap_from_tbys", 1e-3, 0, tmp_path, tmp_path / "parent.ckpt")
    assert "--trainer.max_steps" not in ft and ft[ft.index("--model.init_from") + 1] == str(tmp_path / "parent.ckpt")


def test_gates_are_judged_per_seed_on_the_adaptive_reader(script, plan):
    seeds = (0, 1)
    good = [result("baseline", s, 0.5) for s in seeds] + [result("tbys3_answer", s, 0.9) for s in seeds]
    good += [result("cyb_ap_answer", s, 0.89, pauses=(0.1, 2.5), rho=0.7, steps=1.4) for s in seeds]
    by = {m: [r for r in good if r["method"] == m] for m in ("baseline", "tbys3_answer", "cyb_ap_answer")}
    lines = script.gate_lines(plan, by)
    assert "gap per seed +40.0, +40.0 points (mean +40.0)" in lines[0] and lines[0].endswith("**met**.")
    assert "extra steps 13 %, 13 %" in lines[1] and lines[1].endswith("**met**.")
    # Seed 1's pause model behind the baseline: gate 1 fails however large the mean gap.
    bad = dict(by, tbys3_answer=[result("tbys3_answer", 0, 1.0), result("tbys3_answer", 1, 0.45)])
    assert "**not met**" in script.gate_lines(plan, bad)[0]
    # A CYB model that pauses on easy answers misses gate 2 and says which condition failed.
    greedy = dict(by, cyb_ap_answer=[result("cyb_ap_answer", s, 0.89, pauses=(0.5, 2.5), steps=2.6) for s in seeds])
    line = script.gate_lines(plan, greedy)[1]
    assert "**not met** (≤ 0.2 pauses on easy answers; ≤ 50 % of fixed-K's extra steps)" in line


def test_the_page_reports_every_method_and_keeps_a_hand_written_reading(script, plan):
    runs = [result(m, s, 0.5 + 0.05 * i) for i, m in enumerate(plan["methods"]) for s in (0, 1)]
    text = script.page(plan, runs, META, [], "Our reading.")
    for m in plan["methods"].values():
        assert m["label"] in text
    assert script.KEEP_START + "\nOur reading.\n" + script.KEEP_END in text
    assert "| baseline | 0 | 100.0 / 50.0 |" in text  # per seed: adaptive easy / hard accuracy
