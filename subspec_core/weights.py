"""What a decoder model is made of, independent of where its tensors live.

A decoder layer's linear weights are packed into ONE flat tensor (`LayerLayout`), so streaming a layer is a
single host-to-device copy into a reused GPU buffer, and a resident layer is the same flat tensor on the GPU.
q/k/v are fused into one matrix and gate/up into another: fewer kernels per layer, same math.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

# Linear tensors of one layer, in packing order. Biases are present only when the model has them.
LINEAR_NAMES = ("qkv_weight", "qkv_bias", "o_weight", "o_bias", "gate_up_weight", "down_weight")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-shaped decoder (Llama, Mistral, Qwen2, Qwen3, Phi-3)."""

    architecture: str  # transformers' model_type: "llama", "mistral", "qwen2", "qwen3" or "phi3"
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    tie_embeddings: bool
    qk_norm: bool = False  # Qwen3: an RMSNorm over each query and key head before the rotary embedding

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def linear_params_per_layer(self) -> int:
        """Weights of q, k, v, o, gate, up, down in one layer (biases excluded)."""
        h, i = self.hidden_size, self.intermediate_size
        return h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i


@dataclass(frozen=True)
class LayerLayout:
    """Where each linear tensor of a layer sits inside the layer's flat buffer (offsets in elements)."""

    entries: tuple[tuple[str, int, tuple[int, ...]], ...]  # (name, offset, shape)
    numel: int

    @classmethod
    def for_shape(cls, shape: ModelShape) -> "LayerLayout":
        h, i = shape.hidden_size, shape.intermediate_size
        qkv_out = shape.q_size + 2 * shape.kv_size
        wanted: list[tuple[str, tuple[int, ...]]] = [("qkv_weight", (qkv_out, h))]
        if shape.qkv_bias:
            wanted.append(("qkv_bias", (qkv_out,)))
        wanted.append(("o_weight", (h, shape.q_size)))
        if shape.o_bias:
            wanted.append(("o_bias", (h,)))
        wanted += [("gate_up_weight", (2 * i, h)), ("down_weight", (h, i))]
        entries, offset = [], 0
        for name, dims in wanted:
            entries.append((name, offset, dims))
            # keep every tensor 64-element aligned so views stay aligned for vectorised kernels
            offset += -(-math.prod(dims) // 64) * 64
        return cls(entries=tuple(entries), numel=offset)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into a flat layer buffer (no copies)."""
        return {name: flat[off : off + math.prod(dims)].view(dims) for name, off, dims in self.entries}

    def nbytes(self, dtype: torch.dtype) -> int:
        return self.numel * torch.empty((), dtype=dtype).element_size()


# Writes decoder layer i's fused linears into `out`, named views (LINEAR_NAMES) of where the layer lives: its
# slot of the host arena or its device buffer. Loading fills each layer once, straight from its source.
LayerFiller = Callable[[int, dict[str, torch.Tensor]], None]


@dataclass
class LayerNorms:
    """The two RMSNorm weights of a decoder layer (small; always on the compute device)."""

    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    # Qwen3's per-head q/k norm weights laid out over the fused heads, (heads + kv_heads, 2, head_dim / 2) like
    # the forward's view of q and k: q_norm's weight on every query head, then k_norm's on every key head, so one
    # multiply applies both. None for the other families.
    qk_norm: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [self.input_norm, self.post_attention_norm] + ([] if self.qk_norm is None else [self.qk_norm])

    def to(self, device: torch.device) -> "LayerNorms":
        return LayerNorms(*(None if t is None else t.to(device) for t in (self.input_norm, self.post_attention_norm, self.qk_norm)))


@dataclass
class SharedWeights:
    """Modules the draft shares with the target by reference: embeddings, norms, lm_head, rotary tables."""

    embed: torch.Tensor  # (V, H)
    lm_head: torch.Tensor  # (V, H); the same tensor as `embed` when embeddings are tied
    final_norm: torch.Tensor  # (H,)
    layer_norms: list[LayerNorms]
    inv_freq: torch.Tensor  # (head_dim / 2,) float32
    attention_scaling: float  # rotary cos/sin multiplier (1.0 except for yarn-style scaling)

    def nbytes(self) -> int:
        tensors = [self.embed, self.final_norm, self.inv_freq]
        tensors += [t for n in self.layer_norms for t in n.tensors()]
        if self.lm_head.data_ptr() != self.embed.data_ptr():
            tensors.append(self.lm_head)
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device) -> "SharedWeights":
        embed = self.embed.to(device)
        return SharedWeights(
            embed=embed,
            lm_head=embed if self.lm_head is self.embed else self.lm_head.to(device),
            final_norm=self.final_norm.to(device),
            layer_norms=[n.to(device) for n in self.layer_norms],
            inv_freq=self.inv_freq.to(device),
            attention_scaling=self.attention_scaling,
        )


def shared_nbytes(shape: ModelShape, dtype: torch.dtype) -> int:
    """What `SharedWeights.nbytes()` will be, from the shape alone: the planner sizes the shared weights before
    any weight is read."""
    b = torch.empty((), dtype=dtype).element_size()
    h = shape.hidden_size
    matrices = (1 if shape.tie_embeddings else 2) * shape.vocab_size * h
    norms = (2 * shape.num_layers + 1) * h
    if shape.qk_norm:
        norms += shape.num_layers * (shape.num_heads + shape.num_kv_heads) * shape.head_dim
    return (matrices + norms) * b + (shape.head_dim // 2) * 4  # inv_freq is float32
