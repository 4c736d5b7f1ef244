"""TBYS pause fine-tuning: the prompt/completion sources, the ``tbys_finetune`` layout, its stream and a fit."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cyb_lightning.data import PackedStream, Vocab, make_layout
from cyb_lightning.data import sources as sources_module
from cyb_lightning.data.layout import layout_tbys_finetune
from cyb_lightning.data.sources import HubPromptCompletion, LocalPromptCompletion, document_pair
from cyb_lightning.data.stream import check_pairs
from tests.conftest import assert_example

PAD, EOT, P1 = 0, 1, 3
VOCAB = Vocab(pad_id=0, eot_id=1, dk_id=2, pause_ids=tuple(range(3, 11)), size=100)

PAIRS = [
    {"prompt": "def add(a, b):", "completion": " return a + b"},
    {"prompt": "The keyword for a loop is", "completion": " for"},
    {"prompt": "", "completion": "import sys"},
    {"prompt": "Python lists are", "completion": " mutable sequences."},
    {"prompt": "1 + 1 =", "completion": " 2"},
    {"prompt": "A dict maps", "completion": " keys to values"},
]


def test_tbys_finetune_by_hand():
    # prompt (with its <eot>) · M = 2 pauses · completion (with its <eot>), padded to T + 1 = 9 slots.
    assert_example(layout_tbys_finetune([EOT, 10, 11], [20, 21, EOT], 8, P1, 2, PAD),
        input_ids=[EOT, 10, 11, P1, P1, 20, 21, EOT],
        position_ids=[0, 1, 2, 3, 4, 5, 6, 7],
        targets=[10, 11, P1, P1, 20, 21, EOT, PAD],
        target_mask=[0, 0, 0, 0, 1, 1, 1, 0])  # fmt: skip  only the last pause's output and later count


def test_tbys_finetune_cuts_the_prompt_start_then_the_completion_end():
    # Too long by 2: the prompt loses its first two tokens.
    assert_example(layout_tbys_finetune([EOT, 10, 11, 12, 13], [20, 21, 22, EOT], 7, P1, 2, PAD),
        input_ids=[12, 13, P1, P1, 20, 21, 22], position_ids=range(7),
        targets=[13, P1, P1, 20, 21, 22, EOT], target_mask=[0, 0, 0, 1, 1, 1, 1])  # fmt: skip
    # The completion alone does not fit: one prompt token stays, the completion's end goes.
    assert_example(layout_tbys_finetune([EOT, 10], list(range(20, 30)), 5, P1, 2, PAD),
        input_ids=[10, P1, P1, 20, 21], position_ids=range(5),
        targets=[P1, P1, 20, 21, 22], target_mask=[0, 0, 1, 1, 1])  # fmt: skip


def test_tbys_finetune_layout_config():
    lay = make_layout("tbys_finetune", 16, VOCAB, num_pauses=10)
    assert (lay.pause_ids, lay.steps_per_token, lay.length, lay.real_tokens, lay.pairs) == ((P1,), 1, 16, 7, True)
    ex = lay(([EOT, 40], [50, EOT]), 0)
    np.testing.assert_array_equal(ex["input_ids"][:14], [EOT, 40, *[P1] * 10, 50, EOT])
    np.testing.assert_array_equal(np.flatnonzero(ex["target_mask"]), [11, 12])
    assert not make_layout("cyb", 16, VOCAB).pairs
    for m in (0, 16):
        with pytest.raises(ValueError, match="1 <= num_pauses <= seq_len - 1 = 15"):
            make_layout("tbys_finetune", 16, VOCAB, num_pauses=m)


def write_jsonl(path: Path, records, gz: bool = False) -> Path:
    lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(lines)
    else:
        path.write_text(lines)
    return path


@pytest.fixture
def pair_dir(tmp_path):
    d = tmp_path / "pairs"
    d.mkdir()
    write_jsonl(d / "train-0.jsonl", PAIRS[:3])
    write_jsonl(d / "train-1.jsonl.gz", PAIRS[3:], gz=True)
    write_jsonl(d / "validation.jsonl", PAIRS[:2])
    return d


def test_local_pairs_are_read_and_malformed_records_skipped(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    bad = ["{not json", {"prompt": "x"}, {"prompt": 1, "completion": "y"}, {"prompt": "x", "completion": "  "},
           {"prompt": "x", "completion": "\ud800"}, ["prompt", "completion"]]  # fmt: skip
    write_jsonl(d / "train.jsonl", [PAIRS[0], *bad, PAIRS[1]])
    src = LocalPromptCompletion(str(d))
    got = [document_pair(text) for _, text in src.iter_documents("train")]
    assert got == [(PAIRS[0]["prompt"], PAIRS[0]["completion"]), (PAIRS[1]["prompt"], PAIRS[1]["completion"])]
    assert src.stats["malformed_lines"] == len(bad)
    with pytest.raises(FileNotFoundError, match="LocalPromptCompletion found no validation files"):
        src.shards("validation")


def test_hub_pairs_read_through_datasets(pair_dir, monkeypatch):
    # datasets' own streaming reader over local files (the "json" builder); only the Hub probe is bypassed.
    monkeypatch.setattr(sources_module, "hub_problem", lambda *a, **k: None)
    files = {"train": [str(pair_dir / "train-0.jsonl")], "test": [str(pair_dir / "validation.jsonl")]}
    src = HubPromptCompletion("json", data_files=files, validation_split="test")
    assert [document_pair(t) for _, t in src.iter_documents("train")] == [
        (r["prompt"], r["completion"]) for r in PAIRS[:3]
    ]
    assert len(list(src.iter_documents("validation"))) == 2


def test_hub_pairs_fail_fast_offline():
    with pytest.raises(RuntimeError, match="LocalPromptCompletion"):
        HubPromptCompletion("trl-lib/tldr", probe_timeout_s=0.5).shards("train")


def _stream(src, tokenizer, **kw):
    lay = make_layout("tbys_finetune", 24, tokenizer.vocab, num_pauses=3)
    return PackedStream(src, tokenizer, lay, **kw)


def test_stream_lays_out_one_pair_per_example(pair_dir, tiny_tokenizer):
    tok, p1 = tiny_tokenizer, tiny_tokenizer.vocab.pause_ids[0]
    eot = tok.vocab.eot_id
    examples = list(_stream(LocalPromptCompletion(str(pair_dir)), tok, split="validation"))
    assert len(examples) == 2
    for ex, pair in zip(examples, PAIRS[:2]):
        prompt, completion = [eot, *tok.encode(pair["prompt"])], [*tok.encode(pair["completion"]), eot]
        n = len(prompt) + 3 + len(completion)
        laid = torch.cat((ex["input_ids"], ex["targets"][-1:])).tolist()
        assert laid[:n] == prompt + [p1] * 3 + completion and set(laid[n:]) == {tok.vocab.pad_id}
        assert ex["position_ids"].tolist() == list(range(24))
        scored = ex["targets"][ex["target_mask"]].tolist()
        assert scored == completion  # the completion and its <eot>, nothing of the prompt or the pauses
        assert ex["target_mask"].nonzero().min() == len(prompt) + 3 - 1  # from the last pause's output on


def test_stream_shards_by_rank_and_resumes_exactly(pair_dir, tiny_tokenizer):
    src = LocalPromptCompletion(str(pair_dir))

    def firsts(stream, n):
        it = iter(stream)
        return [next(it)["input_ids"].tolist() for _ in range(n)]

    # Two ranks read one file each (shard mode): every pair once per epoch, none twice.
    epoch = [firsts(_stream(src, tiny_tokenizer, rank=r, world_size=2, lanes=1), 3) for r in (0, 1)]
    one = firsts(_stream(src, tiny_tokenizer, lanes=1), 6)
    assert sorted(epoch[0] + epoch[1]) == sorted(one) and len({tuple(x) for x in one}) == 6
    # Resume mid-epoch from a saved state: the same examples follow.
    stream = _stream(src, tiny_tokenizer, lanes=2, batch_size=2)
    it = iter(stream)
    [next(it) for _ in range(5)]
    state = stream.state_dict()
    expected = [next(it)["input_ids"].tolist() for _ in range(6)]
    resumed = _stream(src, tiny_tokenizer, lanes=2, batch_size=2)
    resumed.load_state_dict(state)
    assert firsts(resumed, 6) == expected


def test_pairs_and_layout_go_together(pair_dir, tiny_source, tiny_tokenizer):
    with pytest.raises(ValueError, match="only a PromptCompletionSource"):
        check_pairs(tiny_source, make_layout("tbys_finetune", 24, VOCAB, num_pauses=3))
    with pytest.raises(ValueError, match="data.layout: tbys_finetune"):
        PackedStream(LocalPromptCompletion(str(pair_dir)), tiny_tokenizer, make_layout("cyb", 24, VOCAB))


def test_no_tokenizer_is_trained_on_pairs(pair_dir, tmp_path):
    from cyb_lightning.datamodule import CYBDataModule

    with pytest.raises(ValueError, match="trains no tokenizer: set data.tokenizer_dir"):
        CYBDataModule(LocalPromptCompletion(str(pair_dir)), tokenizer_dir=str(tmp_path / "none"),
                      layout="tbys_finetune", num_pauses=3)  # fmt: skip


def test_fit_from_the_config_learns_the_completions_and_generate_appends_the_same_pauses(
    pair_dir, tiny_quickstart, tmp_path, capsys
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cyb_lightning.cli import main
    from cyb_lightning.commands.generate import main as generate
    from cyb_lightning.commands.generate import prompt_ids

    source = {"class_path": "cyb_lightning.data.sources.LocalPromptCompletion", "init_args": {"path": str(pair_dir)}}
    cli = main([
        "fit", "--config", "conf/tbys_pause_finetune.yaml", "--trainer", "conf/trainer/cpu.yaml",
        "--model.decoder", "conf/decoder/gpt_tiny.yaml", "--model.lr", "1e-2", "--model.warmup_steps", "5",
        "--data.source", json.dumps(source), "--data.tokenizer_dir", str(tiny_quickstart.tokenizer_dir),
        "--data.seq_len", "24", "--data.num_pauses", "4", "--data.batch_size", "3", "--data.lanes", "1",
        "--data.val_documents", "2", "--trainer.max_steps", "80", "--trainer.val_check_interval", "80",
        "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "1",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
    ])  # fmt: skip
    acc = EventAccumulator(cli.trainer.log_dir, size_guidance={"scalars": 0}).Reload()
    loss = [e.value for e in acc.Scalars("train/loss")]
    assert len(loss) >= 20 and np.mean(loss[-5:]) < 0.25 * np.mean(loss[:5]), loss  # six pairs, learned

    dm = cli.datamodule
    assert dm.layout_spec.num_random_pauses == 4 and dm.pause_ids == (dm.vocab.pause_ids[0],)
    hp = cli.model.hparams  # linked by the CLI: what init_from needs to know about the reserved rows
    assert tuple(hp.pause_ids) == dm.pause_ids and tuple(hp.reserved_ids) == (dm.dk_id, *dm.vocab.pause_ids)
    batch = next(iter(dm.val_dataloader()))
    prompt = prompt_ids(dm, PAIRS[0]["prompt"])  # generate's input: the training prompt and its M pauses
    assert prompt[-4:] == [dm.vocab.pause_ids[0]] * 4
    assert batch["input_ids"][0, : len(prompt)].tolist() == prompt
    assert prompt_ids(dm, PAIRS[0]["prompt"], 0) == prompt[:-4]

    ckpt = tmp_path / "last.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    capsys.readouterr()
    generate(["--ckpt_path", str(ckpt), "--config", str(Path(cli.trainer.log_dir) / "config.yaml"),
              "--prompt", PAIRS[0]["prompt"], "--max_new_tokens", "6", "--temperature", "0"])  # fmt: skip
    out = capsys.readouterr().out
    # One step per token (W = 1: the prompt's pauses are its only ones), and the training completion.
    assert "1.00 forward steps per token (fixed-K: 1;" in out.splitlines()[0]
    assert out.splitlines()[1] == PAIRS[0]["prompt"] + PAIRS[0]["completion"]
