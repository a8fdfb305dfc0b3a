"""Open a target model (HF directory/id or GGUF file) for loading in one pass per layer.

`open_model` reads the config (so the planner knows the shape before any weight is read), the tokenizer and
the end-of-turn ids, and returns a `ModelReader` whose weights are still in the checkpoint: the engine then
reads the shared weights once and each decoder layer once, straight into where it lives (`checkpoint.py`).
Safetensors checkpoints (one file or shards) are read tensor by tensor; a GGUF file is dequantised by
transformers once and cached as a safetensors checkpoint, then read the same way. Only a checkpoint without
safetensors (or a GGUF file with the cache turned off) is materialised by transformers first, and its tensors
are released as they are taken.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from subspec_core.architecture import rotary_from_config, shape_from_hf_config
from subspec_core.checkpoint import (
    SAFETENSORS_FILE, SAFETENSORS_INDEX, SafetensorsCheckpoint, StateDict, TensorStore, fill_layer, read_shared,
)
from subspec_core.config import EngineConfig
from subspec_core.conversion_cache import GgufConversion, dtype_name, gguf_conversion, unwritable_message
from subspec_core.model_source import ResolvedModel, resolve_model
from subspec_core.startup import StartupLog
from subspec_core.weights import LayerLayout, ModelShape, SharedWeights

log = logging.getLogger(__name__)

# End-of-turn tokens of the supported chat families; honoured in addition to the tokenizer's EOS.
KNOWN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|eom_id|>", "<|end|>")


@dataclass
class ModelReader:
    """A model opened for loading: its shape, tokenizer and end-of-turn ids, with its weights still in the
    checkpoint, read on demand (the shared weights once, each decoder layer once)."""

    shape: ModelShape
    tokenizer: Any
    eos_token_ids: frozenset[int]
    store: TensorStore
    inv_freq: torch.Tensor  # (head_dim / 2,) float32, from the config
    attention_scaling: float
    source: str  # how the weights are read, for the start-up line

    def read_shared(self, dtype: torch.dtype, device: torch.device) -> SharedWeights:
        """Embeddings, norms, lm_head and the rotary table, in `dtype` on `device`."""
        return read_shared(self.store, self.shape, inv_freq=self.inv_freq, attention_scaling=self.attention_scaling,
                           dtype=dtype, device=device)

    def fill_layer(self, layer: int, out: dict[str, torch.Tensor]) -> None:
        """Copy decoder layer `layer`'s fused linears into `out` (a weights.LayerFiller)."""
        fill_layer(self.store, self.shape, layer, out)


def load_tokenizer(config: EngineConfig, resolved: ResolvedModel | None = None) -> Any:
    """The model's tokenizer (no weights, no CUDA): usable by the API process."""
    from transformers import AutoTokenizer

    if config.tokenizer:
        return AutoTokenizer.from_pretrained(config.tokenizer)
    resolved = resolved or resolve_model(config.model, config.gguf_file, check_hub=True)
    conversion = gguf_conversion(resolved)
    found = None if conversion is None else conversion.find("tokenizer")
    if found is not None:
        return AutoTokenizer.from_pretrained(found)
    tokenizer = AutoTokenizer.from_pretrained(resolved.load_path, gguf_file=resolved.gguf_file)
    if conversion is not None and conversion.writable():
        conversion.save("tokenizer", tokenizer.save_pretrained)
    return tokenizer


def convert_gguf(resolved: ResolvedModel, dtype: torch.dtype, conversion: GgufConversion) -> Path:
    """Read and dequantise a GGUF model with transformers, and save it to the cache as a safetensors checkpoint
    (this start and later ones read that); returns its directory. The dequantised model is in host memory only
    while this runs."""
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(resolved.load_path, gguf_file=resolved.gguf_file,
                                                    **_LOAD_KWARGS, dtype=dtype)
    # The dequantised weights are an ordinary checkpoint now: drop the GGUF marker before saving.
    hf_model.config.quantization_config = None
    if hasattr(hf_model.config, "__dict__"):
        hf_model.config.__dict__.pop("quantization_config", None)
    hf_model.hf_quantizer = None
    return conversion.save(dtype_name(dtype), hf_model.save_pretrained)


_LOAD_KWARGS: dict[str, Any] = dict(device_map="cpu", low_cpu_mem_usage=True)


def load_hf_model(resolved: ResolvedModel, dtype: torch.dtype) -> Any:
    """transformers' CausalLM on the host, read through the GGUF conversion when there is one (converted now
    when the cache is writable)."""
    conversion = gguf_conversion(resolved)
    weights_dir = None if conversion is None else conversion.weights(dtype)
    if conversion is not None and weights_dir is None:
        if conversion.writable():
            weights_dir = convert_gguf(resolved, dtype, conversion)
        else:
            log.warning(unwritable_message(conversion))
    return _materialise(resolved, dtype, weights_dir)


