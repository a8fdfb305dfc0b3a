"""The engine: load, plan, place, and the generation loop, written once as a generator of token events.

One iteration of `subspec` mode is three calls: draft a tree with the substitute (`grow_tree`), verify it
with one streamed target forward (`_verify_tree`), commit the accepted path (`_emit`). `vanilla` and
`resident` run the same loop with a plain one-token target step instead.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import torch

from subspec_core.cancel import CancelCheck, CancellableLayers, GenerationCancelled
from subspec_core.config import EngineConfig, config_as_dict
from subspec_core.detokenize import IncrementalDetokenizer
from subspec_core.drafting import TreeDrafter
from subspec_core.kv_cache import KVCache, kv_capacity
from subspec_core.loading import open_model
from subspec_core.model import LayerSource, attention_bias, compute_logits, forward_hidden
from subspec_core.model_source import resolve_model
from subspec_core.offload import TargetLayers, place_layers
from subspec_core.planner import MemoryPlan, choose_mode, device_budget, plan_memory
from subspec_core.quant import DraftLayers, QuantizedLinears
from subspec_core.sampling import PROMPT_SCORE_ROWS, choose_tokens, token_logprobs
from subspec_core.startup import StartupLog
from subspec_core.timing import PhaseClock
from subspec_core.tree import causal_chunk_mask, select_verify_nodes, subtree, tree_attention_mask
from subspec_core.types import (
    FINISH_LENGTH, FINISH_STOP, GenerationRequest, RequestStats, SamplingParams, TokenEvent, TokenLogprob,
)
from subspec_core.verify import accepted_path, emitted_tokens
from subspec_core.weights import LayerFiller, LayerLayout, ModelShape, SharedWeights, shared_nbytes, tensors_filler

log = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(config: EngineConfig) -> torch.device:
    """cuda when asked or available (auto), else cpu; asking for cuda without one is an error."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device (install a CUDA build of torch)")
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on the GPU (fp16's range is risky for cumulative activations), float32 on the CPU."""
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class _Decoding:
    """Per-request decoding state that the loop threads through its steps."""

    request_id: str
    params: SamplingParams
    seed: int
    budget: int  # completion tokens allowed (max_tokens capped by the context)
    eos: frozenset[int]
    detokenizer: IncrementalDetokenizer
    stats: RequestStats
    cancelled: CancelCheck | None = None  # asked between draft levels and before each target layer


@dataclass(frozen=True)
class _Step:
    """What one decoding step chose: tokens, draft nodes verified, and (when asked for) their logprobs."""

    tokens: list[int]
    drafted: int = 0
    logprobs: tuple[TokenLogprob, ...] | None = None


def _step_logprobs(dec: _Decoding, logits: torch.Tensor, tokens: torch.Tensor) -> tuple[TokenLogprob, ...] | None:
    """Logprobs of the emitted `tokens` from the target logits rows that chose them; None (free) unless asked."""
    if dec.params.logprobs is None:
        return None
    return token_logprobs(logits=logits, tokens=tokens, num_top=dec.params.logprobs)


@dataclass
class _Cursor:
    """Where decoding stands, on the device: the next step reads it without any host-to-device copy.

    The host keeps its own count of committed rows (it learns each step's length from the step's one read);
    the device copy lets the next step start before the host has looked at anything.
    """

    length: torch.Tensor  # (1,) long: committed KV rows N
    root: torch.Tensor  # (1,) long: the last chosen token, not yet in the KV cache


class Engine:
    """A loaded model ready to generate, one request at a time (batch size 1, as in the paper)."""

    def __init__(
        self,
        *,
        config: EngineConfig,
        shape: ModelShape,
        shared: SharedWeights,
        target_layers: TargetLayers,
        draft_layers: DraftLayers | None,
        kv_cache: KVCache,
        tokenizer: Any,
        eos_token_ids: frozenset[int],
        device: torch.device,
        model_name: str,
        plan: MemoryPlan | None = None,
    ) -> None:
        self.config = config
        self.shape = shape
        self.shared = shared
        self.target_layers = target_layers
        self.draft_layers = draft_layers
        self.kv_cache = kv_cache
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.model_name = model_name
        self.plan = plan
        self.max_model_len = config.max_model_len
        # the plan's chunk: the config's, or the largest the budget allows when the config leaves it unset
        self.prefill_chunk_size = plan.prefill_chunk_size if plan is not None else (config.prefill_chunk_size or 256)
        self._dtype = shared.embed.dtype
        self._clock = PhaseClock(device)
        spec = config.speculation
        self.drafter = None if draft_layers is None else TreeDrafter(
            draft_logits=self.draft_logits, topk=spec.topk, max_depth=spec.max_depth, capacity=kv_cache.capacity,
            temperature=spec.draft_temperature, dtype=shared.embed.dtype, device=device,
        )

    # ----------------------------------------------------------------------------------------- building
    @classmethod
    def from_config(cls, config: EngineConfig, *, progress: bool = True, phases: StartupLog | None = None) -> "Engine":
        """Open the target, choose the mode (resolving `auto`) and plan device memory from its config alone, then
        read its weights in one pass: the shared weights, then each decoder layer straight into its resident
        buffer or its slot of the host arena, its 4-bit substitute quantized from there. Host memory peaks at
        about the arena plus one layer plus the shared weights. Each start-up phase is reported in one line to
        `phases`."""
        log.info("engine config: %s", config_as_dict(config))
        phases = phases if phases is not None else StartupLog()
        device = resolve_device(config)
        dtype = resolve_dtype(config, device)
        with phases.phase("fetch") as phase:
            resolved = resolve_model(config.model, config.gguf_file, progress=progress, check_hub=True)
            phase.detail = resolved.describe()
        reader = open_model(config, dtype, resolved, phases)
        shape = reader.shape
        # Mode and memory plan: `choose_mode` resolves mode auto (an explicit mode is kept as asked).
        budget = device_budget(config.budget_bytes, device)
        plan_for = functools.partial(
            plan_memory, shape=shape, dtype=dtype, speculation=config.speculation,
            max_model_len=config.max_model_len, prefill_chunk_size=config.prefill_chunk_size,
            stream_slots=config.stream_slots, max_resident_layers=config.max_resident_layers,
            shared_bytes=shared_nbytes(shape, dtype), device_type=device.type,
        )
        choice = choose_mode(requested=config.mode, device_type=device.type, num_layers=shape.num_layers,
                             max_resident_layers=config.max_resident_layers, budget_bytes=budget, plan_for=plan_for)
        phases.note(choice.line())
        config = dataclasses.replace(config, mode=choice.mode)
        plan = plan_for(mode=config.mode, budget_bytes=budget)
        log.info("memory plan (%s on %s, %s):\n%s", config.mode, device, dtype, plan.table())
        return cls._build(
            config=config, shape=shape, read_shared=lambda: reader.read_shared(dtype, device),
            fill_layer=reader.fill_layer, dtype=dtype, plan=plan, tokenizer=reader.tokenizer,
            eos_token_ids=reader.eos_token_ids, device=device,
            model_name=config.served_model_name or resolved.display_name, progress=progress, phases=phases,
            source=reader.source,
        )

    @classmethod
    def from_weights(
        cls,
        *,
        config: EngineConfig,
        shape: ModelShape,
        shared: SharedWeights,
        layer_linears: list[dict[str, torch.Tensor]],
        plan: MemoryPlan,
        tokenizer: Any,
        eos_token_ids: frozenset[int],
        device: torch.device,
        model_name: str,
        progress: bool = False,
        phases: StartupLog | None = None,
    ) -> "Engine":
        """Place weights already in host memory according to `plan` (tests and benchmarks with random weights)."""
        return cls._build(
            config=config, shape=shape, read_shared=lambda: shared.to(device), fill_layer=tensors_filler(layer_linears),
            dtype=layer_linears[0]["qkv_weight"].dtype, plan=plan, tokenizer=tokenizer, eos_token_ids=eos_token_ids,
            device=device, model_name=model_name, progress=progress, phases=phases, source="memory",
        )

    @classmethod
    def _build(
        cls,
        *,
        config: EngineConfig,
        shape: ModelShape,
        read_shared: Callable[[], SharedWeights],
        fill_layer: LayerFiller,
        dtype: torch.dtype,
        plan: MemoryPlan,
        tokenizer: Any,
        eos_token_ids: frozenset[int],
        device: torch.device,
        model_name: str,
        progress: bool,
        phases: StartupLog | None,
        source: str,
    ) -> "Engine":
        """One pass over the layers: each is written once where `plan` puts it, and in mode subspec a streamed
        layer's substitute is quantized from its arena slot right away, so no second host copy exists."""
        phases = phases if phases is not None else StartupLog(emit=log.debug)
        speculative = config.mode == "subspec"
        if speculative and not plan.streamed_layers:
            log.warning("every layer is resident: the draft equals the target; mode 'resident' is faster")
        spec = config.speculation
        substitutes: dict[int, QuantizedLinears] = {}
        quantize_s = 0.0

        def quantize(layer: int, weights: dict[str, torch.Tensor]) -> None:
            nonlocal quantize_s
            started = time.perf_counter()
            substitutes[layer] = QuantizedLinears(weights, quant_type=spec.quant_type, block_size=spec.quant_block_size,
                                                  device=device)
            quantize_s += time.perf_counter() - started

        started = time.perf_counter()
        shared = read_shared()
        target_layers = place_layers(
            fill_layer=fill_layer, num_layers=shape.num_layers, layout=LayerLayout.for_shape(shape), dtype=dtype,
            resident_ids=plan.resident_layers, device=device, num_slots=config.stream_slots,
            on_streamed=quantize if speculative else None, progress=progress,
        )
        phases.record("place", time.perf_counter() - started - quantize_s,
                      f"shared weights and {shape.num_layers} layers read once from {source}: "
                      f"{len(plan.resident_layers)} resident on {device.type}, {len(plan.streamed_layers)} streamed")
        draft_layers = None
        if speculative:
            phases.record("quantize", quantize_s,
                          f"{spec.quant_type} substitutes of {len(substitutes)} streamed layers (the draft)")
            draft_layers = DraftLayers(resident=target_layers.resident, substitutes=substitutes)
        else:
            phases.skipped("quantize", f"mode {config.mode} has no draft")
        tree_slots = spec.tree_size if speculative else 1
        kv_cache = KVCache(
            num_layers=shape.num_layers, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
            capacity=kv_capacity(max_model_len=config.max_model_len, tree_slots=tree_slots), dtype=dtype, device=device,
        )
        engine = cls(
            config=config, shape=shape, shared=shared, target_layers=target_layers, draft_layers=draft_layers,
            kv_cache=kv_cache, tokenizer=tokenizer, eos_token_ids=eos_token_ids, device=device, model_name=model_name, plan=plan,
        )
        if engine.drafter is not None and config.cuda_graphs and device.type == "cuda":
            with torch.inference_mode(), phases.phase("graphs") as phase:
                graphed = engine.drafter.capture_cuda_graphs()
                phase.detail = "draft root and level steps captured" if graphed else "capture failed: eager drafting"
        return engine

    # ----------------------------------------------------------------------------------------- forwards
    def _forward(
        self, layers: LayerSource, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
        kv_length: int, bias: torch.Tensor | None,
    ) -> torch.Tensor:
        return forward_hidden(
            shape=self.shape, shared=self.shared, layers=layers, kv_cache=self.kv_cache, tokens=tokens,
            positions=positions, slots=slots, kv_length=kv_length, bias=bias,
        )

    def _target_forward(self, tokens, positions, slots, kv_length, bias, cancelled=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
        layers = self.target_layers if cancelled is None else CancellableLayers(self.target_layers, cancelled)
        try:
            return self._forward(layers, tokens, positions, slots, kv_length, bias)
        except BaseException:
            if self.target_layers.streamer is not None:
                self.target_layers.streamer.reset()  # a forward stopped mid-way leaves the ring out of step
            raise

    def _decoding_logits(self, dec: _Decoding, tokens, positions, slots, kv_length, bias) -> torch.Tensor:  # type: ignore[no-untyped-def]
        """A decoding step's target forward (verify, or the plain one-token step) and its float32 logits.

        Counts the weight bytes copied while it ran: the ring's prefetch of its first layers, issued while the
        draft ran, is not part of it.
        """
        h2d_before = self.target_layers.h2d_bytes
        hidden = self._target_forward(tokens, positions, slots, kv_length, bias, dec.cancelled)
        dec.stats.verify_h2d_bytes += self.target_layers.h2d_bytes - h2d_before
        return compute_logits(self.shape, self.shared, hidden)

    def draft_logits(self, tokens, positions, slots, bias) -> torch.Tensor:  # type: ignore[no-untyped-def]
        """The substitute draft's float32 logits for `tokens`, attending over the whole cache under the additive
        mask `bias` (rows, capacity): the static shape every draft step has (drafting.DraftLogitsFn)."""
        assert self.draft_layers is not None
        hidden = self._forward(self.draft_layers, tokens, positions, slots, self.kv_cache.capacity, bias)
        return compute_logits(self.shape, self.shared, hidden)

    def _prefill_chunks(self, token_ids: list[int], cancelled: CancelCheck | None = None,
                        reuse: int = 0) -> Iterator[torch.Tensor]:
        """Fill KV slots [reuse, n) chunk by chunk with the target, yielding each chunk's hidden states.

        Rows [0, reuse) must already hold token_ids[:reuse] (KVCache.reusable_prefix). Each chunk is recorded
        in the cache's `token_ids` once its forward has run, so an interrupted prefill leaves only whole
        chunks marked reusable.
        """
        cache = self.kv_cache
        del cache.token_ids[reuse:]
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        chunk = self.prefill_chunk_size
        for start in range(reuse, len(token_ids), chunk):
            end = min(start + chunk, len(token_ids))
            slots = torch.arange(start, end, device=self.device)
            bias = attention_bias(causal_chunk_mask(start=start, length=end - start, device=self.device), self._dtype)
            hidden = self._target_forward(ids[start:end], slots, slots, end, bias, cancelled)
            cache.token_ids.extend(token_ids[start:end])
            yield hidden

    def _prefill(self, prompt: list[int], dec: _Decoding) -> tuple[torch.Tensor, tuple[TokenLogprob, ...] | None]:
        """Prefill the prompt after the rows the cache already holds for it; logits (1, V) of its last token,
        and with `prompt_logprobs` asked for, the logprobs of prompt tokens 1..n-1 (then nothing is reused:
        every row's logits are needed; scored chunk by chunk, so the (n, V) logits never exist at once)."""
        prompt_logprobs = dec.params.prompt_logprobs
        reuse = 0 if prompt_logprobs is not None else self.kv_cache.reusable_prefix(prompt)
        dec.stats.cached_prompt_tokens = reuse
        hidden = None
        scored: list[TokenLogprob] | None = None if prompt_logprobs is None else []
        ids = torch.tensor(prompt, dtype=torch.long, device=self.device) if scored is not None else None
        start = 0
        for hidden in self._prefill_chunks(prompt, dec.cancelled, reuse):
            end = start + hidden.shape[0]
            if scored is not None and start < len(prompt) - 1:
                # row i (position start + i) predicts prompt token start + i + 1; the last row predicts output
                rows = min(end, len(prompt) - 1) - start
                for first in range(0, rows, PROMPT_SCORE_ROWS):
                    last = min(first + PROMPT_SCORE_ROWS, rows)
                    logits = compute_logits(self.shape, self.shared, hidden[first:last])
                    scored.extend(token_logprobs(logits=logits, tokens=ids[start + 1 + first : start + 1 + last],
                                                 num_top=prompt_logprobs))
            start = end
        assert hidden is not None
        return compute_logits(self.shape, self.shared, hidden[-1:]), None if scored is None else tuple(scored)

    def close(self) -> None:
        """Release what dropping the engine would not: the page-locked registration of the host arena."""
        self.target_layers.close()

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Target logits (n, V) float32 at every position of `token_ids`, computed by chunked prefill.

        For scoring, tests and benchmarks; it overwrites the KV cache like any request.
        """
        with torch.inference_mode():
            return torch.cat([compute_logits(self.shape, self.shared, h) for h in self._prefill_chunks(token_ids)])

    # ----------------------------------------------------------------------------------------- steps
    def _commit(self, root: int, step: _Step) -> None:
        """Record the rows a decoding step committed: the root's (the last token before the step) and the
        accepted drafted tokens'; the step's last token (the bonus) is the next root, not in the cache yet."""
        self.kv_cache.token_ids.append(root)
        self.kv_cache.token_ids.extend(step.tokens[:-1])

    def _plain_step(self, cursor: _Cursor, committed: int, dec: _Decoding) -> _Step:
        """One target forward over the last token: the baseline's decoding step (vanilla and resident)."""
        start = self._clock.mark()
        logits = self._decoding_logits(dec, cursor.root, cursor.length, cursor.length, committed + 1, None)
        token = choose_tokens(
            logits=logits, params=dec.params, seed=dec.seed, positions=cursor.length + 1, first_position=committed + 1,
            num_positions=1,
        )
        cursor.root.copy_(token)
        cursor.length.add_(1)
        end = self._clock.mark()
        values = token.tolist()  # the step's one host sync
        dec.stats.verify_s += self._clock.seconds(start, end)
        dec.stats.iterations += 1
        return _Step(values, 0, _step_logprobs(dec, logits, token))

    def _speculative_step(self, cursor: _Cursor, committed: int, depth: int, dec: _Decoding) -> _Step:
        """Draft a tree, verify it in one target forward, keep the accepted rows."""
        assert self.drafter is not None
        spec = self.config.speculation
        n = committed
        draft_start = self._clock.mark()
        tree = self.drafter.grow(root_token=cursor.root, prefix_length=cursor.length, depth=depth, cancelled=dec.cancelled)
        verify_start = self._clock.mark()
        if spec.verify_size < tree.size:
            tree = subtree(tree, select_verify_nodes(scores=tree.scores, budget=spec.verify_size))
        size = tree.size
        slots = n + torch.arange(size, device=self.device)
        positions = n + tree.depths
        bias = attention_bias(tree_attention_mask(ancestors=tree.ancestors, prefix_length=n), self._dtype)
        logits = self._decoding_logits(dec, tree.tokens, positions, slots, n + size, bias)  # (size, V)
        target_tokens = choose_tokens(
            logits=logits, params=dec.params, seed=dec.seed, positions=positions + 1, first_position=n + 1, num_positions=depth + 1
        )
        path = accepted_path(
            tokens=tree.tokens, parents=tree.parents, depths=tree.depths, ancestors=tree.ancestors,
            target_tokens=target_tokens, max_length=depth + 1,
        )
        self.kv_cache.compact(dest_start=n, source_slots=n + path.nodes)  # the root's and accepted nodes' rows first
        emitted = emitted_tokens(path=path, target_tokens=target_tokens)  # (depth + 1,) padded
        cursor.length.add_(path.length)
        cursor.root.copy_(emitted.index_select(0, path.length - 1))  # the bonus token is the next root
        verify_end = self._clock.mark()
        read = torch.cat([path.length, emitted]).tolist()  # the iteration's one host sync: length + tokens
        values = read[1 : 1 + read[0]]
        dec.stats.draft_s += self._clock.seconds(draft_start, verify_start)
        dec.stats.verify_s += self._clock.seconds(verify_start, verify_end)
        dec.stats.iterations += 1
        dec.stats.drafted_tokens += size - 1
        dec.stats.accepted_tokens += len(values) - 1
        # each emitted token was chosen by the verify logits row of its path node (the bonus: the last one's);
        # asked-for logprobs cost a second read, requests without them keep the one
        nodes = path.nodes[: len(values)]
        return _Step(values, size - 1, _step_logprobs(dec, logits.index_select(0, nodes), emitted[: len(values)]))

    def _emit(self, dec: _Decoding, step: _Step, *, accept_length: int | None) -> TokenEvent:
        """Apply EOS, max_tokens and stop strings to newly chosen tokens, in order, and make their event."""
        new_tokens = step.tokens
        kept: list[int] = []
        finish = None
        for token in new_tokens:
            if token in dec.eos:
                finish = FINISH_STOP
                break
            kept.append(token)
            if dec.stats.completion_tokens + len(kept) >= dec.budget:
                finish = FINISH_LENGTH
                break
        delta = dec.detokenizer.add(kept)
        text = delta.text
        if delta.stopped:
            kept, finish = kept[: delta.kept_tokens], FINISH_STOP
        elif finish is not None:
            text += dec.detokenizer.flush()
        dec.stats.completion_tokens += len(kept)
        return TokenEvent(
            request_id=dec.request_id, token_ids=tuple(kept), text=text, accept_length=accept_length,
            drafted_tokens=step.drafted, finish_reason=finish, stats=dec.stats if finish else None,
            logprobs=None if step.logprobs is None else step.logprobs[: len(kept)],
        )

    # ----------------------------------------------------------------------------------------- the loop
    def validate(self, request: GenerationRequest) -> None:
        """Reject a request the engine cannot serve, before any work (ValueError with a client-facing message)."""
        prompt_len = len(request.prompt_token_ids)
        if prompt_len == 0:
            raise ValueError("the prompt is empty")
        if prompt_len >= self.max_model_len:
            raise ValueError(
                f"the prompt has {prompt_len} tokens; this model's context is {self.max_model_len} tokens "
                "(prompt plus at least one generated token must fit)"
            )
        vocab = self.shape.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")

    def generate(self, request: GenerationRequest, *, cancelled: CancelCheck | None = None) -> Iterator[TokenEvent]:
        """Generate for one request; yields an event per target forward, the last one with finish_reason and stats.

        Closing the generator between events aborts the request; nothing needs cleaning up, since the next
        request overwrites the KV cache from slot 0. `cancelled` stops it inside a step: it is asked between
        draft levels and before each decoder layer of a target forward, and once it returns True the
        generator returns (without a final event) within one level or one layer.
        """
        try:
            yield from self._events(request, cancelled)
        except GenerationCancelled:
            log.info("request %s cancelled inside an engine step", request.request_id)

    def _events(self, request: GenerationRequest, cancelled: CancelCheck | None) -> Iterator[TokenEvent]:
        self.validate(request)
        prompt = list(request.prompt_token_ids)
        params = request.sampling
        dec = _Decoding(
            request_id=request.request_id,
            params=params,
            seed=self.config.seed if params.seed is None else params.seed,
            budget=min(params.max_tokens, self.max_model_len - len(prompt)),
            eos=frozenset() if params.ignore_eos else self.eos_token_ids,
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_token_ids=prompt, stop=params.stop),
            stats=RequestStats(prompt_tokens=len(prompt)),
            cancelled=cancelled,
        )
        speculative = self.draft_layers is not None
        h2d_start = self.target_layers.h2d_bytes
        with torch.inference_mode():
            started = time.perf_counter()
            logits, prompt_logprobs = self._prefill(prompt, dec)
            length = torch.full((1,), len(prompt), dtype=torch.long, device=self.device)
            first = choose_tokens(
                logits=logits, params=params, seed=dec.seed, positions=length, first_position=len(prompt), num_positions=1
            )
            cursor = _Cursor(length=length, root=first)
            step = _Step(first.tolist(), 0, _step_logprobs(dec, logits, first))
            dec.stats.prefill_s = time.perf_counter() - started
            committed = len(prompt)  # KV rows written; the last chosen token is not in the cache yet
            if dec.budget == 0:  # scoring only: the prompt's logprobs, no output token
                event = TokenEvent(request_id=dec.request_id, token_ids=(), text="", finish_reason=FINISH_LENGTH,
                                   stats=dec.stats)
            else:
                event = self._emit(dec, step, accept_length=None)
            event = replace(event, prompt_logprobs=prompt_logprobs)
            while True:
                dec.stats.h2d_bytes = self.target_layers.h2d_bytes - h2d_start
                yield event
                if event.finished:
                    return
                remaining = dec.budget - dec.stats.completion_tokens
                if speculative and remaining > 1:
                    # a tree deeper than the tokens still allowed would only draft what gets cut
                    depth = min(self.config.speculation.max_depth, remaining - 1)
                    next_step = self._speculative_step(cursor, committed, depth, dec)
                else:
                    next_step = self._plain_step(cursor, committed, dec)
                self._commit(step.tokens[-1], next_step)
                step = next_step
                committed += len(step.tokens)
                event = self._emit(dec, step, accept_length=len(step.tokens))
