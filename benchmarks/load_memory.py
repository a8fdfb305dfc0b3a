"""Peak host memory while loading: the one-pass loader against arena + largest layer + shared weights.

    python -m benchmarks.load_memory [--shape qwen2.5-1.5b] [--quant-type nf4] [--paths one-pass,transformers] [--json]

Writes a synthetic checkpoint of the shape (random bf16 weights, sharded safetensors with their index, a
config.json and the default model's tokenizer) to a temporary directory, then loads it in a fresh
subprocess per path, on the CPU in mode subspec with every layer streamed, and reads the subprocess's peak
resident set (VmHWM, the kernel's high-water mark of its address space):
- `one-pass`: the real loading path, `build_engine` (each layer read once into the host arena, its
  substitute quantized from there);
- `transformers`: the previous path, for comparison: transformers materialises the whole model, its layers
  are fused (`loading.extract_weights`), then packed and quantized (`engine_from_weights`).
The bound is 1.15 x what must exist once loaded plus one layer: the process before any weight is read (its
RSS when the `load` phase ends: interpreter, torch, tokenizer, the quantization library), the arena, the
largest layer, the shared weights, and on a CPU the buffers a GPU would hold (substitutes, streaming ring,
KV cache), which are host memory here; so are the quantizer's temporaries, which a GPU keeps on the device.
The last stdout line is one JSON object (with --json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.synthetic_weights import SHAPES
from subspec_core.checkpoint import SAFETENSORS_INDEX, layer_parts
from subspec_core.weights import ModelShape

BOUND = 1.15
PATHS = ("one-pass", "transformers")


def _vm_rss() -> int:
    """This process's resident set now, in bytes (/proc: no extra dependency)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _peak_rss() -> int:
    """This process's peak resident set so far, in bytes: VmHWM, the high-water mark of its own address space.
    Not `ru_maxrss`: exec records the forking parent's high-water mark there, so a child started by a large
    process (a test session that has loaded models) would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# --------------------------------------------------------------------------------------------- checkpoint
def _part_rows(shape: ModelShape, fused: str, count: int) -> list[int]:
    """Rows of each checkpoint tensor that makes up `fused` (one tensor when the checkpoint stores it fused)."""
    rows = {"qkv_weight": [shape.q_size, shape.kv_size, shape.kv_size], "qkv_bias": [shape.q_size, shape.kv_size, shape.kv_size],
            "gate_up_weight": [shape.intermediate_size] * 2, "o_weight": [shape.hidden_size],
            "o_bias": [shape.hidden_size], "down_weight": [shape.hidden_size]}[fused]
    return rows if count == len(rows) else [sum(rows)]


def _columns(shape: ModelShape, fused: str) -> tuple[int, ...]:
    return {"qkv_weight": (shape.hidden_size,), "gate_up_weight": (shape.hidden_size,), "o_weight": (shape.q_size,),
            "down_weight": (shape.intermediate_size,), "qkv_bias": (), "o_bias": ()}[fused]


def tensor_specs(shape: ModelShape) -> list[tuple[str, tuple[int, ...]]]:
    """Every checkpoint tensor of the shape, by the family's names, in file order: (name, dims)."""
    h = shape.hidden_size
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab_size, h))]
    for layer in range(shape.num_layers):
        for fused, parts in layer_parts(shape, layer).items():
            specs += [(name, (rows, *_columns(shape, fused))) for name, rows in zip(parts, _part_rows(shape, fused, len(parts)))]
        prefix = f"model.layers.{layer}."
        specs += [(f"{prefix}input_layernorm.weight", (h,)), (f"{prefix}post_attention_layernorm.weight", (h,))]
        if shape.qk_norm:
            specs += [(f"{prefix}self_attn.{norm}.weight", (shape.head_dim,)) for norm in ("q_norm", "k_norm")]
    specs.append(("model.norm.weight", (h,)))
    if not shape.tie_embeddings:
        specs.append(("lm_head.weight", (shape.vocab_size, h)))
    return specs


def _hf_config(shape: ModelShape) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(
        shape.architecture, vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads, head_dim=shape.head_dim,
        rms_norm_eps=shape.rms_norm_eps, tie_word_embeddings=shape.tie_embeddings, max_position_embeddings=4096,
        dtype="bfloat16",
    )


