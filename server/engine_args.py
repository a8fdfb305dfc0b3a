"""Engine flags for the CLI, derived from `subspec_core.config.EngineConfig` / `SpeculationConfig` fields.

Shared by `subspec serve` and `subspec generate`: `add_engine_arguments(parser)` adds `--config` and one
flag per config field (`--model`, `--mode`, `--gpu-memory-budget`, `--max-depth`, ...), and
`engine_config_from_args(args)` resolves defaults < YAML < SUBSPEC_* env < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

from subspec_core.config import (
    DEVICES,
    DTYPES,
    MODES,
    QUANT_TYPES,
    EngineConfig,
    SpeculationConfig,
    load_yaml,
    resolve_engine_config,
)

_HELP = {
    "model": "'default' (SmolLM2-135M-Instruct GGUF), a Hugging Face id or directory, or a .gguf file",
    "gguf_file": "GGUF file name inside --model when it is a directory or repo holding several",
    "tokenizer": "tokenizer to use instead of the model's own",
    "served_model_name": "the name clients pass as `model` (default: a short model name)",
    "mode": "auto (resident when the model fits the device, always on a CPU; subspec when layers must "
            "stream), subspec (offload + speculation), vanilla (offload, no speculation) or resident",
    "device": "auto picks cuda when available",
    "dtype": "auto: bfloat16 on cuda, float32 on cpu",
    "gpu_memory_budget": "GPU memory the engine may use, e.g. 8GiB (default: the free memory; unused on a CPU)",
    "max_resident_layers": "cap on full-precision decoder layers kept on the GPU (0 streams all)",
    "cuda_graphs": "true/false: replay the draft steps and the one-token step as captured CUDA graphs (CUDA only)",
    "stream_slots": "GPU layer buffers in the weight-streaming ring (>= 2)",
    "max_model_len": "prompt + completion tokens",
    "max_num_seqs": "sequences decoded together, each with its own KV region, verified in one streamed forward; auto "
                    "(default): as many as the GPU memory left after the layers holds, up to 8 (1 on a CPU)",
    "prefill_chunk_size": "prompt tokens per prefill forward (default: the largest the memory budget allows)",
    "seed": "seed for requests that give none (default: a fresh random seed per request)",
    "simulate_link_gbps": "CPU only, a development and benchmarking aid: stream layers over a simulated link of this "
                          "many GB/s (default: off)",
    "simulate_link_jitter_s": "with --simulate-link-gbps: random delays up to this many seconds per copy and per layer",
    "topk": "draft tree width (nodes kept per depth)",
    "max_depth": "draft steps per iteration (tree depth)",
    "max_verify_tokens": "tree nodes verified per iteration (default: the whole tree)",
    "draft_temperature": "temperature shaping the draft tree (never affects the output distribution)",
    "quant_type": "the draft's low-bit substitute weights",
    "quant_block_size": "quantization block size",
    "post_levels": "post-speculation: draft levels grown under the tree while each verify waits for weights, the next "
                   "iteration starting from them when the whole tree is accepted (0: off)",
}
_CHOICES = {"mode": MODES, "device": DEVICES, "dtype": DTYPES, "quant_type": QUANT_TYPES}
_ENGINE_FIELDS = [f for f in dataclasses.fields(EngineConfig) if f.name != "speculation"]
_SPEC_FIELDS = list(dataclasses.fields(SpeculationConfig))


def _help(f: dataclasses.Field) -> str:
    text = _HELP.get(f.name, "")
    return text if f.default is None or "default" in text else f"{text} (default: {f.default})"


def _bool(text: str) -> bool:
    """A boolean flag value: true/false, yes/no, on/off, 1/0."""
    value = text.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def count_or_auto(text: str) -> int | str:
    """`auto` or a whole number (max_num_seqs)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a whole number, got {text!r}") from None


_TYPES = {"max_num_seqs": count_or_auto}  # fields whose annotation is not one plain type


def _arg_type(f: dataclasses.Field) -> Any:
    if f.name in _TYPES:
        return _TYPES[f.name]
    annotation = str(f.type).split(" |")[0]
    return {"int": int, "float": float, "str": str, "bool": _bool}[annotation]


def _metavar(f: dataclasses.Field) -> str:
    choices = _CHOICES.get(f.name)
    return "{" + ",".join(choices) + "}" if choices else f.name.upper()


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config` plus one flag per engine and speculation config field (all default to 'not given')."""
    parser.add_argument("--config", metavar="YAML", default=None,
                        help="preset file (e.g. configs/default.yaml): engine keys, `speculation:`, `server:`")
    engine = parser.add_argument_group("engine", "model and engine settings (YAML keys, env SUBSPEC_*)")
    for f in _ENGINE_FIELDS:
        engine.add_argument(f"--{f.name.replace('_', '-')}", dest=f"engine_{f.name}", type=_arg_type(f),
                            choices=_CHOICES.get(f.name), default=None, metavar=_metavar(f), help=_help(f))
    spec = parser.add_argument_group("speculation",
                                     "draft tree settings (YAML `speculation:`, env SUBSPEC_SPECULATION_*)")
    for f in _SPEC_FIELDS:
        spec.add_argument(f"--{f.name.replace('_', '-')}", dest=f"spec_{f.name}", type=_arg_type(f),
                          choices=_CHOICES.get(f.name), default=None, metavar=_metavar(f), help=_help(f))


def engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The engine flags given on the command line, as resolve_engine_config's cli_overrides."""
    overrides: dict[str, Any] = {f.name: getattr(args, f"engine_{f.name}", None) for f in _ENGINE_FIELDS}
    speculation = {f.name: getattr(args, f"spec_{f.name}") for f in _SPEC_FIELDS
                   if getattr(args, f"spec_{f.name}", None) is not None}
    if speculation:
        overrides["speculation"] = speculation
    return {k: v for k, v in overrides.items() if v is not None}


# The preset `subspec serve` / `generate` use for the default model when no --config is given (mode auto:
# the fastest way for the machine), and the one that streams every layer as the paper does, which the
# benchmarks of the mechanism use by default. Found beside the package in a checkout/editable install and
# in Docker.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_PRESET = CONFIG_DIR / "default.yaml"
OFFLOAD_PRESET = CONFIG_DIR / "default-offload.yaml"


def yaml_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None,
                   default_preset: Path = DEFAULT_PRESET) -> dict[str, Any]:
    """The --config file's contents; without one, `default_preset` when the model is the default model."""
    if getattr(args, "config", None):
        return load_yaml(args.config)
    env = os.environ if environ is None else environ
    model = getattr(args, "engine_model", None) or env.get("SUBSPEC_MODEL") or "default"
    if model == "default" and default_preset.is_file():
        return load_yaml(default_preset)
    return {}


def engine_config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None,
                            yaml_data: Mapping[str, Any] | None = None,
                            default_preset: Path = DEFAULT_PRESET) -> EngineConfig:
    """Resolve the engine config: defaults < --config YAML (else `default_preset`) < SUBSPEC_* env < flags."""
    return resolve_engine_config(
        yaml_data=yaml_data if yaml_data is not None else yaml_from_args(args, environ, default_preset),
        environ=os.environ if environ is None else environ,
        cli_overrides=engine_overrides(args),
    )
