"""The baseline users run today: transformers + accelerate `dispatch_model` CPU offload, greedy `generate`.

The decoder layers that our memory planner streams in `vanilla` mode under the same budget go to "cpu"
(accelerate keeps them in host memory and copies each one to the GPU inside every forward); embeddings,
the final norm, rotary tables, lm_head and the layers the planner keeps resident go to the GPU. On a
CPU-only machine every module is on the CPU (no offload happens, but the whole path still runs).

First-token and decode times come from a streamer: `generate` hands it the prompt, then each new token
after moving it to the host (a sync), so perf_counter at each hand-off sees finished work.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.gpu_memory import GIB, free_device_memory, peak_gib, reset_peak
from benchmarks.mode_result import ModeResult, PromptRun, pooled
from subspec_core import loading
from subspec_core.architecture import shape_from_hf_config
from subspec_core.build import resolve_device, resolve_dtype
from subspec_core.config import EngineConfig
from subspec_core.loading import eos_token_ids
from subspec_core.model_source import resolve_model
from subspec_core.planner import BudgetTooSmallError, MemoryPlan, device_budget, plan_for

MODE = "hf-accelerate"


class TokenClock:
    """A `generate` streamer recording each new token and when it reached the host (skips the prompt)."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        if not self._prompt_seen:  # generate() first hands over the prompt ids
            self._prompt_seen = True
            return
        self.token_ids.extend(int(t) for t in value.reshape(-1).tolist())
        self.times.append(now)

    def end(self) -> None:
        pass


def load_hf_model(config: EngineConfig, dtype: torch.dtype) -> Any:
    """The target as a transformers CausalLM on the host (through the engine's GGUF conversion cache)."""
    return loading.load_hf_model(resolve_model(config.model, config.gguf_file, progress=False), dtype).eval()


def vanilla_plan(config: EngineConfig, hf_model: Any, dtype: torch.dtype, device: torch.device) -> MemoryPlan:
    """The plan `build_engine` makes for mode 'vanilla' (same inputs, same default budget rule)."""
    shape = shape_from_hf_config(hf_model.config, max_model_len=config.max_model_len)
    return plan_for(config, shape, dtype=dtype, device_type=device.type,
                    budget_bytes=device_budget(config.budget_bytes, device), mode="vanilla")


def device_map_for(plan: MemoryPlan, num_layers: int, device: torch.device) -> dict[str, Any]:
    """Streamed layers on 'cpu' (accelerate offload), everything else on the compute device."""
    main: Any = device.index if device.type == "cuda" else "cpu"
    device_map: dict[str, Any] = {"model.embed_tokens": main, "model.rotary_emb": main, "model.norm": main, "lm_head": main}
    streamed = set(plan.streamed_layers)
    for i in range(num_layers):
        device_map[f"model.layers.{i}"] = "cpu" if i in streamed else main
    return device_map


def _generate(model: Any, prompt: list[int], *, max_tokens: int, eos: list[int], device: torch.device) -> PromptRun:
    clock = TokenClock()
    input_ids = torch.tensor([prompt], dtype=torch.long, device=device)
    start = time.perf_counter()
    model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, max_new_tokens=max_tokens,
        temperature=None, top_p=None, top_k=None, eos_token_id=eos, pad_token_id=eos[0] if eos else None, streamer=clock,
    )
    ids = clock.token_ids
    if ids and ids[-1] in eos:
        ids = ids[:-1]  # our engine does not emit the EOS token itself; compare like with like
    first, last = (clock.times[0], clock.times[-1]) if clock.times else (start, start)
    return PromptRun(token_ids=ids, ttft_s=first - start, decode_s=last - first, iterations=max(len(clock.times) - 1, 0))


def run_hf_accelerate(
    config: EngineConfig, prompts: list[list[int]], *, tokenizer: Any, max_tokens: int, warmup_tokens: int
) -> ModeResult:
    """Load with transformers, dispatch with accelerate, time greedy `generate` on every prompt, free the model."""
    from accelerate import dispatch_model

    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    free_device_memory()
    model = load_hf_model(config, dtype)
    try:
        try:
            plan = vanilla_plan(config, model, dtype, device)
        except BudgetTooSmallError as exc:
            return ModeResult(mode=MODE, status="skipped", reason=f"does not fit: {exc}")
        reset_peak(device)
        model = dispatch_model(model, device_map=device_map_for(plan, model.config.num_hidden_layers, device))
        build_peak = peak_gib(device)
        reset_peak(device)
        eos = sorted(eos_token_ids(tokenizer, getattr(model, "generation_config", None)))
        with torch.no_grad():  # what generate() uses itself; accelerate's hooks re-create parameters per forward
            if warmup_tokens > 0:
                _generate(model, prompts[0], max_tokens=warmup_tokens, eos=eos, device=device)
            runs = [_generate(model, p, max_tokens=max_tokens, eos=eos, device=device) for p in prompts]
        on_cuda = device.type == "cuda"
        result = pooled(MODE, runs, on_cuda=on_cuda)
        result.peak_gpu_gib, result.peak_gpu_build_gib = peak_gib(device), build_peak
        result.resident_layers, result.streamed_layers = list(plan.resident_layers), list(plan.streamed_layers)
        result.budget_gib = None if plan.budget_bytes is None else plan.budget_bytes / GIB
        result.memory_plan = plan.table()
        # One forward per token, not instrumented inside: its wall time per forward stands in the verify column.
        decode_s = sum(r.decode_s for r in runs)
        result.verify_ms_per_iter = decode_s / result.iterations * 1e3 if result.iterations else None
        result.notes.append("verify_ms_per_iter: decode wall time per forward (generate is not instrumented inside)")
        offloaded = sum(
            p.numel() * p.element_size() for i in plan.streamed_layers for p in model.model.layers[i].parameters()
        ) if plan.streamed_layers and on_cuda else 0
        if offloaded and decode_s > 0:
            # accelerate copies every offloaded parameter in every forward: bytes implied by the plan, not counted
            result.verify_h2d_gbps = offloaded * result.iterations / decode_s / 1e9
            result.notes.append("verify_h2d_gbps: offloaded bytes x forwards / decode wall time (implied, not counted)")
        if not on_cuda:
            result.notes.append("CPU: every module is on the CPU, nothing is offloaded or copied")
        return result
    finally:
        del model
        free_device_memory()