def write_checkpoint(shape: ModelShape, directory: Path, *, shard_bytes: int = 2**30, seed: int = 0) -> int:
    """Write a synthetic checkpoint of `shape` as transformers saves one (safetensors shards of about `shard_bytes`
    and their index, config.json) with the default model's tokenizer; random bf16 weights, norms at 1. Returns the
    weight bytes written. One shard is in memory at a time."""
    from safetensors.torch import save_file

    from subspec_core.config import EngineConfig
    from subspec_core.loading import load_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    _hf_config(shape).save_pretrained(directory)
    load_tokenizer(EngineConfig()).save_pretrained(directory)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for name, dims in tensor_specs(shape):
        if filled >= shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append((name, dims))
        filled += 2 * math.prod(dims)
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    for k, specs in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: (torch.ones(dims) if len(dims) == 1 else torch.randn(dims, generator=generator) * 0.02)
                   .to(torch.bfloat16) for name, dims in specs}
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update((name, file) for name in tensors)
    total = 2 * sum(math.prod(dims) for specs in shards for _, dims in specs)
    (directory / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


# --------------------------------------------------------------------------------------------- the child
def _engine_config(directory: Path, quant_type: str) -> Any:
    from subspec_core.config import EngineConfig, SpeculationConfig

    return EngineConfig(model=str(directory), mode="subspec", device="cpu", dtype="bfloat16", max_resident_layers=0,
                        max_model_len=512, prefill_chunk_size=64,
                        speculation=SpeculationConfig(quant_type=quant_type, max_depth=8))


def _load_one_pass(directory: Path, quant_type: str) -> tuple[Any, int]:
    """The real loading path; the baseline is the RSS when the `load` phase (config, tokenizer) has ended."""
    from subspec_core.build import build_engine
    from subspec_core.startup import StartupLog

    baseline: list[int] = []

    def on_line(line: str) -> None:
        if line.startswith("start-up: load"):
            baseline.append(_vm_rss())

    engine = build_engine(_engine_config(directory, quant_type), progress=False, phases=StartupLog(emit=on_line))
    return engine, baseline[0]


def _load_transformers(directory: Path, quant_type: str) -> tuple[Any, int]:
    """The previous path: transformers materialises the model, its layers are fused, then packed and quantized."""
    from transformers import AutoModelForCausalLM

    from subspec_core.architecture import shape_from_hf_config
    from subspec_core.build import InMemoryWeights, engine_from_weights
    from subspec_core.loading import extract_weights, load_tokenizer

    config = _engine_config(directory, quant_type)
    tokenizer = load_tokenizer(config)
    baseline = _vm_rss()
    hf_model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.bfloat16, device_map="cpu",
                                                    low_cpu_mem_usage=True)
    shape = shape_from_hf_config(hf_model.config, max_model_len=config.max_model_len)
    shared, layer_linears = extract_weights(hf_model, shape, consume=True)
    del hf_model
    weights = InMemoryWeights(shape=shape, shared=shared, layer_linears=layer_linears, tokenizer=tokenizer)
    engine = engine_from_weights(config, weights, device=torch.device("cpu"), model_name="synthetic")
    return engine, baseline


def child(directory: Path, path: str, quant_type: str) -> dict[str, Any]:
    """Load the checkpoint by `path` in this process; the peak RSS and what it is made of."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if quant_type != "int4":  # bitsandbytes' import (~120 MB of libraries) is process, not weights: before the baseline
        import bitsandbytes.functional  # noqa: F401
    load = _load_one_pass if path == "one-pass" else _load_transformers
    engine, baseline = load(directory, quant_type)
    peak = _peak_rss()
    streamer = engine.target_layers.streamer
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    parts = {
        "arena": nbytes(streamer.store.arena),
        "largest_layer": streamer.store.layout.nbytes(engine.shared.embed.dtype),
        "shared": engine.shared.nbytes(),
        "substitutes": sum(s.nbytes() for s in engine.draft_layers.substitutes.values()),
        "ring": sum(nbytes(slot) for slot in streamer.slots),
        "kv_cache": nbytes(engine.kv_cache.data),
    }
    accounted = baseline + sum(parts.values())
    # what a GPU host would hold: the peak less the process and the buffers a GPU keeps, against arena + layer + shared
    device_side = parts["substitutes"] + parts["ring"] + parts["kv_cache"]
    host_side = (peak - baseline - device_side) / (parts["arena"] + parts["largest_layer"] + parts["shared"])
    return {"path": path, "peak_rss": peak, "baseline_rss": baseline, "parts": parts, "accounted": accounted,
            "ratio": peak / accounted, "host_side_ratio": host_side, "planner_host_ram": engine.plan.host_ram_bytes}


def measure(directory: Path, path: str, *, quant_type: str, timeout: float = 1800) -> dict[str, Any]:
    """Run `child` in a fresh interpreter (so nothing loaded before counts) and return its report."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.load_memory", "--child", str(directory), "--paths", path,
         "--quant-type", quant_type],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the {path} load failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def summary(shape_name: str, written: int, results: list[dict[str, Any]]) -> str:
    lines = [f"synthetic {shape_name}: {_gib(written)} of bf16 weights, loaded on the CPU in mode subspec, every layer "
             f"streamed; bound {BOUND} x accounted"]
    for r in results:
        p = r["parts"]
        lines.append(
            f"  {r['path']:<13} peak RSS {_gib(r['peak_rss'])} = {r['ratio']:.3f} x accounted {_gib(r['accounted'])} "
            f"(before weights {_gib(r['baseline_rss'])} + arena {_gib(p['arena'])} + largest layer "
            f"{_gib(p['largest_layer'])} + shared {_gib(p['shared'])} + substitutes {_gib(p['substitutes'])} + ring "
            f"{_gib(p['ring'])} + KV {_gib(p['kv_cache'])}); without the process and the buffers a GPU would hold: "
            f"{r['host_side_ratio']:.3f} x (arena + largest layer + shared); planner's host RAM figure "
            f"{_gib(r['planner_host_ram'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    parser.add_argument("--quant-type", default="nf4", help="the draft's substitute format (default: the presets' nf4)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--dir", type=Path, default=None, help="write (or reuse) the checkpoint here instead of a temp dir")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.paths, args.quant_type)))
        return
    shape = SHAPES[args.shape]
    with tempfile.TemporaryDirectory(prefix="load-memory-") as tmp:
        directory = args.dir or Path(tmp)
        if (directory / SAFETENSORS_INDEX).is_file():
            written = json.loads((directory / SAFETENSORS_INDEX).read_text())["metadata"]["total_size"]
        else:
            written = write_checkpoint(shape, directory)
        results = [measure(directory, path, quant_type=args.quant_type) for path in args.paths.split(",")]
    print(summary(args.shape, written, results))
    if args.json:
        print(json.dumps({"shape": args.shape, "weight_bytes": written, "bound": BOUND, "results": results}))


if __name__ == "__main__":
    main()
