"""One static KV cache, shared by the target and its substitute draft.

Slots [0, N) hold the committed prefix (always written by the target). Slots past N are scratch: the draft
writes its tree rows there, the target's verification forward overwrites them, and `compact` moves the
accepted path's rows to sit right after the prefix. Only those rows move; the rest of the cache is untouched.
"""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated keys/values for every layer: one tensor, shape (layers, 2, kv_heads, capacity, head_dim)."""

    def __init__(
        self, *, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.capacity = capacity
        # One allocation for the whole cache makes compaction one gather and one scatter for all layers.
        self.data = torch.zeros(num_layers, 2, num_kv_heads, capacity, head_dim, dtype=dtype, device=device)

    @staticmethod
    def bytes_needed(*, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * num_kv_heads * capacity * head_dim * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store keys/values (n, kv_heads, head_dim) of n tokens at cache slots (n,)."""
        self.data[layer, 0].index_copy_(1, slots, keys.transpose(0, 1))
        self.data[layer, 1].index_copy_(1, slots, values.transpose(0, 1))

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots [0, length): each (kv_heads, length, head_dim), views."""
        return self.data[layer, 0, :, :length], self.data[layer, 1, :, :length]

    def compact(self, *, dest_start: int, source_slots: torch.Tensor) -> None:
        """Move rows `source_slots` (ascending, all >= dest_start) to [dest_start, dest_start + len) in every layer."""
        count = source_slots.numel()
        rows = self.data.index_select(3, source_slots)  # gather first: source and destination ranges may overlap
        self.data[:, :, :, dest_start : dest_start + count].copy_(rows)
