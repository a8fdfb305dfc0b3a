"""Drafting while the weights stream: vanilla, subspec and subspec with post-speculation, in one run.

    OMP_NUM_THREADS=1 python -m benchmarks.pipeline --json [--num-prompts 2 --max-tokens 64]

On a CPU the layers stream over a SIMULATED link (copies.SimulatedLink: a copy thread that sleeps for
bytes / bandwidth, then copies), set so that one streamed forward takes about as long as drafting one tree
(the regime of a GPU at PCIe speed, where the two are about equal): the draft time of a depth-`max_depth`
tree and the bytes a forward streams are measured first, and the bandwidth is their ratio. On a GPU the real
link is used. All three modes run greedy over the same MT-Bench first turns with the default-offload preset;
`identical` says whether their outputs are equal token for token.

Threads: the draft runs on the same cores as the verify's compute (in the thread waiting for a copy), while
the copy thread only sleeps and copies; run with OMP_NUM_THREADS=1 (one compute thread, the copy thread on the
other core of a 2-core machine): timings on a shared 2-core machine are steadier that way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.engine_modes import timed_generation
from benchmarks.mt_bench import first_turn_prompts
from benchmarks.provenance import device_record
from subspec_core.build import build_engine, resolve_device
from subspec_core.config import EngineConfig, load_yaml, resolve_engine_config
from subspec_core.loading import load_tokenizer

PRESET = Path(__file__).resolve().parents[1] / "configs" / "default-offload.yaml"
POST_LEVELS = 16  # the extension's levels per verify (see postspec.py and the README's table)
POST_DEPTH = 8  # fresh trees' depth with post-speculation on


@dataclasses.dataclass(frozen=True)
class Calibration:
    draft_tree_s: float  # one depth-max_depth tree grown by the draft (median)
    forward_bytes: int  # weight bytes one target forward streams
    link_gbps: float  # forward_bytes / draft_tree_s


def calibrate(config: EngineConfig, prompt: list[int], *, repeats: int = 3) -> Calibration:
    """Time the draft's tree at the preset's depth (synchronous copies: no link involved) and count a forward's
    streamed bytes; the link that streams those bytes in that time."""
    engine = build_engine(dataclasses.replace(config, mode="subspec"), progress=False)
    try:
        depth = config.speculation.max_depth
        with torch.inference_mode():
            engine.prompt_logits(prompt)
            root = torch.ones(1, dtype=torch.long, device=engine.device)
            length = torch.full((1,), len(prompt), dtype=torch.long, device=engine.device)
            times = []
            for _ in range(repeats + 1):  # the first one warms up
                start = time.perf_counter()
                engine.drafter.grow(root_token=root, prefix_length=length, committed=len(prompt), depth=depth)
                times.append(time.perf_counter() - start)
        streamer = engine.target_layers.streamer
        assert streamer is not None, "the preset streams every layer"
        forward_bytes = len(streamer.order) * streamer.slots[0].numel() * streamer.slots[0].element_size()
    finally:
        engine.close()
    draft_s = statistics.median(times[1:])
    return Calibration(draft_tree_s=draft_s, forward_bytes=forward_bytes, link_gbps=forward_bytes / draft_s / 1e9)


def run_mode(config: EngineConfig, prompts: list[list[int]], *, max_tokens: int) -> dict[str, Any]:
    """Build the engine, warm it up, time every prompt greedily; tokens per second of decoding (after the
    first token, so prefill is not counted), and the pooled counters."""
    engine = build_engine(config, progress=False)
    try:
        timed_generation(engine, prompts[0], max_tokens=4, probe=None)  # warm-up
        runs = [timed_generation(engine, prompt, max_tokens=max_tokens, probe=None) for prompt in prompts]
        iterations = sum(run.iterations for run in runs)
        chained = sum(run.chained_iterations for run in runs)
        tokens = sum(len(run.token_ids) - 1 for run in runs)
        decode_s = sum(run.decode_s for run in runs)
        draft_s = sum(run.draft_s or 0.0 for run in runs)
        return {
            "mode": config.mode, "post_levels": config.speculation.post_levels,
            "max_depth": config.speculation.max_depth if config.mode == "subspec" else None,
            "tok_s": tokens / decode_s, "tokens": tokens, "decode_s": decode_s, "iterations": iterations,
            "chained_iterations": chained, "draft_s_per_iter": draft_s / max(iterations, 1),
            "verify_s_per_iter": sum(run.verify_s or 0.0 for run in runs) / max(iterations, 1),
            "outputs": [run.token_ids for run in runs],
        }
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(PRESET), help="preset (default: configs/default-offload.yaml)")
    parser.add_argument("--num-prompts", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--post-levels", type=int, default=POST_LEVELS, help="extension levels per verify")
    parser.add_argument("--post-depth", type=int, default=POST_DEPTH, help="fresh trees' depth with post-speculation")
    parser.add_argument("--link-gbps", type=float, default=None, help="skip the calibration: this link (CPU)")
    parser.add_argument("--modes", default="vanilla,subspec,subspec-same-depth,overlap")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    config = resolve_engine_config(yaml_data={**load_yaml(args.config)}, environ={})
    device = resolve_device(config)
    cpu = device.type == "cpu"
    prompts = first_turn_prompts(load_tokenizer(config), limit=args.num_prompts)
    calibration = None
    link = args.link_gbps
    if cpu and link is None:
        calibration = calibrate(config, prompts[0])
        link = calibration.link_gbps
        print(f"calibration: a depth-{config.speculation.max_depth} draft tree takes {calibration.draft_tree_s:.3f} s; "
              f"a forward streams {calibration.forward_bytes / 1e6:.1f} MB: link {link:.3f} GB/s "
              f"(a streamed forward's link time = the draft tree's time)", file=sys.stderr)
    linked = dataclasses.replace(config, simulate_link_gbps=link if cpu else None)
    spec = config.speculation
    modes = {
        "vanilla": dataclasses.replace(linked, mode="vanilla"),
        "subspec": dataclasses.replace(linked, mode="subspec"),
        "subspec-same-depth": dataclasses.replace(linked, mode="subspec", speculation=dataclasses.replace(
            spec, max_depth=args.post_depth)),
        "overlap": dataclasses.replace(linked, mode="subspec", speculation=dataclasses.replace(
            spec, max_depth=args.post_depth, post_levels=args.post_levels)),
    }
    results = {}
    for name in args.modes.split(","):
        started = time.perf_counter()
        results[name] = run_mode(modes[name], prompts, max_tokens=args.max_tokens)
        print(f"{name}: {results[name]['tok_s']:.3f} tok/s ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    outputs = [r["outputs"] for r in results.values()]
    report: dict[str, Any] = {
        "link": "simulated" if cpu else "real",
        "link_gbps": None if link is None else round(link, 4),
        "draft_tree_s": None if calibration is None else round(calibration.draft_tree_s, 4),
        "forward_link_s": None if calibration is None else round(calibration.forward_bytes / (link * 1e9), 4),
        "torch_threads": torch.get_num_threads(),
        "prompts": args.num_prompts, "max_tokens": args.max_tokens,
        "post_depth": args.post_depth, "post_levels": args.post_levels,
        "identical": all(o == outputs[0] for o in outputs),
    }
    for name, key in (("vanilla", "vanilla_tok_s"), ("subspec", "subspec_tok_s"),
                      ("subspec-same-depth", "subspec_same_depth_tok_s"), ("overlap", "overlap_tok_s")):
        if name in results:
            report[key] = round(results[name]["tok_s"], 4)
    if "overlap" in results:
        overlap = results["overlap"]
        report["chained_fraction"] = round(overlap["chained_iterations"] / max(overlap["iterations"], 1), 4)
    report["modes"] = {name: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "outputs"}
                       for name, r in results.items()}
    report["device"] = device_record(device)
    print(json.dumps(report, indent=None if args.json else 2))
    return 0 if report["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
