"""A compact Llama-shaped decoder forward (gpt-fast style) over explicit slots, positions and masks.

Llama, Mistral, Qwen2, Qwen3 and Phi-3 share it: they differ only in q/k/v biases (Qwen2), a per-head
RMSNorm of q and k (Qwen3) and the checkpoint's tensor names (Phi-3 stores q/k/v and gate/up fused).

The same function runs the target and the draft: only the `LayerSource` differs (streamed or resident
full-precision linears for the target, 4-bit substitutes for the draft). Everything else, embeddings,
norms, rotary tables, lm_head and the KV cache, is the same objects for both.

Kernel count matters: a draft step runs a few rows through every layer, so it is bound by kernel launches,
not by arithmetic. Per layer the forward issues about 30 aten ops, views included:
- RMSNorm is one `F.rms_norm`; Qwen3's q/k norm is one more over the fused q and k heads, then one multiply
  by their weights written back in place;
- rotary embedding is one multiply-add over q, k AND v at once (v's table is the identity), with the
  half-rotation done by a flip and signs folded into the sin table, so k and v leave it side by side,
  ready for a single KV-cache write;
- attention is one SDPA call with the GQA group folded into the query rows, so the masked call stays on a
  fused kernel (memory-efficient attention on CUDA, where the engine restricts each call shape to the kernel
  `attention.py` picks) instead of SDPA's math fallback, and the additive mask is built once per forward,
  not per layer.

Layouts: CUDA's fused kernels return attention output with (B, L, H, D)-ordered strides, CPU's with the
query's (B, H, L, D); the code after SDPA only splits, permutes and reshapes, so either is read right
(tests/core runs under an imitation of CUDA's layout, tests/cuda_layouts.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from subspec_core.kv_cache import KVCache
from subspec_core.weights import ModelShape, SharedWeights

# Memory-efficient attention wants the mask's row stride to be a multiple of 16 elements (it copies and pads
# the mask on every call otherwise): masks are allocated with their last dimension padded to this.
MASK_ALIGN = 16


class Linears(Protocol):
    """The four (fused) linear maps of one decoder layer."""

    def qkv(self, x: torch.Tensor) -> torch.Tensor: ...
    def o(self, x: torch.Tensor) -> torch.Tensor: ...
    def gate_up(self, x: torch.Tensor) -> torch.Tensor: ...
    def down(self, x: torch.Tensor) -> torch.Tensor: ...


class LayerSource(Protocol):
    """Hands out each layer's linears in order during one forward (a streamer waits for copies here)."""

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
    """RMSNorm as one op (a fused kernel on CUDA)."""
    return F.rms_norm(x, weight.shape, weight, eps)


@dataclass(frozen=True)
class RotaryTables:
    """Per-token rotary multipliers for the fused q/k/v heads, each (n, heads + 2 kv_heads, 2, head_dim / 2).

    out = x * cos + flip(x) * sin, with x viewed as (.., 2, head_dim / 2) halves; that is the usual
    x * cos + rotate_half(x) * sin, whose first half carries -sin. v's heads get cos = 1, sin = 0, which
    leaves them exactly unchanged.
    """

    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def build(cls, shape: ModelShape, shared: SharedWeights, positions: torch.Tensor, dtype: torch.dtype) -> "RotaryTables":
        n, half = positions.shape[0], shape.head_dim // 2
        angles = positions.float()[:, None] * shared.inv_freq[None, :]  # (n, half), float32 as the reference
        cos = (angles.cos() * shared.attention_scaling).to(dtype)
        sin = (angles.sin() * shared.attention_scaling).to(dtype)
        rotated = shape.num_heads + shape.num_kv_heads
        cos_table = torch.ones(n, rotated + shape.num_kv_heads, 2, half, dtype=dtype, device=positions.device)
        sin_table = torch.zeros_like(cos_table)
        cos_table[:, :rotated] = cos[:, None, None, :]
        sin_table[:, :rotated, 0] = -sin[:, None, :]
        sin_table[:, :rotated, 1] = sin[:, None, :]
        return cls(cos_table, sin_table)

    def apply(self, qkv: torch.Tensor) -> torch.Tensor:
        """Rotate q and k of a fused (n, heads + 2 kv_heads, 2, head_dim / 2) projection; v passes through."""
        return torch.addcmul(qkv * self.cos, qkv.flip(2), self.sin)


