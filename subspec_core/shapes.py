"""A model's shape without its weights, for planning offline (`subspec plan`): nothing is downloaded.

`find_shape` reads, in order: a local directory's config.json or a local GGUF file's header (transformers'
own parsers, then `architecture.shape_from_hf_config`, as loading does); for a hub id, the table below of
the presets' models (their published config.json), else the model's config.json in the local Hugging Face
cache. The table is what makes `subspec plan --config configs/<preset>` work on a machine without the models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from subspec_core.architecture import shape_from_hf_config
from subspec_core.errors import SetupError
from subspec_core.model_source import DEFAULT_MODEL, DEFAULT_MODEL_ALIAS
from subspec_core.weights import ModelShape

# The decoders of the presets' models and two the benchmarks use (each hub model's config.json), and the default
# model's (its GGUF header).
QWEN25_7B = ModelShape(
    architecture="qwen2", num_layers=28, hidden_size=3584, intermediate_size=18944, num_heads=28, num_kv_heads=4,
    head_dim=128, vocab_size=152064, rms_norm_eps=1e-6, qkv_bias=True, o_bias=False, tie_embeddings=False,
)
QWEN25_14B = ModelShape(
    architecture="qwen2", num_layers=48, hidden_size=5120, intermediate_size=13824, num_heads=40, num_kv_heads=8,
    head_dim=128, vocab_size=152064, rms_norm_eps=1e-6, qkv_bias=True, o_bias=False, tie_embeddings=False,
)
QWEN25_32B = ModelShape(
    architecture="qwen2", num_layers=64, hidden_size=5120, intermediate_size=27648, num_heads=40, num_kv_heads=8,
    head_dim=128, vocab_size=152064, rms_norm_eps=1e-6, qkv_bias=True, o_bias=False, tie_embeddings=False,
)
LLAMA31_8B = ModelShape(
    architecture="llama", num_layers=32, hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8,
    head_dim=128, vocab_size=128256, rms_norm_eps=1e-5, qkv_bias=False, o_bias=False, tie_embeddings=False,
)
QWEN3_8B = ModelShape(
    architecture="qwen3", num_layers=36, hidden_size=4096, intermediate_size=12288, num_heads=32, num_kv_heads=8,
    head_dim=128, vocab_size=151936, rms_norm_eps=1e-6, qkv_bias=False, o_bias=False, tie_embeddings=False, qk_norm=True,
)
MISTRAL_7B = ModelShape(  # Mistral-7B-Instruct-v0.3 (sliding_window null)
    architecture="mistral", num_layers=32, hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8,
    head_dim=128, vocab_size=32768, rms_norm_eps=1e-5, qkv_bias=False, o_bias=False, tie_embeddings=False,
)
PHI3_MEDIUM = ModelShape(  # Phi-3-medium-128k-instruct (4k-instruct has the same decoder)
    architecture="phi3", num_layers=40, hidden_size=5120, intermediate_size=17920, num_heads=40, num_kv_heads=10,
    head_dim=128, vocab_size=32064, rms_norm_eps=1e-5, qkv_bias=False, o_bias=False, tie_embeddings=False,
)
QWEN25_1_5B = ModelShape(
    architecture="qwen2", num_layers=28, hidden_size=1536, intermediate_size=8960, num_heads=12, num_kv_heads=2,
    head_dim=128, vocab_size=151936, rms_norm_eps=1e-6, qkv_bias=True, o_bias=False, tie_embeddings=True,
)
QWEN3_14B = ModelShape(
    architecture="qwen3", num_layers=40, hidden_size=5120, intermediate_size=17408, num_heads=40, num_kv_heads=8,
    head_dim=128, vocab_size=151936, rms_norm_eps=1e-6, qkv_bias=False, o_bias=False, tie_embeddings=False, qk_norm=True,
)
SMOLLM2_135M = ModelShape(
    architecture="llama", num_layers=30, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3,
    head_dim=64, vocab_size=49152, rms_norm_eps=1e-5, qkv_bias=False, o_bias=False, tie_embeddings=True,
)

PUBLISHED_SHAPES: dict[str, ModelShape] = {
    "Qwen/Qwen2.5-7B-Instruct": QWEN25_7B, "Qwen/Qwen2.5-14B-Instruct": QWEN25_14B,
    "Qwen/Qwen2.5-32B-Instruct": QWEN25_32B, "meta-llama/Llama-3.1-8B-Instruct": LLAMA31_8B, "Qwen/Qwen3-8B": QWEN3_8B,
    "mistralai/Mistral-7B-Instruct-v0.3": MISTRAL_7B, "microsoft/Phi-3-medium-128k-instruct": PHI3_MEDIUM,
    "Qwen/Qwen2.5-1.5B-Instruct": QWEN25_1_5B, "Qwen/Qwen3-14B": QWEN3_14B, DEFAULT_MODEL_ALIAS: SMOLLM2_135M,
}


class ShapeNotFoundError(SetupError, ValueError):
    """No config for the model is at hand without downloading it."""


@dataclass(frozen=True)
class FoundShape:
    shape: ModelShape
    source: str  # where the shape was read, for the plan's header


def find_shape(model: str, *, gguf_file: str | None = None, max_model_len: int) -> FoundShape:
    """The shape of `model` (EngineConfig.model: 'default', a directory, a .gguf file or a hub id), offline."""
    if model == DEFAULT_MODEL_ALIAS:
        return FoundShape(SMOLLM2_135M, f"the default model ({DEFAULT_MODEL.display_name}): its GGUF header's values")
    local = Path(model).expanduser()
    if local.is_file() or (local.is_dir() and gguf_file):
        directory, name = (local.parent, local.name) if local.is_file() else (local, gguf_file)
        shape = _from_pretrained(str(directory), max_model_len, gguf_file=name)
        return FoundShape(shape, f"GGUF header of {directory / name}")
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ShapeNotFoundError(f"{local}: no config.json (for a GGUF file pass its path, or gguf_file)")
        return FoundShape(_from_pretrained(str(local), max_model_len), f"{local / 'config.json'}")
    if gguf_file is None and model in PUBLISHED_SHAPES:
        return FoundShape(PUBLISHED_SHAPES[model], f"{model}'s published config.json (the presets' shape table)")
    try:
        shape = _from_pretrained(model, max_model_len, gguf_file=gguf_file, local_files_only=True)
    except OSError as exc:
        raise ShapeNotFoundError(
            f"no shape for {model!r} without downloading it: it is not in the local Hugging Face cache nor in the "
            f"presets' table ({', '.join(sorted(PUBLISHED_SHAPES))}); pass --model with a local directory holding "
            "its config.json, or a .gguf file"
        ) from exc
    return FoundShape(shape, f"{model}'s config.json in the local Hugging Face cache")


def _from_pretrained(path: str, max_model_len: int, **kwargs: object) -> ModelShape:
    from transformers import AutoConfig  # imported here: the table path needs no transformers import

    return shape_from_hf_config(AutoConfig.from_pretrained(path, **kwargs), max_model_len=max_model_len)
