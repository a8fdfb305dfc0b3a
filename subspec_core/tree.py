"""Token trees as tensors, and the pure functions that grow, prune and mask them.

Node j of a drafted tree lives in KV slot N + j while drafting (N = committed length): the root at j = 0,
depth-d node i at j = 1 + (d - 1) * topk + i. A node's parent always has a smaller index, so index order is
a topological order. `ancestors[j]` marks j's ancestors and j itself: a node may attend to exactly those.

    A small tree (topk = 2, depth 2):        0 (root)
                                            /        \\
                                           1          2
                                          / \\
                                         3   4
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenTree:
    """A token tree: all tensors on one device, node 0 is the root."""

    tokens: torch.Tensor  # (T,) long
    parents: torch.Tensor  # (T,) long, -1 for the root
    depths: torch.Tensor  # (T,) long, 0 for the root
    scores: torch.Tensor  # (T,) float32 cumulative draft log-probability of the path (root: 0)
    ancestors: torch.Tensor  # (T, T) bool, row j: j's ancestors and j itself

    @property
    def size(self) -> int:
        return self.tokens.shape[0]


def expand_frontier(
    *, parent_scores: torch.Tensor, logprobs: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick the `topk` children of highest cumulative log-probability among all frontier nodes' children.

    parent_scores: (m,) float32; logprobs: (m, V) float32 draft log-probabilities of each node's next token.
    Returns (parent_rows (k,) indices into the frontier, tokens (k,), scores (k,)), best first.
    Log-probabilities in float32 do not underflow at depth the way products of fp16 probabilities do.
    """
    vocab = logprobs.shape[-1]
    total = (parent_scores[:, None] + logprobs).flatten()  # (m * V,)
    scores, flat = torch.topk(total, topk)
    return flat // vocab, flat % vocab, scores


def select_verify_nodes(*, scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices (ascending) of the `budget` best nodes; always a valid tree.

    A child's score is its parent's plus a log-probability <= 0, so it never beats its parent; a stable
    sort puts the (smaller-index) parent first among equal scores. Hence every kept node's ancestors are kept.
    """
    if budget >= scores.shape[0]:
        return torch.arange(scores.shape[0], device=scores.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:budget]).values


def subtree(tree: TokenTree, kept: torch.Tensor) -> TokenTree:
    """The tree restricted to `kept` (ascending, ancestor-closed), renumbered 0..len(kept)-1."""
    new_index = torch.full((tree.size,), -1, dtype=torch.long, device=tree.tokens.device)
    new_index[kept] = torch.arange(kept.shape[0], device=kept.device)
    old_parents = tree.parents[kept]
    parents = torch.where(old_parents >= 0, new_index[old_parents.clamp(min=0)], old_parents)
    return TokenTree(
        tokens=tree.tokens[kept],
        parents=parents,
        depths=tree.depths[kept],
        scores=tree.scores[kept],
        ancestors=tree.ancestors[kept][:, kept],
    )


def tree_attention_mask(*, ancestors: torch.Tensor, prefix_length: int, gap: int = 0) -> torch.Tensor:
    """Mask (rows, prefix + gap + T) for nodes placed `gap` slots after a prefix: every node sees the prefix and
    its ancestors, none of the gap's slots."""
    rows = ancestors.shape[0]
    prefix = torch.ones(rows, prefix_length, dtype=torch.bool, device=ancestors.device)
    hidden = torch.zeros(rows, gap, dtype=torch.bool, device=ancestors.device)
    return torch.cat([prefix, hidden, ancestors], dim=1)


def causal_chunk_mask(*, start: int, length: int, device: torch.device) -> torch.Tensor:
    """Mask (length, start + length) for a prefill chunk at slots [start, start + length): causal."""
    cols = torch.arange(start + length, device=device)
    rows = torch.arange(start, start + length, device=device)
    return cols[None, :] <= rows[:, None]
