"""The packed stream: exact packing, rank × worker sharding, resume, finite validation, bad input."""

from __future__ import annotations

import gzip
import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cyb_lightning.data import HubC4, LocalShards, PackedStream, make_layout
from cyb_lightning.data.quickstart import write_shard

T = 8


def _doc(i: int) -> str:
    return f"Document {i} says " + "lorem ipsum dolor " * (i % 5 + 1) + f"and ends {i}."


@pytest.fixture
def shards(tmp_path):
    """Three train shards (5, 7, 4 documents) and one validation shard (6 documents)."""
    i = 0
    for s, n in enumerate([5, 7, 4]):
        write_shard(tmp_path / f"c4-train.{s:05d}-of-00003.json.gz", [_doc(j) for j in range(i, i + n)])
        i += n
    write_shard(tmp_path / "c4-validation.00000-of-00001.json.gz", [_doc(100 + j) for j in range(6)])
    return tmp_path


def _stream(source, tok, layout="none", **kw):
    lay = make_layout(layout, T, tok.vocab, num_pauses=2, seed=3)
    return PackedStream(source, tok, lay, seed=11, **kw)


def _np(examples):
    return [{k: v.numpy() for k, v in ex.items()} for ex in examples]


def _key(ex):
    return tuple(ex["input_ids"].tolist()) + tuple(ex["targets"].tolist())


def _token_stream(source, tok, split="train"):
    docs = [t for _, t in source.iter_documents(split)]
    return np.concatenate([np.append(x, tok.vocab.eot_id) for x in tok.encode_batch_np(docs)])


def _take(it, n):
    return [next(it) for _ in range(n)]


def _worker_iter(monkeypatch, stream, worker, num_workers):
    """Start iterating ``stream`` as DataLoader worker ``worker`` of ``num_workers``."""
    info = SimpleNamespace(id=worker, num_workers=num_workers)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: info)
    it = iter(stream)
    first = next(it, None)
    monkeypatch.undo()
    return ([] if first is None else [first]), it


