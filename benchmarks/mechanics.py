"""The pieces of one decoding iteration, run on an engine one at a time, so each can be timed on its own.

What is called (subspec_core's public functions, plus one private engine method):
- `model.forward_hidden` + `model.compute_logits` with `engine.target_layers` (the streamed target) and
  `engine.kv_cache`: the target forward of `Engine._plain_step` (one token) and of `Engine._speculative_step`
  (a tree with its mask), without the greedy choice, the accepted-path walk and the KV compaction.
- `engine.drafter.grow` (the 4-bit substitute draft's static-shape tree growth): the draft phase of
  `_speculative_step`, exactly.
- `tree.select_verify_nodes` / `tree.subtree` / `tree.tree_attention_mask`: the verify-set pruning and mask.
- `Engine.prompt_logits`: a chunked prefill filling the KV cache for the prefix.
"""

from __future__ import annotations

from typing import Any

import torch

from subspec_core.model import attention_bias, compute_logits, forward_hidden
from subspec_core.tree import TokenTree, select_verify_nodes, subtree, tree_attention_mask


def target_logits(
    engine: Any, *, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, kv_length: int,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """One streamed target forward over `tokens` (n,) and its float32 logits (n, V); `mask` bool (n, kv_length)."""
    bias = None if mask is None else attention_bias(mask, engine.shared.embed.dtype)
    hidden = forward_hidden(
        shape=engine.shape, shared=engine.shared, layers=engine.target_layers, kv_cache=engine.kv_cache, tokens=tokens,
        positions=positions, slots=slots, kv_length=kv_length, bias=bias,
    )
    return compute_logits(engine.shape, engine.shared, hidden)


def one_token_forward(engine: Any, *, root: torch.Tensor, prefix_length: int) -> torch.Tensor:
    """The vanilla decoding forward: the last token (1,) at slot and position N, attending to N + 1 slots."""
    slot = torch.tensor([prefix_length], dtype=torch.long, device=engine.device)
    return target_logits(engine, tokens=root, positions=slot, slots=slot, kv_length=prefix_length + 1, mask=None)


def draft_tree(engine: Any, *, root: torch.Tensor, prefix_length: int, depth: int) -> TokenTree:
    """A draft tree of 1 + depth * topk nodes: `depth` substitute forwards (root, then depth - 1 levels of topk)."""
    prefix = torch.full((1,), prefix_length, dtype=torch.long, device=engine.device)
    return engine.drafter.grow(root_token=root, prefix_length=prefix, depth=depth)


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


def verify_forward(engine: Any, *, tree: TokenTree, prefix_length: int) -> torch.Tensor:
    """The verification forward: every node at slot N + j, position N + depth, seeing the prefix and its ancestors."""
    slots = prefix_length + torch.arange(tree.size, device=engine.device)
    mask = tree_attention_mask(ancestors=tree.ancestors, prefix_length=prefix_length)
    return target_logits(
        engine, tokens=tree.tokens, positions=prefix_length + tree.depths, slots=slots,
        kv_length=prefix_length + tree.size, mask=mask,
    )
