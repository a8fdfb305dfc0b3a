"""The rows one batched target forward carries: each participant's tokens, positions, KV slots and mask, and their
concatenation (model.SequenceRows gives each participant its row range).

A participant is a sequence's verify tree, its one-token step, or a chunk of its prompt (a request admitted into
the batch prefills inside the others' forwards). Each writes and attends within its own KV region, so the three
kinds mix freely in one forward:

    rows  [ tree of seq 0 (7 rows) | token of seq 1 (1 row) | prompt chunk of seq 2 (16 rows) ]
    keys   region 0                  region 1                 region 2
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from subspec_core.kv_cache import KVCache
from subspec_core.model import SequenceRows, attention_bias
from subspec_core.tree import TokenTree, causal_chunk_mask, tree_attention_mask


@dataclass(frozen=True)
class ForwardRows:
    """One participant's rows: tokens and positions (n,), written at `slots` of its region, attending over the
    region's slots [0, kv_length) under the additive `bias` (n, kv_length) (None: all of them)."""

    tokens: torch.Tensor
    positions: torch.Tensor
    kv_cache: KVCache
    slots: torch.Tensor
    kv_length: int
    bias: torch.Tensor | None


def tree_rows(*, tree: TokenTree, committed: int, kv_cache: KVCache, dtype: torch.dtype) -> ForwardRows:
    """A verify tree after N = committed rows: node j at slot N + j and position N + depth(j), seeing the prefix
    and its own ancestors (Engine.verify_logits' rows, in a region)."""
    n = committed
    mask = tree_attention_mask(ancestors=tree.ancestors, prefix_length=n)
    return ForwardRows(tokens=tree.tokens, positions=n + tree.depths, kv_cache=kv_cache,
                       slots=n + torch.arange(tree.size, device=tree.tokens.device), kv_length=n + tree.size,
                       bias=attention_bias(mask, dtype))


def token_rows(*, token: torch.Tensor, length: torch.Tensor, committed: int, kv_cache: KVCache) -> ForwardRows:
    """The one-token step: `token` (1,) at slot and position N (`length` (1,) on the device, `committed` the
    same N on the host), seeing slots [0, N]: no mask needed."""
    return ForwardRows(tokens=token, positions=length, kv_cache=kv_cache, slots=length, kv_length=committed + 1,
                       bias=None)


def prefill_rows(*, prompt_ids: torch.Tensor, start: int, rows: int, kv_cache: KVCache,
                 dtype: torch.dtype) -> ForwardRows:
    """`rows` rows of the prompt (its token ids (P,) on the compute device) from `start`, cut at its end: slots and
    positions [start, end), causal among themselves and seeing rows [0, start) (the chunks Engine's own prefill
    runs). A slice of ids already on the device: no host copy, which would wait for the draft queued before it."""
    end = min(start + rows, prompt_ids.shape[0])
    device = prompt_ids.device
    slots = torch.arange(start, end, device=device)
    mask = causal_chunk_mask(start=start, length=end - start, device=device)
    return ForwardRows(tokens=prompt_ids[start:end], positions=slots, kv_cache=kv_cache, slots=slots, kv_length=end,
                       bias=attention_bias(mask, dtype))


def concatenate(parts: Sequence[ForwardRows]) -> tuple[torch.Tensor, torch.Tensor, tuple[SequenceRows, ...]]:
    """The forward's tokens and positions (rows,), and each part's SequenceRows, in order."""
    rows, start = [], 0
    for part in parts:
        end = start + part.tokens.shape[0]
        rows.append(SequenceRows(kv_cache=part.kv_cache, start=start, stop=end, slots=part.slots,
                                 kv_length=part.kv_length, bias=part.bias))
        start = end
    return torch.cat([p.tokens for p in parts]), torch.cat([p.positions for p in parts]), tuple(rows)


def root_only_tree(root: torch.Tensor) -> TokenTree:
    """A tree of the root alone (1,): verifying it is a plain one-token step (its one row picks the next token)."""
    device = root.device
    return TokenTree(tokens=root.clone(), parents=torch.full((1,), -1, dtype=torch.long, device=device),
                     depths=torch.zeros(1, dtype=torch.long, device=device),
                     scores=torch.zeros(1, dtype=torch.float32, device=device),
                     ancestors=torch.ones(1, 1, dtype=torch.bool, device=device))
