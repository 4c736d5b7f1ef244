"""Every YAML under conf/ parses (litgpt's habit), and the paper configs say what the paper did."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from cyb_lightning.cli import main
from cyb_lightning.losses import PauseLoss

CONF = Path(__file__).resolve().parents[1] / "conf"
TOP_LEVEL = sorted(p for p in CONF.glob("*.yaml"))
FRAGMENTS = sorted(p for p in CONF.glob("*/*.yaml"))


def printed_config(*args: str) -> dict:
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as info:
        main(["fit", *args, "--print_config"])
    assert info.value.code in (0, None), out.getvalue()
    return yaml.safe_load(out.getvalue())


def build_loss(cfg: dict) -> PauseLoss:
    import importlib

    module, name = cfg["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**(cfg.get("init_args") or {}))


@pytest.mark.parametrize("path", TOP_LEVEL, ids=lambda p: p.name)
def test_every_config_parses_and_its_loss_fits_its_layout(path):
    cfg = printed_config("--config", str(path))
    build_loss(cfg["model"]["loss"]).check_steps(steps_per_token(cfg["data"]))  # raises if ω/γ/ρ and the layout disagree


def steps_per_token(data: dict) -> int:
    """W of a config's layout, as the layout class states it."""
    from cyb_lightning.data.layout import make_layout
    from cyb_lightning.data.tokenizer import standard_vocab

    return make_layout(data["layout"], data["seq_len"], standard_vocab(), num_pauses=data["num_pauses"]).steps_per_token


def test_fragments_are_found():
    assert {p.parent.name for p in FRAGMENTS} >= {"decoder", "trainer", "data"}


@pytest.mark.parametrize("path", [p for p in FRAGMENTS if p.parent.name == "trainer"], ids=lambda p: p.name)
def test_trainer_fragments_stack_on_the_quickstart(path):
    cfg = printed_config("--config", str(CONF / "quickstart.yaml"), "--trainer", str(path))
    assert cfg["trainer"]["max_steps"] > 0


@pytest.mark.parametrize("path", [p for p in FRAGMENTS if p.parent.name == "data"], ids=lambda p: p.name)
def test_data_sources_swap_with_one_override(path):
    cfg = printed_config("--config", str(CONF / "cyb_dp.yaml"), "--data.source", str(path))
    assert cfg["data"]["source"]["class_path"] == yaml.safe_load(path.read_text())["class_path"]


PAPER = {  # method.md §4 and §6: the settings each paper config must default to
    "cyb_ap.yaml": ("CYBAP", "cyb", 3, {"omega": [0, 0, 0, 1]}),
    "cyb_va.yaml": ("CYBVA", "cyb", 3, {"rho": [4, 1, 1, 4]}),
    "cyb_dp.yaml": ("CYBDP", "cyb", 3, {"rho": [4, 1, 1, 4], "alpha": 0.01}),
    "tbys_pause1.yaml": ("TBYSPerToken", "cyb", 1, {}),
    "tbys_pause2.yaml": ("TBYSPerToken", "cyb", 2, {}),
    "tbys_pause3.yaml": ("TBYSPerToken", "cyb", 3, {}),
    "baseline.yaml": ("CrossEntropy", "none", None, {}),
    "pause_pretrain.yaml": ("CrossEntropy", "tbys_random", None, {}),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_default_to_the_papers_settings(name):
    cls, layout, k, args = PAPER[name]
    cfg = printed_config("--config", str(CONF / name))
    assert cfg["model"]["loss"]["class_path"].endswith("." + cls)
    assert cfg["data"]["layout"] == layout
    if k is not None:
        assert cfg["data"]["num_pauses"] == k
    for key, value in args.items():
        assert cfg["model"]["loss"]["init_args"][key] == value
    if cls.startswith("CYB"):
        assert cfg["model"]["loss"]["init_args"]["psi_dk"] == 0.9
    if name == "pause_pretrain.yaml":
        assert cfg["data"]["pause_fraction"] == 0.1
    assert cfg["data"]["source"]["class_path"].endswith("HubC4")


METHOD_LAYERS = sorted(p for p in (CONF / "positive_control").glob("*.yaml") if p.name != "finetune.yaml")


@pytest.mark.parametrize("layer", METHOD_LAYERS, ids=lambda p: p.name)
def test_positive_control_layers_change_only_the_method(layer):
    """Every method of the comparison stacks on conf/positive_control.yaml: the same decoder, data and steps."""
    base = printed_config("--config", str(CONF / "positive_control.yaml"))
    cfg = printed_config("--config", str(CONF / "positive_control.yaml"), "--config", str(layer))
    assert cfg["model"]["decoder"] == base["model"]["decoder"]
    assert cfg["trainer"]["max_steps"] == base["trainer"]["max_steps"] and cfg["seed_everything"] == 0
    assert cfg["data"]["source"] == base["data"]["source"] and cfg["data"]["seq_len"] == base["data"]["seq_len"]
    build_loss(cfg["model"]["loss"]).check_steps(steps_per_token(cfg["data"]))


def test_the_positive_control_fine_tuning_stage_changes_only_its_schedule():
    """conf/positive_control/finetune.yaml (CYB from a trained pause model): a shorter run at a lower rate on every
    level from the start; the decoder, task and layout stay those of the method it stacks on."""
    base = printed_config("--config", str(CONF / "positive_control.yaml"), "--config",
                          str(CONF / "positive_control" / "cyb_ap_answer.yaml"))  # fmt: skip
    cfg = printed_config("--config", str(CONF / "positive_control.yaml"), "--config",
                         str(CONF / "positive_control" / "cyb_ap_answer.yaml"), "--config",
                         str(CONF / "positive_control" / "finetune.yaml"))  # fmt: skip
    assert cfg["model"]["decoder"] == base["model"]["decoder"] and cfg["data"]["source"] == base["data"]["source"]
    assert cfg["data"]["layout"] == base["data"]["layout"] == "answer_pauses"
    assert cfg["trainer"]["max_steps"] < base["trainer"]["max_steps"] and cfg["model"]["lr"] < base["model"]["lr"]
    assert base["data"]["curriculum"] is not None and cfg["data"]["curriculum"] is None
