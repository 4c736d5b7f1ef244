import pytest
import torch

from cyb_lightning.model import GPT, GPTConfig


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    # A wide init gives logits of order 1, so position effects stand well above float round-off.
    cfg = dict(vocab_size=97, n_layer=2, n_head=4, d_model=32, max_position=64, init_std=0.2)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2}, {"tie_embeddings": False}])
def test_causal_later_tokens_never_change_earlier_outputs(kw):
    model = tiny(**kw)
    ids = torch.randint(0, 97, (2, 12))
    pos = torch.arange(12).expand(2, -1)
    base = model(ids, pos)
    for cut in (0, 5, 11):
        changed = ids.clone()
        changed[:, cut:] = (changed[:, cut:] + 1) % 97
        out = model(changed, pos)
        torch.testing.assert_close(out[:, :cut], base[:, :cut], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, cut:], base[:, cut:])


def test_position_ids_are_honoured():
    model = tiny()
    ids = torch.randint(0, 97, (1, 8))
    consecutive = model(ids, torch.arange(8)[None])
    shared = model(ids, torch.arange(4).repeat_interleave(2)[None])  # the CYB layout's shared positions
    torch.testing.assert_close(consecutive[:, 0], shared[:, 0])  # position 0 either way
    assert (consecutive[:, 1:] - shared[:, 1:]).abs().max() > 1e-3
    # RoPE is relative: shifting every position by the same offset leaves the logits unchanged.
    torch.testing.assert_close(model(ids, torch.arange(8)[None] + 7), consecutive, atol=1e-4, rtol=1e-4)


def test_shapes_ties_and_parameter_count():
    model = tiny()
    assert model(torch.zeros(3, 5, dtype=torch.long)).shape == (3, 5, 97)
    assert model.head.weight is model.embed.weight
    n = sum(p.numel() for p in model.parameters())
    assert n == model.cfg.num_params()
    untied = tiny(tie_embeddings=False, n_kv_head=1)
    assert sum(p.numel() for p in untied.parameters()) == untied.cfg.num_params()


def test_bad_sizes_fail_with_the_fix_named():
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="vocab_size is unset"):
        GPT(GPTConfig(d_model=32, n_head=4))


def test_gradients_reach_every_parameter():
    model = tiny().train()
    ids = torch.randint(0, 97, (2, 6))
    model(ids).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
