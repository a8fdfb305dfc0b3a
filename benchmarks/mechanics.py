"""The pieces of one decoding iteration, run on an engine one at a time, so each can be timed on its own.

What is called (subspec_core's public functions, plus one private engine method):
- `model.forward_hidden` + `model.compute_logits` with `engine.target_layers` (the streamed target) and
  `engine.kv_cache`: the target forward of `Engine._plain_step` (one token) and of `Engine._speculative_step`
  (a tree with its mask), without the greedy choice, the accepted-path walk and the KV compaction.
- `drafting.grow_tree` with `engine.draft_logits` (the 4-bit substitute draft's forward + logits):
  the draft phase of `_speculative_step`, exactly.
- `tree.select_verify_nodes` / `tree.subtree` / `tree.tree_attention_mask`: the verify-set pruning and mask.
- `Engine.prompt_logits`: a chunked prefill filling the KV cache for the prefix.
"""

from __future__ import annotations

from typing import Any

import torch

from subspec_core.drafting import grow_tree
from subspec_core.model import compute_logits, forward_hidden
from subspec_core.tree import TokenTree, select_verify_nodes, subtree, tree_attention_mask


def target_logits(
    engine: Any, *, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, kv_length: int,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """One streamed target forward over `tokens` (n,) and its float32 logits (n, V)."""
    hidden = forward_hidden(
        shape=engine.shape, shared=engine.shared, layers=engine.target_layers, kv_cache=engine.kv_cache, tokens=tokens,
        positions=positions, slots=slots, kv_length=kv_length, attention_mask=mask,
    )
    return compute_logits(engine.shape, engine.shared, hidden)


def one_token_forward(engine: Any, *, root: torch.Tensor, prefix_length: int) -> torch.Tensor:
    """The vanilla decoding forward: the last token (1,) at slot and position N, attending to N + 1 slots."""
    slot = torch.tensor([prefix_length], dtype=torch.long, device=engine.device)
    return target_logits(engine, tokens=root, positions=slot, slots=slot, kv_length=prefix_length + 1, mask=None)


def draft_tree(engine: Any, *, root: torch.Tensor, prefix_length: int, depth: int) -> TokenTree:
    """A draft tree of 1 + depth * topk nodes: `depth` substitute forwards (root, then depth - 1 levels of topk)."""
    spec = engine.config.speculation
    return grow_tree(
        draft_logits=engine.draft_logits, root_token=root, prefix_length=prefix_length, topk=spec.topk,
        max_depth=depth, temperature=spec.draft_temperature,
    )


def verify_set(tree: TokenTree, nodes: int) -> TokenTree:
    """The `nodes` best nodes of a drafted tree (ancestor-closed), as the engine prunes to max_verify_tokens."""
    return subtree(tree, select_verify_nodes(scores=tree.scores, budget=nodes))


def verify_forward(engine: Any, *, tree: TokenTree, prefix_length: int) -> torch.Tensor:
    """The verification forward: every node at slot N + j, position N + depth, seeing the prefix and its ancestors."""
    slots = prefix_length + torch.arange(tree.size, device=engine.device)
    mask = tree_attention_mask(ancestors=tree.ancestors, prefix_length=prefix_length)
    return target_logits(
        engine, tokens=tree.tokens, positions=prefix_length + tree.depths, slots=slots,
        kv_length=prefix_length + tree.size, mask=mask,
    )