def attention_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask (rows, cols) from a boolean one (True = may attend): 0 or -inf.

    The storage's row length is padded to MASK_ALIGN; the returned view has exactly `cols` columns.
    """
    rows, cols = allowed.shape
    padded = -(-cols // MASK_ALIGN) * MASK_ALIGN
    bias = torch.full((rows, padded), float("-inf"), dtype=dtype, device=allowed.device)
    return bias[:, :cols].masked_fill_(allowed, 0.0)


def gqa_mask(bias: torch.Tensor, group: int) -> torch.Tensor:
    """The (n, cols) additive mask repeated for the `group` query rows of each token: (1, 1, n * group, cols), in
    storage whose rows stay padded to MASK_ALIGN (one copy, as a plain repeat_interleave would cost, minus the
    per-call pad memory-efficient attention would add to an unaligned mask)."""
    rows, cols = bias.shape
    padded = -(-cols // MASK_ALIGN) * MASK_ALIGN
    mask = bias.new_empty(1, 1, rows * group, padded)[..., :cols]  # padding columns are never read
    mask.view(rows, group, cols).copy_(bias.unsqueeze(1))
    return mask


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
    bias: torch.Tensor | None,  # (n, kv_length) additive mask (attention_bias); None = attend to all
) -> torch.Tensor:
    """Run all decoder layers; returns the last hidden states (n, hidden), before the final norm."""
    x = F.embedding(tokens, shared.embed)  # (n, H)
    rotary = RotaryTables.build(shape, shared, positions, x.dtype)
    # GQA folded into query rows: row i * group + g of kv head h is query head h * group + g of token i,
    # so every row of a kv head's block needs token i's mask row
    mask = None if bias is None else gqa_mask(bias, shape.num_heads // shape.num_kv_heads)  # (1, 1, n*group, kv_length)
    for i in range(shape.num_layers):
        linears = layers.acquire(i)
        x = decoder_layer(shape=shape, shared=shared, layer=i, linears=linears, kv_cache=kv_cache, x=x, rotary=rotary,
                          mask=mask, slots=slots, kv_length=kv_length)
        layers.release(i)
    return x


def decoder_layer(
    *, shape: ModelShape, shared: SharedWeights, layer: int, linears: Linears, kv_cache: KVCache, x: torch.Tensor,
    rotary: RotaryTables, mask: torch.Tensor | None, slots: torch.Tensor, kv_length: int,
) -> torch.Tensor:
    """One decoder layer over hidden states x (n, hidden): attention (writing the n tokens' keys and values at
    `slots`, attending over cache slots [0, kv_length) under `mask`) and the MLP; the new hidden states."""
    qkv = _rotated_qkv(shape=shape, shared=shared, layer=layer, linears=linears, x=x, rotary=rotary)
    attn = _attend(shape=shape, layer=layer, kv_cache=kv_cache, qkv=qkv, mask=mask, slots=slots, kv_length=kv_length)
    return _finish_layer(shape=shape, shared=shared, layer=layer, linears=linears, x=x, attn=attn)


def _rotated_qkv(*, shape: ModelShape, shared: SharedWeights, layer: int, linears: Linears, x: torch.Tensor,
                 rotary: RotaryTables) -> torch.Tensor:
    """The layer's fused q/k/v projection of x (n, hidden), q and k normed (Qwen3) and rotated:
    (n, heads + 2 kvh, 2, hd/2)."""
    heads, kv_heads = shape.num_heads, shape.num_kv_heads
    eps = shape.rms_norm_eps
    norms = shared.layer_norms[layer]
    h = rms_norm(x, norms.input_norm, eps)
    qkv = linears.qkv(h).unflatten(1, (heads + 2 * kv_heads, 2, shape.head_dim // 2))
    if norms.qk_norm is not None:  # Qwen3: RMSNorm per q and k head, written over them in place (3 ops)
        qk = qkv[:, : heads + kv_heads]
        torch.mul(F.rms_norm(qk, qk.shape[-2:], None, eps), norms.qk_norm, out=qk)
    return rotary.apply(qkv)


def _attend(*, shape: ModelShape, layer: int, kv_cache: KVCache, qkv: torch.Tensor, mask: torch.Tensor | None,
            slots: torch.Tensor, kv_length: int) -> torch.Tensor:
    """Attention of n rows of one sequence: store their keys and values at `slots` of its cache, attend over its
    slots [0, kv_length) under `mask` (GQA-folded, gqa_mask); (n, heads * hd)."""
    n = qkv.shape[0]
    heads, kv_heads, head_dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
    group = heads // kv_heads
    kv_cache.write(layer, slots, qkv[:, heads:].view(n, 2, kv_heads, head_dim))
    q = qkv[:, :heads].view(n, kv_heads, group, head_dim).transpose(0, 1).reshape(1, kv_heads, n * group, head_dim)
    keys, values = kv_cache.attention_views(layer, kv_length)  # (1, kvh, kv_length, hd) each
    attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (1, kvh, n*group, hd), any strides
    # (1, kvh, n, group, hd) -> (1, n, kvh, group, hd) -> (n, heads * hd): one copy whatever the strides
    return attn.unflatten(2, (n, group)).transpose(1, 2).reshape(n, heads * head_dim)


def _finish_layer(*, shape: ModelShape, shared: SharedWeights, layer: int, linears: Linears, x: torch.Tensor,
                  attn: torch.Tensor) -> torch.Tensor:
    """The attention output's projection and residual, then the MLP and its residual."""
    x = x + linears.o(attn)
    h = rms_norm(x, shared.layer_norms[layer].post_attention_norm, shape.rms_norm_eps)
    gate, up = linears.gate_up(h).chunk(2, dim=-1)
    return x + linears.down(F.silu(gate) * up)


