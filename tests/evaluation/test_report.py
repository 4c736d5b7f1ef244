"""The report command end to end on a tiny checkpoint: every file, numbers equal to the validation metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from cyb_lightning.__main__ import COMMANDS
from cyb_lightning.evaluation.report import FILES


@pytest.fixture(scope="module")
def report(tiny_run, tmp_path_factory):
    from cyb_lightning.__main__ import main

    ckpt, _ = tiny_run
    out = tmp_path_factory.mktemp("report")
    main(["report", "--ckpt_path", str(ckpt), "--out", str(out), "--min_count", "2", "--adaptive_batches", "1"])
    return out, json.loads((out / "report.json").read_text())


def test_report_is_a_registered_command():
    assert COMMANDS["report"] == "cyb_lightning.commands.report:main"
    assert COMMANDS["generate"] == "cyb_lightning.commands.generate:main"


def test_report_writes_every_file(report):
    out, data = report
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert any((out / "tensorboard").iterdir())
    assert set(data["token_analysis"]["quadrants"]) == {
        "high_median_high_variance", "high_median_low_variance", "low_median_high_variance", "low_median_low_variance"}
    md = (out / "report.md").read_text()
    assert f"{data['metrics']['ppl']:.3f}" in md and "token_quadrants.png" in md


def test_report_numbers_match_the_validation_metrics(report, tiny_run):
    from cyb_lightning.commands.loading import load_run

    _, data = report
    ckpt, _ = tiny_run
    module, datamodule = load_run(str(ckpt))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    m = data["metrics"]
    assert m["tokens"] > 0
    assert math.isclose(m["ppl"], logged["val/ppl"], rel_tol=1e-5)
    assert math.isclose(m["loss"], logged["val/loss"], rel_tol=1e-5)
    assert math.isclose(m["extra_pauses"], logged["val/extra_pauses"], rel_tol=1e-5, abs_tol=1e-7)
    assert math.isclose(m["accuracy"], logged["val/full_layout/accuracy"], rel_tol=1e-5, abs_tol=1e-7)
    # Validation's adaptive reader is the standalone one over the same batches (each token given only the pauses
    # it asks for): the same accuracy, perplexity and steps.
    from cyb_lightning.generation import PausePolicy, Sampling, adaptive_evaluate, runner_for

    alone = adaptive_evaluate(runner_for(module, PausePolicy("threshold"), Sampling(0.0)), datamodule.val_dataloader())
    for key in ("accuracy", "ppl", "steps_per_token"):
        assert math.isclose(alone[key], logged[f"val/adaptive/{key}"], rel_tol=1e-5), key
    for i, p in enumerate(m["p_stop"]):
        assert math.isclose(p, logged[f"val/p_stop/step{i + 1}"], rel_tol=1e-5, abs_tol=1e-7)
    for i, r in enumerate(m["calibration_spearman"]):
        assert math.isclose(r, logged[f"val/calibration/step{i + 1}"], rel_tol=1e-4, abs_tol=1e-6)
    assert math.isclose(sum(m["p_stop"]), 1.0, rel_tol=1e-6)
    # The token table is consistent with the latency: occurrence-weighted means ≤ all tokens' mean range.
    toks = data["token_analysis"]["tokens"]
    assert all(t["count"] >= 2 for t in toks) and all(0 <= t["median"] <= 2 for t in toks)
    # Adaptive runs: fixed-K spends exactly W steps per token, no-pause exactly 1.
    assert data["adaptive"]["fixed"]["steps_per_token"] == 3.0
    assert data["adaptive"]["none"]["steps_per_token"] == 1.0
    for kind in ("threshold", "sample", "greedy"):  # every policy by default, the trained rules first
        r = data["adaptive"][kind]
        # Steps and the pause histogram are counted apart: they must tell the same story.
        assert math.isclose(r["steps_per_token"], 1 + sum(k * p for k, p in enumerate(r["p_pauses"])), rel_tol=1e-9)
        assert r["batch_steps_per_token"] >= r["steps_per_token"]
    assert list(data["adaptive"])[0] == "threshold"
    # Fixed-K reading, teacher-forced, is the training layout read at step W: the NLL of the full forward there.
    from cyb_lightning.commands.loading import load_run

    module, dm = load_run(str(ckpt))
    per_token, stats = module.evaluation_outputs(next(iter(dm.val_dataloader())))  # adaptive_batches 1
    assert math.isclose(data["adaptive"]["fixed"]["nll"], float(-stats.log_t[:, -1].double().mean()), rel_tol=1e-5)


def test_fit_logs_the_token_views_and_evaluation_metrics_to_tensorboard(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ckpt, _ = tiny_run
    acc = EventAccumulator(str(ckpt.parent.parent), size_guidance={"images": 0, "tensors": 0}).Reload()
    tags = acc.Tags()
    assert "val/tokens/quadrants_plot" in tags["images"] and "val/latency" in tags["images"]
    assert any(t.startswith("val/tokens/quadrants") for t in tags["tensors"])  # add_text → a text tensor
    for name in ("val/ppl", "val/full_layout/accuracy", "val/adaptive/accuracy", "val/calibration/step1",
                 "val/calibration/step2"):
        assert name in tags["scalars"], name


def test_report_compares_with_a_no_pause_baseline_on_the_same_tokens(tiny_run, tiny_quickstart, tmp_path):
    """``--baseline_ckpt``: the no-pause model's perplexity over the very held-out tokens the adaptive runs
    read, beside the model's own step mixture; a pause checkpoint as the 'baseline' is refused."""
    import yaml

    from cyb_lightning.__main__ import main
    from cyb_lightning.data import QuickstartCorpus
    from cyb_lightning.commands.loading import load_run
    from cyb_lightning.generation import PausePolicy, Sampling, adaptive_evaluate, runner_for
    from tests.conftest import TINY_QUICKSTART
    from tests.evaluation.conftest import tiny_run_config

    source = QuickstartCorpus(str(tiny_quickstart.corpus.directory.parent), **TINY_QUICKSTART)
    cfg = tiny_run_config(source, tmp_path)
    cfg["model"]["loss"] = {"class_path": "cyb_lightning.losses.CrossEntropy"}
    cfg["data"]["layout"] = "none"
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(tmp_path / "base.yaml")])
    base_ckpt = tmp_path / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt, _ = tiny_run
    out = tmp_path / "report"
    main(["report", "--ckpt_path", str(ckpt), "--out", str(out), "--min_count", "2", "--adaptive", "threshold",
          "--adaptive_batches", "1", "--baseline_ckpt", str(base_ckpt)])  # fmt: skip
    data = json.loads((out / "report.json").read_text())
    comp = data["comparators"]
    assert comp["step_mixture"]["steps_per_token"] == 3
    assert comp["step_mixture"]["tokens"] == comp["baseline"]["tokens"] == data["adaptive"]["threshold"]["tokens"]
    # The baseline read by itself over the same batches gives the same number.
    base, base_dm = load_run(str(base_ckpt))
    _, dm = load_run(str(ckpt))
    again = adaptive_evaluate(runner_for(base, PausePolicy("none"), Sampling(0.0)), dm.val_dataloader(), 1)
    assert math.isclose(comp["baseline"]["ppl"], again["ppl"], rel_tol=1e-9)
    assert comp["baseline"]["tokens"] == data["adaptive"]["threshold"]["tokens"]  # the very same tokens
    from cyb_lightning.evaluation.report import evaluate

    m = evaluate(base, base_dm.val_dataloader(), max_batches=1)["metrics"]  # W = 1: per-step fields stay lists
    assert m["p_stop"] == [1.0] and len(m["accuracy_per_step"]) == 1
    assert "no-pause baseline" in (out / "report.md").read_text()
    with pytest.raises(ValueError, match="must be a no-pause run"):
        main(["report", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "r2"), "--adaptive", "",
              "--baseline_ckpt", str(ckpt)])  # fmt: skip


