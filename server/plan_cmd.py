"""`subspec plan`: the memory plan a GPU start would make for a config, printed without a GPU and without weights.

    subspec plan --config configs/qwen2.5-7b-instruct-8gb.yaml [--model M] [--gpu-memory-budget B]
                 [--max-num-seqs N] [--json]

The model's shape is read offline (`subspec_core.shapes`). The budget is --gpu-memory-budget, else the config's,
else what the preset's card class allows (fit.CARD_SHARE of it); the start-up check against the GPU's free
memory comes after this plan. --json prints one object: mode, max_num_seqs (the count the plan decodes together:
the planner's choice when it is auto) with max_num_seqs_reason, kv_bytes (the KV cache of all its
sequences), seqs_that_fit (how many the budget holds at the same resident layers), device_total_bytes
(everything the process holds on the GPU, reserves included), reserve_bytes (the part that is not tensors),
budget_bytes, resident_layers and streamed_layers (counts), and the rows.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Any

from server.engine_args import count_or_auto


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", required=True, help="preset file (e.g. configs/default.yaml)")
    parser.add_argument("--model", default=None, help="the model to plan for instead of the preset's")
    parser.add_argument("--gpu-memory-budget", default=None, metavar="SIZE", help="e.g. 8GiB (default: the preset's)")
    parser.add_argument("--max-num-seqs", default=None, type=count_or_auto, metavar="N",
                        help="sequences decoded together, each with its own KV region, or auto (default: the "
                             "preset's, else auto)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan; 2 for a config that cannot be planned (bad value, budget too small), 1 for a shape not found."""
    import torch

    from subspec_core.architecture import UnsupportedModelError
    from subspec_core.build import resolve_dtype
    from subspec_core.config import load_yaml, resolve_engine_config
    from subspec_core.fit import card_bytes, card_limit
    from subspec_core.planner import BudgetTooSmallError, choose_mode, plan_for
    from subspec_core.shapes import ShapeNotFoundError, find_shape

    try:
        yaml_data = load_yaml(args.config)
        card = yaml_data.get("card")
        limit = None if card is None else card_limit(str(card))
        config = resolve_engine_config(yaml_data=yaml_data, environ=os.environ, cli_overrides={
            "model": args.model, "gpu_memory_budget": args.gpu_memory_budget,
            "max_num_seqs": getattr(args, "max_num_seqs", None)})
        found = find_shape(config.model, gguf_file=config.gguf_file, max_model_len=config.max_model_len)
        dtype = resolve_dtype(config, torch.device("cuda"))  # what a GPU start runs in
        budget = config.budget_bytes if config.budget_bytes is not None else limit
        plan_cuda = functools.partial(plan_for, config, found.shape, dtype=dtype, device_type="cuda")
        choice = choose_mode(requested=config.mode, device_type="cuda", num_layers=found.shape.num_layers,
                             max_resident_layers=config.max_resident_layers, budget_bytes=budget, plan_for=plan_cuda)
        plan = plan_cuda(budget_bytes=budget, mode=choice.mode)
    except (ShapeNotFoundError, UnsupportedModelError, OSError) as exc:
        print(f"subspec plan: {exc}", file=sys.stderr)
        return 1
    except (ValueError, BudgetTooSmallError) as exc:
        print(f"subspec plan: {exc}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {
        "config": args.config, "model": config.model, "shape_source": found.source, "mode": choice.mode,
        "mode_reason": choice.reason, "device_total_bytes": plan.device_bytes, "reserve_bytes": plan.reserve_bytes,
        "budget_bytes": plan.budget_bytes, "card": card, "card_bytes": None if card is None else card_bytes(str(card)),
        "card_limit_bytes": limit, "resident_layers": len(plan.resident_layers),
        "streamed_layers": len(plan.streamed_layers), "prefill_chunk_size": plan.prefill_chunk_size,
        "host_ram_bytes": plan.host_ram_bytes, "max_num_seqs": plan.max_num_seqs,
        "max_num_seqs_reason": plan.seqs_reason, "seqs_that_fit": plan.seqs_that_fit, "kv_bytes": plan.kv_bytes,
        "dtype": str(dtype).removeprefix("torch."),
        "rows": [{"component": r.component, "location": r.location, "bytes": r.nbytes, "detail": r.detail,
                  "reserve": r.reserve} for r in plan.rows],
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{config.model}: {found.shape.architecture}, {found.shape.num_layers} layers, {report['dtype']} "
          f"(shape: {found.source})")
    print(choice.line())
    print(plan.seqs_line())
    if card is not None:
        print(f"card {card}: device total {plan.device_bytes / 2**30:.2f} GiB, "
              f"{plan.device_bytes / card_bytes(str(card)):.1%} of its {card_bytes(str(card)) / 2**30:.0f} GiB "
              f"(at most {card_limit(str(card)) / 2**30:.2f} GiB)")
    print(plan.table())
    return 0
