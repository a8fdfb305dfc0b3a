"""Load a target model (HF directory/id or GGUF file) into our own weight containers.

transformers does the file parsing (safetensors, GGUF dequantisation); we then take its tensors, fuse
q/k/v and gate/up, and drop the transformers module tree: our compact forward (`model.py`) runs them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from subspec_core.config import EngineConfig
from subspec_core.model_source import ResolvedModel, default_cache_dir, resolve_model
from subspec_core.startup import StartupLog
from subspec_core.weights import LayerNorms, ModelShape, SharedWeights

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
# Rotary variants whose inverse frequencies are static (a dynamic variant would change with length).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# End-of-turn tokens of the supported chat families; honoured in addition to the tokenizer's EOS.
KNOWN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|eom_id|>")


class UnsupportedModelError(ValueError):
    """The model's architecture or a feature of it is not one our forward implements."""


@dataclass
class LoadedModel:
    """A target model on the host: shape, shared weights and per-layer fused linear tensors."""

    shape: ModelShape
    shared: SharedWeights
    layer_linears: list[dict[str, torch.Tensor]]  # per layer: fused tensors named as in weights.LINEAR_NAMES
    eos_token_ids: frozenset[int]
    dtype: torch.dtype


ENV_GGUF_CONVERSION_CACHE = "SUBSPEC_GGUF_CONVERSION_CACHE"


def gguf_conversion_dir(resolved: ResolvedModel) -> Path | None:
    """Where a local GGUF model's one-time conversion to a Hugging Face checkpoint is cached, or None.

    Parsing GGUF metadata (the whole vocabulary) and dequantising takes seconds each time; the converted
    checkpoint loads in a fraction of that. The key is the file's path, size and mtime: a changed file
    gets a new conversion. Set SUBSPEC_GGUF_CONVERSION_CACHE=0 to always read the GGUF file.
    """
    if resolved.gguf_file is None or os.environ.get(ENV_GGUF_CONVERSION_CACHE, "1") == "0":
        return None
    gguf = Path(resolved.load_path) / resolved.gguf_file
    if not gguf.is_file():
        return None  # a GGUF file inside a hub repo: transformers resolves it, we do not cache it
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return default_cache_dir() / "converted" / f"{gguf.stem}-{key}"


def _save_atomically(target: Path, save: Any) -> None:
    """Write a directory with `save(tmpdir)`, then rename it into place (a crash leaves no half-written cache)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        save(tmp)
        os.replace(tmp, target)
    except OSError:
        if target.exists():
            return  # another process converted the same model concurrently
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(config: EngineConfig, resolved: ResolvedModel | None = None) -> Any:
    """The model's tokenizer (no weights, no CUDA): usable by the API process."""
    from transformers import AutoTokenizer

    if config.tokenizer:
        return AutoTokenizer.from_pretrained(config.tokenizer)
    resolved = resolved or resolve_model(config.model, config.gguf_file)
    converted = gguf_conversion_dir(resolved)
    if converted is not None and (converted / "tokenizer" / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(converted / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(resolved.load_path, gguf_file=resolved.gguf_file)
    if converted is not None:
        _save_atomically(converted / "tokenizer", tokenizer.save_pretrained)
    return tokenizer


def _converted_weights_dir(resolved: ResolvedModel, dtype: torch.dtype) -> Path | None:
    """Where the GGUF conversion cache keeps this model's weights in `dtype`, or None (not a local GGUF)."""
    converted = gguf_conversion_dir(resolved)
    return None if converted is None else converted / str(dtype).removeprefix("torch.")


def _convert_gguf(resolved: ResolvedModel, dtype: torch.dtype, weights_dir: Path) -> Any:
    """Read and dequantise a GGUF model with transformers, and save it as a checkpoint for later starts."""
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(resolved.load_path, gguf_file=resolved.gguf_file,
                                                    **_LOAD_KWARGS, dtype=dtype)
    # The dequantised weights are an ordinary checkpoint now: drop the GGUF marker before saving.
    hf_model.config.quantization_config = None
    if hasattr(hf_model.config, "__dict__"):
        hf_model.config.__dict__.pop("quantization_config", None)
    hf_model.hf_quantizer = None
    _save_atomically(weights_dir, hf_model.save_pretrained)
    return hf_model


_LOAD_KWARGS: dict[str, Any] = dict(device_map="cpu", low_cpu_mem_usage=True)


def _load_hf_model(resolved: ResolvedModel, dtype: torch.dtype) -> Any:
    """transformers' CausalLM on the host, through the GGUF conversion cache when it applies."""
    from transformers import AutoModelForCausalLM

    weights_dir = _converted_weights_dir(resolved, dtype)
    if weights_dir is not None and (weights_dir / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(weights_dir, **_LOAD_KWARGS, dtype=dtype)
    if weights_dir is not None:
        return _convert_gguf(resolved, dtype, weights_dir)
    return AutoModelForCausalLM.from_pretrained(resolved.load_path, **resolved.from_pretrained_kwargs(),
                                                **_LOAD_KWARGS, dtype=dtype)


def shape_from_hf_config(hf_config: Any) -> ModelShape:
    """Validate a transformers config and extract the dimensions our forward needs."""
    arch = getattr(hf_config, "model_type", None)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"model architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(Llama 2/3.x, SmolLM2, Qwen2/Qwen2.5 families)"
        )
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"activation {hf_config.hidden_act!r} is not supported (silu only)")
    if getattr(hf_config, "mlp_bias", False):
        raise UnsupportedModelError("MLP biases are not supported")
    layer_types = getattr(hf_config, "layer_types", None) or ()
    if getattr(hf_config, "use_sliding_window", False) or "sliding_attention" in layer_types:
        raise UnsupportedModelError("sliding-window attention is not supported")
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    num_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
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
        qkv_bias=arch == "qwen2" or attention_bias,
        o_bias=arch == "llama" and attention_bias,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
    )


