"""A GPT-style decoder you can read top to bottom: RoPE on explicit position ids, RMSNorm, SwiGLU.

The CYB layout gives every pause the position index of the real token before it, so positions are an
input (``position_ids``), never ``arange(L)``. Attention is plain causal attention over the laid-out
sequence through ``scaled_dot_product_attention``. ``forward`` returns logits only; losses live in
``cyb_lightning.losses``.

Incremental decoding: pass a :class:`KVCache` to ``forward`` and only the new inputs; the cache is
extended in place with their keys and values (RoPE already applied, since positions are explicit). A
new input may be marked invisible (``key_mask`` False): no later query attends to it. Adaptive
generation uses that to run rows of a batch in lockstep while each row pauses a different number of times.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cyb_lightning.losses.head import OutputHead
from cyb_lightning.model.spec import DecoderSpec


@dataclass
class GPTConfig(DecoderSpec):
    """Sizes of our own decoder. ``vocab_size`` is filled in from the data (reserved ids included)."""

    vocab_size: int = 0
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # grouped-query attention when smaller than n_head
    d_model: int = 256
    ffn_hidden: int | None = None  # SwiGLU width; default ≈ 8/3·d rounded up to a multiple of 64
    max_position: int = 4096  # largest position index (real tokens, not laid-out tokens)
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.ffn_hidden is None:
            self.ffn_hidden = 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if (self.d_model // self.n_head) % 2:
            raise ValueError(f"head size {self.d_model // self.n_head} must be even for RoPE")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def num_params(self, include_embeddings: bool = True) -> int:
        d, f, h = self.d_model, self.ffn_hidden, self.head_dim
        attn = d * h * (self.n_head + 2 * self.n_kv_head) + self.n_head * h * d
        per_layer = attn + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layer * per_layer + d + (emb if include_embeddings else 0)

    def build(self, vocab_size: int) -> GPT:
        return GPT(replace(self, vocab_size=vocab_size))

    def block_types(self) -> tuple[type[nn.Module], ...]:
        return (Block,)

    def flops_per_token(self, vocab_size: int, context: int) -> int:
        """Training FLOPs per laid-out token: 6·(non-embedding params + output head) + attention (PaLM, app. B)."""
        n = replace(self, vocab_size=vocab_size).num_params(include_embeddings=False) + vocab_size * self.d_model
        return 6 * n + 12 * self.n_layer * self.d_model * context


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32: bf16 sums of squares lose too much precision over wide d_model.
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


def rope_cache(head_dim: int, max_position: int, base: float, device=None) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_position, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


class LayerCache:
    """Keys and values ``[B, H_kv, S, head_dim]`` of one layer, plus which keys may be attended ``[B, S]``."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.visible: Tensor | None = None
        self.all_visible = True  # no hidden key yet: one new query may attend to everything, mask-free

    def extend(self, k: Tensor, v: Tensor, visible: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        if visible is None:
            visible = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
        else:
            self.all_visible = self.all_visible and bool(visible.all())
        if self.k is None:
            self.k, self.v, self.visible = k, v, visible
        else:
            self.k = torch.cat((self.k, k), dim=2)
            self.v = torch.cat((self.v, v), dim=2)
            self.visible = torch.cat((self.visible, visible), dim=1)
        return self.k, self.v, self.visible


class KVCache:
    """Per-layer key/value cache for :meth:`GPT.forward`; grows in place with every call."""

    def __init__(self, n_layer: int) -> None:
        self.layers = [LayerCache() for _ in range(n_layer)]

    def __len__(self) -> int:
        """S: inputs cached so far (visible or not)."""
        k = self.layers[0].k
        return 0 if k is None else k.shape[2]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x1, x2) of the two halves of each head; ``cos``/``sin`` are ``[B, 1, L, head_dim/2]``."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=False)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: LayerCache | None = None, key_mask: Tensor | None = None
    ) -> Tensor:
        B, L, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], -1
        )
        q = q.view(B, L, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, L, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, L, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = None
        if cache is not None:
            k, v, visible = cache.extend(k, v, key_mask)
            S = k.shape[2]
            if L > 1 or not cache.all_visible:  # one new query over visible keys needs no mask at all
                # Query j (absolute S − L + j) sees the visible keys up to itself, and always itself.
                causal = torch.ones(L, S, dtype=torch.bool, device=x.device).tril(S - L)
                itself = torch.zeros(L, S, dtype=torch.bool, device=x.device)
                itself[:, S - L :] = torch.eye(L, dtype=torch.bool, device=x.device)
                mask = (causal & visible[:, None, None, :]) | itself
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=cache is None,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        return self.proj(y.transpose(1, 2).reshape(B, L, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.ffn_hidden, bias=False)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: LayerCache | None = None, key_mask: Tensor | None = None
    ) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, cache, key_mask))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.vocab_size < 2:
            raise ValueError("GPTConfig.vocab_size is unset: it comes from the data module (data.vocab_size)")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rope_cache(cfg.head_dim, cfg.max_position, cfg.rope_base)
        # Not persistent: derived from the config, and FSDP need not shard or checkpoint it.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)  # RMSNorm gains
            elif name.endswith(("proj.weight", "down.weight")):
                # GPT-2: scale the residual projections by 1/sqrt(2·layers) to keep the stream's variance.
                nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, std=std)
        cos, sin = rope_cache(self.cfg.head_dim, self.cfg.max_position, self.cfg.rope_base, self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layer)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        key_mask: Tensor | None = None,
        head_fn: Callable[[Tensor, OutputHead], Any] | None = None,
    ) -> Tensor | Any:
        """``input_ids``, ``position_ids``: ``[B, L]`` → logits ``[B, L, V]``.

        With ``cache``, the inputs continue the cached ones (which they attend to) and the cache is extended
        in place; ``key_mask`` (bool ``[B, L]``, cache only) hides inputs from every later query. With
        ``head_fn``, returns ``head_fn(final hidden states [B, L, d], output head)`` instead of the logits:
        the loss meets the head inside ``forward``, where FSDP2 has the head's weight gathered.
        """
        hidden = self.hidden_states(input_ids, position_ids, cache, key_mask)
        return self.head(hidden) if head_fn is None else head_fn(hidden, self.output_head())

    def hidden_states(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        key_mask: Tensor | None = None,
    ) -> Tensor:
        """The final hidden states ``[B, L, d]`` (after the final norm): ``forward`` is ``head`` of these."""
        if position_ids is None:
            start = 0 if cache is None else len(cache)
            position_ids = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
            position_ids = position_ids.expand_as(input_ids)
        if key_mask is not None and cache is None:
            raise ValueError("key_mask hides inputs from later queries; it needs a cache (use new_cache())")
        cos = self.rope_cos[position_ids].unsqueeze(1)
        sin = self.rope_sin[position_ids].unsqueeze(1)
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, None if cache is None else cache.layers[i], key_mask)
        return self.norm(x)

    def output_head(self) -> OutputHead:
        """The output layer: logits = hidden_states @ weight.T."""
        return OutputHead(self.head.weight, self.head.bias)

    def input_embeddings(self) -> nn.Embedding:
        return self.embed
