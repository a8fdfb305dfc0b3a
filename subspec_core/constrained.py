"""A constrained request's token masks as tensors: on each draft level's candidates and each verified row.

subspec_core/grammar.py keeps the grammar states (host side, llguidance) and gives masks as int32 bitmasks;
this module turns them into (rows, V) boolean masks on the device and applies them. Only constrained requests
come here: they read each draft level's new tokens on the host (one small read per level) and draft eagerly,
while unconstrained requests keep the captured draft graphs and one host read per iteration.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from subspec_core.grammar import GrammarState, TreeGrammar


_UNPACK_ROWS = 32


def bitmask_to_bool(words: np.ndarray, vocab_size: int, *, device: torch.device,
                    end_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, W) int32 bitmasks -> (rows, vocab_size) bool on `device`: bit t of word t // 32 allows token t;
    columns past the tokenizer's vocabulary (a model's padded embedding rows) stay False. A row that allows
    nothing allows what `end_mask` (V,) allows (everything without one): a node whose token its parent refused is
    never on an accepted path, and a grammar with nowhere to go ends the output, while an all -inf row would
    turn sampling into NaNs. Unpacked on the host for a CPU, on the device for a GPU (8x fewer bytes to copy)."""
    rows = words.shape[0]
    packed = np.ascontiguousarray(words).view(np.uint8)  # (rows, 4W): little-endian, token t is bit t % 8 of byte t // 8
    if device.type == "cpu":
        allowed = torch.from_numpy(np.unpackbits(packed, axis=1, bitorder="little")).view(torch.bool)  # 0/1 bytes
    else:
        packed_on_device = torch.from_numpy(packed).to(device)
        shifts = torch.arange(8, dtype=torch.uint8, device=device)
        allowed = torch.empty(rows, packed.shape[1] * 8, dtype=torch.bool, device=device)
        for start in range(0, rows, _UNPACK_ROWS):  # (rows, 4W, 8) bytes at a time: a few MB, not a verify's GB
            chunk = packed_on_device[start : start + _UNPACK_ROWS]
            allowed[start : start + _UNPACK_ROWS] = ((chunk.unsqueeze(-1) >> shifts) & 1).view(chunk.shape[0], -1).bool()
    if allowed.shape[1] >= vocab_size:
        allowed = allowed[:, :vocab_size]
    else:
        allowed = torch.cat([allowed, allowed.new_zeros(rows, vocab_size - allowed.shape[1])], dim=1)
    empty = np.flatnonzero(~_within(words, vocab_size).any(axis=1))  # on the packed words: 32x less to scan
    if len(empty):
        allowed[torch.from_numpy(empty).to(allowed.device)] = True if end_mask is None else end_mask
    return allowed


def _within(words: np.ndarray, vocab_size: int) -> np.ndarray:
    """The words of tokens below `vocab_size` (a model vocabulary smaller than the tokenizer's), the last one's
    higher bits cleared."""
    full, rest = divmod(vocab_size, 32)
    if full + (rest > 0) >= words.shape[1]:
        return words
    kept = words[:, : full + (rest > 0)].copy()
    if rest:
        kept[:, -1] &= np.int32((1 << rest) - 1) if rest < 31 else np.int32(0x7FFFFFFF)
    return kept


def end_token_mask(end_tokens: Sequence[int], vocab_size: int, device: torch.device) -> torch.Tensor | None:
    """(V,) bool allowing the model's end tokens, for rows that allow nothing; None without any."""
    if not end_tokens:
        return None
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    mask[list(end_tokens)] = True
    return mask


def mask_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """-inf, in place (and `allowed` inverted in place), where a token is not allowed (before temperature, top-k and top-p: the constrained target's
    distribution is the target's renormalized over what the grammar allows). In place: a verify's logits are
    the largest tensor of an iteration, and a second copy of them is memory the plan does not hold."""
    return logits.masked_fill_(allowed.logical_not_(), float("-inf"))  # `allowed` is consumed


class TreeMasks:
    """The masks of one draft tree, level by level, for the drafter (`DraftGuide`) and then the verify rows."""

    def __init__(self, state: GrammarState, *, vocab_size: int, device: torch.device,
                 end_mask: torch.Tensor | None) -> None:
        started = time.perf_counter()
        self._grammar: TreeGrammar = state.tree()
        self._vocab_size = vocab_size
        self._device = device
        self._end_mask = end_mask
        self.host_s = time.perf_counter() - started  # host time spent on this tree's masks

    def _to_device(self, words: np.ndarray, started: float) -> torch.Tensor:
        allowed = bitmask_to_bool(words, self._vocab_size, device=self._device, end_mask=self._end_mask)
        self.host_s += time.perf_counter() - started
        return allowed

    def root(self) -> torch.Tensor:
        """(1, V): what may follow the root (the request's state)."""
        return self._to_device(self._grammar.masks([0]), time.perf_counter())

    def level(self, nodes: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        """Add a drafted level (`nodes` (k,) into the tree's `tokens` and `parents`) and return its (k, V) masks:
        what may follow each new node."""
        started = time.perf_counter()
        ids, level_parents, level_tokens = torch.stack([nodes, parents[nodes], tokens[nodes]]).tolist()  # one read
        words = self._grammar.add(level_parents, level_tokens)
        assert ids == list(range(len(self._grammar) - len(ids), len(self._grammar))), "levels are added in order"
        return self._to_device(words, started)

    def rows(self, nodes: torch.Tensor | None = None) -> torch.Tensor:
        """(n, V) masks of the verified nodes (all of the tree's by default)."""
        started = time.perf_counter()
        chosen = None if nodes is None else nodes.tolist()
        return self._to_device(self._grammar.masks(chosen), started)
