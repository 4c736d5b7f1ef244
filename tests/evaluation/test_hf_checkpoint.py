"""``generate`` and ``report --adaptive`` on a fine-tuned Hugging Face checkpoint (a tiny Llama, offline).

Its tokenizer adds DK and 8 pause ids at the END of the vocabulary, so ids 0–8 are text ('!', '"', '#', '$'
among them): generated text must drop ids by their role, not by an id range.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from tests.evaluation.conftest import tiny_run_config  # noqa: E402
from tests.model.test_hf import save_tiny, save_tiny_tokenizer  # noqa: E402

PROMPT = "#$!x"  # encodes to ids 7, 8, 5 and one above the reserved count


@pytest.fixture(scope="module")
def hf_run(tiny_quickstart, tmp_path_factory):
    """The checkpoint of a 2-step CYB-AP fine-tune (K = 2) of a tiny random Llama."""
    from cyb_lightning.cli import main
    from cyb_lightning.data import QuickstartCorpus
    from tests.conftest import TINY_QUICKSTART

    root = tmp_path_factory.mktemp("hf_run")
    n = save_tiny_tokenizer(root / "llama")
    path = save_tiny(root / "llama", "llama", vocab_size=n)
    config = tiny_run_config(QuickstartCorpus(str(tiny_quickstart.corpus.directory.parent), **TINY_QUICKSTART),
                             root, max_steps=2)  # fmt: skip
    config["trainer"]["callbacks"] = config["trainer"]["callbacks"][:1]
    config["model"]["decoder"] = {"class_path": "cyb_lightning.model.HFDecoder", "init_args": {"name_or_path": path}}
    config["data"]["tokenizer"] = {"class_path": "cyb_lightning.data.hf_tokenizer.HFTokenizer",
                                   "init_args": {"name_or_path": path}}  # fmt: skip
    (root / "fit.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(root / "fit.yaml")])
    ckpt = root / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt


def test_generated_text_drops_reserved_ids_by_role_not_by_range(tmp_path):
    from cyb_lightning.data.hf_tokenizer import HFTokenizer
    from cyb_lightning.commands.generate import text_of

    save_tiny_tokenizer(tmp_path)
    tok = HFTokenizer(str(tmp_path), model_vocab_size=300, num_pauses=8)
    v = tok.vocab
    assert tok.num_reserved == 9 and min(v.dk_id, *v.pause_ids) > 8  # added at the end: ids 0–8 are text
    ids = [v.eot_id, *tok.encode(PROMPT), v.pad_id, v.dk_id, *v.pause_ids, v.eot_id]
    assert min(tok.encode(PROMPT)[1:]) < tok.num_reserved  # '#', '$', '!' have ids below 9
    assert text_of(tok, ids) == PROMPT  # BOS, EOS, padding, DK and pauses dropped; '#$!' kept


def test_our_tokenizer_roles_are_its_reserved_block(tiny_tokenizer):
    # Our BPE puts pad, eot, DK and the 8 pauses in front: the roles are exactly ids 0 … R − 1.
    assert tiny_tokenizer.role_ids == frozenset(range(tiny_tokenizer.num_reserved))


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["greedy", "threshold", "sample"])
def test_generate_on_an_hf_checkpoint_with_and_without_the_cache(hf_run, policy, capsys):
    from cyb_lightning.__main__ import main

    ckpt = hf_run
    outputs = []
    for use_cache in ("true", "false"):
        threads = torch.get_num_threads()
        main(["generate", "--ckpt_path", str(ckpt), "--prompt", PROMPT, "--max_new_tokens", "5", "--policy", policy,
              "--temperature", "0.8", "--seed", "3", "--compare", "--use_cache", use_cache])  # fmt: skip
        torch.set_num_threads(threads)
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]  # KV cache = full recomputation: same tokens, pauses, calls (sample: same seed)
    for kind in (policy, "fixed", "none"):
        assert f"=== policy {kind}:" in outputs[0]
    assert "3.00 forward steps per token (fixed-K: 3" in outputs[0] and "1.00 forward steps per token" in outputs[0]
    texts = [line for line in outputs[0].splitlines() if not line.startswith("===")]
    assert len(texts) == 3 and all(t.startswith(PROMPT) for t in texts), texts


def test_generate_refuses_a_use_cache_that_is_not_a_boolean(capsys):
    from cyb_lightning.__main__ import main

    with pytest.raises(SystemExit):
        main(["generate", "--ckpt_path", "run/last.ckpt", "--use_cache", "maybe"])
    assert "expected true or false, got 'maybe'" in capsys.readouterr().err


@pytest.mark.slow
def test_adaptive_report_on_an_hf_checkpoint(hf_run, tmp_path):
    from cyb_lightning.__main__ import main

    ckpt = hf_run
    main(["report", "--ckpt_path", str(ckpt), "--out", str(tmp_path), "--min_count", "2", "--max_batches", "1",
          "--adaptive", "greedy,threshold,sample,fixed,none", "--adaptive_batches", "1"])  # fmt: skip
    adaptive = json.loads((tmp_path / "report.json").read_text())["adaptive"]
    assert adaptive["fixed"]["steps_per_token"] == 3.0 and adaptive["none"]["steps_per_token"] == 1.0
    for kind in ("greedy", "threshold", "sample"):
        r = adaptive[kind]
        # Steps and the pause histogram are counted apart: they must tell the same story.
        assert math.isclose(r["steps_per_token"], 1 + sum(k * p for k, p in enumerate(r["p_pauses"])), rel_tol=1e-9)
        assert r["tokens"] > 0
    from cyb_lightning.commands.loading import load_run

    module, dm = load_run(str(ckpt))
    _, stats = module.evaluation_outputs(next(iter(dm.val_dataloader())))  # --adaptive_batches 1
    # Fixed-K reading, teacher-forced, is the training layout read at step W.
    assert math.isclose(adaptive["fixed"]["nll"], float(-stats.log_t[:, -1].double().mean()), rel_tol=1e-4)
    assert len({r["tokens"] for r in adaptive.values()}) == 1  # every policy read the same tokens