def eos_token_ids(tokenizer: Any, generation_config: Any) -> frozenset[int]:
    """Every id that ends a turn: the tokenizer's EOS, the generation config's (often a list), end-of-turn tokens."""
    ids: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in KNOWN_END_TOKENS if t in vocab)
    return frozenset(ids)


def extract_weights(
    hf_model: Any, shape: ModelShape, *, consume: bool = False
) -> tuple[SharedWeights, list[dict[str, torch.Tensor]]]:
    """Take a transformers Llama/Qwen2 CausalLM apart into shared weights and fused per-layer linears.

    With `consume`, each layer's unfused q/k/v/gate/up modules are dropped as soon as they are fused, so
    host memory peaks at about one model plus one layer instead of two models.
    """
    inner = hf_model.model
    rotary = inner.rotary_emb
    layer_norms, layer_linears = [], []
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = {
            "qkv_weight": torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach(),
            "o_weight": attn.o_proj.weight.detach(),
            "gate_up_weight": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
            "down_weight": mlp.down_proj.weight.detach(),
        }
        if shape.qkv_bias:
            linears["qkv_bias"] = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]).detach()
        if shape.o_bias:
            linears["o_bias"] = attn.o_proj.bias.detach()
        layer_linears.append(linears)
        if consume:
            for module, names in ((attn, ("q_proj", "k_proj", "v_proj")), (mlp, ("gate_proj", "up_proj"))):
                for name in names:
                    setattr(module, name, None)
        layer_norms.append(LayerNorms(layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()))
    embed = inner.embed_tokens.weight.detach()
    lm_head = hf_model.lm_head.weight.detach()
    if shape.tie_embeddings or lm_head.data_ptr() == embed.data_ptr():
        lm_head = embed  # one tensor, shared: never copied twice
    shared = SharedWeights(
        embed=embed,
        lm_head=lm_head,
        final_norm=inner.norm.weight.detach(),
        layer_norms=layer_norms,
        inv_freq=rotary.inv_freq.detach().float().clone(),
        attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
    )
    return shared, layer_linears


def load_model(
    config: EngineConfig, dtype: torch.dtype, resolved: ResolvedModel | None = None, phases: StartupLog | None = None,
) -> tuple[LoadedModel, Any]:
    """Load the target on the host in `dtype`; returns our weights and the tokenizer.

    Reports the `convert` and `load` start-up phases to `phases` (by default at debug level only).
    """
    from transformers import AutoConfig

    phases = phases if phases is not None else StartupLog(emit=log.debug)
    resolved = resolved or resolve_model(config.model, config.gguf_file)
    if resolved.gguf_file is None:  # fail before reading gigabytes of weights (GGUF: the header is the file)
        shape_from_hf_config(AutoConfig.from_pretrained(resolved.load_path))
    # The one-time GGUF conversion is its own phase; reading the (converted) checkpoint is part of `load`.
    weights_dir = _converted_weights_dir(resolved, dtype)
    hf_model = None
    if weights_dir is not None and not (weights_dir / "config.json").is_file():
        with phases.phase("convert") as phase:
            hf_model = _convert_gguf(resolved, dtype, weights_dir)
            phase.detail = f"GGUF dequantised to {_dtype_name(dtype)}, saved to {weights_dir} (once)"
    else:
        phases.skipped("convert", "not a local GGUF file" if weights_dir is None else f"done before: {weights_dir}")
    with phases.phase("load") as phase:
        if hf_model is None:
            hf_model = _load_hf_model(resolved, dtype)
        shape = shape_from_hf_config(hf_model.config)
        hf_model.eval()
        tokenizer = load_tokenizer(config, resolved)
        shared, layer_linears = extract_weights(hf_model, shape, consume=True)
        eos = eos_token_ids(tokenizer, getattr(hf_model, "generation_config", None))
        del hf_model  # our fused copies hold the linear weights; the module tree is no longer needed
        phase.detail = (f"{resolved.display_name}: {shape.architecture}, {shape.num_layers} layers, "
                        f"{_dtype_name(dtype)}, into host memory")
    return LoadedModel(shape=shape, shared=shared, layer_linears=layer_linears, eos_token_ids=eos, dtype=dtype), tokenizer


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
