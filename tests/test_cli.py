"""The command line end to end: a tiny CPU fit through LightningCLI, and the errors a user can make."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cyb_lightning.cli import main
from tests.conftest import TINY_QUICKSTART, TINY_VOCAB


def tiny_args(root, source_root, *extra: str) -> list[str]:
    source = {
        "class_path": "cyb_lightning.data.sources.QuickstartCorpus",
        "init_args": {"root": str(source_root), **TINY_QUICKSTART},
    }
    return [
        "fit",
        "--config",
        "conf/quickstart.yaml",
        "--data.source",
        json.dumps(source),
        "--data.bpe_vocab_size",
        str(TINY_VOCAB),
        "--data.seq_len",
        "32",
        "--data.batch_size",
        "8",
        "--data.val_documents",
        "4",
        "--model.decoder.init_args.d_model",
        "32",
        "--model.decoder.init_args.n_head",
        "2",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger.init_args.save_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        *extra,
    ]


@pytest.fixture
def source_root(tiny_quickstart):
    return tiny_quickstart.corpus.directory.parent


def scalars(acc: EventAccumulator, tag: str) -> list[float]:
    return [e.value for e in acc.Scalars(tag)]


def test_fit_learns_checkpoints_and_writes_stopping_histograms(tmp_path, source_root):
    cli = main(
        tiny_args(
            tmp_path,
            source_root,
            "--trainer.max_steps",
            "40",
            "--trainer.val_check_interval",
            "20",
            "--trainer.log_every_n_steps",
            "5",
            "--trainer.limit_val_batches",
            "2",
            "--trainer.callbacks.every_n_steps",
            "10",
        )
    )
    log_dir = cli.trainer.log_dir
    acc = EventAccumulator(log_dir, size_guidance={"histograms": 0, "scalars": 0}).Reload()
    loss = scalars(acc, "train/loss")
    assert len(loss) >= 8 and loss[-1] < loss[0] - 0.5, loss
    assert {"train/pauses/stop_step", "train/pauses/expected_per_token", "val/pauses/stop_step"} <= set(
        acc.Tags()["histograms"]
    )
    # The stop_step histogram is the latency distribution: its buckets hold probabilities summing to 1.
    hist = acc.Histograms("val/pauses/stop_step")[-1].histogram_value
    assert len(hist.bucket) == 4 and math.isclose(sum(hist.bucket), 1.0, rel_tol=1e-6)
    ppl = scalars(acc, "val/ppl")
    assert ppl[-1] < TINY_VOCAB  # better than uniform over the text ids
    ckpts = sorted(p.name for p in (tmp_path / "quickstart" / "version_0" / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts
    saved = yaml.safe_load((tmp_path / "quickstart" / "version_0" / "config.yaml").read_text())
    assert saved["model"]["loss"]["class_path"] == "cyb_lightning.losses.CYBAP"


def run_cli_error(args, capsys) -> str:
    with pytest.raises((SystemExit, ValueError, OSError)) as info:
        main(args)
    err = capsys.readouterr().err
    return f"{err}\n{info.value}"


def test_missing_config_file_is_named(capsys):
    msg = run_cli_error(["fit", "--config", "conf/no_such_config.yaml"], capsys)
    assert "no_such_config.yaml" in msg and ("does not exist" in msg or "not found" in msg.lower())


def test_unknown_loss_class_is_named(tmp_path, source_root, capsys):
    msg = run_cli_error(tiny_args(tmp_path, source_root, "--model.loss", "cyb_lightning.losses.CYBXYZ"), capsys)
    assert "CYBXYZ" in msg


@pytest.mark.parametrize(
    "loss, needle",
    [
        ('{"class_path": "cyb_lightning.losses.CYBAP", "init_args": {"omega": [0, 0, 1]}}', "num_pauses"),
        ('{"class_path": "cyb_lightning.losses.CYBAP", "init_args": {"omega": [0, -1, 0, 1]}}', "non-negative"),
        ('{"class_path": "cyb_lightning.losses.CYBAP", "init_args": {"gamma": [1, 1, 1]}}', "gamma"),
        ('{"class_path": "cyb_lightning.losses.CYBVA", "init_args": {"rho": [1, 1]}}', "num_pauses"),
        ('{"class_path": "cyb_lightning.losses.CYBDP", "init_args": {"rho": [1, 1, -1, 1]}}', "rho"),
    ],
)
def test_bad_loss_hyperparameters_are_named(tmp_path, source_root, capsys, loss, needle):
    msg = run_cli_error(tiny_args(tmp_path, source_root, "--model.loss", loss), capsys)
    assert needle in msg


def test_empty_corpus_folder_is_named(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    source = json.dumps({"class_path": "cyb_lightning.data.sources.LocalShards", "init_args": {"path": str(empty)}})
    args = [
        "fit",
        "--config",
        "conf/quickstart.yaml",
        "--data.source",
        source,
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    msg = run_cli_error(args, capsys)
    assert str(empty) in msg


def test_variable_pause_layout_trains_from_the_cli_and_validates_with_all_pauses(tmp_path, source_root):
    cli = main(
        tiny_args(
            tmp_path,
            source_root,
            "--data.layout",
            "variable",
            "--data.omega",
            "[1, 1, 1, 1]",
            "--trainer.max_steps",
            "6",
            "--trainer.val_check_interval",
            "6",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.log_every_n_steps",
            "1",
        )
    )
    dm = cli.datamodule
    train = next(iter(dm.train_dataloader()))
    assert "step_mask" in train  # granted steps differ per token …
    granted = train["step_mask"][train["target_mask"]].sum(-1)
    assert set(granted.unique().tolist()) > {1} and granted.max() <= 4
    val = next(iter(dm.val_dataloader()))
    assert "step_mask" not in val and val["input_ids"].shape[1] == 4 * 32  # … evaluation grants all K
    metrics = cli.trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"])) and math.isfinite(float(metrics["val/ppl"]))
    assert abs(sum(float(metrics[f"val/p_stop/step{i}"]) for i in range(1, 5)) - 1) < 1e-4


def test_the_entry_point_ends_the_process_group_after_success_only(tmp_path, monkeypatch):
    """A process group left to the interpreter's exit can abort a finished gloo job (SIGABRT); after an
    error it must stay, since destroying it while other ranks wait in a collective would hang them."""
    import torch.distributed as dist

    import cyb_lightning.__main__ as entry
    import cyb_lightning.cli

    def fit(argv, fail=False):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store-{fail}", rank=0, world_size=1)
        if fail:
            raise RuntimeError("a rank failed")

    monkeypatch.setattr(cyb_lightning.cli, "main", fit)
    entry.main(["fit"])
    assert not dist.is_initialized()

    monkeypatch.setattr(cyb_lightning.cli, "main", lambda argv: fit(argv, fail=True))
    with pytest.raises(RuntimeError, match="a rank failed"):
        entry.main(["fit"])
    assert dist.is_initialized()
    dist.destroy_process_group()


def test_positive_control_fit_logs_every_difficulty_level(tmp_path, capsys):
    """The demo's path, shortened: the digit-sum task through the CLI logs, per level, the adaptive reader's
    accuracy and pauses taken (and its histograms) and the full layout's readout; the summary prints the
    adaptive reader first, a row per level."""
    source = {"class_path": "cyb_lightning.data.synthetic.DigitSum",
              "init_args": {"levels": [1, 3], "documents_per_shard": 200, "train_shards": 2,
                            "root": str(tmp_path / "synthetic")}}  # fmt: skip
    cli = main(["fit", "--config", "conf/positive_control.yaml", "--data.source", json.dumps(source),
                "--trainer.max_steps", "12", "--trainer.val_check_interval", "6", "--data.curriculum.ramp_steps", "6",
                "--data.batch_size", "8", "--data.seq_len", "7", "--data.val_documents", "40",
                "--data.val_batch_size", "16", "--trainer.default_root_dir", str(tmp_path),
                "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])  # fmt: skip
    out = capsys.readouterr().out
    assert out.index("adaptive reader") < out.index("full layout") and "per difficulty level" in out
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0] in ("1", "2", "3")]
    assert [r[0] for r in rows] == ["1", "3"]
    acc = EventAccumulator(cli.trainer.log_dir, size_guidance={"histograms": 0}).Reload()
    for level in (1, 3):
        for key in ("accuracy", "steps_per_token"):
            values = scalars(acc, f"val/adaptive/difficulty/{level}/{key}")
            assert len(values) == 2 and all(math.isfinite(v) for v in values)
        # The histogram of pauses taken (the callback counts them) agrees with the logged steps (the metric sums them).
        hist = acc.Histograms(f"val/adaptive/pauses_by_difficulty/{level}")[-1].histogram_value
        mean_pauses = sum(k * c for k, c in enumerate(hist.bucket)) / sum(hist.bucket)
        assert math.isclose(1 + mean_pauses, scalars(acc, f"val/adaptive/difficulty/{level}/steps_per_token")[-1],
                            rel_tol=1e-5)  # fmt: skip
        for key in ("accuracy", "extra_pauses", "readout_steps"):
            assert len(scalars(acc, f"val/full_layout/difficulty/{level}/{key}")) == 2
        assert f"val/adaptive/pauses_by_difficulty/{level}" in acc.Tags()["histograms"]
        assert f"val/pauses_by_difficulty/{level}/stop_step" in acc.Tags()["histograms"]
    assert "val/adaptive/difficulty/2/accuracy" not in acc.Tags()["scalars"]  # no problem of level 2 in this task
    # The summary's numbers are the logged ones (last validation).
    summary = [r for r in rows if r[0] == "3"][0]
    assert float(summary[1]) == pytest.approx(100 * scalars(acc, "val/adaptive/difficulty/3/accuracy")[-1], abs=0.05)


def test_the_fit_summary_states_its_pace_and_a_loaded_machine():
    from cyb_lightning.cli import machine_busy, pace

    idle = pace(100.0, 98.0, 5000, busy_seconds=110.0)  # the machine's busy time is this fit's, give or take
    assert idle == "fit: 5000 steps in 100 s (50.0 steps/s)"
    loaded = pace(100.0, 98.0, 5000, busy_seconds=198.0)  # another core's worth of other work
    assert (
        loaded.startswith("fit: 5000 steps in 100 s (50.0 steps/s); the machine was loaded")
        and "about 1.0 of" in loaded
    )
    assert pace(100.0, 98.0, 5000, busy_seconds=None) == idle  # no /proc/stat: nothing said
    before = machine_busy()
    t = time.process_time()
    while time.process_time() - t < 0.5:  # this process keeps a core busy for 0.5 s: the machine was busy as long
        pass
    assert machine_busy() - before >= 0.45


def test_the_pace_counts_the_cpu_of_its_own_workers_as_its_own():
    """The demo's DataLoader worker makes the rows on the second core: its CPU time is the fit's, not "other
    work" (the summary called an idle machine loaded)."""
    import subprocess
    import sys

    from cyb_lightning.cli import cpu_time

    before = cpu_time()
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass\ntime.sleep(30)",
        ]
    )
    try:
        time.sleep(2.5)  # the child spins for 1 s of CPU, then sleeps: still running when we look
        assert worker.poll() is None
        used = cpu_time() - before
    finally:
        worker.kill()
        worker.wait()
    assert 0.9 <= used <= 2.0, used


