"""A compact Llama/Qwen2 decoder forward (gpt-fast style) over explicit slots, positions and masks.

The same function runs the target and the draft: only the `LayerSource` differs (streamed or resident
full-precision linears for the target, 4-bit substitutes for the draft). Everything else, embeddings,
norms, rotary tables, lm_head and the KV cache, is the same objects for both.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from subspec_core.kv_cache import KVCache
from subspec_core.weights import ModelShape, SharedWeights


class Linears(Protocol):
    """The four (fused) linear maps of one decoder layer."""

    def qkv(self, x: torch.Tensor) -> torch.Tensor: ...
    def o(self, x: torch.Tensor) -> torch.Tensor: ...
    def gate_up(self, x: torch.Tensor) -> torch.Tensor: ...
    def down(self, x: torch.Tensor) -> torch.Tensor: ...


class LayerSource(Protocol):
    """Hands out each layer's linears in order during one forward (a streamer waits for copies here)."""

    def begin_forward(self) -> None: ...
    def acquire(self, layer: int) -> Linears: ...
    def release(self, layer: int) -> None: ...


class DenseLinears:
    """Full-precision linears over named weight views (a resident layer, or a streamed layer's GPU slot)."""

    __slots__ = ("_w",)

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self._w = weights

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._w["qkv_weight"], self._w.get("qkv_bias"))

    def o(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._w["o_weight"], self._w.get("o_bias"))

    def gate_up(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._w["gate_up_weight"])

    def down(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._w["down_weight"])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, cast back before the weight multiply (as the reference models do)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotary_tables(shared: SharedWeights, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for `positions` (n,): each (n, head_dim), computed in float32."""
    freqs = positions.float()[:, None] * shared.inv_freq[None, :]  # (n, head_dim/2)
    angles = torch.cat((freqs, freqs), dim=-1)
    return (angles.cos() * shared.attention_scaling).to(dtype), (angles.sin() * shared.attention_scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (n, heads, head_dim) by per-token angles (n, head_dim)."""
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


def forward_hidden(
    *,
    shape: ModelShape,
    shared: SharedWeights,
    layers: LayerSource,
    kv_cache: KVCache,
    tokens: torch.Tensor,  # (n,) token ids
    positions: torch.Tensor,  # (n,) rotary positions
    slots: torch.Tensor,  # (n,) KV cache slots the n tokens write
    kv_length: int,  # attend over cache slots [0, kv_length)
    attention_mask: torch.Tensor | None,  # (n, kv_length) bool, True = may attend; None = attend to all
) -> torch.Tensor:
    """Run all decoder layers; returns the last hidden states (n, hidden), before the final norm."""
    n = tokens.shape[0]
    x = shared.embed[tokens]  # (n, H)
    cos, sin = rotary_tables(shared, positions, x.dtype)
    mask = None if attention_mask is None else attention_mask[None, None]  # (1, 1, n, kv_length)
    q_end, k_end = shape.q_size, shape.q_size + shape.kv_size
    eps = shape.rms_norm_eps
    layers.begin_forward()
    for i in range(shape.num_layers):
        norms = shared.layer_norms[i]
        linears = layers.acquire(i)
        h = rms_norm(x, norms.input_norm, eps)
        qkv = linears.qkv(h)  # (n, q + 2 kv)
        q = qkv[:, :q_end].view(n, shape.num_heads, shape.head_dim)
        k = qkv[:, q_end:k_end].view(n, shape.num_kv_heads, shape.head_dim)
        v = qkv[:, k_end:].view(n, shape.num_kv_heads, shape.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        kv_cache.write(i, slots, k, v)
        keys, values = kv_cache.read(i, kv_length)  # (kvh, T, hd)
        attn = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask, enable_gqa=True
        )  # (1, heads, n, hd)
        x = x + linears.o(attn[0].transpose(0, 1).reshape(n, shape.q_size))
        h = rms_norm(x, norms.post_attention_norm, eps)
        gate, up = linears.gate_up(h).chunk(2, dim=-1)
        x = x + linears.down(F.silu(gate) * up)
        layers.release(i)
    return x


def compute_logits(shape: ModelShape, shared: SharedWeights, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm and lm_head for the rows that need logits; float32 (rows, vocab)."""
    return F.linear(rms_norm(hidden, shared.final_norm, shape.rms_norm_eps), shared.lm_head).float()
