"""Decoding: the generation loop, written once as a generator of token events (build.py builds the engine).

One iteration of `subspec` mode is three calls: draft a tree with the substitute (`TreeDrafter.grow`), verify
it with one streamed target forward (`verify_logits`), commit the accepted path (`accepted_path`, then the KV
compaction). `vanilla` and `resident` run the same loop with the plain one-token forward (`step_logits`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch.nn.attention import SDPBackend

from subspec_core.attention import AttentionBackends, attention_kernel
from subspec_core.cancel import CancelCheck, CancellableLayers, GenerationCancelled
from subspec_core.config import EngineConfig
from subspec_core.constrained import TreeMasks, bitmask_to_bool, end_token_mask, mask_logits
from subspec_core.detokenize import IncrementalDetokenizer
from subspec_core.drafting import TreeDrafter
from subspec_core.grammar import Grammars, GrammarState
from subspec_core.hardware import DeviceInfo
from subspec_core.kv_cache import KVCache
from subspec_core.model import (
    LayerSource, SequenceRows, attention_bias, compute_logits, forward_hidden, forward_hidden_batched,
)
from subspec_core.copies import WhileWaiting
from subspec_core.offload import OverlappedLayers, TargetLayers
from subspec_core.planner import MemoryPlan
from subspec_core.postspec import PlannedTree, PostSpeculation
from subspec_core.quant import DraftLayers
from subspec_core.sampling import PROMPT_SCORE_ROWS, choose_tokens, token_logprobs
from subspec_core.step_graphs import StepGraphs
from subspec_core.stopwatch import Stopwatch
from subspec_core.tree import TokenTree, causal_chunk_mask, select_verify_nodes, subtree, tree_attention_mask
from subspec_core.types import (
    FINISH_LENGTH, FINISH_STOP, GenerationRequest, RequestStats, SamplingParams, TokenEvent, TokenLogprob,
)
from subspec_core.verify import AcceptedPath, accepted_path, emitted_tokens

if TYPE_CHECKING:  # batch.py imports this module
    from subspec_core.batch import BatchDecoder
from subspec_core.weights import ModelShape, SharedWeights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """What build.py hands the engine: the weights where `plan` put them, the KV cache, the tokenizer's side."""

    shape: ModelShape
    shared: SharedWeights
    target_layers: TargetLayers
    draft_layers: DraftLayers | None  # mode subspec only
    kv_cache: KVCache
    plan: MemoryPlan
    device: torch.device
    hardware: DeviceInfo
    tokenizer: Any
    eos_token_ids: frozenset[int]
    model_name: str
    # every sequence's KV region (kv_cache.kv_regions), kv_cache the first; empty: kv_cache alone (max_num_seqs 1)
    kv_regions: tuple[KVCache, ...] = ()


def _request_seed(requested: int | None, configured: int | None) -> int:
    """A request's own seed, else the operator's (`EngineConfig.seed`), else a fresh one: unseeded sampling is
    not repeatable (OpenAI's semantics). Greedy decoding never reads it."""
    if requested is not None:
        return requested
    return configured if configured is not None else secrets.randbits(63)


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
    cancelled: CancelCheck | None = None
    grammar: GrammarState | None = None  # a structured output's state: every emitted token consumed


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
    """Where decoding stands, on the device, so a step starts before the host has read the last one (the host
    keeps its own count of committed rows, learnt from each step's one read)."""

    length: torch.Tensor  # (1,) long: committed KV rows N
    root: torch.Tensor  # (1,) long: the last chosen token, not yet in the KV cache


