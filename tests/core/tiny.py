"""Tiny random-weight Llama/Qwen2 models, and engines built on them, for fast CPU tests.

The weights are scaled up so next-token distributions are peaked (like a trained model's): with the default
init every distribution is near-uniform and a draft could never agree with the target twice in a row.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from subspec_core.config import EngineConfig, SpeculationConfig
from subspec_core.engine import Engine
from subspec_core.loading import extract_weights, shape_from_hf_config
from subspec_core.planner import plan_memory

TINY_VOCAB = 512


def tiny_hf_model(family: str, *, seed: int = 0, vocab_size: int = TINY_VOCAB, num_layers: int = 3, scale: float = 2.5) -> Any:
    """A random transformers CausalLM of the given family: 'llama', 'llama3' (rope scaling), 'qwen2', 'tied'."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False, use_sliding_window=False))
    elif family == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        model = LlamaForCausalLM(LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=False))
    elif family in ("llama", "tied"):
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=family == "tied"))
    else:
        raise ValueError(family)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.5)
            else:
                param.normal_(0.0, scale / param.shape[-1] ** 0.5)
    return model.float().eval()


def tiny_engine(
    hf_model: Any,
    tokenizer: Any,
    *,
    mode: str = "subspec",
    max_resident_layers: int | None = 0,
    speculation: SpeculationConfig | None = None,
    max_model_len: int = 256,
    prefill_chunk_size: int = 16,
    quant_type: str = "int4",
    eos_token_ids: frozenset[int] = frozenset(),
    dtype: torch.dtype = torch.float32,
) -> Engine:
    """An engine over a tiny model's weights on the CPU (streamed layers by default, like the paper)."""
    speculation = speculation or SpeculationConfig(topk=3, max_depth=6)
    speculation = replace(speculation, quant_type=quant_type)
    config = EngineConfig(
        model="tiny", mode=mode, device="cpu", dtype=str(dtype).removeprefix("torch."),
        max_resident_layers=max_resident_layers, max_model_len=max_model_len, prefill_chunk_size=prefill_chunk_size,
        speculation=speculation,
    )
    shape = shape_from_hf_config(hf_model.config)
    shared, layer_linears = extract_weights(hf_model.to(dtype), shape)
    plan = plan_memory(
        shape=shape, dtype=dtype, mode=mode, speculation=speculation, max_model_len=max_model_len,
        prefill_chunk_size=prefill_chunk_size, stream_slots=config.stream_slots, budget_bytes=None,
        max_resident_layers=max_resident_layers, shared_bytes=shared.nbytes(),
    )
    return Engine.from_weights(
        config=config, shape=shape, shared=shared, layer_linears=layer_linears, plan=plan, tokenizer=tokenizer,
        eos_token_ids=eos_token_ids, device=torch.device("cpu"), model_name="tiny",
    )


def generate_ids(engine: Engine, prompt: list[int], **sampling: Any) -> tuple[list[int], Any]:
    """All token ids of one generation, and its final stats."""
    from subspec_core.types import GenerationRequest, SamplingParams

    ids: list[int] = []
    stats = None
    for event in engine.generate(GenerationRequest("t", tuple(prompt), SamplingParams(**sampling))):
        ids.extend(event.token_ids)
        stats = event.stats or stats
    return ids, stats
