"""Random-weight models of a given shape, generated fast, for measuring mechanics at paper scale.

Layer linears are drawn on the compute device one fused tensor at a time (a GPU draws a 7B model's
~15 GB in well under a second) and moved to host memory; `build.engine_from_weights` then packs the streamed
layers into its page-locked arena, exactly as for real weights. Shared weights (embeddings, lm_head,
norms) are drawn where they will live: on the compute device. Acceptance is meaningless with random
weights; timings of forwards, copies and the draft are not.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from subspec_core.shapes import (
    LLAMA31_8B, MISTRAL_7B, PHI3_MEDIUM, QWEN3_8B, QWEN3_14B, QWEN25_1_5B, QWEN25_7B, QWEN25_14B, QWEN25_32B,
)
from subspec_core.weights import LayerNorms, ModelShape, SharedWeights

# A few-layer stand-in of Qwen2.5-7B's family (QWEN25_7B, the paper's headline setting), small enough for a CPU
# smoke test.
TINY = ModelShape(
    architecture="qwen2", num_layers=4, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
    head_dim=16, vocab_size=512, rms_norm_eps=1e-6, qkv_bias=True, o_bias=False, tie_embeddings=False,
)
# The same stand-in in Qwen3's form: no q/k/v biases, an RMSNorm over each q and k head.
TINY_QWEN3 = dataclasses.replace(TINY, architecture="qwen3", qkv_bias=False, qk_norm=True)
# The presets' decoders, a 1.5B one (load_memory's) and Qwen3-14B live in subspec_core.shapes (`subspec plan`
# reads them).
SHAPES = {
    "qwen2.5-7b": QWEN25_7B, "tiny": TINY, "tiny-qwen3": TINY_QWEN3, "qwen2.5-1.5b": QWEN25_1_5B, "qwen2.5-14b": QWEN25_14B,
    "qwen2.5-32b": QWEN25_32B, "llama-3.1-8b": LLAMA31_8B, "qwen3-8b": QWEN3_8B, "qwen3-14b": QWEN3_14B,
    "mistral-7b": MISTRAL_7B, "phi-3-medium": PHI3_MEDIUM,
}

# Engine settings per synthetic model, applied under the run's --config / env / flags (which win).
# qwen2.5-7b: the paper's offload setting (8 GB, max_length 2048, prefill chunk 256, topk 6 x depth 48, bf16).
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-7b": {"dtype": "bfloat16", "gpu_memory_budget": "8GiB", "max_model_len": 2048, "prefill_chunk_size": 256,
                   "speculation": {"topk": 6, "max_depth": 48}},
    "tiny": {"max_resident_layers": 0, "max_model_len": 512, "prefill_chunk_size": 64,
             "speculation": {"topk": 6, "max_depth": 48}},
}
ROPE_THETA = 1_000_000.0  # Qwen2.5's rotary base
INIT_STD = 0.02  # transformers' default initializer_range: keeps bf16 activations finite through 28 layers


def random_weights(
    shape: ModelShape, *, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> tuple[SharedWeights, list[dict[str, torch.Tensor]]]:
    """Shared weights on `device` and per-layer fused linears (as `loading.extract_weights` names them) on the host."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(*dims: int) -> torch.Tensor:
        return torch.empty(dims, dtype=dtype, device=device).normal_(0.0, INIT_STD, generator=generator)

    h, inter, qkv_out = shape.hidden_size, shape.intermediate_size, shape.q_size + 2 * shape.kv_size
    layer_linears = []
    for _ in range(shape.num_layers):
        linears = {
            "qkv_weight": normal(qkv_out, h),
            "o_weight": normal(h, shape.q_size),
            "gate_up_weight": normal(2 * inter, h),
            "down_weight": normal(h, inter),
        }
        if shape.qkv_bias:
            linears["qkv_bias"] = normal(qkv_out)
        if shape.o_bias:
            linears["o_bias"] = normal(h)
        layer_linears.append({name: t.cpu() for name, t in linears.items()})  # one layer on the device at a time
    ones = lambda: torch.ones(h, dtype=dtype, device=device)  # noqa: E731 - RMSNorm weights start at 1

    def qk_norm(shape: ModelShape) -> torch.Tensor | None:
        if not shape.qk_norm:
            return None
        return torch.ones(shape.num_heads + shape.num_kv_heads, 2, shape.head_dim // 2, dtype=dtype, device=device)

    embed = normal(shape.vocab_size, h)
    exponents = torch.arange(0, shape.head_dim, 2, dtype=torch.float32, device=device) / shape.head_dim
    shared = SharedWeights(
        embed=embed,
        lm_head=embed if shape.tie_embeddings else normal(shape.vocab_size, h),
        final_norm=ones(),
        layer_norms=[LayerNorms(ones(), ones(), qk_norm(shape)) for _ in range(shape.num_layers)],
        inv_freq=1.0 / ROPE_THETA**exponents,
        attention_scaling=1.0,
    )
    return shared, layer_linears