class Engine:
    """A loaded model ready to generate, one request at a time (batch size 1, as in the paper)."""

    def __init__(self, config: EngineConfig, model: LoadedModel) -> None:
        self.config = config
        self.shape = model.shape
        self.shared = model.shared
        self.target_layers = model.target_layers
        self.draft_layers = model.draft_layers
        self.kv_cache = model.kv_cache  # region 0: the one `generate` decodes in
        self.kv_regions = model.kv_regions or (model.kv_cache,)
        self.plan = model.plan
        self.device = model.device
        self.hardware = model.hardware
        self.tokenizer = model.tokenizer
        self.eos_token_ids = model.eos_token_ids
        self.model_name = model.model_name
        self.max_model_len = config.max_model_len
        self.prefill_chunk_size = model.plan.prefill_chunk_size
        self._dtype = model.shared.embed.dtype
        self._clock = Stopwatch(model.device)
        self.attention = AttentionBackends.choose(device_type=model.device.type, dtype=self._dtype,
                                                  head_dim=model.shape.head_dim, capability=model.hardware.capability)
        spec = config.speculation
        # a drafter per KV region (its buffers and masks are one sequence's); region 0's is the one `generate` uses
        self.drafters: tuple[TreeDrafter, ...] = () if model.draft_layers is None else tuple(
            TreeDrafter(
                draft_logits=functools.partial(self.draft_logits, cache=region), topk=spec.topk,
                max_depth=spec.max_depth, capacity=region.capacity, temperature=spec.draft_temperature,
                dtype=self._dtype, device=model.device, max_levels=spec.draft_levels,
            )
            for region in self.kv_regions
        )
        self.drafter = self.drafters[0] if self.drafters else None
        self.postspec = None
        self.step_graphs: StepGraphs | None = None  # set by build.py where the one-token step is captured
        for region, drafter in zip(self.kv_regions, self.drafters):
            region.keep_views(drafter.bucket_lengths)
        if self.drafter is not None:
            if spec.post_levels:
                self.postspec = PostSpeculation(
                    drafter=self.drafter, levels=spec.post_levels, verify_size=spec.verify_size, device=model.device,
                    kv_move=lambda dest, slots: self.kv_cache.compact(dest_start=dest, source_slots=slots))
        self._grammars: Grammars | None = None  # made for the first constrained request (~0.3 s)
        self._end_mask = end_token_mask(sorted(self.eos_token_ids), model.shape.vocab_size, model.device)

    def _grammar_state(self, params: SamplingParams) -> GrammarState | None:
        if params.constraint is None:
            return None
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, sorted(self.eos_token_ids))
        return self._grammars.state(params.constraint)

    def _allowed_now(self, dec: _Decoding, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (1, V) masked by what a constrained request's grammar allows next (unchanged otherwise)."""
        if dec.grammar is None:
            return logits
        started = time.perf_counter()
        allowed = bitmask_to_bool(dec.grammar.allowed()[None], logits.shape[-1], device=self.device,
                                  end_mask=self._end_mask)
        dec.stats.grammar_s += time.perf_counter() - started
        return mask_logits(logits, allowed)

    def _tree_masks(self, dec: _Decoding) -> TreeMasks | None:
        """A constrained request's masks for the tree it drafts next (its guide, then its verify rows); None
        otherwise."""
        if dec.grammar is None:
            return None
        return TreeMasks(dec.grammar, vocab_size=self.shape.vocab_size, device=self.device, end_mask=self._end_mask)

    @staticmethod
    def _allowed_on_tree(dec: _Decoding, logits: torch.Tensor, masks: TreeMasks | None,
                         kept: torch.Tensor | None) -> torch.Tensor:
        """Verify `logits` (size, V) masked row by row by what the grammar allows after that row's path (`kept`:
        the grown nodes the verified tree kept; None: all), in place; unchanged without masks."""
        if masks is None:
            return logits
        masked = mask_logits(logits, masks.rows(kept))
        dec.stats.grammar_s += masks.host_s  # the tree's mask work, its verify rows' included
        return masked

    def close(self) -> None:
        """Wait for in-flight weight copies, then free the streaming ring and unregister the page-locked host
        arena (idempotent; an engine dropped without it is torn down in the same order, offload.release_ring)."""
        self.target_layers.close()

    # ----------------------------------------------------------------------------------------- forwards
    def _forward(
        self, layers: LayerSource, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
        kv_length: int, bias: torch.Tensor | None, backend: SDPBackend | None, cache: KVCache | None = None,
    ) -> torch.Tensor:
        with attention_kernel(backend):  # entered once per forward (~10 us), not per layer
            return forward_hidden(
                shape=self.shape, shared=self.shared, layers=layers, kv_cache=cache or self.kv_cache, tokens=tokens,
                positions=positions, slots=slots, kv_length=kv_length, bias=bias,
            )

    def _target_forward(self, tokens, positions, slots, kv_length, bias, backend, cancelled=None,  # type: ignore[no-untyped-def]
                        while_waiting: WhileWaiting | None = None, cache: KVCache | None = None) -> torch.Tensor:
        return self._with_target_layers(
            lambda layers: self._forward(layers, tokens, positions, slots, kv_length, bias, backend, cache),
            cancelled, while_waiting)

    def target_hidden_batched(self, tokens: torch.Tensor, positions: torch.Tensor, sequences: tuple[SequenceRows, ...],
                              *, backend: SDPBackend | None, stop: CancelCheck | None = None) -> torch.Tensor:
        """One streamed target forward over the rows of several sequences (model.forward_hidden_batched): every
        streamed layer is copied once for all of them; the hidden states (rows, hidden), whose logits the caller
        computes a sequence at a time (lm_head is resident: (rows, V) logits of every tree at once would cost the
        memory of B trees for nothing). `stop` is the batch's own check before each layer (a shutdown; a worker's
        heartbeat hook), never one request's: an abort must not stop the others' forward."""
        return self._with_target_layers(lambda layers: self._forward_batched(layers, tokens, positions, sequences,
                                                                             backend), stop)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head over hidden states (rows, hidden): float32 logits (rows, V)."""
        return compute_logits(self.shape, self.shared, hidden)

    def draft_forward_batched(self, tokens: torch.Tensor, positions: torch.Tensor,
                              sequences: tuple[SequenceRows, ...]) -> torch.Tensor:
        """The substitute draft's float32 logits over the rows of several sequences (batch_drafting.BatchedDraftFn)."""
        assert self.draft_layers is not None
        hidden = self._forward_batched(self.draft_layers, tokens, positions, sequences, self.attention.draft_level)
        return compute_logits(self.shape, self.shared, hidden)

    def _forward_batched(self, layers: LayerSource, tokens: torch.Tensor, positions: torch.Tensor,
                         sequences: tuple[SequenceRows, ...], backend: SDPBackend | None) -> torch.Tensor:
        with attention_kernel(backend):
            return forward_hidden_batched(shape=self.shape, shared=self.shared, layers=layers, tokens=tokens,
                                          positions=positions, sequences=sequences)

    def _with_target_layers(self, run: Callable[[LayerSource], torch.Tensor], cancelled: CancelCheck | None,
                            while_waiting: WhileWaiting | None = None) -> torch.Tensor:
        """`run(layers)`: one target forward over the target's layers, with the cancel checks and wait hook asked
        for; a forward stopped mid-way resets the ring, which it leaves out of step."""
        layers: LayerSource = self.target_layers
        if while_waiting is not None:
            layers = OverlappedLayers(self.target_layers, while_waiting)
        if cancelled is not None:
            layers = CancellableLayers(layers, cancelled)
        try:
            return run(layers)
        except BaseException:
            if self.target_layers.streamer is not None:
                self.target_layers.streamer.reset()
            raise

    def step_logits(self, token: torch.Tensor, position: torch.Tensor, *, prefix_length: int,
                    cancelled: CancelCheck | None = None) -> torch.Tensor:
        """The plain decoding forward: `token` (1,) at slot and position N, seeing slots [0, N]; float32 logits (1, V).
        N comes twice: `position` (1,) on the device, read without a host-to-device copy, and `prefix_length`.
        Replays the captured one-token graphs where there are some (step_graphs.py)."""
        graphs = self.step_graphs
        if graphs is not None and graphs.captured:
            hidden = self._with_target_layers(lambda layers: graphs.forward(
                token=token, position=position, prefix_length=prefix_length, layers=layers), cancelled)
        else:
            hidden = self._target_forward(token, position, position, prefix_length + 1, None,
                                          self.attention.one_token_step, cancelled)
        return compute_logits(self.shape, self.shared, hidden)

    def verify_logits(self, tree: TokenTree, *, prefix_length: int, slot_base: int | None = None,
                      cancelled: CancelCheck | None = None, while_waiting: WhileWaiting | None = None) -> torch.Tensor:
        """The verification forward: node j at slot B + j (B = slot_base, default N) and position N + depth(j),
        seeing the prefix [0, N) and its own ancestors; float32 logits (size, V). `while_waiting` runs while a
        streamed layer's copy is in flight (post-speculation)."""
        n = prefix_length
        base = n if slot_base is None else slot_base
        slots = base + torch.arange(tree.size, device=self.device)
        mask = tree_attention_mask(ancestors=tree.ancestors, prefix_length=n, gap=base - n)
        hidden = self._target_forward(tree.tokens, n + tree.depths, slots, base + tree.size,
                                      attention_bias(mask, self._dtype), self.attention.verify_tree, cancelled,
                                      while_waiting)
        return compute_logits(self.shape, self.shared, hidden)

    def draft_logits(self, tokens, positions, slots, bias,  # type: ignore[no-untyped-def]
                     cache: KVCache | None = None) -> torch.Tensor:
        """The substitute draft's float32 logits for `tokens`, attending over cache slots [0, L) of `cache` (default
        region 0) under the additive mask `bias` (rows, L), L a draft bucket's length (drafting.DraftLogitsFn)."""
        assert self.draft_layers is not None
        # root and level steps are both masked: one kernel (attention.draft_root == draft_level)
        hidden = self._forward(self.draft_layers, tokens, positions, slots, bias.shape[1], bias,
                               self.attention.draft_level, cache)
        return compute_logits(self.shape, self.shared, hidden)

    def _prefill_chunks(self, token_ids: list[int], cancelled: CancelCheck | None = None,
                        reuse: int = 0, cache: KVCache | None = None) -> Iterator[torch.Tensor]:
        """Fill KV slots [reuse, n) of `cache` (default region 0) chunk by chunk with the target, yielding each
        chunk's hidden states.

        Rows [0, reuse) must already hold token_ids[:reuse] (KVCache.reusable_prefix). A chunk is recorded in the
        cache's `token_ids` once its forward has run, so an interrupted prefill leaves only whole chunks reusable.
        """
        cache = cache or self.kv_cache
        del cache.token_ids[reuse:]
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        chunk = self.prefill_chunk_size
        for start in range(reuse, len(token_ids), chunk):
            end = min(start + chunk, len(token_ids))
            slots = torch.arange(start, end, device=self.device)
            bias = attention_bias(causal_chunk_mask(start=start, length=end - start, device=self.device), self._dtype)
            hidden = self._target_forward(ids[start:end], slots, slots, end, bias, self.attention.prefill_chunk,
                                          cancelled, cache=cache)
            cache.token_ids.extend(token_ids[start:end])
            yield hidden

    def _prefill(self, prompt: list[int], dec: _Decoding,
                 cache: KVCache | None = None) -> tuple[torch.Tensor, tuple[TokenLogprob, ...] | None]:
        """Prefill the prompt after the rows the cache already holds for it; logits (1, V) of its last token,
        and with `prompt_logprobs` asked for, the logprobs of prompt tokens 1..n-1 (then nothing is reused:
        every row's logits are needed; scored chunk by chunk, so the (n, V) logits never exist at once)."""
        prompt_logprobs = dec.params.prompt_logprobs
        cache = cache or self.kv_cache
        reuse = 0 if prompt_logprobs is not None else cache.reusable_prefix(prompt)
        dec.stats.cached_prompt_tokens = reuse
        hidden = None
        scored: list[TokenLogprob] | None = None if prompt_logprobs is None else []
        ids = torch.tensor(prompt, dtype=torch.long, device=self.device) if scored is not None else None
        start = 0
        for hidden in self._prefill_chunks(prompt, dec.cancelled, reuse, cache):
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

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Target logits (n, V) float32 at every position of `token_ids`, by chunked prefill (it overwrites the
        KV cache like any request)."""
        with torch.inference_mode():
            return torch.cat([compute_logits(self.shape, self.shared, h) for h in self._prefill_chunks(token_ids)])

    # ----------------------------------------------------------------------------------------- steps
    def _commit(self, root: int, step: _Step, cache: KVCache | None = None) -> None:
        """Record the rows a decoding step committed: the root's (the last token before the step) and the
        accepted drafted tokens'; the step's last token (the bonus) is the next root, not in the cache yet."""
        cache = cache or self.kv_cache
        cache.token_ids.append(root)
        cache.token_ids.extend(step.tokens[:-1])

    def _plain_step(self, cursor: _Cursor, committed: int, dec: _Decoding) -> _Step:
        """One target forward over the last token: the baseline's decoding step (vanilla and resident)."""
        start = self._clock.mark()
        h2d = self.target_layers.h2d_bytes
        logits = self.step_logits(cursor.root, cursor.length, prefix_length=committed, cancelled=dec.cancelled)
        dec.stats.verify_h2d_bytes += self.target_layers.h2d_bytes - h2d
        token = choose_tokens(
            logits=self._allowed_now(dec, logits), params=dec.params, seed=dec.seed, positions=cursor.length + 1,
            first_position=committed + 1, num_positions=1,
        )
        cursor.root.copy_(token)
        cursor.length.add_(1)
        end = self._clock.mark()
        values = token.tolist()  # the step's one host sync
        dec.stats.verify_s += self._clock.seconds(start, end)
        dec.stats.iterations += 1
        return _Step(values, 0, _step_logprobs(dec, logits, token))

    def _plan_tree(self, cursor: _Cursor, committed: int, depth: int,
                   dec: _Decoding) -> tuple[PlannedTree, TreeMasks | None]:
        """The tree this iteration verifies: post-speculation's (chained or fresh), else a fresh grow pruned
        to max_verify_tokens, verified in place of its draft rows. A constrained request's tree is grown with
        its candidates restricted level by level to what the grammar allows after their path, never chained
        (an extension would need the grammar too); its masks come with it."""
        assert self.drafter is not None
        masks = self._tree_masks(dec)
        if masks is not None:
            tree = self.drafter.grow_guided(root_token=cursor.root, prefix_length=cursor.length, committed=committed,
                                            depth=depth, guide=masks, cancelled=dec.cancelled)
        elif self.postspec is not None:
            limit = dec.budget - dec.stats.completion_tokens - 1  # a tree deeper than the tokens allowed
            return self.postspec.plan(root=cursor.root, length=cursor.length, committed=committed, depth=depth,
                                      limit=limit, cancelled=dec.cancelled), None
        else:
            tree = self.drafter.grow(root_token=cursor.root, prefix_length=cursor.length, committed=committed,
                                     depth=depth, cancelled=dec.cancelled)
        kept = None
        if self.config.speculation.verify_size < tree.size:
            kept = select_verify_nodes(scores=tree.scores, budget=self.config.speculation.verify_size)
            tree = subtree(tree, kept)
        return PlannedTree(tree=tree, kept=kept, depth=depth, verify_base=committed, chained=False, extend=0), masks

    def _speculative_step(self, cursor: _Cursor, committed: int, depth: int, dec: _Decoding) -> _Step:
        """Draft a tree (or take the one post-speculation chained), verify it in one target forward, keep the
        accepted rows."""
        n = committed
        draft_start = self._clock.mark()
        planned, masks = self._plan_tree(cursor, committed, depth, dec)
        tree, depth = planned.tree, planned.depth
        verify_start = self._clock.mark()
        size = tree.size
        # weight bytes copied during the verify itself: the ring's prefetch, issued while the draft ran, is not
        h2d = self.target_layers.h2d_bytes
        overlap = (contextlib.nullcontext() if self.postspec is None
                   else self.postspec.overlapping(planned, dec.cancelled))
        with overlap as while_waiting:
            logits = self.verify_logits(tree, prefix_length=n, slot_base=planned.verify_base, cancelled=dec.cancelled,
                                        while_waiting=while_waiting)  # (size, V)
        dec.stats.verify_h2d_bytes += self.target_layers.h2d_bytes - h2d
        choosing = self._allowed_on_tree(dec, logits, masks, planned.kept)  # row i: after i's path
        path, emitted = self._accept(tree=tree, logits=choosing, committed=n, depth=depth,
                                     verify_base=planned.verify_base, cursor=cursor, dec=dec)
        chain = None if self.postspec is None else self.postspec.candidates(planned, path=path, emitted=emitted)
        verify_end = self._clock.mark()
        # the iteration's one host sync: length + tokens (+ post-speculation's chain candidates)
        read = torch.cat([path.length, emitted, *([] if chain is None else [chain])]).tolist()
        values = read[1 : 1 + read[0]]
        if self.postspec is not None:
            node, live, deepest = read[-3:]
            self.postspec.settle(node=node, live=live, deepest=deepest, committed=n + len(values))
        dec.stats.draft_s += self._clock.seconds(draft_start, verify_start)
        dec.stats.verify_s += self._clock.seconds(verify_start, verify_end)
        dec.stats.iterations += 1
        dec.stats.chained_iterations += planned.chained
        dec.stats.drafted_tokens += size - 1
        dec.stats.accepted_tokens += len(values) - 1
        # each emitted token was chosen by the verify row of its path node (the bonus: the last one's);
        # asked-for logprobs cost a second read, requests without them keep the one
        nodes = path.nodes[: len(values)]
        return _Step(values, size - 1, _step_logprobs(dec, logits.index_select(0, nodes), emitted[: len(values)]))

    def _accept(self, *, tree: TokenTree, logits: torch.Tensor, committed: int, depth: int, verify_base: int,
                cursor: _Cursor, dec: _Decoding, cache: KVCache | None = None) -> tuple[AcceptedPath, torch.Tensor]:
        """After a verify: the target's choice at every node (row i of `logits` (size, V): after i's path), the
        accepted path, its KV rows moved to [N, N + length) of `cache` and the cursor advanced past it, all on
        the device; the path and the tokens it emits, (depth + 1,) padded (emitted_tokens)."""
        n = committed
        target_tokens = choose_tokens(
            logits=logits, params=dec.params, seed=dec.seed, positions=tree.depths + (n + 1), first_position=n + 1,
            num_positions=depth + 1,
        )
        path = accepted_path(
            tokens=tree.tokens, parents=tree.parents, depths=tree.depths, ancestors=tree.ancestors,
            target_tokens=target_tokens, max_length=depth + 1,
        )
        # the root's and accepted nodes' rows first
        (cache or self.kv_cache).compact(dest_start=n, source_slots=verify_base + path.nodes)
        emitted = emitted_tokens(path=path, target_tokens=target_tokens)  # (depth + 1,) padded
        cursor.length.add_(path.length)
        cursor.root.copy_(emitted.index_select(0, path.length - 1))  # the bonus token is the next root
        return path, emitted

    def _emit(self, dec: _Decoding, step: _Step, *, accept_length: int | None) -> TokenEvent:
        """Advance a constrained request's grammar past newly chosen tokens, apply EOS, max_tokens and stop
        strings to them, in order, and make their event."""
        if dec.grammar is not None:
            dec.grammar.consume(step.tokens)
        kept: list[int] = []
        finish = None
        for token in step.tokens:
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
    def batch_decoder(self) -> BatchDecoder | None:
        """A BatchDecoder over this engine when it decodes several sequences together (max_num_seqs > 1), else
        None. Post-speculation keeps one request at a time (Engine.generate), so it gives None too."""
        if len(self.kv_regions) <= 1 or self.postspec is not None:
            return None
        from subspec_core.batch import BatchDecoder  # batch.py builds on this module

        return BatchDecoder(self)

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
        """Generate for one request: an event per target forward, the last with finish_reason and stats.

        Closing the generator between events aborts (the next request overwrites the KV cache from slot 0).
        `cancelled` is asked between draft levels and before each decoder layer of a target forward; once it
        returns True the generator returns, without a final event, within one level or one layer.
        """
        try:
            yield from self._events(request, cancelled)
        except GenerationCancelled:
            log.info("request %s cancelled inside an engine step", request.request_id)
        finally:  # however it ends (finished, cancelled, closed between events, failed)
            if self.postspec is not None:
                self.postspec.abandon()  # no draft work outlives the request

    def _decoding(self, request: GenerationRequest, cancelled: CancelCheck | None) -> _Decoding:
        """A validated request's decoding state (its grammar's too, for a structured output)."""
        self.validate(request)
        prompt = list(request.prompt_token_ids)
        params = request.sampling
        return _Decoding(
            request_id=request.request_id,
            params=params,
            seed=_request_seed(params.seed, self.config.seed),
            budget=min(params.max_tokens, self.max_model_len - len(prompt)),
            eos=frozenset() if params.ignore_eos else self.eos_token_ids,
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_token_ids=prompt, stop=params.stop),
            stats=RequestStats(prompt_tokens=len(prompt)),
            cancelled=cancelled,
            grammar=self._grammar_state(params),
        )

    def _first_step(self, dec: _Decoding, logits: torch.Tensor, prompt_length: int) -> tuple[_Cursor, _Step]:
        """The first token, chosen from the prompt's last logits (1, V): the cursor after the prompt, and the step."""
        length = torch.full((1,), prompt_length, dtype=torch.long, device=self.device)
        first = choose_tokens(
            logits=self._allowed_now(dec, logits), params=dec.params, seed=dec.seed, positions=length,
            first_position=prompt_length, num_positions=1,
        )
        return _Cursor(length=length, root=first), _Step(first.tolist(), 0, _step_logprobs(dec, logits, first))

    def _first_event(self, dec: _Decoding, step: _Step) -> TokenEvent:
        """The first step's event; with no output token allowed (scoring only: the prompt's logprobs), an empty
        finished one."""
        if dec.budget == 0:
            return TokenEvent(request_id=dec.request_id, token_ids=(), text="", finish_reason=FINISH_LENGTH,
                              stats=dec.stats)
        return self._emit(dec, step, accept_length=None)

    def _events(self, request: GenerationRequest, cancelled: CancelCheck | None) -> Iterator[TokenEvent]:
        dec = self._decoding(request, cancelled)
        prompt = list(request.prompt_token_ids)
        speculative = self.draft_layers is not None
        h2d_start = self.target_layers.h2d_bytes
        with torch.inference_mode():
            started = time.perf_counter()
            logits, prompt_logprobs = self._prefill(prompt, dec)
            cursor, step = self._first_step(dec, logits, len(prompt))
            dec.stats.prefill_s = time.perf_counter() - started
            committed = len(prompt)  # KV rows written; the last chosen token is not in the cache yet
            event = replace(self._first_event(dec, step), prompt_logprobs=prompt_logprobs)
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
