"""Several requests decoded together: one streamed target forward per iteration serves every active sequence.

In the offload regime a target forward costs the weight stream, nearly whatever rows it carries, so verifying the
trees of B requests in one forward pays the stream once for B of them. An iteration is the single-sequence loop's
three calls, each over the batch: draft every sequence's tree with one draft forward per level
(batch_drafting.grow_batched; on CUDA each level replayed as a graph captured per batch composition,
batch_graphs.py), verify all trees with one target forward (model.forward_hidden_batched: the
linears over every row, attention per sequence within its own KV region), then accept, commit and emit per
sequence with its own sampling parameters and seed. Vanilla and resident: one forward over every last token.

Requests join at iteration boundaries into a free KV region: `admit` prefills the prompt a chunk per iteration
inside the batch's own forwards (a prompt no longer costs everyone an extra pass over the weights), `join` in
forwards of its own before returning the first event (prompt logprobs need it). They leave when they finish, are
cancelled or dropped (`leave`). No one else's tokens change: each sequence decodes what it would alone (its own
region and position-keyed sampling; rows computed beside other rows may round differently in the last bit, which
flips only a float32 near-tie, see agreement.py). batch_rows.py builds each participant's rows.

A structured output (a constraint) is a member like any other: its first token and each verified row are masked
by its own grammar state, its tree is grown guided (its levels chosen among what the grammar allows) within the
shared draft forwards, and the tokens it commits advance its grammar (Engine's own pieces: `_first_step`,
`_tree_masks`, `_allowed_on_tree`, `_emit`). The others' rows are never masked.

Restriction for now: post-speculation (post_levels > 0) keeps its single-sequence path, Engine.generate. A
BatchDecoder decodes in every region, region 0 included, which Engine.generate also uses: drive an engine through
one or the other at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from subspec_core.batch_drafting import DraftRequest, grow_batched
from subspec_core.batch_graphs import BatchGraphs
from subspec_core.cancel import CancelCheck
from subspec_core.constrained import TreeMasks
from subspec_core.engine import Engine, _Cursor, _Decoding, _Step, _step_logprobs
from subspec_core.batch_rows import ForwardRows, concatenate, prefill_rows, root_only_tree, token_rows, tree_rows
from subspec_core.kv_cache import KVCache
from subspec_core.model import SequenceRows
from subspec_core.sampling import choose_tokens
from subspec_core.tree import TokenTree, select_verify_nodes, subtree
from subspec_core.types import GenerationRequest, TokenEvent


@dataclass
class _Sequence:
    """One request in the batch: its KV region, decoding state, cursor and host count of committed rows; while its
    prompt is prefilled chunk by chunk inside the batch's forwards (`admit`), the prompt and the rows done."""

    region: int
    dec: _Decoding
    prompt: list[int]
    started: float  # when it was admitted (perf_counter): its first token's wait is its prefill_s
    prompt_ids: torch.Tensor | None = None  # (P,) on the compute device while its prompt rides the batch's forwards
    prefilled: int = 0  # prompt rows in its KV region
    prefilling: bool = True  # until its first token is chosen
    cursor: _Cursor | None = None  # set with the first token
    committed: int = 0  # KV rows written; the last step's last token (the root) is not in the cache yet
    last: _Step | None = None
    h2d_share: float = 0.0  # weight bytes streamed on its behalf: its own prefill's, its share of each forward


@dataclass(frozen=True)
class _Tree:
    """A sequence's tree to verify: the grown nodes it kept (None: all), and a constrained request's masks."""

    tree: TokenTree
    kept: torch.Tensor | None
    masks: TreeMasks | None