@dataclass(frozen=True)
class SequenceRows:
    """Rows [start, stop) of a batched forward that belong to one sequence: they write their keys and values at
    `slots` of its own KV region and attend over that region's slots [0, kv_length) under `bias`."""

    kv_cache: KVCache  # the sequence's region (kv_cache.kv_regions)
    start: int
    stop: int
    slots: torch.Tensor  # (stop - start,) slots in the region
    kv_length: int
    bias: torch.Tensor | None  # (stop - start, kv_length) additive mask (attention_bias); None = attend to all


def forward_hidden_batched(
    *, shape: ModelShape, shared: SharedWeights, layers: LayerSource, tokens: torch.Tensor, positions: torch.Tensor,
    sequences: tuple[SequenceRows, ...],
) -> torch.Tensor:
    """Run all decoder layers over the rows of several sequences at once; the last hidden states (n, hidden).

    Every linear runs on all n rows together, so a streamed layer is copied once for the whole batch; attention
    alone runs per sequence, over its own KV region with its own mask (the simplest exact design: a row can
    never see another sequence's keys). `tokens`, `positions` (n,) are the sequences' rows concatenated in order.
    """
    x = F.embedding(tokens, shared.embed)  # (n, H)
    rotary = RotaryTables.build(shape, shared, positions, x.dtype)
    group = shape.num_heads // shape.num_kv_heads
    masks = [None if seq.bias is None else gqa_mask(seq.bias, group) for seq in sequences]  # once per forward
    for i in range(shape.num_layers):
        linears = layers.acquire(i)
        qkv = _rotated_qkv(shape=shape, shared=shared, layer=i, linears=linears, x=x, rotary=rotary)
        attn = torch.cat([
            _attend(shape=shape, layer=i, kv_cache=seq.kv_cache, qkv=qkv[seq.start : seq.stop], mask=mask,
                    slots=seq.slots, kv_length=seq.kv_length)
            for seq, mask in zip(sequences, masks)
        ])  # (n, heads * hd)
        x = _finish_layer(shape=shape, shared=shared, layer=i, linears=linears, x=x, attn=attn)
        layers.release(i)
    return x


def compute_logits(shape: ModelShape, shared: SharedWeights, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm and lm_head for the rows that need logits; float32 (rows, vocab)."""
    return F.linear(rms_norm(hidden, shared.final_norm, shape.rms_norm_eps), shared.lm_head).float()