@pytest.mark.parametrize("args, first_line", [
    (["--data.seq_len", "abc"], 'error: Parser key "data.seq_len":'),
    (["--data.layout", "bogus"], "error: unknown layout 'bogus'; choose one of none, cyb, tbys_random"),
    (["--model.loss.init_args.gamma0", "7"], "error: gamma0 must lie in [0, 1], got 7.0"),
])  # fmt: skip
def test_a_bad_setting_is_one_message_without_a_traceback_or_usage_dump(args, first_line, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", "conf/positive_control.yaml", "--data.source.init_args.root", str(tmp_path), *args])
    message = str(info.value.code)
    assert message.splitlines()[0] == first_line or message.startswith(first_line), message
    assert len(message.splitlines()) <= 4 and "Traceback" not in message
    assert "usage:" not in capsys.readouterr().err


def test_a_config_copied_out_of_conf_names_the_missing_fragment_and_where_it_looked(tmp_path):
    copy = tmp_path / "my_cyb_dp.yaml"
    copy.write_text(Path("conf/cyb_dp.yaml").read_text())
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(copy), "--print_config"])
    message = str(info.value.code)
    assert message.startswith('error: Parser key "trainer":') and "Traceback" not in message
    hint = [line for line in message.splitlines() if line.startswith("the config fragment")]
    assert hint == [
        (
            f"the config fragment 'trainer/gpu.yaml' was not found: looked for it beside {copy}, in "
            f"{tmp_path / 'trainer' / 'gpu.yaml'}; copy {Path('conf/trainer/gpu.yaml').resolve()} there too, or write "
            "its full path."
        )
    ]