class BatchDecoder:
    """Up to `len(engine.kv_regions)` (the engine's max_num_seqs) requests decoded together on one engine."""

    def __init__(self, engine: Engine) -> None:
        if engine.postspec is not None:
            raise ValueError("post-speculation (post_levels > 0) runs one request at a time (Engine.generate)")
        self.engine = engine
        self._sequences: list[_Sequence | None] = [None] * len(engine.kv_regions)
        # Rows one target forward may carry: what the planner sizes its activations for (reserves.plan_sizes: every
        # sequence's verify rows, or one prefill chunk, whichever is more). Prompt chunks riding on a forward take
        # what the decoding sequences leave, so a burst of newcomers never outgrows the plan.
        seq_rows = engine.config.speculation.verify_size if engine.drafters else 1
        self.row_budget = max(self.capacity * seq_rows, engine.prefill_chunk_size)
        self._seq_rows = seq_rows
        # the draft levels' CUDA graphs, one per batch composition (batch_graphs.py); None: eager
        graphed = bool(engine.drafters) and engine.config.cuda_graphs and engine.device.type == "cuda"
        self.draft_graphs = BatchGraphs(device=engine.device) if graphed else None
        self.forward_rows = 0  # rows of the last step's target forward (trees and prompt chunks): a metric

    @property
    def active(self) -> int:
        """Sequences decoding now."""
        return sum(seq is not None for seq in self._sequences)

    @property
    def capacity(self) -> int:
        """Sequences it decodes at most (one per KV region)."""
        return len(self._sequences)

    @property
    def has_room(self) -> bool:
        return self.active < self.capacity

    def _cache(self, seq: _Sequence) -> KVCache:
        return self.engine.kv_regions[seq.region]

    def _free_region(self, prompt: list[int]) -> int:
        """The free region whose cached rows share the longest prefix with `prompt` (prefix reuse per region)."""
        free = [r for r, seq in enumerate(self._sequences) if seq is None]
        if not free:
            raise RuntimeError(f"the batch is full ({len(self._sequences)} sequences, max_num_seqs)")
        return max(free, key=lambda r: (self.engine.kv_regions[r].reusable_prefix(prompt), -r))

    # ------------------------------------------------------------------------------------- joining, leaving
    def _new_sequence(self, request: GenerationRequest, cancelled: CancelCheck | None) -> _Sequence:
        """Validate a request and give it a free region (nothing runs yet)."""
        dec = self.engine._decoding(request, cancelled)
        prompt = list(request.prompt_token_ids)
        return _Sequence(region=self._free_region(prompt), dec=dec, prompt=prompt, started=time.perf_counter())

    def join(self, request: GenerationRequest, *, cancelled: CancelCheck | None = None) -> TokenEvent:
        """Admit a request between iterations and prefill its prompt now, in forwards of its own (prompt logprobs
        too); its first event (finished already when max_tokens allows one token, or none). Its `cancelled` is
        asked before each layer of that prefill: a True answer raises GenerationCancelled and admits nothing."""
        seq = self._new_sequence(request, cancelled)
        engine = self.engine
        h2d = engine.target_layers.h2d_bytes
        with torch.inference_mode():
            logits, prompt_logprobs = engine._prefill(seq.prompt, seq.dec, self._cache(seq))
        seq.prefilled = len(seq.prompt)
        seq.h2d_share = engine.target_layers.h2d_bytes - h2d
        seq.dec.stats.h2d_bytes = int(seq.h2d_share)
        return replace(self._first_event(seq, logits), prompt_logprobs=prompt_logprobs)

    def admit(self, request: GenerationRequest, *, cancelled: CancelCheck | None = None) -> None:
        """Admit a request between iterations without a forward of its own: from the next `step` on, its prompt is
        prefilled a chunk per iteration inside the batch's forward (the weight stream the others' verification
        pays), and the step that completes it returns its first event. Rows a region already holds for the
        prompt are kept (prefix reuse). Prompt logprobs need `join`."""
        if request.sampling.prompt_logprobs is not None:
            raise ValueError("prompt logprobs are scored by join's own prefill, not inside a batched forward")
        seq = self._new_sequence(request, cancelled)
        cache = self._cache(seq)
        seq.prefilled = seq.dec.stats.cached_prompt_tokens = cache.reusable_prefix(seq.prompt)
        del cache.token_ids[seq.prefilled :]
        seq.prompt_ids = torch.tensor(seq.prompt, dtype=torch.long, device=self.engine.device)  # between iterations
        self._sequences[seq.region] = seq

    def _first_event(self, seq: _Sequence, logits: torch.Tensor) -> TokenEvent:
        """The first token from the prompt's last logits (1, V), chosen as Engine.generate chooses it, and its
        event; the sequence decodes from the next iteration on, unless that event finished it."""
        engine, dec = self.engine, seq.dec
        with torch.inference_mode():
            seq.cursor, seq.last = engine._first_step(dec, logits, len(seq.prompt))
        seq.committed, seq.prefilling = len(seq.prompt), False
        dec.stats.prefill_s = time.perf_counter() - seq.started
        event = engine._first_event(dec, seq.last)
        self._sequences[seq.region] = None if event.finished else seq
        return event

    def leave(self, request_id: str) -> bool:
        """Drop a request (aborted, timed out) between iterations; its region is free for the next. Whether it was
        in the batch."""
        for region, seq in enumerate(self._sequences):
            if seq is not None and seq.dec.request_id == request_id:
                self._sequences[region] = None
                return True
        return False

    # ------------------------------------------------------------------------------------- one iteration
    def step(self, *, stop: CancelCheck | None = None) -> list[TokenEvent]:
        """One iteration for every active sequence, in one streamed target forward: each decoding sequence gets one
        event, in region order (a finished one's is its last, with finish_reason and stats, and frees its region);
        each admitted sequence still prefilling adds its next prompt chunk to the same forward, and gets its first
        event (after the decoding ones) from the forward that completes its prompt. A sequence whose `cancelled`
        check answers True is dropped first, without an event, as Engine.generate returns without one.

        `stop` is asked before each draft level and each decoder layer of the forward (a worker's heartbeat hook, a
        shutdown): once it answers True, GenerationCancelled is raised and the iteration is void, as if it had not
        begun (nothing is committed before the forward ends; its draft and scratch rows are rewritten by the next
        step).
        """
        for region, seq in enumerate(self._sequences):
            if seq is not None and seq.dec.cancelled is not None and seq.dec.cancelled():
                self._sequences[region] = None
        sequences = [seq for seq in self._sequences if seq is not None]
        if not sequences:
            return []
        engine = self.engine
        decoding = [seq for seq in sequences if not seq.prefilling]
        prefilling = self._prefill_turns([seq for seq in sequences if seq.prefilling], decoding=len(decoding))
        h2d = engine.target_layers.h2d_bytes
        with torch.inference_mode():
            if engine.drafters:
                steps, firsts = self._speculative_steps(decoding, prefilling, stop)
            else:
                steps, firsts = self._plain_steps(decoding, prefilling, stop)
        served = decoding + [seq for seq, _ in prefilling]
        share = (engine.target_layers.h2d_bytes - h2d) / len(served)  # the forward's stream, paid once for all
        events = []
        for seq in served:
            seq.h2d_share += share
            seq.dec.stats.h2d_bytes = int(seq.h2d_share)
        for seq, step in zip(decoding, steps):
            engine._commit(seq.last.tokens[-1], step, self._cache(seq))
            seq.last = step
            seq.committed += len(step.tokens)
            seq.dec.stats.verify_h2d_bytes += int(share)
            event = engine._emit(seq.dec, step, accept_length=len(step.tokens))
            if event.finished:
                self._sequences[seq.region] = None
            events.append(event)
        for (seq, _), first in zip(prefilling, firsts):
            if first is not None:
                events.append(self._first_event(seq, first))
        return events

    def _forward(self, parts: list[ForwardRows], *, masked: bool,
                 stop: CancelCheck | None) -> tuple[torch.Tensor, tuple[SequenceRows, ...]]:
        """One streamed target forward over every part's rows, concatenated in order: the hidden states (rows,
        hidden) and each part's SequenceRows (its row range)."""
        engine = self.engine
        tokens, positions, rows = concatenate(parts)
        self.forward_rows = int(tokens.shape[0])
        # a masked part needs the masked kernel (flash takes no mask); it runs the unmasked parts as well
        backend = engine.attention.verify_tree if masked else engine.attention.one_token_step
        return engine.target_hidden_batched(tokens, positions, rows, backend=backend, stop=stop), rows

    def _prefill_turns(self, prefilling: list[_Sequence], *, decoding: int) -> list[tuple[_Sequence, int]]:
        """The prefilling sequences whose prompt rides on this step's forward, oldest first, each with its rows: up to
        a prefill chunk of what the row budget leaves beside `decoding` sequences' verify rows (at least one tree's
        worth, as someone is prefilling, so a sequence still in the batch has room). The others wait a step."""
        left = self.row_budget - decoding * self._seq_rows
        turns = []
        for seq in sorted(prefilling, key=lambda s: s.started):
            rows = min(self.engine.prefill_chunk_size, len(seq.prompt) - seq.prefilled, left)
            if rows <= 0:
                break
            turns.append((seq, rows))
            left -= rows
        return turns

    def _prefill_parts(self, prefilling: list[tuple[_Sequence, int]]) -> list[ForwardRows]:
        """Each prefilling sequence's next `rows` prompt rows (batch_rows.prefill_rows)."""
        assert all(seq.prompt_ids is not None for seq, _ in prefilling)  # admit made them
        return [prefill_rows(prompt_ids=seq.prompt_ids, start=seq.prefilled, rows=rows, kv_cache=self._cache(seq),
                             dtype=self.engine._dtype) for seq, rows in prefilling]

    def _prefilled(self, prefilling: list[tuple[_Sequence, int]], hidden: torch.Tensor,
                   rows: tuple[SequenceRows, ...]) -> list[torch.Tensor | None]:
        """Record each prefilling sequence's chunk as committed rows; where it completed the prompt, the logits
        (1, V) of its last row (they choose the first token), else None."""
        done: list[torch.Tensor | None] = []
        for (seq, _), row in zip(prefilling, rows):
            end = seq.prefilled + (row.stop - row.start)
            self._cache(seq).token_ids.extend(seq.prompt[seq.prefilled : end])
            seq.prefilled = end
            complete = end == len(seq.prompt)
            if complete:
                seq.prompt_ids = None  # its prompt no longer rides on a forward
            done.append(self.engine.logits(hidden[row.stop - 1 : row.stop]) if complete else None)
        return done

    def _plain_steps(self, sequences: list[_Sequence], prefilling: list[tuple[_Sequence, int]],
                     stop: CancelCheck | None) -> tuple[list[_Step], list[torch.Tensor | None]]:
        """One target forward over every sequence's last token (vanilla, resident) and the prefilling sequences'
        chunks: row i is sequence i's token at slot and position N_i, seeing its region's slots [0, N_i]."""
        engine = self.engine
        start = engine._clock.mark()
        parts = [token_rows(token=seq.cursor.root, length=seq.cursor.length, committed=seq.committed,
                            kv_cache=self._cache(seq)) for seq in sequences]
        hidden, rows = self._forward(parts + self._prefill_parts(prefilling), masked=bool(prefilling), stop=stop)
        firsts = self._prefilled(prefilling, hidden, rows[len(sequences):])
        if not sequences:
            return [], firsts
        logits = engine.logits(hidden[: len(sequences)])  # (B, V)
        chosen = []
        for i, seq in enumerate(sequences):
            dec = seq.dec
            token = choose_tokens(logits=engine._allowed_now(dec, logits[i : i + 1]), params=dec.params,
                                  seed=dec.seed, positions=seq.cursor.length + 1, first_position=seq.committed + 1,
                                  num_positions=1)
            seq.cursor.root.copy_(token)
            seq.cursor.length.add_(1)
            chosen.append(token)
        end = engine._clock.mark()
        values = torch.cat(chosen).tolist()  # the iteration's one host sync
        steps = []
        for i, seq in enumerate(sequences):
            seq.dec.stats.verify_s += engine._clock.seconds(start, end)
            seq.dec.stats.iterations += 1
            steps.append(_Step([values[i]], 0, _step_logprobs(seq.dec, logits[i : i + 1], chosen[i])))
        return steps, firsts

    def _trees(self, sequences: list[_Sequence], depths: list[int], stop: CancelCheck | None) -> list[_Tree]:
        """Each sequence's tree to verify: grown together (depth >= 1; guided by a constrained request's masks) and
        pruned to max_verify_tokens, or the root alone where one token is all the budget allows (the solo loop's
        plain step, as a one-node tree: its one row masked by the grammar's state, as that step's)."""
        engine = self.engine
        masks = [engine._tree_masks(seq.dec) for seq in sequences]
        growing = [i for i, depth in enumerate(depths) if depth >= 1]
        grown = grow_batched(requests=[
            DraftRequest(drafter=engine.drafters[sequences[i].region], kv_cache=self._cache(sequences[i]),
                         root_token=sequences[i].cursor.root, prefix_length=sequences[i].cursor.length,
                         committed=sequences[i].committed, depth=depths[i], guide=masks[i])
            for i in growing
        ], forward=engine.draft_forward_batched, stop=stop, graphs=self.draft_graphs) if growing else []
        trees = [_Tree(root_only_tree(seq.cursor.root), None, guide) for seq, guide in zip(sequences, masks)]
        verify_size = engine.config.speculation.verify_size
        for i, tree in zip(growing, grown):
            kept = None
            if verify_size < tree.size:
                kept = select_verify_nodes(scores=tree.scores, budget=verify_size)
                tree = subtree(tree, kept)
            trees[i] = _Tree(tree, kept, masks[i])
        return trees

    def _speculative_steps(self, sequences: list[_Sequence], prefilling: list[tuple[_Sequence, int]],
                           stop: CancelCheck | None) -> tuple[list[_Step], list[torch.Tensor | None]]:
        """Draft every decoding sequence's tree, verify all of them (and the prefilling sequences' chunks) in one
        target forward, accept per sequence."""
        engine = self.engine
        max_depth = engine.config.speculation.max_depth
        # a tree deeper than the tokens still allowed would only draft what gets cut
        depths = [min(max_depth, seq.dec.budget - seq.dec.stats.completion_tokens - 1) for seq in sequences]
        draft_start = engine._clock.mark()
        planned = self._trees(sequences, depths, stop) if sequences else []
        trees = [plan.tree for plan in planned]
        verify_start = engine._clock.mark()
        parts = [tree_rows(tree=tree, committed=seq.committed, kv_cache=self._cache(seq), dtype=engine._dtype)
                 for seq, tree in zip(sequences, trees)]
        hidden, rows = self._forward(parts + self._prefill_parts(prefilling), masked=True, stop=stop)  # (rows, hidden)
        firsts = self._prefilled(prefilling, hidden, rows[len(sequences):])
        # logits a sequence at a time (the plan holds one tree's); where logprobs are asked, only its path's rows stay
        accepted, asked = [], []
        for seq, plan, depth, row in zip(sequences, planned, depths, rows):
            logits = engine.logits(hidden[row.start : row.stop])  # (size, V); row i: after i's path
            logits = engine._allowed_on_tree(seq.dec, logits, plan.masks, plan.kept)
            path, emitted = engine._accept(tree=plan.tree, logits=logits, committed=seq.committed, depth=depth,
                                           verify_base=seq.committed, cursor=seq.cursor, dec=seq.dec,
                                           cache=self._cache(seq))
            accepted.append((path, emitted))
            asked.append(logits.index_select(0, path.nodes) if seq.dec.params.logprobs is not None else None)
            del logits  # before the next sequence's are made
        if not sequences:
            return [], firsts
        verify_end = engine._clock.mark()
        # the iteration's one host sync: every sequence's path length and tokens
        read = torch.cat([torch.cat([path.length, emitted]) for path, emitted in accepted]).tolist()
        steps, offset = [], 0
        for seq, tree, logits, (path, emitted) in zip(sequences, trees, asked, accepted):
            count = read[offset]
            values = read[offset + 1 : offset + 1 + count]
            offset += 1 + emitted.shape[0]  # the length, then the padded tokens (depth + 1, fewer in a smaller tree)
            stats = seq.dec.stats
            stats.draft_s += engine._clock.seconds(draft_start, verify_start)
            stats.verify_s += engine._clock.seconds(verify_start, verify_end)
            stats.iterations += 1
            stats.drafted_tokens += tree.size - 1
            stats.accepted_tokens += len(values) - 1
            logprobs = None if logits is None else _step_logprobs(seq.dec, logits[: len(values)], emitted[: len(values)])
            steps.append(_Step(values, tree.size - 1, logprobs))
        return steps, firsts
