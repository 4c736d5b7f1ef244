"""Every bad input gets a defined outcome: skipped and counted, split, retried, or a clear error."""

from __future__ import annotations

import gzip
import logging
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from cyb_lightning.data import HubC4, LocalShards, PackedStream, TextSource, make_layout
from cyb_lightning.data.quickstart import write_shard
from cyb_lightning.data.stream import split_pieces

T = 8


class MemorySource(TextSource):
    """Documents from memory: one train shard per list."""

    def __init__(self, shards: list[list[str]]):
        self.docs = shards

    def shards(self, split):
        return [str(i) for i in range(len(self.docs))]

    def iter_shard(self, split, shard):
        yield from self.docs[int(shard)]

    def fingerprint(self):
        return "memory"


def _stream(source, tok, layout="none", **kw):
    return PackedStream(source, tok, make_layout(layout, T, tok.vocab, num_pauses=2), seed=1, **kw)


def _inputs(stream, n=None):
    out = []
    for ex in stream:
        out.append(ex["input_ids"][ex["target_mask"]].numpy())
        if n is not None and len(out) == n:
            break
    return np.concatenate(out)


def test_bad_lines_are_skipped_counted_and_logged(tmp_path, caplog):
    lines = [
        b'{"text": "good one"}',
        b"{malformed json",  # malformed JSON
        b'{"url": "no text field"}',  # record without text
        b'{"text": null}',
        b'{"text": "bad utf-8 \xff\xfe here"}',  # invalid UTF-8 bytes
        b'{"text": "lone surrogate \\ud800 here"}',  # valid JSON, but UTF-8 cannot encode it
        b'{"text": ""}',  # empty
        b'{"text": "  \\n\\t  "}',  # whitespace only
        b'{"text": "good two"}',
    ]
    with gzip.open(tmp_path / "c4-train.00000-of-00001.json.gz", "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    src = LocalShards(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="cyb_lightning.data.sources"):
        assert [t for _, t in src.iter_documents("train")] == ["good one", "good two"]
    assert src.stats["malformed_lines"] == 4
    assert src.stats["invalid_text"] == 1 and src.stats["empty_documents"] == 2
    # Each warning names the file, the line and what was wrong with it.
    shard = tmp_path / "c4-train.00000-of-00001.json.gz"
    assert [r.getMessage() for r in caplog.records] == [
        f"{shard}, line 2: malformed line skipped (not JSON: Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1))",
        f"{shard}, line 3: malformed line skipped (no string 'text' field (keys ['url']))",
        f"{shard}, line 4: malformed line skipped (no string 'text' field (keys ['text']))",
        f"{shard}, line 5: malformed line skipped (not UTF-8)",
        f"{shard}, line 6: text UTF-8 cannot encode (a lone surrogate escape such as \\ud800); skipped",
        f"{shard}, line 7: empty or whitespace-only document; skipped",
        f"{shard}, line 8: empty or whitespace-only document; skipped",
    ]


def test_reserved_strings_in_text_are_plain_text(tiny_tokenizer):
    text = "quoting <pause1><pause2> and <dk> or <eot><pad> literally: <pause8>"
    src = MemorySource([[text, text]])
    ex = next(iter(_stream(src, tiny_tokenizer, "cyb", infinite=False, shuffle=False)))
    groups = ex["input_ids"].view(T, 3)
    v = tiny_tokenizer.vocab
    assert (groups[:, 0] >= tiny_tokenizer.num_reserved).all()  # the real tokens: text ids only
    assert groups[:, 1:].tolist() == [list(v.pause_ids[:2])] * T  # pauses only where the layout puts them
    assert tiny_tokenizer.decode(groups[:, 0].tolist()) == tiny_tokenizer.decode(tiny_tokenizer.encode(text)[:T])
    assert not set(ex["targets"].tolist()) & {v.dk_id, v.pad_id, *v.pause_ids}


def test_long_documents_are_tokenized_in_bounded_pieces(tiny_tokenizer, monkeypatch):
    words = [f"word{i % 97}" for i in range(20_000)]
    doc = " ".join(words)  # ~180k characters
    pieces = split_pieces(doc, 1000)
    assert "".join(pieces) == doc and max(map(len, pieces)) <= 1000 and all(p.startswith(" ") for p in pieces[1:])
    calls = []
    encode = tiny_tokenizer.encode_batch_np

    def spy(texts):
        calls.append(sum(map(len, texts)))
        return encode(texts)

    monkeypatch.setattr(tiny_tokenizer, "encode_batch_np", spy)
    piecewise = _inputs(_stream(MemorySource([[doc]]), tiny_tokenizer, infinite=False, max_document_chars=1000))
    assert max(calls) < 2000  # never more than ~one piece's worth of text per tokenizer call
    whole = np.asarray(tiny_tokenizer.encode(doc))
    np.testing.assert_array_equal(piecewise[: whole.size - 1], whole[:-1])  # cut before a space: same tokens


def test_a_100_mb_document_streams_without_tokenizing_it_whole(tiny_tokenizer, monkeypatch):
    """A 100 MB document in memory (nothing written to disk): the first examples come after tokenizing
    about one piece of it, so time and tokenizer memory stay bounded."""
    doc = "lorem ipsum dolor sit amet " * 3_900_000  # 105 MB
    calls = []
    encode = tiny_tokenizer.encode_batch_np
    monkeypatch.setattr(
        tiny_tokenizer, "encode_batch_np", lambda texts: calls.append(sum(map(len, texts))) or encode(texts)
    )
    t0 = time.monotonic()
    got = _inputs(_stream(MemorySource([[doc], ["a short one"]]), tiny_tokenizer), n=50)
    assert time.monotonic() - t0 < 20 and got.size == 50 * T
    assert max(calls) <= 2 * 100_000 and sum(calls) < 1_000_000  # pieces of <= max_document_chars


def test_transient_read_errors_are_retried_with_backoff(tmp_path, monkeypatch):
    write_shard(tmp_path / "c4-train.00000-of-00001.json.gz", [f"document {i}" for i in range(10)])
    failures = {"left": 2}

    class Flaky(LocalShards):
        def iter_shard(self, split, shard):
            for i, text in enumerate(super().iter_shard(split, shard)):
                if i == 4 and failures["left"]:
                    failures["left"] -= 1
                    raise ConnectionResetError("connection reset by peer")
                yield text

    sleeps = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    src = Flaky(str(tmp_path))
    got = [t for _, t in src.read_shard("train", src.shards("train")[0], retries=3, backoff_s=0.5)]
    assert got == [f"document {i}" for i in range(10)]  # nothing lost, nothing repeated
    assert sleeps == [0.5, 1.0] and src.stats["retries"] == 2
    failures["left"] = 10
    with pytest.raises(RuntimeError, match="failed 4 times in a row"):
        list(src.read_shard("train", src.shards("train")[0], retries=3, backoff_s=0.5))


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*download-c4"):
        LocalShards(str(tmp_path / "nowhere")).shards("train")
    with pytest.raises(FileNotFoundError, match="found no train shards"):
        LocalShards(str(tmp_path)).shards("train")


def test_a_split_without_documents_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(RuntimeError, match="has no documents"):
        next(iter(_stream(MemorySource([["", "   "]]), tiny_tokenizer)))


def test_hub_source_fails_fast_offline_naming_the_local_mirror(tiny_vocab_size):
    from cyb_lightning.datamodule import CYBDataModule

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="conf/data/c4_local.yaml"):
        CYBDataModule(source=HubC4(), bpe_vocab_size=tiny_vocab_size)
    assert time.monotonic() - t0 < 2.0