def test_packing_is_exact(shards, tiny_tokenizer):
    src = LocalShards(str(shards))
    tokens = _token_stream(src, tiny_tokenizer)
    ref = _np(_stream(src, tiny_tokenizer, infinite=False, shuffle=False))
    assert len(ref) == -(-(tokens.size - 1) // T)
    for g, ex in enumerate(ref):
        window = tokens[g * T : g * T + T + 1]
        np.testing.assert_array_equal(ex["input_ids"][: window.size - 1], window[:-1])
        np.testing.assert_array_equal(ex["targets"][ex["target_mask"]], window[1:])
    # Every token but the first is a target exactly once; the last chunk is padded and masked.
    scored = np.concatenate([ex["targets"][ex["target_mask"]] for ex in ref])
    np.testing.assert_array_equal(scored, tokens[1:])
    n_last = tokens.size - (len(ref) - 1) * T  # real tokens in the last chunk
    assert n_last < T + 1 and ref[-1]["target_mask"].sum() == n_last - 1
    assert (ref[-1]["input_ids"][n_last:] == tiny_tokenizer.vocab.pad_id).all()


def test_rank_worker_sharding_is_disjoint_complete_and_ordered(shards, tiny_tokenizer, monkeypatch):
    src = LocalShards(str(shards))
    ref = _np(_stream(src, tiny_tokenizer, infinite=False, shuffle=False))
    world, workers, bs = 2, 3, 2
    seen = []
    per_rank = []
    for rank in range(world):
        outs = []
        for w in range(workers):
            s = _stream(src, tiny_tokenizer, infinite=False, shuffle=False, rank=rank, world_size=world, batch_size=bs)
            first, it = _worker_iter(monkeypatch, s, w, workers)
            outs.append(_np(first + list(it)))
        # DataLoader takes one batch from each worker in turn: that must give the rank's examples in order.
        batches = [[ex[i : i + bs] for i in range(0, len(ex), bs)] for ex in outs]
        order = [e for b in range(max(map(len, batches))) for w in range(workers) if b < len(batches[w])
                 for e in batches[w][b]]  # fmt: skip
        mine = ref[rank::world]
        assert [_key(e) for e in order[: len(mine)]] == [_key(e) for e in mine]
        assert all(not e["target_mask"].any() for e in order[len(mine) :])  # padding to equal length
        per_rank.append(len(order))
        seen += order[: len(mine)]
    assert per_rank[0] == per_rank[1] == -(-len(ref) // world)
    assert sorted(map(_key, seen)) == sorted(map(_key, ref))


@pytest.mark.parametrize("layout", ["cyb", "tbys_random"])
def test_state_dict_resumes_at_the_next_example(shards, tiny_tokenizer, layout):
    src = LocalShards(str(shards))
    n = 150  # more than one epoch
    ref = _np(_take(iter(_stream(src, tiny_tokenizer, layout)), n))
    offsets, epochs = [], []
    for cut in [0, 1, 13, 29, 41, 57, 77, 101, 139]:
        s = _stream(src, tiny_tokenizer, layout)
        it = iter(s)
        _take(it, cut)
        state = json.loads(json.dumps(s.state_dict()))  # plain JSON: fits any checkpoint
        offsets.append(state["lanes"][0]["offset"])
        epochs.append(state["lanes"][0]["epoch"])
        resumed = _stream(src, tiny_tokenizer, layout)
        resumed.load_state_dict(state)
        got = _np(_take(iter(resumed), n - cut))
        assert [_key(e) for e in got] == [_key(e) for e in ref[cut:]], cut
        np.testing.assert_array_equal(got[-1]["target_mask"], ref[-1]["target_mask"])
    assert any(offsets) and max(epochs) >= 1, (offsets, epochs)  # mid-document cuts, a later epoch


def test_training_epochs_reshuffle_shards(shards, tiny_tokenizer):
    src = LocalShards(str(shards))
    orders = [tuple(src.shard_order("train", epoch=e, shuffle_seed=11)) for e in range(6)]
    assert all(sorted(o) == sorted(src.shards("train")) for o in orders)
    assert len(set(orders)) > 1
    assert orders == [tuple(src.shard_order("train", epoch=e, shuffle_seed=11)) for e in range(6)]
    s = _stream(src, tiny_tokenizer)
    s.set_epoch(2)
    first = next(iter(s))["input_ids"]
    expected = tiny_tokenizer.encode(next(src.iter_documents("train", epoch=2, shuffle_seed=11))[1])[:T]
    assert first.tolist() == expected


def test_resume_with_a_different_number_of_workers(shards, tiny_tokenizer, monkeypatch):
    src = LocalShards(str(shards))
    bs = 2
    ref = _np(_take(iter(_stream(src, tiny_tokenizer, batch_size=bs)), 30))
    streams = [_stream(src, tiny_tokenizer, batch_size=bs) for _ in range(2)]
    starts = [_worker_iter(monkeypatch, s, w, 2) for w, s in enumerate(streams)]
    # Consume 5 batches in DataLoader order (w0, w1, w0, w1, w0); StatefulDataLoader snapshots a worker's
    # state right after that worker's batch.
    primed = [first for first, _ in starts]
    states = [None, None]
    for b in range(5):
        w = b % 2
        _take(starts[w][1], bs - len(primed[w]))
        primed[w] = []
        states[w] = streams[w].state_dict()
    merged = PackedStream.merge_states(states)
    assert merged["index"] == 5 * bs
    resumed = _stream(src, tiny_tokenizer, batch_size=bs)
    resumed.load_state_dict(merged)  # now read with one worker
    got = _np(_take(iter(resumed), 30 - 5 * bs))
    assert [_key(e) for e in got] == [_key(e) for e in ref[5 * bs :]]


def test_validation_is_finite_fixed_and_even_across_ranks(shards, tiny_tokenizer):
    src = LocalShards(str(shards))
    val = _stream(src, tiny_tokenizer, "cyb", split="validation")
    first = _np(val)
    assert [_key(e) for e in _np(val)] == [_key(e) for e in first]
    it = iter(val)
    _take(it, 3)  # a partial pass (e.g. Lightning's sanity check) must not shift the next one
    assert [_key(e) for e in _np(val)] == [_key(e) for e in first]
    capped = _np(_stream(src, tiny_tokenizer, "cyb", split="validation", max_documents=2))
    assert 0 < len(capped) < len(first)
    assert [_key(e) for e in capped[:-1]] == [_key(e) for e in first[: len(capped) - 1]]
    counts = [len(_np(_stream(src, tiny_tokenizer, split="validation", rank=r, world_size=3))) for r in range(3)]
    assert counts[0] == counts[1] == counts[2] == -(-len(first) // 3)


def test_malformed_lines_are_skipped_and_counted(tmp_path):
    good = [json.dumps({"text": f"good {i}", "url": "u"}).encode() for i in range(3)]
    bad = [b"not json", b'{"text": 5}', b'["a list"]', b'{"no_text": "x"}', b'{"text": "\xff\xfe"}']
    lines = [good[0], bad[0], bad[1], b"", good[1], bad[2], bad[3], bad[4], good[2]]
    with gzip.open(tmp_path / "c4-train.00000-of-00002.json.gz", "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    (tmp_path / "c4-train.00001-of-00002.json").write_bytes(b'{"text": "plain"}\n{broken\n')
    src = LocalShards(str(tmp_path))
    assert [t for _, t in src.iter_documents("train")] == ["good 0", "good 1", "good 2", "plain"]
    assert src.stats["malformed_lines"] == 6 and src.stats["broken_shards"] == 0


def test_truncated_gzip_ends_its_shard(tmp_path):
    write_shard(tmp_path / "c4-train.00000-of-00001.json.gz", [f"text number {i} " * 50 for i in range(200)])
    path = tmp_path / "c4-train.00000-of-00001.json.gz"
    path.write_bytes(path.read_bytes()[:-200])
    src = LocalShards(str(path))  # a glob/file path works too
    texts = [t for _, t in src.iter_documents("train")]
    assert 0 < len(texts) < 200 and texts[0] == "text number 0 " * 50
    assert src.stats["broken_shards"] == 1


def test_local_shards_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="validation_pattern"):
        LocalShards(str(tmp_path)).shards("validation")
    with pytest.raises(ValueError, match="split must be"):
        LocalShards(str(tmp_path)).shards("test")


def test_hub_c4_fails_fast_offline():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="LocalShards"):
        HubC4().prepare()
    assert time.monotonic() - t0 < 2.0


def test_state_from_another_config_is_refused(shards, tiny_tokenizer):
    src = LocalShards(str(shards))
    state = _stream(src, tiny_tokenizer, world_size=2).state_dict()
    with pytest.raises(ValueError, match="different data config"):
        _stream(src, tiny_tokenizer, world_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="rank < world_size"):
        _stream(src, tiny_tokenizer, rank=2, world_size=2)


# -- whole shards to ranks and lanes, workers share the lanes ----------------------------------------------


@pytest.fixture
def eight_shards(tmp_path):
    """Eight train shards of 3-6 documents each."""
    i = 0
    for s in range(8):
        n = 3 + s % 4
        docs = [" ".join(f"doc{j}word{k}" for k in range(6 + j % 5)) for j in range(i, i + n)]  # all distinct
        write_shard(tmp_path / f"c4-train.{s:05d}-of-00008.json.gz", docs)
        i += n
    return tmp_path


def _loader_order(monkeypatch, make, num_workers, num_batches, bs):
    """The examples a DataLoader with ``num_workers`` workers would yield (round robin, worker 0 first)."""
    its = []
    for w in range(num_workers):
        first, it = _worker_iter(monkeypatch, make(), w, num_workers)
        its.append((first, it))
    out = []
    for b in range(num_batches):
        first, it = its[b % num_workers]
        out += _np(first + _take(it, bs - len(first)))
        its[b % num_workers] = ([], it)
    return out


def test_shards_go_whole_to_ranks_and_lanes(eight_shards, tiny_tokenizer, monkeypatch):
    """World 2 × lanes 2: every shard is read by exactly one (rank, lane) per epoch, and the rank's batches
    are its lanes' packed streams taken in turn, whatever the number of workers (2 divides the lanes; 4
    reads each lane twice and warns), identically on every run."""
    src = LocalShards(str(eight_shards))
    world, lanes, bs, nb = 2, 2, 2, 8
    for epoch in (0, 1):
        order = src.shard_order("train", epoch=epoch, shuffle_seed=11)
        read = []
        for r in range(world):
            s = _stream(src, tiny_tokenizer, rank=r, world_size=world, lanes=lanes)
            read += [sh for lane in range(lanes) for sh in s._lane_shards(epoch, lane)]
        assert sorted(read) == sorted(order) and len(read) == len(set(read)) == 8
    seen = set()
    for rank in range(world):
        def make(rank=rank):
            return _stream(src, tiny_tokenizer, rank=rank, world_size=world, batch_size=bs, lanes=lanes)

        assert make().plan()["mode"] == "shards" and make().plan_warnings(2) == []
        # Reference: lane l packs the rank's shards l, l + lanes, … of epoch 0; batch b comes from lane b % lanes.
        order = src.shard_order("train", epoch=0, shuffle_seed=11)[rank::world]
        ref_lanes = []
        for lane in range(lanes):
            docs = [t for sh in order[lane::lanes] for _, t in src.read_shard("train", sh)]
            eot = tiny_tokenizer.vocab.eot_id
            toks = np.concatenate([np.append(x, eot) for x in tiny_tokenizer.encode_batch_np(docs)])
            ref_lanes.append([toks[g * T : g * T + T + 1] for g in range(nb // lanes * bs)])
        expected = [ref_lanes[b % lanes][(b // lanes) * bs + k] for b in range(nb) for k in range(bs)]
        runs = []
        for workers in (1, 2, 4):
            if workers == 4:
                with pytest.warns(UserWarning, match="each lane is read by 2 workers"):
                    got = _loader_order(monkeypatch, make, workers, nb, bs)
            else:
                got = _loader_order(monkeypatch, make, workers, nb, bs)
            runs.append([_key(e) for e in got])
            for e, window in zip(got, expected):
                np.testing.assert_array_equal(e["input_ids"], window[:-1])
                np.testing.assert_array_equal(e["targets"], window[1:])
        assert runs[0] == runs[1] == runs[2]
        assert runs[0] == [_key(e) for e in _loader_order(monkeypatch, make, 2, nb, bs)]  # the same every run
        seen |= set(runs[0])
    assert len(seen) == world * nb * bs  # the two ranks never share an example


def test_shard_count_not_a_multiple_of_the_world_size_warns(shards, tiny_tokenizer):
    s = _stream(LocalShards(str(shards)), tiny_tokenizer, rank=1, world_size=2, lanes=2)
    assert s.plan()["mode"] == "examples"
    with pytest.warns(UserWarning, match="not a multiple of the world size 2"):
        next(iter(s))


def test_lanes_resume_with_any_number_of_workers(eight_shards, tiny_tokenizer, monkeypatch):
    """4 lanes: stop after 5 batches read by 2 workers, merge their states, go on with 1, 2 or 4 workers."""
    src = LocalShards(str(eight_shards))
    bs, lanes = 2, 4

    def make():
        return _stream(src, tiny_tokenizer, "tbys_random", batch_size=bs, lanes=lanes)

    ref = [_key(e) for e in _loader_order(monkeypatch, make, 1, 40, bs)]
    streams = [make() for _ in range(2)]
    its = [_worker_iter(monkeypatch, s, w, 2) for w, s in enumerate(streams)]
    states = [s.state_dict() for s in streams]
    for b in range(5):
        first, it = its[b % 2]
        _take(it, bs - len(first))
        its[b % 2] = ([], it)
        states[b % 2] = streams[b % 2].state_dict()
    merged = json.loads(json.dumps(PackedStream.merge_states(states)))
    assert merged["index"] == 5 * bs
    for workers in (1, 2, 4):
        def resumed():
            s = make()
            s.load_state_dict(merged)
            return s

        got = [_key(e) for e in _loader_order(monkeypatch, resumed, workers, 35, bs)]
        assert got == ref[5 * bs :], workers
