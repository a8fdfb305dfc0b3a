"""Tiny random-weight models of every supported family, and engines built on them, for fast CPU tests.

The weights are scaled up so next-token distributions are peaked (like a trained model's): with the default
init every distribution is near-uniform and a draft could never agree with the target twice in a row.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from subspec_core.architecture import shape_from_hf_config
from subspec_core.build import InMemoryWeights, engine_from_weights
from subspec_core.config import EngineConfig, SpeculationConfig
from subspec_core.engine import Engine
from subspec_core.loading import extract_weights

TINY_VOCAB = 512


FAMILIES = ("llama", "llama3", "qwen2", "tied", "qwen3", "mistral", "phi3", "phi3-longrope")
LONGROPE_ORIGINAL = 256  # the tiny LongRoPE model's original context: its short factors hold up to here


def tiny_hf_config(family: str, *, vocab_size: int = TINY_VOCAB, num_layers: int = 3) -> Any:
    """A transformers config of the family (see FAMILIES): 'llama3' has Llama 3 rope scaling, 'tied' tied
    embeddings, 'phi3-longrope' Phi-3 128k's LongRoPE."""
    import transformers

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
        tie_word_embeddings=family == "tied",
    )
    phi3_ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # Phi3Config's defaults are past a tiny vocab
    if family == "qwen2":
        return transformers.Qwen2Config(**common, use_sliding_window=False)
    if family == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return transformers.LlamaConfig(**common, rope_parameters=rope)
    if family in ("llama", "tied"):
        return transformers.LlamaConfig(**common)
    if family == "qwen3":  # head_dim set apart from hidden / heads, as Qwen3 does
        return transformers.Qwen3Config(**{**common, "num_attention_heads": 8}, head_dim=16)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    if family == "phi3":
        return transformers.Phi3Config(**common, **phi3_ids)
    if family == "phi3-longrope":
        half = 8  # head_dim 16 / 2
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": LONGROPE_ORIGINAL,
                "short_factor": [1.0 + 0.3 * k for k in range(half)], "long_factor": [2.0 + k for k in range(half)]}
        return transformers.Phi3Config(**{**common, "max_position_embeddings": 4 * LONGROPE_ORIGINAL}, **phi3_ids,
                                       rope_parameters=rope, original_max_position_embeddings=LONGROPE_ORIGINAL)
    raise ValueError(family)


def tiny_hf_model(family: str, *, seed: int = 0, vocab_size: int = TINY_VOCAB, num_layers: int = 3, scale: float = 2.5) -> Any:
    """A random transformers CausalLM of the family (see FAMILIES), weights scaled for peaked distributions."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(family, vocab_size=vocab_size, num_layers=num_layers))
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
    seed: int | None = None,
    simulate_link_gbps: float | None = None,
    simulate_link_jitter_s: float = 0.0,
    max_num_seqs: int = 1,
) -> Engine:
    """An engine over a tiny model's weights on the CPU (streamed layers by default, like the paper)."""
    speculation = speculation or SpeculationConfig(topk=3, max_depth=6)
    speculation = replace(speculation, quant_type=quant_type)
    config = EngineConfig(
        model="tiny", mode=mode, device="cpu", dtype=str(dtype).removeprefix("torch."),
        max_resident_layers=max_resident_layers, max_model_len=max_model_len, prefill_chunk_size=prefill_chunk_size,
        speculation=speculation, seed=seed, simulate_link_gbps=simulate_link_gbps,
        simulate_link_jitter_s=simulate_link_jitter_s, max_num_seqs=max_num_seqs,
    )
    shape = shape_from_hf_config(hf_model.config, max_model_len=max_model_len)
    shared, layer_linears = extract_weights(hf_model.to(dtype), shape)
    weights = InMemoryWeights(shape=shape, shared=shared, layer_linears=layer_linears, tokenizer=tokenizer,
                              eos_token_ids=eos_token_ids)
    return engine_from_weights(config, weights, device=torch.device("cpu"))


def generate_ids(engine: Engine, prompt: list[int], **sampling: Any) -> tuple[list[int], Any]:
    """All token ids of one generation, and its final stats."""
    from subspec_core.types import GenerationRequest, SamplingParams

    ids: list[int] = []
    stats = None
    for event in engine.generate(GenerationRequest("t", tuple(prompt), SamplingParams(**sampling))):
        ids.extend(event.token_ids)
        stats = event.stats or stats
    return ids, stats