def test_hub_unreachable_fails_within_the_probe_timeout(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # A server on the loopback that takes the connection and never answers (a hung proxy or Hub).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="cannot reach .*local C4 mirror"):
            HubC4(probe_timeout_s=0.5).prepare()
        assert time.monotonic() - t0 < 3.0


def test_download_c4_offline_says_so_quickly(tmp_path):
    from cyb_lightning.data.download import main

    t0 = time.monotonic()
    with pytest.raises(SystemExit, match="offline mode.*c4_local.yaml"):
        main(["--out", str(tmp_path), "--shards", "2"])
    assert time.monotonic() - t0 < 2.0 and not list(tmp_path.iterdir())


def test_download_c4_names_and_places_the_files(tmp_path, monkeypatch):
    import huggingface_hub

    from cyb_lightning.data import download

    fetched = []

    def fake(repo_id, filename, repo_type, revision, local_dir):
        fetched.append((repo_id, filename, repo_type))
        path = tmp_path / "dl" / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        write_shard(path, [f"{filename} text"])
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    monkeypatch.setattr(download, "check_hub", lambda timeout_s: None)
    download.main(["--out", str(tmp_path / "c4"), "--shards", "2", "--validation-shards", "1"])
    assert [f for _, f, _ in fetched] == [
        "en/c4-train.00000-of-01024.json.gz", "en/c4-train.00001-of-01024.json.gz",
        "en/c4-validation.00000-of-00008.json.gz",
    ]  # fmt: skip
    src = LocalShards(str(tmp_path / "c4"))
    assert len(src.shards("train")) == 2 and len(src.shards("validation")) == 1
    download.main(["--out", str(tmp_path / "c4"), "--shards", "2"])  # already there: nothing fetched
    assert len(fetched) == 3


def test_hub_c4_streams_whole_file_shards(tmp_path, monkeypatch, tiny_tokenizer):
    """HubC4's shards are the streaming dataset's file shards, read one at a time (here a local json
    dataset stands in for the Hub: same ``datasets`` streaming code path, no network)."""
    import datasets

    files = []
    for s in range(4):
        files.append(str(tmp_path / f"c4-train.{s:05d}-of-00004.json.gz"))
        write_shard(Path(files[-1]), [f"shard {s} document {i} " * 3 for i in range(5)] + ["", "  "])
    real_load = datasets.load_dataset
    def fake_load(name, config, split, streaming, revision):
        return real_load("json", data_files=files, split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    src = HubC4(probe_timeout_s=0.1)
    src._checked = True  # the reachability probe is tested above
    assert src.shards("train") == ["0", "1", "2", "3"]
    assert [t for _, t in src.read_shard("train", "2")] == [f"shard 2 document {i} " * 3 for i in range(5)]
    assert src.stats["empty_documents"] == 2
    for rank in range(2):
        s = _stream(src, tiny_tokenizer, rank=rank, world_size=2, lanes=2)
        assert s.plan()["mode"] == "shards" and s.plan()["lanes"] == 2
        lanes = [s._lane_shards(0, lane) for lane in range(2)]
        assert all(len(x) == 1 for x in lanes)
        first = tiny_tokenizer.decode(next(iter(s))["input_ids"].tolist())  # layout "none": the plain tokens
        assert len(first) > 5 and f"shard {lanes[0][0]} document 0".startswith(first)
    # The same split across ranks as ``datasets.distributed.split_dataset_by_node`` (whole shards, since
    # 4 is a multiple of 2), here without the per-epoch shuffle so that both use the canonical order.
    from datasets.distributed import split_dataset_by_node

    ds = real_load("json", data_files=files, split="train", streaming=True)
    for rank in range(2):
        theirs = [r["text"] for r in split_dataset_by_node(ds, rank=rank, world_size=2) if r["text"].strip()]
        s = _stream(src, tiny_tokenizer, rank=rank, world_size=2, lanes=1, shuffle=False)
        ours = [t for sh in s._lane_shards(0, 0) for _, t in src.read_shard("train", sh)]
        assert ours == theirs


def _mirror_with_a_non_gzip_shard(tmp_path: Path, num_shards: int = 4, bad: int = 1) -> Path:
    """A local C4 mirror of ``num_shards`` train shards; shard ``bad`` is plain text named ``.json.gz``."""
    for s in range(num_shards):
        path = tmp_path / f"c4-train.{s:05d}-of-{num_shards:05d}.json.gz"
        if s == bad:
            path.write_text("this is not gzip\n")
        else:
            write_shard(path, [f"shard {s} document {d}: " + "words " * 12 for d in range(6)])
    return tmp_path


@pytest.mark.parametrize("lanes, rank, world", [(1, 0, 1), (2, 0, 1), (4, 0, 1), (2, 0, 2), (2, 1, 2)])
def test_an_unreadable_shard_alone_in_a_lane_is_skipped_and_counted(tmp_path, tiny_tokenizer, lanes, rank, world):
    """4 shards, one not gzip: whatever the lanes and ranks, training goes on without it, and it is counted."""
    src = LocalShards(str(_mirror_with_a_non_gzip_shard(tmp_path)))
    stream = _stream(src, tiny_tokenizer, lanes=lanes, rank=rank, world_size=world, batch_size=2)
    text = tiny_tokenizer.decode(_inputs(stream, 200).tolist())
    assert "shard 1 " not in text and all(f"shard {s} " in text for s in (0, 2, 3) if world == 1)
    assert src.stats["broken_shards"] >= 1
    assert src.shard_problems[str(tmp_path / "c4-train.00001-of-00004.json.gz")].startswith(
        f"{tmp_path / 'c4-train.00001-of-00004.json.gz'}: unreadable after line 0"
    )


def test_a_lane_with_no_readable_shard_says_so_with_the_cause(tmp_path, tiny_tokenizer):
    """Unshuffled, lane 1 always gets the broken shard: it truly has no data, and the error names why."""
    src = LocalShards(str(_mirror_with_a_non_gzip_shard(tmp_path)))
    stream = _stream(src, tiny_tokenizer, lanes=4, batch_size=2, shuffle=False)
    with pytest.raises(RuntimeError) as err:
        _inputs(stream, 60)
    message = str(err.value)
    assert "lane 1 of rank 0 (train split of LocalShards) has no documents in any shard it can be dealt" in message
    assert "c4-train.00001-of-00004.json.gz: unreadable after line 0, rest of shard skipped" in message
    assert "Not a gzipped file" in message


def test_skips_are_logged_per_reason_and_summed_up_at_the_end_of_fit(tmp_path, caplog):
    """Through the CLI: data/skipped/<reason> scalars (here in metrics.csv) and one summary line."""
    import csv

    from cyb_lightning.cli import main as cli_main

    (tmp_path / "mirror").mkdir()
    mirror = _mirror_with_a_non_gzip_shard(tmp_path / "mirror")
    with gzip.open(mirror / "c4-train.00002-of-00004.json.gz", "ab") as f:
        f.write(b"{not json\n" + b'{"url": "no text"}\n')
    write_shard(mirror / "c4-validation.00000-of-00001.json.gz", ["a validation document " * 4])
    args = [
        "fit", "--seed_everything", "1", "--model.decoder", "cyb_lightning.model.GPTConfig",
        "--model.decoder.n_layer", "1", "--model.decoder.n_head", "2", "--model.decoder.d_model", "16",
        "--model.decoder.max_position", "16", "--model.loss", "cyb_lightning.losses.CrossEntropy",
        "--data.source", "cyb_lightning.data.LocalShards", "--data.source.path", str(mirror),
        # A tokenizer of its own: the shared one (tiny_quickstart's) would be retrained on this mirror.
        "--data.tokenizer_dir", str(tmp_path / "tokenizer"), "--data.bpe_vocab_size", "512",
        "--data.layout", "none", "--data.seq_len", "8", "--data.batch_size", "2", "--data.lanes", "4",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", "40",
        "--trainer.log_every_n_steps", "20", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar",
        "false", "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    with caplog.at_level(logging.INFO):
        cli_main(args)
    (metrics,) = (tmp_path / "run").rglob("metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("data/skipped/broken_shards")]
    assert [int(r["step"]) for r in rows] == [20, 40]
    last = rows[-1]
    assert float(last["data/skipped/malformed_lines"]) >= 2 and float(last["data/skipped/broken_shards"]) >= 1
    assert float(last["data/skipped/invalid_text"]) == 0
    (summary,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data skipped during this fit")]
    assert f"{int(float(last['data/skipped/malformed_lines']))} malformed lines" in summary
    assert "broken shards" in summary and "the warnings name each file and line" in summary


@pytest.mark.parametrize(
    "status, body, problem",
    [
        (404, b"Not Found", "answered HTTP 404 Not Found, not the dataset"),  # a proxy without the Hub
        (200, b"<html>Sign in to the network</html>", "not with the description of allenai/c4"),  # a portal
        (200, b'{"id": "allenai/c4", "sha": "abc"}', None),  # the Hub itself
    ],
)
def test_only_the_datasets_description_counts_as_the_hub(monkeypatch, status, body, problem):
    """Any reply that is not the dataset ends in the same message naming the local mirror."""
    import http.server
    import threading

    class Reply(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Reply)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    try:
        if problem is None:
            HubC4(probe_timeout_s=5).prepare()
        else:
            with pytest.raises(RuntimeError) as err:
                HubC4(probe_timeout_s=5).prepare()
            assert problem in str(err.value)
            assert "Use the local C4 mirror instead: `--data.source conf/data/c4_local.yaml`" in str(err.value)
    finally:
        server.shutdown()