def test_level_table_puts_the_no_pause_model_beside_the_adaptive_reader():
    from cyb_lightning.commands.report import level_table

    levels = {1: {"accuracy": 1.0, "steps_per_token": 1.0}, 8: {"accuracy": 0.9, "steps_per_token": 3.5}}
    text = level_table(levels, {1: {"accuracy": 1.0}, 8: {"accuracy": 0.455}})
    assert text.splitlines() == ["    level   accuracy   pauses taken   no-pause model",
                                 "        1    100.0 %           0.00          100.0 %",
                                 "        8     90.0 %           2.50           45.5 %"]  # fmt: skip
    assert "no-pause" not in level_table(levels)


def test_a_checkpoint_that_does_not_exist_says_so(tmp_path):
    from cyb_lightning.__main__ import main

    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*nothing\.ckpt; check the path"):
        main(["report", "--ckpt_path", str(tmp_path / "nothing.ckpt")])
    (tmp_path / "last.ckpt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*lsat\.ckpt; the folder has .*last\.ckpt"):
        main(["generate", "--ckpt_path", str(tmp_path / "lsat.ckpt")])


def test_the_committed_no_pause_model_of_the_demo_loads_as_one(tmp_path):
    """data/positive_control/baseline (read by `make demo`): a no-pause model of the positive control's task and
    decoder, whose answers it reads well above chance."""
    import yaml

    from cyb_lightning.commands.loading import load_run
    from cyb_lightning.generation import PausePolicy, Sampling, adaptive_evaluate, runner_for

    repo = Path(__file__).resolve().parents[2]
    ckpt = str(repo / "data" / "positive_control" / "baseline" / "checkpoints" / "last.ckpt")
    module, dm = load_run(ckpt, overrides=["--data.source.init_args.root", str(tmp_path), "--data.val_documents", "256"])
    demo = yaml.safe_load((repo / "conf" / "positive_control.yaml").read_text())
    assert module.hparams.steps_per_token == 1 and dm.layout == "none"
    assert {k: getattr(module.decoder_spec, k) for k in demo["model"]["decoder"]["init_args"]} == demo["model"]["decoder"]["init_args"]
    out = adaptive_evaluate(runner_for(module, PausePolicy("none"), Sampling(0.0)), dm.val_dataloader())
    assert out["by_difficulty"][1]["accuracy"] == 1.0 and out["accuracy"] > 0.8  # 10 answer classes: chance is 0.1


def test_the_committed_halfway_checkpoint_of_the_demo_is_the_recipe_at_step_4500():
    """data/positive_control/cyb_ap_answer/step4500.ckpt (resumed by `make demo`): the CYB recipe of
    conf/positive_control.yaml at the demo's rate, halfway through its 9,000 steps, with the stream's state to
    resume from."""
    import yaml

    from cyb_lightning.resume import load_metadata

    repo = Path(__file__).resolve().parents[2]
    meta = load_metadata(repo / "data" / "positive_control" / "cyb_ap_answer" / "step4500.ckpt")
    recipe = yaml.safe_load((repo / "conf" / "positive_control.yaml").read_text())
    assert meta["global_step"] == 4500 and meta["hyper_parameters"]["lr"] == 0.01
    assert meta["hyper_parameters"]["loss"] == recipe["model"]["loss"]
    assert meta["datamodule_hyper_parameters"]["layout"] == "answer_pauses"
    assert meta["CYBDataModule"]  # the stream's position (the curriculum's with it) to resume from
