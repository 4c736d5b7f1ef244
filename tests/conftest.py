"""Shared fixtures: one tiny offline quickstart corpus + tokenizer per test session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network; HubC4 must fail fast
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# Small enough to build in about a second: the pydoc topics plus a handful of stdlib modules.
TINY_QUICKSTART = dict(max_stdlib_files=12, num_train_shards=4)
TINY_VOCAB = 512


@pytest.fixture(scope="session")
def tiny_quickstart(tmp_path_factory):
    """A QuickstartBuild (corpus + 512-id BPE) in a session temp dir; read-only for tests."""
    from cyb_lightning.data import build_quickstart

    return build_quickstart(tmp_path_factory.mktemp("quickstart"), TINY_VOCAB, **TINY_QUICKSTART)


@pytest.fixture
def tiny_source(tiny_quickstart):
    """A fresh QuickstartCorpus over the session corpus (a cache hit, no rebuild)."""
    from cyb_lightning.data import QuickstartCorpus

    return QuickstartCorpus(str(tiny_quickstart.corpus.directory.parent), **TINY_QUICKSTART)


@pytest.fixture
def tiny_vocab_size():
    """The BPE size the session tokenizer was trained with (pass it to build against the same cache)."""
    return TINY_VOCAB


@pytest.fixture
def tiny_tokenizer(tiny_quickstart):
    return tiny_quickstart.tokenizer


@pytest.fixture
def one_thread():
    """Step-by-step decoding of a tiny model is latency-bound: one thread avoids pool contention on shared CPUs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_script(relative: str):
    """A script outside the package (``bench/…``, ``scripts/…``) imported as a module by its path."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_example(example, **expected) -> None:
    """A laid-out example has exactly the batch contract's keys, and ``expected``'s values and dtypes."""
    import numpy as np

    assert set(example) == {"input_ids", "position_ids", "targets", "target_mask"}
    for key, value in expected.items():
        want = np.asarray(value, dtype=bool if key == "target_mask" else np.int64)
        assert example[key].dtype == want.dtype, key
        np.testing.assert_array_equal(example[key], want, err_msg=key)


def tiny_cyb_yaml(tiny_quickstart) -> str:
    """The model and data of a tiny CYB-AP fit (YAML text, ``data`` last and open): the resume, kill and
    requeue tests append their batch size and trainer."""
    quickstart_args = ", ".join(f"{k}: {v}" for k, v in TINY_QUICKSTART.items())
    return f"""
seed_everything: 1234
model:
  decoder:
    class_path: cyb_lightning.model.GPTConfig
    init_args: {{n_layer: 1, n_head: 2, d_model: 32, max_position: 64}}
  loss: {{class_path: cyb_lightning.losses.CYBAP}}
  warmup_steps: 2
  decay_steps: 1000
data:
  source:
    class_path: cyb_lightning.data.QuickstartCorpus
    init_args: {{root: {tiny_quickstart.corpus.directory.parent}, {quickstart_args}}}
  tokenizer_dir: {tiny_quickstart.tokenizer_dir}
  bpe_vocab_size: {TINY_VOCAB}
  layout: cyb
  num_pauses: 3
  seq_len: 16
"""


def assert_cache_contract(decoder, ids, pos, filler_id: int) -> None:
    """A decoder's KV-cache contract (our GPT, HFCausalLM): inputs fed in chunks give the logits of one full
    forward; an input fed with ``key_mask`` False in row 0 is as if never fed there, while row 1, which saw
    it, changes."""
    import torch

    with torch.no_grad():
        full = decoder(ids, pos)
        cache = decoder.new_cache()
        parts = [decoder(ids[:, a:b], pos[:, a:b], cache=cache) for a, b in ((0, 4), (4, 5), (5, ids.shape[1]))]
        assert len(cache) == ids.shape[1]
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
        cache = decoder.new_cache()
        decoder(ids[:, :5], pos[:, :5], cache=cache)
        decoder(torch.full((2, 1), filler_id), pos[:, 5:6], cache=cache, key_mask=torch.tensor([[False], [True]]))
        rest = decoder(ids[:, 5:], pos[:, 5:], cache=cache)
        torch.testing.assert_close(rest[0], full[0, 5:], rtol=1e-5, atol=1e-5)  # row 0 never saw it
        assert not torch.allclose(rest[1], full[1, 5:], atol=1e-4)  # row 1 did
