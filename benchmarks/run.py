"""The side-by-side benchmark: one process, one run, the same prompts, greedy, every mode.

    python -m benchmarks.run --config configs/qwen2.5-7b-instruct-8gb.yaml --num-prompts 20 --max-tokens 128 \\
        --modes subspec,vanilla,hf-accelerate,resident --synthetic qwen2.5-7b --out results.json

Modes: `subspec` (streamed target + substitute speculation), `vanilla` (the same streamed target, no
speculation), `hf-accelerate` (transformers + accelerate CPU offload of the layers the planner streams),
`resident` (everything on the GPU, skipped where it does not fit). Each mode's engine is built, run and
freed before the next. Without --config, the default model runs with configs/default-offload.yaml (every
decoder layer streamed, as the paper runs its models). `--synthetic NAME` adds the paper-scale mechanics on random
weights (benchmarks/synthetic.py); `--modes none` runs only that. The engine flags (--model, --config,
--gpu-memory-budget, --max-depth, ...) are the server's; `--mode` is ignored (each mode sets its own).
Prints a markdown report on stdout and writes the JSON document to --out; benchmarks/results/README.md
explains every column. Exit status 1 when a mode failed or subspec's tokens differ from vanilla's.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import platform
import sys
import traceback
from dataclasses import asdict, replace
from importlib import metadata
from typing import Any, Callable

import torch

from benchmarks.bandwidth import measure_pinned_h2d
from benchmarks.engine_modes import ENGINE_MODES, run_engine_mode
from benchmarks.gpu_memory import free_device_memory
from benchmarks.hf_accelerate import MODE as HF_MODE
from benchmarks.hf_accelerate import run_hf_accelerate
from benchmarks.mode_result import ModeResult, compare_modes
from benchmarks.mt_bench import first_turn_prompts
from benchmarks.provenance import device_record
from benchmarks.report import markdown, write_json
from benchmarks.synthetic import run_synthetic
from benchmarks.synthetic_weights import PRESETS
from server.engine_args import OFFLOAD_PRESET, add_engine_arguments, engine_config_from_args, engine_overrides
from subspec_core.agreement import compare_generations
from subspec_core.config import EngineConfig, config_as_dict, resolve_engine_config
from subspec_core.build import build_engine, resolve_device, resolve_dtype
from subspec_core.loading import load_tokenizer
from subspec_core.model_source import default_served_name
from subspec_core.quant import int4_kernel_name

MODES = ("subspec", "vanilla", HF_MODE, "resident")
# Without --config and --model: the default model run the paper's way (every decoder layer streamed).
SUITES = ("mt_bench",)
# Engine flags that describe the real model, not the synthetic one (which has its own preset and budget).
_MODEL_FIELDS = ("model", "gguf_file", "tokenizer", "served_model_name", "gpu_memory_budget", "mode")


def parse_modes(text: str) -> list[str]:
    """'subspec,vanilla' -> ['subspec', 'vanilla']; 'none' or '' -> []."""
    modes = [m.strip() for m in text.split(",") if m.strip() and m.strip() != "none"]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)} or 'none'")
    return modes


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--suite", choices=SUITES, default="mt_bench", help="prompt suite (first turns, chat-templated)")
    bench.add_argument("--num-prompts", type=positive_int, default=20, help="prompts from the suite (the paper: 20)")
    bench.add_argument("--max-tokens", type=positive_int, default=128, help="new tokens per prompt (EOS may stop earlier)")
    bench.add_argument("--modes", type=parse_modes, default=list(MODES), help=f"comma-separated from {','.join(MODES)}, or none")
    bench.add_argument("--warmup-tokens", type=int, default=16, help="untimed warm-up generation per mode (0: none)")
    bench.add_argument("--synthetic", choices=sorted(PRESETS), default=None,
                       help="also measure the mechanics on a random-weight model of this shape")
    bench.add_argument("--synthetic-budget", default=None, help="GPU budget of the synthetic model (default: its preset)")
    bench.add_argument("--synthetic-repeats", type=positive_int, default=3, help="timed repeats per synthetic measurement")
    bench.add_argument("--out", default="results.json", help="where to write the JSON document")
    add_engine_arguments(parser)
    return parser


def run_config(args: argparse.Namespace) -> EngineConfig:
    """The real model's config: --config < env < flags; the default model without --config gets the offload
    preset (every layer streamed: the mechanism under test). Each mode then sets its own `mode`."""
    return engine_config_from_args(args, default_preset=OFFLOAD_PRESET)


def synthetic_config(name: str, args: argparse.Namespace) -> EngineConfig:
    """The synthetic model's preset under the engine flags given on the command line (not the real model's)."""
    overrides = {k: v for k, v in engine_overrides(args).items() if k not in _MODEL_FIELDS}
    if args.synthetic_budget:
        overrides["gpu_memory_budget"] = args.synthetic_budget
    return resolve_engine_config(yaml_data=PRESETS[name], environ={}, cli_overrides=overrides)


def environment(device: torch.device, config: EngineConfig) -> dict[str, Any]:
    """The device and its libraries (device_record), the Python packages, and the substitute's kernel; each
    mode's entry adds its engine's attention kernels and graph capture (engine_modes)."""
    versions = {}
    for package in ("torch", "transformers", "accelerate", "bitsandbytes"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    quant = config.speculation.quant_type
    kernel = int4_kernel_name(device) if quant == "int4" else f"bitsandbytes {quant}"
    return {**device_record(device), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(), "packages": versions, "substitute": quant, "substitute_kernel": kernel}


def run_modes(config: EngineConfig, modes: list[str], prompts: list[list[int]], *, tokenizer: Any,
              args: argparse.Namespace, pinned_gbps: float | None,
              on_result: Callable[[list[ModeResult]], None]) -> list[ModeResult]:
    """Each mode in turn, its engine freed before the next; a mode that raises is recorded as 'failed'.

    `on_result(results so far)` runs after every mode, so a later crash loses nothing already measured.
    """
    results = []
    for mode in modes:
        print(f"benchmark: {mode} ({len(prompts)} prompts, {args.max_tokens} tokens)", file=sys.stderr, flush=True)
        kwargs = dict(max_tokens=args.max_tokens, warmup_tokens=args.warmup_tokens)
        try:
            if mode == HF_MODE:
                result = run_hf_accelerate(config, prompts, tokenizer=tokenizer, **kwargs)
            else:
                assert mode in ENGINE_MODES
                result = run_engine_mode(config, mode, prompts, **kwargs)
        except Exception as exc:  # noqa: BLE001 - keep the other modes' results; the exit status reports it
            traceback.print_exc()
            result = ModeResult(mode=mode, status="failed", reason=f"{type(exc).__name__}: {exc}")
        result.pinned_h2d_gbps = pinned_gbps
        results.append(result)
        on_result(results)
    return results


def agreement(config: EngineConfig, prompts: list[list[int]], results: list[ModeResult]) -> dict[str, Any] | None:
    """The run's losslessness check, tie-aware in low precision (subspec_core.agreement).

    Exact token equality in float32. In bf16/fp16, a prompt whose subspec tokens differ from vanilla's passes
    only if the target's own top-2 logit margin at the first difference is a near-tie; a vanilla engine is
    rebuilt to measure that margin, and only when some prompt differs.
    """
    by_mode = {r.mode: r for r in results if r.status == "ok"}
    subspec, vanilla = by_mode.get("subspec"), by_mode.get("vanilla")
    if subspec is None or vanilla is None:
        return None
    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    exact = dtype == torch.float32
    pairs = list(zip(prompts, vanilla.token_ids, subspec.token_ids))
    differing = [i for i, (_, ref, got) in enumerate(pairs) if ref != got]
    entries: list[dict[str, Any]] = []
    if differing:
        engine = build_engine(replace(config, mode="vanilla"), progress=False)
        try:
            for i in differing:
                prompt, ref, got = pairs[i]
                entries.append({"prompt": i, **compare_generations(engine, prompt, ref, got, exact=exact, dtype=dtype).as_dict()})
        finally:
            engine.close()
            del engine
            free_device_memory()
    return {"exact": exact, "prompts": len(pairs), "identical": len(pairs) - len(differing), "diverged": entries,
            "lossless": all(e["ok"] for e in entries)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    config = run_config(args)
    device = resolve_device(config)
    print("benchmark: measuring pinned host-to-device bandwidth", file=sys.stderr, flush=True)
    bandwidth = measure_pinned_h2d(device)
    model_name = default_served_name(config.model, config.gguf_file)
    doc: dict[str, Any] = {
        "schema": 2,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device, config),
        "run": {"model": model_name, "suite": args.suite, "num_prompts": args.num_prompts, "max_tokens": args.max_tokens,
                "modes": args.modes, "warmup_tokens": args.warmup_tokens, "greedy": True},
        "config": config_as_dict(config),
        "pinned_h2d": asdict(bandwidth),
        "modes": [],
        "identical_tokens_subspec_vs_vanilla": None,
        "agreement": None,
        "synthetic": None,
    }
    tokenizer = load_tokenizer(config)
    results: list[ModeResult] = []

    def record_modes(so_far: list[ModeResult]) -> None:
        doc["identical_tokens_subspec_vs_vanilla"] = compare_modes(so_far)
        doc["modes"] = [r.as_dict() for r in so_far]
        write_json(doc, args.out)

    if args.modes:
        prompts = first_turn_prompts(tokenizer, limit=args.num_prompts)
        results = run_modes(config, args.modes, prompts, tokenizer=tokenizer, args=args, pinned_gbps=bandwidth.gbps,
                            on_result=record_modes)
        doc["agreement"] = agreement(config, prompts, results)
        write_json(doc, args.out)
    synthetic_failed = False
    if args.synthetic:
        print(f"benchmark: synthetic {args.synthetic}", file=sys.stderr, flush=True)
        subspec = next((r for r in results if r.mode == "subspec" and r.status == "ok"), None)
        spec = config.speculation
        try:
            doc["synthetic"] = run_synthetic(
                args.synthetic, synthetic_config(args.synthetic, args), tokenizer=tokenizer, pinned_gbps=bandwidth.gbps,
                repeats=args.synthetic_repeats, measured_tau=subspec.mean_accept_length if subspec else None,
                measured_tau_source=(f"measured: {model_name}, {args.suite}, {args.num_prompts} prompts, "
                                     f"depth {spec.max_depth} x topk {spec.topk}") if subspec else "",
            )
        except Exception as exc:  # noqa: BLE001 - the modes' results are kept; the exit status reports it
            traceback.print_exc()
            synthetic_failed = True
            doc["synthetic_error"] = f"{type(exc).__name__}: {exc}"
        write_json(doc, args.out)
    sys.stdout.write(markdown(doc))
    print(f"benchmark: wrote {args.out}", file=sys.stderr)
    failed = [r.mode for r in results if r.status == "failed"] + (["synthetic"] if synthetic_failed else [])
    lossless = doc["agreement"] is None or doc["agreement"]["lossless"]
    if failed or not lossless:
        print(f"benchmark: FAILED parts {failed}; lossless (tie-aware) subspec vs vanilla: {lossless}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
