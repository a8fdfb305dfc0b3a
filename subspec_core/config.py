"""Engine configuration: frozen dataclasses, validated once, resolved in one place.

Precedence, lowest first: dataclass defaults < YAML preset < environment (SUBSPEC_*) < CLI overrides, defined
once in `merge_sources`; the server's settings (server/settings.py) resolve through it too.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

MODES = ("auto", "subspec", "vanilla", "resident")  # auto: the planner picks resident or subspec
QUANT_TYPES = ("int4", "nf4", "fp4", "int8")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes PyTorch's tinygemm int4 kernels take
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' blockwise 4-bit and int8
DTYPES = ("auto", "float16", "bfloat16", "float32")
DEVICES = ("auto", "cuda", "cpu")
PRESET_ONLY_KEYS = ("server", "card")  # top-level preset keys that are not engine settings

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_byte_size(text: str | int | float) -> int:
    """Parse '8GiB', '512 MiB', '24GB' or a plain number of bytes into an int."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a byte size: {text!r} (use e.g. '8GiB', '512MiB', '24GB')")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class SpeculationConfig:
    """How the substitute draft is built and how deep/wide its token tree grows."""

    topk: int = 6  # tree width: nodes kept per depth (global beam over cumulative log-probability)
    max_depth: int = 32  # draft steps per iteration (the paper's offload configs use 48)
    max_verify_tokens: int | None = None  # None: the whole tree, max_depth * topk + 1 nodes
    draft_temperature: float = 0.2  # shapes the tree only; verification never reads draft probabilities
    # int4: group-wise asymmetric int4 on PyTorch's tinygemm kernels (one op per linear; the default);
    # bitsandbytes (the design card's library): nf4 | fp4 (4-bit), int8
    quant_type: str = "int4"
    quant_block_size: int = 64  # the int4 group size / the bitsandbytes block size
    # post-speculation (postspec.py): draft levels grown past the tree's frontier while each verify waits on the
    # link, the next iteration starting from them when the whole tree is accepted; 0: off
    post_levels: int = 0

    def __post_init__(self) -> None:
        if self.topk < 1:
            raise ValueError("speculation.topk must be >= 1")
        if self.max_depth < 1:
            raise ValueError("speculation.max_depth must be >= 1")
        if self.max_verify_tokens is not None and self.max_verify_tokens < 2:
            raise ValueError("speculation.max_verify_tokens must be >= 2 (the root and one drafted token)")
        if self.draft_temperature <= 0:
            raise ValueError("speculation.draft_temperature must be > 0")
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"speculation.quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.quant_type == "int4" and self.quant_block_size not in INT4_GROUP_SIZES:
            raise ValueError(f"speculation.quant_block_size (the int4 group size) must be one of {INT4_GROUP_SIZES} "
                             f"with quant_type int4, got {self.quant_block_size}")
        if self.quant_block_size not in BLOCK_SIZES:
            raise ValueError("speculation.quant_block_size must be a power of two in [32, 4096]")
        if self.post_levels < 0:
            raise ValueError("speculation.post_levels must be >= 0 (0: no post-speculation)")

    @property
    def tree_size(self) -> int:
        """Nodes drafted per iteration: the root plus topk nodes at each depth."""
        return self.max_depth * self.topk + 1

    @property
    def draft_levels(self) -> int:
        """Levels the drafter's buffers hold: a tree and the extension post-speculation grows under it."""
        return self.max_depth + self.post_levels

    @property
    def verify_depth(self) -> int:
        """The deepest tree a verify may check: a fresh one, or a chained one (an extension's levels but the first)."""
        return max(self.max_depth, self.post_levels - 1)

    @property
    def tree_slots(self) -> int:
        """KV slots past the committed prefix an iteration may write: the tree's draft rows, which the verify
        overwrites; with post-speculation, the draft rows of a tree and its extension, then the verify's own."""
        if not self.post_levels:
            return self.tree_size
        return 1 + self.draft_levels * self.topk + self.verify_size

    @property
    def verify_size(self) -> int:
        """Nodes the target verifies per iteration (the best `max_verify_tokens` of the tree)."""
        if self.max_verify_tokens is None:
            return self.tree_size
        return min(self.max_verify_tokens, self.tree_size)


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to load a model and run it. Plain data; YAML keys mirror the fields."""

    model: str = "default"  # 'default' (SmolLM2-135M-Instruct GGUF), a HF id or directory, or a .gguf file
    gguf_file: str | None = None  # file name inside `model` when `model` is a directory holding GGUF files
    tokenizer: str | None = None  # defaults to the model's own tokenizer
    served_model_name: str | None = None  # the name clients pass as `model`; defaults to a short model name
    # auto (the planner: resident when the whole model fits the compute device, subspec when layers must
    # stream) | subspec | vanilla (streamed target, no speculation) | resident (no offload)
    mode: str = "auto"
    device: str = "auto"  # auto: cuda when available, else cpu (the same code path, plain tensors)
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    gpu_memory_budget: str | None = None  # e.g. '8GiB'; None: the GPU's free memory (no meaning on a CPU)
    max_resident_layers: int | None = None  # cap on full-precision decoder layers kept on the GPU; 0 streams all
    cuda_graphs: bool = True  # replay the draft steps and the one-token step as CUDA graphs captured at start (CUDA only)
    stream_slots: int = 2  # GPU layer buffers in the streaming ring (>= 2: copy of layer i+1 overlaps compute of i)
    max_model_len: int = 2048  # prompt + completion tokens
    # sequences decoded together (vLLM's name): each gets its own KV region of max_model_len + tree slots, and one
    # streamed target forward verifies all their trees (batch.py). auto: the planner fits as many as the memory
    # left after the layers are placed holds, up to planner.AUTO_MAX_NUM_SEQS (1 on a CPU, which has no budget to
    # size them from); a number is honoured or refused with the plan's numbers; 1: one request at a time
    max_num_seqs: int | str = "auto"
    prefill_chunk_size: int | None = None  # None: the planner picks the largest chunk the memory budget allows
    seed: int | None = None  # for requests that give none; None: each such request draws a fresh one
    # A development and benchmarking aid, CPU only: stream layers over a simulated link of this many GB/s
    # (a copy thread, copies.SimulatedLink) instead of synchronous copies; None: off
    simulate_link_gbps: float | None = None
    simulate_link_jitter_s: float = 0.0  # with the simulated link: random delays up to this per copy and per layer
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.gpu_memory_budget is not None:
            parse_byte_size(self.gpu_memory_budget)
        if self.max_resident_layers is not None and self.max_resident_layers < 0:
            raise ValueError("max_resident_layers must be >= 0")
        if self.stream_slots < 2:
            raise ValueError("stream_slots must be >= 2 (one being filled while one is read)")
        if self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if self.max_num_seqs != "auto" and (type(self.max_num_seqs) is not int or self.max_num_seqs < 1):
            raise ValueError(f"max_num_seqs must be auto or an integer >= 1, got {self.max_num_seqs!r}")
        if self.prefill_chunk_size is not None and self.prefill_chunk_size < 1:
            raise ValueError("prefill_chunk_size must be >= 1")
        if self.simulate_link_gbps is not None and self.simulate_link_gbps <= 0:
            raise ValueError("simulate_link_gbps must be > 0 (or null: no simulated link)")
        if self.simulate_link_jitter_s < 0:
            raise ValueError("simulate_link_jitter_s must be >= 0")
        if self.simulate_link_jitter_s and self.simulate_link_gbps is None:
            raise ValueError("simulate_link_jitter_s needs simulate_link_gbps (the delays are the simulated link's)")
        if self.simulate_link_gbps is not None and self.device == "cuda":
            raise ValueError("simulate_link_gbps is a CPU aid: on CUDA the real link streams the layers")

    @property
    def budget_bytes(self) -> int | None:
        return None if self.gpu_memory_budget is None else parse_byte_size(self.gpu_memory_budget)

    @property
    def requested_num_seqs(self) -> int | None:
        """max_num_seqs as the planner takes it: None for auto (planner.plan_memory chooses)."""
        return None if self.max_num_seqs == "auto" else int(self.max_num_seqs)


def check_keys(data: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    """Reject keys that name no setting: a misspelt key must fail, not be ignored."""
    known = list(known)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) in {where}: {', '.join(unknown)}; known: {', '.join(known)}")


def environment_values(environ: Mapping[str, str], prefix: str, names: Iterable[str]) -> dict[str, str]:
    """The PREFIX<NAME> variables that are set, keyed by name; an empty variable (e.g. from compose) is not set."""
    return {name: environ[key] for name in names if environ.get(key := f"{prefix}{name.upper()}", "") != ""}


def merge_sources(*, yaml_data: Mapping[str, Any] | None = None, env: Mapping[str, Any] | None = None,
                  flags: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The one precedence rule of every setting, defaults < YAML < environment < flags: each source overrides
    the ones before it key by key (nested mappings merge); a flag left unset (None, at any depth) overrides
    nothing; a key no source gives is absent, so the dataclass's default applies."""
    merged: dict[str, Any] = {}
    for source in (yaml_data or {}, env or {}, _drop_none(flags or {})):
        merged = _deep_merge(merged, source)
    return merged


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _drop_none(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _drop_none(v) if isinstance(v, Mapping) else v for k, v in mapping.items() if v is not None}


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a preset file; it must be a mapping of plain data."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping at the top level")
    return data


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """Instantiate a (possibly nested) config dataclass from a mapping, rejecting unknown keys."""
    check_keys(data, (f.name for f in dataclasses.fields(cls)), where)
    kwargs = dict(data)
    if cls is EngineConfig and "speculation" in kwargs and not isinstance(kwargs["speculation"], SpeculationConfig):
        kwargs["speculation"] = _build(SpeculationConfig, kwargs["speculation"] or {}, f"{where}.speculation")
    return cls(**kwargs)


