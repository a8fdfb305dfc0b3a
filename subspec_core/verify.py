"""Lossless verification of a token tree against the target's choices, on the device, without a Python walk.

Rule (walk from the root): at node j the target chooses `target_tokens[j]` (its argmax, or its sample);
if a child of j carries that token, accept it and continue there; otherwise stop. Every emitted token is
therefore exactly what the target chose at that prefix: the draft only decides how many of those choices
one target forward gets to make. Children of one node carry distinct tokens, so the accepted path is unique.

Everything here has fixed-size outputs (no `nonzero`, no indexing by a device scalar), so the host learns
the result from ONE small read per iteration: the path's length and the emitted tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AcceptedPath:
    """The accepted root path, padded to a fixed size.

    nodes (max_length,): node indices, root first, in depth order; entries from `length` on are padding
    (valid indices, meaningless). length (1,): nodes on the path, root included (accepted tokens + 1).
    """

    nodes: torch.Tensor
    length: torch.Tensor


def accepted_path(
    *, tokens: torch.Tensor, parents: torch.Tensor, depths: torch.Tensor, ancestors: torch.Tensor,
    target_tokens: torch.Tensor, max_length: int,
) -> AcceptedPath:
    """The longest root path the target agrees with (see the module docstring), as an AcceptedPath.

    tokens, parents (-1 at the root), depths, target_tokens (T,); ancestors (T, T) bool; max_length: a
    bound on path nodes (the tree's depth + 1). A node is reachable when every node on its path, itself
    included, carries the token the target chose at its parent; the deepest reachable node ends the path.
    Node order is topological (a parent's index is smaller than its children's), so the path's nodes in index
    order are in depth order.
    """
    size = tokens.shape[0]
    matches = tokens == target_tokens[parents.clamp(min=0)]
    matches[0] = True  # the root is committed, not drafted
    reachable = ~(ancestors & ~matches[None, :]).any(dim=1)  # (T,)
    deepest = torch.argmax(torch.where(reachable, depths, -1)).view(1)
    on_path = ancestors.index_select(0, deepest)[0]  # (T,) the deepest node's ancestors and itself
    index = torch.arange(size, device=tokens.device)
    # path nodes sort first (by index); the rest get keys >= size and are clamped into range as padding
    nodes = torch.sort(torch.where(on_path, index, size + index)).values[:max_length].clamp_(max=size - 1)
    return AcceptedPath(nodes=nodes, length=depths.index_select(0, deepest) + 1)


def emitted_tokens(*, path: AcceptedPath, target_tokens: torch.Tensor) -> torch.Tensor:
    """The tokens one verification emits, padded like the path: the target's choice at each path node
    (the accepted drafted tokens, then the bonus chosen at the last one)."""
    return target_tokens.index_select(0, path.nodes)
