"""Growing the draft tree: a global beam of `topk` nodes per depth, by cumulative draft log-probability.

The draft never prefills: it attends to the target's KV rows for the committed prefix [0, N) and writes
its own rows only at scratch slots N + j (j = tree node index), which the verification forward overwrites.
"""

from __future__ import annotations

from typing import Callable

import torch

from subspec_core.cancel import CancelCheck, raise_if_cancelled
from subspec_core.tree import TokenTree, expand_frontier

# (tokens (n,), positions (n,), slots (n,), kv_length, mask (n, kv_length) or None) -> float32 logits (n, V)
DraftLogitsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, "torch.Tensor | None"], torch.Tensor]


def grow_tree(
    *,
    draft_logits: DraftLogitsFn,
    root_token: torch.Tensor,  # (1,) long: the last committed token, whose KV is not yet in the cache
    prefix_length: int,  # N: committed KV rows
    topk: int,
    max_depth: int,
    temperature: float,
    cancelled: CancelCheck | None = None,
) -> TokenTree:
    """Draft a tree of 1 + max_depth * topk nodes with max_depth draft forwards (root, then levels 1..D-1).

    `cancelled` is asked before each draft forward (so an abort waits at most one level); when it turns true,
    `GenerationCancelled` is raised.
    """
    device = root_token.device
    size = 1 + max_depth * topk
    tokens = torch.empty(size, dtype=torch.long, device=device)
    parents = torch.empty(size, dtype=torch.long, device=device)
    depths = torch.empty(size, dtype=torch.long, device=device)
    scores = torch.empty(size, dtype=torch.float32, device=device)
    ancestors = torch.zeros(size, size, dtype=torch.bool, device=device)
    tokens[:1] = root_token
    parents[0], depths[0], scores[0], ancestors[0, 0] = -1, 0, 0.0, True

    n = prefix_length
    root_slot = torch.tensor([n], dtype=torch.long, device=device)
    raise_if_cancelled(cancelled)
    logits = draft_logits(root_token, root_slot, root_slot, n + 1, None)  # (1, V)
    frontier = torch.zeros(1, dtype=torch.long, device=device)  # node indices of the current level
    frontier_scores = torch.zeros(1, dtype=torch.float32, device=device)
    prefix_mask = torch.ones(topk, n, dtype=torch.bool, device=device)
    for depth in range(1, max_depth + 1):
        logprobs = torch.log_softmax(logits / temperature, dim=-1)
        parent_rows, level_tokens, level_scores = expand_frontier(parent_scores=frontier_scores, logprobs=logprobs, topk=topk)
        start = 1 + (depth - 1) * topk
        level = torch.arange(start, start + topk, device=device)
        level_parents = frontier[parent_rows]
        tokens[level], parents[level], depths[level], scores[level] = level_tokens, level_parents, depth, level_scores
        ancestors[level] = ancestors[level_parents]
        ancestors[level, level] = True
        if depth == max_depth:
            break  # the deepest level is proposed but never run through the draft
        raise_if_cancelled(cancelled)
        end = start + topk
        mask = torch.cat([prefix_mask, ancestors[level, :end]], dim=1)  # (k, N + end)
        positions = torch.full((topk,), n + depth, dtype=torch.long, device=device)
        logits = draft_logits(level_tokens, positions, n + level, n + end, mask)
        frontier, frontier_scores = level, level_scores
    return TokenTree(tokens=tokens, parents=parents, depths=depths, scores=scores, ancestors=ancestors)
