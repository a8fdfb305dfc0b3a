"""Several requests decoded together: one streamed target forward per iteration serves every active sequence.

In the offload regime a target forward costs the weight stream, nearly whatever rows it carries, so verifying the
trees of B requests in one forward pays the stream once for B of them. An iteration is the single-sequence loop's
three calls, each over the batch: draft every sequence's tree with one draft forward per level
(batch_drafting.grow_batched), verify all trees with one target forward (model.forward_hidden_batched: the
linears over every row, attention per sequence within its own KV region), then accept, commit and emit per
sequence with its own sampling parameters and seed. Vanilla and resident: one forward over every last token.

Requests join at iteration boundaries (`join`: a prefill of their own into a free region, then the first token)
and leave when they finish, are cancelled or dropped (`leave`). No one else's tokens change: each sequence decodes
what it would alone (its own region and position-keyed sampling; rows computed beside other rows may round
differently in the last bit, which flips only a float32 near-tie, see agreement.py).

Restrictions for now: post-speculation (post_levels > 0) and structured outputs (a constraint) keep their
single-sequence path, Engine.generate. A BatchDecoder decodes in every region, region 0 included, which
Engine.generate also uses: drive an engine through one or the other at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from subspec_core.batch_drafting import DraftRequest, grow_batched
from subspec_core.cancel import CancelCheck
from subspec_core.detokenize import IncrementalDetokenizer
from subspec_core.engine import Engine, _Cursor, _Decoding, _request_seed, _Step, _step_logprobs
from subspec_core.kv_cache import KVCache
from subspec_core.model import SequenceRows, attention_bias
from subspec_core.sampling import choose_tokens
from subspec_core.tree import TokenTree, select_verify_nodes, subtree, tree_attention_mask
from subspec_core.types import FINISH_LENGTH, GenerationRequest, RequestStats, TokenEvent


@dataclass
class _Sequence:
    """One request in the batch: its KV region, decoding state, cursor and host count of committed rows."""

    region: int
    dec: _Decoding
    cursor: _Cursor
    committed: int  # KV rows written; the last step's last token (the root) is not in the cache yet
    last: _Step
    h2d_share: float  # weight bytes streamed on its behalf: its prefill's, and its share of each batched forward


class BatchDecoder:
    """Up to `len(engine.kv_regions)` (the engine's max_num_seqs) requests decoded together on one engine."""

    def __init__(self, engine: Engine) -> None:
        if engine.postspec is not None:
            raise ValueError("post-speculation (post_levels > 0) runs one request at a time (Engine.generate)")
        self.engine = engine
        self._sequences: list[_Sequence | None] = [None] * len(engine.kv_regions)

    @property
    def active(self) -> int:
        """Sequences decoding now."""
        return sum(seq is not None for seq in self._sequences)

    @property
    def has_room(self) -> bool:
        return self.active < len(self._sequences)

    def _cache(self, seq: _Sequence) -> KVCache:
        return self.engine.kv_regions[seq.region]

    def _free_region(self, prompt: list[int]) -> int:
        """The free region whose cached rows share the longest prefix with `prompt` (prefix reuse per region)."""
        free = [r for r, seq in enumerate(self._sequences) if seq is None]
        if not free:
            raise RuntimeError(f"the batch is full ({len(self._sequences)} sequences, max_num_seqs)")
        return max(free, key=lambda r: (self.engine.kv_regions[r].reusable_prefix(prompt), -r))

    # ------------------------------------------------------------------------------------- joining, leaving
    def join(self, request: GenerationRequest, *, cancelled: CancelCheck | None = None) -> TokenEvent:
        """Admit a request between iterations: prefill its prompt into a free region (a forward of its own) and
        choose its first token; the first event (finished already when max_tokens allows one token, or none)."""
        engine = self.engine
        engine.validate(request)
        params = request.sampling
        if params.constraint is not None:
            raise ValueError("structured outputs run one request at a time (Engine.generate), not in a batch")
        prompt = list(request.prompt_token_ids)
        region = self._free_region(prompt)
        cache = engine.kv_regions[region]
        dec = _Decoding(
            request_id=request.request_id, params=params, seed=_request_seed(params.seed, engine.config.seed),
            budget=min(params.max_tokens, engine.max_model_len - len(prompt)),
            eos=frozenset() if params.ignore_eos else engine.eos_token_ids,
            detokenizer=IncrementalDetokenizer(engine.tokenizer, prompt_token_ids=prompt, stop=params.stop),
            stats=RequestStats(prompt_tokens=len(prompt)), cancelled=cancelled,
        )
        h2d = engine.target_layers.h2d_bytes
        with torch.inference_mode():
            started = time.perf_counter()
            logits, prompt_logprobs = engine._prefill(prompt, dec, cache)
            length = torch.full((1,), len(prompt), dtype=torch.long, device=engine.device)
            first = choose_tokens(logits=logits, params=params, seed=dec.seed, positions=length,
                                  first_position=len(prompt), num_positions=1)
            step = _Step(first.tolist(), 0, _step_logprobs(dec, logits, first))
            dec.stats.prefill_s = time.perf_counter() - started
        if dec.budget == 0:  # scoring only: the prompt's logprobs, no output token
            event = TokenEvent(request_id=dec.request_id, token_ids=(), text="", finish_reason=FINISH_LENGTH,
                               stats=dec.stats)
        else:
            event = engine._emit(dec, step, accept_length=None)
        seq = _Sequence(region=region, dec=dec, cursor=_Cursor(length=length, root=first), committed=len(prompt),
                        last=step, h2d_share=engine.target_layers.h2d_bytes - h2d)
        dec.stats.h2d_bytes = int(seq.h2d_share)
        if not event.finished:
            self._sequences[region] = seq
        return replace(event, prompt_logprobs=prompt_logprobs)

    def leave(self, request_id: str) -> bool:
        """Drop a request (aborted, timed out) between iterations; its region is free for the next. Whether it was
        in the batch."""
        for region, seq in enumerate(self._sequences):
            if seq is not None and seq.dec.request_id == request_id:
                self._sequences[region] = None
                return True
        return False

    # ------------------------------------------------------------------------------------- one iteration
    def step(self) -> list[TokenEvent]:
        """One iteration for every active sequence: one event each, in region order; a finished sequence's event
        is its last (finish_reason and stats) and frees its region. A sequence whose `cancelled` check answers
        True is dropped first, without an event, as Engine.generate returns without one."""
        for region, seq in enumerate(self._sequences):
            if seq is not None and seq.dec.cancelled is not None and seq.dec.cancelled():
                self._sequences[region] = None
        sequences = [seq for seq in self._sequences if seq is not None]
        if not sequences:
            return []
        engine = self.engine
        h2d = engine.target_layers.h2d_bytes
        with torch.inference_mode():
            steps = self._speculative_steps(sequences) if engine.drafters else self._plain_steps(sequences)
        share = (engine.target_layers.h2d_bytes - h2d) / len(sequences)  # the verify's stream, paid once for all
        events = []
        for seq, step in zip(sequences, steps):
            engine._commit(seq.last.tokens[-1], step, self._cache(seq))
            seq.last = step
            seq.committed += len(step.tokens)
            seq.h2d_share += share
            seq.dec.stats.verify_h2d_bytes += int(share)
            seq.dec.stats.h2d_bytes = int(seq.h2d_share)
            event = engine._emit(seq.dec, step, accept_length=len(step.tokens))
            if event.finished:
                self._sequences[seq.region] = None
            events.append(event)
        return events

    def _plain_steps(self, sequences: list[_Sequence]) -> list[_Step]:
        """One target forward over every sequence's last token (vanilla, resident): row i is sequence i's token
        at slot and position N_i, seeing its region's slots [0, N_i]."""
        engine = self.engine
        start = engine._clock.mark()
        rows = tuple(
            SequenceRows(kv_cache=self._cache(seq), start=i, stop=i + 1, slots=seq.cursor.length,
                         kv_length=seq.committed + 1, bias=None)
            for i, seq in enumerate(sequences)
        )
        logits = engine.logits(engine.target_hidden_batched(
            torch.cat([seq.cursor.root for seq in sequences]), torch.cat([seq.cursor.length for seq in sequences]),
            rows, backend=engine.attention.one_token_step))  # (B, V)
        chosen = []
        for i, seq in enumerate(sequences):
            dec = seq.dec
            token = choose_tokens(logits=logits[i : i + 1], params=dec.params, seed=dec.seed,
                                  positions=seq.cursor.length + 1, first_position=seq.committed + 1, num_positions=1)
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
        return steps

    def _trees(self, sequences: list[_Sequence], depths: list[int]) -> list[TokenTree]:
        """Each sequence's tree to verify: grown together (depth >= 1) and pruned to max_verify_tokens, or the
        root alone where one token is all the budget allows (the solo loop's plain step, as a one-node tree)."""
        engine = self.engine
        growing = [i for i, depth in enumerate(depths) if depth >= 1]
        grown = grow_batched(requests=[
            DraftRequest(drafter=engine.drafters[sequences[i].region], kv_cache=self._cache(sequences[i]),
                         root_token=sequences[i].cursor.root, prefix_length=sequences[i].cursor.length,
                         committed=sequences[i].committed, depth=depths[i])
            for i in growing
        ], forward=engine.draft_forward_batched) if growing else []
        trees: list[TokenTree] = [root_only_tree(seq.cursor.root) for seq in sequences]
        verify_size = engine.config.speculation.verify_size
        for i, tree in zip(growing, grown):
            if verify_size < tree.size:
                tree = subtree(tree, select_verify_nodes(scores=tree.scores, budget=verify_size))
            trees[i] = tree
        return trees

    def _speculative_steps(self, sequences: list[_Sequence]) -> list[_Step]:
        """Draft every sequence's tree, verify all of them in one target forward, accept per sequence."""
        engine = self.engine
        max_depth = engine.config.speculation.max_depth
        # a tree deeper than the tokens still allowed would only draft what gets cut
        depths = [min(max_depth, seq.dec.budget - seq.dec.stats.completion_tokens - 1) for seq in sequences]
        draft_start = engine._clock.mark()
        trees = self._trees(sequences, depths)
        verify_start = engine._clock.mark()
        rows, start = [], 0
        for seq, tree in zip(sequences, trees):
            n = seq.committed
            mask = tree_attention_mask(ancestors=tree.ancestors, prefix_length=n)  # its prefix and its ancestors
            rows.append(SequenceRows(kv_cache=self._cache(seq), start=start, stop=start + tree.size,
                                     slots=n + torch.arange(tree.size, device=engine.device), kv_length=n + tree.size,
                                     bias=attention_bias(mask, engine._dtype)))
            start += tree.size
        hidden = engine.target_hidden_batched(
            torch.cat([tree.tokens for tree in trees]),
            torch.cat([seq.committed + tree.depths for seq, tree in zip(sequences, trees)]),
            tuple(rows), backend=engine.attention.verify_tree)  # (sum of sizes, hidden)
        accepted, asked = [], []  # logits a sequence at a time; kept only where logprobs are asked for
        for seq, tree, depth, row in zip(sequences, trees, depths, rows):
            logits = engine.logits(hidden[row.start : row.stop])  # (size, V)
            accepted.append(engine._accept(tree=tree, logits=logits, committed=seq.committed, depth=depth,
                                           verify_base=seq.committed, cursor=seq.cursor, dec=seq.dec,
                                           cache=self._cache(seq)))
            asked.append(logits if seq.dec.params.logprobs is not None else None)
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
            logprobs = None if logits is None else _step_logprobs(
                seq.dec, logits.index_select(0, path.nodes[: len(values)]), emitted[: len(values)])
            steps.append(_Step(values, tree.size - 1, logprobs))
        return steps


def root_only_tree(root: torch.Tensor) -> TokenTree:
    """A tree of the root alone (1,): verifying it is a plain one-token step (its one row picks the next token)."""
    device = root.device
    return TokenTree(tokens=root.clone(), parents=torch.full((1,), -1, dtype=torch.long, device=device),
                     depths=torch.zeros(1, dtype=torch.long, device=device),
                     scores=torch.zeros(1, dtype=torch.float32, device=device),
                     ancestors=torch.ones(1, 1, dtype=torch.bool, device=device))