def test_naming_the_hf_decoder_names_its_tokenizer_too(tmp_path, source_root):
    """One model path: an HFTokenizer left without ``name_or_path`` reads the HF decoder's model; a tokenizer
    given its own path keeps it."""
    from cyb_lightning.cli import CYBLightningCLI
    from cyb_lightning.datamodule import CYBDataModule
    from cyb_lightning.module import CYBModule
    from tests.model.test_hf import save_tiny, save_tiny_tokenizer

    n = save_tiny_tokenizer(tmp_path / "llama")
    folder = save_tiny(tmp_path / "llama", "llama", vocab_size=n)
    other = tmp_path / "other"
    save_tiny_tokenizer(other)
    base = tiny_args(tmp_path, source_root)[1:]  # without "fit"; our GPT's sizes dropped (an HF decoder has its own)
    cut = base.index("--model.decoder.init_args.d_model")
    args = base[:cut] + base[cut + 4 :] + [
        "--model.decoder", json.dumps({"class_path": "cyb_lightning.model.HFDecoder", "init_args": {"name_or_path": folder}}),
        "--data.tokenizer", json.dumps({"class_path": "cyb_lightning.data.hf_tokenizer.HFTokenizer",
                                        "init_args": {"add_ids": True}}),
    ]  # fmt: skip
    cli = CYBLightningCLI(CYBModule, CYBDataModule, args=args, run=False, parser_kwargs={"parser_mode": "omegaconf"})
    assert cli.datamodule.tokenizer.name_or_path == folder
    mine = CYBLightningCLI(CYBModule, CYBDataModule, args=args + ["--data.tokenizer.init_args.name_or_path", str(other)],
                           run=False, parser_kwargs={"parser_mode": "omegaconf"})  # fmt: skip
    assert mine.datamodule.tokenizer.name_or_path == str(other)