_TEXT_FIELDS = ("model", "tokenizer", "gguf_file", "gpu_memory_budget", "served_model_name")


def _engine_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """SUBSPEC_<FIELD> and SUBSPEC_SPECULATION_<FIELD> variables as a config mapping, each read as a YAML scalar
    ('8', 'null', '0.2', 'nf4'); a name field stays text even when it looks like a number."""
    names = [f.name for f in dataclasses.fields(EngineConfig) if f.name != "speculation"]
    overrides: dict[str, Any] = {k: yaml.safe_load(v) for k, v in environment_values(environ, "SUBSPEC_", names).items()}
    spec_names = [f.name for f in dataclasses.fields(SpeculationConfig)]
    speculation = environment_values(environ, "SUBSPEC_SPECULATION_", spec_names)
    if speculation:
        overrides["speculation"] = {k: yaml.safe_load(v) for k, v in speculation.items()}
    for key in _TEXT_FIELDS:
        if overrides.get(key) is not None:
            overrides[key] = str(overrides[key])
    return overrides


def resolve_engine_config(
    *,
    yaml_data: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    cli_overrides: Mapping[str, Any] | None = None,
) -> EngineConfig:
    """Merge defaults < YAML < env (default: os.environ) < CLI into one validated EngineConfig.

    `yaml_data` may hold a `server:` section, which is the server's (server/settings.py), and `card:`, the card
    class a preset is sized for (checked by its tests and `subspec plan`; fit.py).
    """
    engine_yaml = {k: v for k, v in (yaml_data or {}).items() if k not in PRESET_ONLY_KEYS}
    env = _engine_env(environ if environ is not None else os.environ)
    return _build(EngineConfig, merge_sources(yaml_data=engine_yaml, env=env, flags=cli_overrides), "config")


def config_as_dict(config: EngineConfig) -> dict[str, Any]:
    """Plain-data view of a config (for logging the resolved config at start)."""
    return dataclasses.asdict(config)
