"""The model families our forward runs: a transformers config checked and turned into a ModelShape and its
rotary table, before any weight is read. Everything it cannot run exactly is refused with the reason.

Llama (2/3.x, SmolLM2), Mistral, Qwen2/2.5, Qwen3 (dense) and Phi-3 are one Llama-shaped decoder with small
differences (`weights.ModelShape`). Two features are exact only within a context length, so they are
checked against `max_model_len`:
- a sliding attention window changes attention only for keys `window` or more positions back: a model
  whose window is at least `max_model_len` attends exactly as with full attention;
- LongRoPE (Phi-3 128k, "su" in older configs) switches the whole sequence to its long factors once it is
  longer than `original_max_position_embeddings`; up to that length its short factors are a static table.
"""

from __future__ import annotations

from typing import Any

import torch

from subspec_core.errors import SetupError
from subspec_core.weights import ModelShape

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
FAMILIES = "Llama 2/3.x, SmolLM2, Mistral, Qwen2/Qwen2.5, Qwen3 (dense), Phi-3"
# Rotary variants whose inverse frequencies are static (a dynamic variant would change with length);
# longrope is static up to its original context (checked against max_model_len).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")

_GEMMA = (
    "Gemma models are not supported: their decoder differs from the Llama-shaped forward this engine runs "
    "((1 + w) RMSNorm, embeddings scaled by sqrt(hidden_size), a GeLU-tanh MLP, extra pre/post feed-forward "
    "norms, attention and final-logit soft-capping (Gemma 2), sliding-window layers with their own rotary base "
    "(Gemma 2/3), q/k norms (Gemma 3))"
)
_REFUSED = {"gemma": _GEMMA, "gemma2": _GEMMA, "gemma3": _GEMMA, "gemma3_text": _GEMMA}


class UnsupportedModelError(SetupError, ValueError):
    """The model's architecture or a feature of it is not one our forward implements."""


def _rope_parameters(hf_config: Any) -> dict[str, Any]:
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    return rope if isinstance(rope, dict) else {}


def _rope_type(hf_config: Any) -> str:
    rope = _rope_parameters(hf_config)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    return "longrope" if rope_type == "su" else rope_type


def sliding_window(hf_config: Any) -> int | None:
    """The attention window transformers applies to at least one layer of this model, or None."""
    window = getattr(hf_config, "sliding_window", None)
    if window is None:
        return None
    if hf_config.model_type in ("mistral", "phi3"):  # their attention always passes config.sliding_window
        return int(window)
    layer_types = getattr(hf_config, "layer_types", None) or ()
    uses = "sliding_attention" in layer_types if layer_types else getattr(hf_config, "use_sliding_window", False)
    return int(window) if uses else None


def _check_context(hf_config: Any, max_model_len: int | None) -> None:
    """Refuse the features that would make our static masks or rotary table inexact within `max_model_len`."""
    window = sliding_window(hf_config)
    if window is not None and (max_model_len is None or window < max_model_len):
        raise UnsupportedModelError(
            f"this model attends through a sliding window of {window} tokens, which is not implemented; it is "
            f"exact up to a context of {window} tokens: set max_model_len <= {window}"
            + ("" if max_model_len is None else f" (it is {max_model_len})")
        )
    if _rope_type(hf_config) == "longrope":
        rope = _rope_parameters(hf_config)
        original = rope.get("original_max_position_embeddings") or getattr(hf_config, "original_max_position_embeddings", None)
        if original is None or max_model_len is None or max_model_len > original:
            raise UnsupportedModelError(
                f"LongRoPE switches the rotary embedding of the whole sequence to its long factors past {original} "
                f"tokens, which a static rotary table cannot follow; it is exact up to {original} tokens: set "
                f"max_model_len <= {original}" + ("" if max_model_len is None else f" (it is {max_model_len})")
            )


def shape_from_hf_config(hf_config: Any, *, max_model_len: int | None = None) -> ModelShape:
    """Validate a transformers config for a context of `max_model_len` tokens and extract our forward's dimensions.

    Without `max_model_len` a sliding window or LongRoPE is refused (their exactness depends on it).
    """
    arch = getattr(hf_config, "model_type", None)
    if arch in _REFUSED:
        raise UnsupportedModelError(f"{_REFUSED[arch]}; supported: {', '.join(SUPPORTED_ARCHITECTURES)} ({FAMILIES})")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"model architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
            f"({FAMILIES})"
        )
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"activation {hf_config.hidden_act!r} is not supported (silu only)")
    if getattr(hf_config, "mlp_bias", False):
        raise UnsupportedModelError("MLP biases are not supported")
    rope_type = _rope_type(hf_config)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    partial = _rope_parameters(hf_config).get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UnsupportedModelError(f"a partial rotary embedding (partial_rotary_factor={partial}) is not supported")
    _check_context(hf_config, max_model_len)
    num_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    attention_bias = bool(getattr(hf_config, "attention_bias", False)) and arch in ("llama", "qwen3")
    return ModelShape(
        architecture=arch,
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_heads=num_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        vocab_size=hf_config.vocab_size,
        rms_norm_eps=float(hf_config.rms_norm_eps),
        qkv_bias=arch == "qwen2" or attention_bias,  # Qwen2 always; Llama and Qwen3 with attention_bias (o too)
        o_bias=attention_bias,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qk_norm=arch == "qwen3",
    )


def rotary_from_config(hf_config: Any) -> tuple[torch.Tensor, float]:
    """The rotary inverse frequencies (float32, head_dim / 2) and cos/sin scale, computed as transformers does.

    For LongRoPE these are its short factors: what transformers uses while the sequence is within the original
    context, which `shape_from_hf_config` requires of max_model_len.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = _rope_type(hf_config)
    if rope_type == "default":
        base = _rope_parameters(hf_config).get("rope_theta", getattr(hf_config, "rope_theta", None))
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)