def _materialise(resolved: ResolvedModel, dtype: torch.dtype, weights_dir: Path | None) -> Any:
    """transformers' CausalLM on the host: from the converted checkpoint when given, else as `resolved` says."""
    from transformers import AutoModelForCausalLM

    if weights_dir is not None:
        return AutoModelForCausalLM.from_pretrained(weights_dir, **_LOAD_KWARGS, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(resolved.load_path, **resolved.from_pretrained_kwargs(),
                                                **_LOAD_KWARGS, dtype=dtype)


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
    """Take a transformers CausalLM of a supported family apart into shared weights and fused per-layer linears
    (on the host, in the model's dtype): what tests and benchmarks place with `build.engine_from_weights`.

    With `consume`, each of the model's tensors is released from the returned state as it is fused (the caller
    must drop the model too for that to free memory).
    """
    store = StateDict(dict(hf_model.state_dict()), consume=consume)
    dtype = hf_model.model.embed_tokens.weight.dtype
    inv_freq, scaling = rotary_from_config(hf_model.config)
    shared = read_shared(store, shape, inv_freq=inv_freq, attention_scaling=scaling, dtype=dtype,
                         device=torch.device("cpu"))
    layout = LayerLayout.for_shape(shape)
    layer_linears = []
    for i in range(shape.num_layers):
        out = {name: torch.empty(dims, dtype=dtype) for name, _, dims in layout.entries}
        fill_layer(store, shape, i, out)
        layer_linears.append(out)
    return shared, layer_linears


def _safetensors_checkpoint(load_path: str | Path) -> SafetensorsCheckpoint | None:
    """The checkpoint's safetensors files (one file or the shards of its index), found as transformers finds
    them (a local directory or the Hugging Face cache / hub); None when it has none."""
    from transformers.utils import cached_file

    optional = dict(_raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
    single = cached_file(str(load_path), SAFETENSORS_FILE, **optional)
    if single is not None:
        return SafetensorsCheckpoint.from_files([Path(single)])
    index = cached_file(str(load_path), SAFETENSORS_INDEX, **optional)
    if index is None:
        return None
    shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
    return SafetensorsCheckpoint.from_index(Path(index), {shard: Path(cached_file(str(load_path), shard)) for shard in shards})


def _generation_config(load_path: str | Path) -> Any:
    """The checkpoint's generation config (its end-of-turn ids), or None: the file is optional."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(load_path))
    except OSError:
        return None


def open_model(
    config: EngineConfig, dtype: torch.dtype, resolved: ResolvedModel | None = None, phases: StartupLog | None = None,
) -> ModelReader:
    """Open the target for loading in `dtype`: config (validated for max_model_len), tokenizer, end-of-turn ids.

    No weight is read, except where transformers must materialise the model (no safetensors, or a GGUF file
    without the conversion cache). Reports the `convert` and `load` start-up phases to `phases`.
    """
    from transformers import AutoConfig

    phases = phases if phases is not None else StartupLog(emit=log.debug)
    resolved = resolved or resolve_model(config.model, config.gguf_file, check_hub=True)
    conversion = gguf_conversion(resolved)
    weights_dir = None if conversion is None else conversion.weights(dtype)
    if conversion is None:
        phases.skipped("convert", "not a local GGUF file")
    elif weights_dir is not None:
        phases.skipped("convert", f"done before: {weights_dir}")
    elif conversion.writable():
        with phases.phase("convert") as phase:
            weights_dir = convert_gguf(resolved, dtype, conversion)  # then read back layer by layer
            phase.detail = f"GGUF dequantised to {dtype_name(dtype)}, saved to {weights_dir} (once)"
    else:
        phases.skipped("convert", unwritable_message(conversion))
    with phases.phase("load") as phase:
        checkpoint_path: str | Path = weights_dir if weights_dir is not None else resolved.load_path
        store: TensorStore | None = None
        if resolved.gguf_file is None or weights_dir is not None:
            hf_config = AutoConfig.from_pretrained(str(checkpoint_path))
            shape = shape_from_hf_config(hf_config, max_model_len=config.max_model_len)  # before any weight
            store = _safetensors_checkpoint(checkpoint_path)
            generation_config = _generation_config(checkpoint_path)
        if store is not None:
            source = "safetensors, layer by layer"
        else:  # transformers materialises the model; its tensors are released as they are placed
            hf_model = _materialise(resolved, dtype, weights_dir)
            hf_config, generation_config = hf_model.config, getattr(hf_model, "generation_config", None)
            shape = shape_from_hf_config(hf_config, max_model_len=config.max_model_len)
            store = StateDict(dict(hf_model.state_dict()), consume=True)
            del hf_model  # the state dict is now the only owner of the tensors
            source = "transformers (materialised first: no safetensors checkpoint)"
        tokenizer = load_tokenizer(config, resolved)
        inv_freq, scaling = rotary_from_config(hf_config)
        phase.detail = (f"{resolved.display_name}: {shape.architecture}, {shape.num_layers} layers, "
                        f"{dtype_name(dtype)}, weights read from {source}")
    return ModelReader(shape=shape, tokenizer=tokenizer, eos_token_ids=eos_token_ids(tokenizer, generation_config),
                       store=store, inv_freq=inv_freq, attention_scaling=scaling, source=source)


