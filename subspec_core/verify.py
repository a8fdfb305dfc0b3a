"""Lossless verification of a token tree against the target's choices, on the device, without a Python walk.

Rule (walk from the root): at node j the target chooses `target_tokens[j]` (its argmax, or its sample);
if a child of j carries that token, accept it and continue there; otherwise stop. Every emitted token is
therefore exactly what the target chose at that prefix: the draft only decides how many of those choices
one target forward gets to make. Children of one node carry distinct tokens, so the accepted path is unique.
"""

from __future__ import annotations

import torch


def accepted_path(
    *, parents: torch.Tensor, tokens: torch.Tensor, depths: torch.Tensor, ancestors: torch.Tensor, target_tokens: torch.Tensor
) -> torch.Tensor:
    """Node indices (ascending, root first) of the longest root path the target agrees with.

    parents (T,) with -1 at the root; tokens, depths, target_tokens (T,); ancestors (T, T) bool.
    A node is reachable when every node on its path, itself included, carries the token the target chose at
    its parent; the deepest reachable node ends the path.
    """
    matches = tokens == target_tokens[parents.clamp(min=0)]
    matches[0] = True  # the root is committed, not drafted
    reachable = ~(ancestors & ~matches[None, :]).any(dim=1)
    deepest = torch.argmax(torch.where(reachable, depths, -1))
    return ancestors[deepest].nonzero().squeeze(1)


def emitted_tokens(*, path: torch.Tensor, target_tokens: torch.Tensor) -> torch.Tensor:
    """The tokens one verification emits: the target's choice at each path node (accepted tokens + bonus)."""
    return target_tokens[path]
