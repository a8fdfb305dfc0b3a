"""The tree side of one decoding iteration, for timing its pieces one at a time on a built engine.

The target forwards are the engine's own (`Engine.step_logits`, `Engine.verify_logits`), and the draft is
`engine.drafter.grow` exactly; this module only shapes their inputs: a drafted tree at a fixed prefix, and the
verify set `max_verify_tokens` keeps of it (or a beam-shaped tree when more nodes are asked for than were drafted).
"""

from __future__ import annotations

from typing import Any

import torch

from subspec_core.tree import TokenTree, select_verify_nodes, subtree


def draft_tree(engine: Any, *, root: torch.Tensor, prefix_length: int, depth: int) -> TokenTree:
    """A draft tree of 1 + depth * topk nodes: `depth` substitute forwards (root, then depth - 1 levels of topk)."""
    prefix = torch.full((1,), prefix_length, dtype=torch.long, device=engine.device)
    return engine.drafter.grow(root_token=root, prefix_length=prefix, committed=prefix_length, depth=depth)


def verify_set(tree: TokenTree, nodes: int, *, topk: int, vocab_size: int) -> TokenTree:
    """`nodes` tree nodes to verify: the best of a drafted tree (ancestor-closed), as the engine prunes to
    max_verify_tokens; for more nodes than the tree has, a beam-shaped tree of that size (random tokens):
    a verify forward's cost depends on its node count and mask, not on which tokens it carries."""
    if nodes <= tree.size:
        return subtree(tree, select_verify_nodes(scores=tree.scores, budget=nodes))
    return beam_tree(nodes, topk=topk, vocab_size=vocab_size, device=tree.tokens.device)


def beam_tree(size: int, *, topk: int, vocab_size: int, device: torch.device) -> TokenTree:
    """A tree numbered like a drafted one (root, then levels of `topk`), every node's parent the first node of
    the level above; random tokens below `vocab_size`."""
    index = torch.arange(size, device=device)
    depths = torch.where(index == 0, 0, (index - 1) // topk + 1)
    parents = torch.where(depths <= 1, 0, 1 + (depths - 2) * topk)
    parents[0] = -1
    ancestors = torch.zeros(size, size, dtype=torch.bool, device=device)
    ancestors[index, index] = True
    ancestors[:, 0] = True
    # the first node of each level above a node is its ancestor (levels >= 1, strictly above)
    level_heads = 1 + (depths[None, :] - 1) * topk  # (1, T): the head node of each column's level
    ancestors |= (index[None, :] == level_heads) & (depths[None, :] < depths[:, None]) & (depths[None, :] >= 1)
    tokens = torch.randint(vocab_size, (size,), generator=torch.Generator().manual_seed(size)).to(device)
    return TokenTree(tokens=tokens, parents=parents, depths=depths, scores=-depths.float(), ancestors=ancestors)
