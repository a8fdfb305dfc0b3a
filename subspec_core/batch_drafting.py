"""Growing the draft trees of several sequences together: one draft forward per level for all of them.

Each sequence keeps its own `TreeDrafter` (its buffers, bucket and masks, over its own KV region); only the
draft forward is shared. A level's rows are every still-growing sequence's frontier, concatenated (1 row per
sequence at the root, topk at each later level), each row attending to its own region under its own mask
(model.forward_hidden_batched). A sequence with a shallower tree simply stops contributing rows.

    Two sequences, topk 2, depths 2 and 1:   level 0 (root):  rows [a0 | b0]        one forward
                                             level 1:         rows [a1 a2]          one forward (b is done)

A level is one `_grow_level` call: the per-sequence halves (`root_inputs`/`root_update`, ...) the single-sequence
graphs capture, around the shared forward (a guided sequence's masks read from its drafter's staged buffer). Its
shapes are fixed by the level's composition (who grows, in which bucket, guided or not), so on CUDA each
composition's level is captured once and replayed (batch_graphs.py); without `graphs` every op is launched.
"""

from __future__ import annotations

from dataclasses import dataclass
import functools
from typing import Callable, Sequence

import torch

from subspec_core.batch_graphs import BatchGraphs
from subspec_core.cancel import CancelCheck, raise_if_cancelled
from subspec_core.drafting import DraftBucket, DraftGuide, DraftRows, TreeDrafter
from subspec_core.kv_cache import KVCache
from subspec_core.model import SequenceRows
from subspec_core.tree import TokenTree

# (tokens (n,), positions (n,), the sequences' rows) -> float32 draft logits (n, V)
BatchedDraftFn = Callable[[torch.Tensor, torch.Tensor, tuple[SequenceRows, ...]], torch.Tensor]


@dataclass(frozen=True)
class DraftRequest:
    """One sequence's grow: its drafter and KV region, the root (1,) and N (1,) on the device, N on the host; a
    constrained request's `guide` (TreeDrafter.grow_guided's)."""

    drafter: TreeDrafter
    kv_cache: KVCache
    root_token: torch.Tensor
    prefix_length: torch.Tensor
    committed: int
    depth: int
    guide: DraftGuide | None = None


def _forward_rows(forward: BatchedDraftFn, rows: Sequence[tuple[KVCache, DraftRows]]) -> list[torch.Tensor]:
    """One draft forward over every sequence's rows; each sequence's logits, in order."""
    sequences, start = [], 0
    for cache, (tokens, _, slots, bias) in rows:
        stop = start + tokens.shape[0]
        sequences.append(SequenceRows(kv_cache=cache, start=start, stop=stop, slots=slots, kv_length=bias.shape[1],
                                      bias=bias))
        start = stop
    logits = forward(torch.cat([r[0] for _, r in rows]), torch.cat([r[1] for _, r in rows]), tuple(sequences))
    return [logits[seq.start : seq.stop] for seq in sequences]


def _grow_level(forward: BatchedDraftFn, growing: Sequence[tuple[DraftRequest, DraftBucket]], root: bool,
                allowed: Sequence[torch.Tensor | None]) -> None:
    """One level for every growing sequence: one draft forward over their frontiers (their roots, at the root level),
    then each drafter's next level into its own buffers (a guided one's among its `allowed` tokens)."""
    rows = [(r.kv_cache, r.drafter.root_inputs(b) if root else r.drafter.level_inputs(b)) for r, b in growing]
    for (r, b), logits, mask in zip(growing, _forward_rows(forward, rows), allowed):
        if root:
            r.drafter.root_update(b, logits, mask)
        else:
            r.drafter.level_update(b, logits, mask)


def grow_batched(*, requests: Sequence[DraftRequest], forward: BatchedDraftFn, stop: CancelCheck | None = None,
                 graphs: BatchGraphs | None = None) -> list[TokenTree]:
    """Grow each request's tree of 1 + depth * topk nodes, with max(depth) draft forwards shared by all: the
    trees are those each drafter's own `grow` would make (the same steps on the same inputs; only the rows a
    forward carries beside them differ). The trees are views of the drafters' buffers. `stop` is asked before
    each level's forward (GenerationCancelled once it answers True), as Engine.generate asks between levels.
    `graphs`: replay each level's captured graph (CUDA); None launches every op.
    A guided request's levels are chosen among what its guide allows, as `grow_guided` chooses them: each level is
    added to its guide (a host read) before the next level's forward, whose masks are staged in its drafter's own
    buffer (`stage_allowed`), so a guided level is captured and replayed like any other (guided or not is part of
    its composition: the masking is an op more)."""
    buckets: list[DraftBucket] = [
        r.drafter.start_tree(root_token=r.root_token, prefix_length=r.prefix_length, depth=r.depth,
                             committed=r.committed)
        for r in requests
    ]
    allowed = [None if r.guide is None else r.guide.root() for r in requests]  # a guided one's next level's masks
    for level in range(max(r.depth for r in requests)):
        raise_if_cancelled(stop)
        at = [i for i, r in enumerate(requests) if r.depth > level]
        growing = [(requests[i], buckets[i]) for i in at]
        masks = [None if allowed[i] is None else requests[i].drafter.stage_allowed(allowed[i]) for i in at]
        step = functools.partial(_grow_level, forward, growing, level == 0, masks)
        if graphs is None:
            step()
        else:  # the composition: every buffer and shape the level touches, and which rows are masked
            graphs.run((level == 0, *((r.drafter, r.kv_cache, b.length, r.guide is not None) for r, b in growing)),
                       step)
        for i in at:
            guide = requests[i].guide
            if guide is not None:  # the next level's masks; the last level's are its verify rows'
                allowed[i] = requests[i].drafter.guide_frontier(guide)
    return [r.drafter.finish_tree(b, r.depth) for r, b in zip(requests, buckets)]
