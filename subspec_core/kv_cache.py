"""One static KV cache, shared by the target and its substitute draft.

Slots [0, N) hold the committed prefix (always written by the target). Slots past N are scratch: the draft
writes its tree rows there, the target's verification forward overwrites them, and `compact` moves the
accepted path's rows to sit right after the prefix. Only those rows move; the rest of the cache is untouched.

The cache also remembers which token each committed row holds (`token_ids`), so a request whose prompt
starts like the last one's prompt and output (a chat's next turn, a retried prompt) prefills only the rest.

Several sequences decoded together (batch.py) each own a region: `kv_regions` allocates one tensor holding
`num_seqs` caches side by side along the slot axis, each a `KVCache` over its own view, with its own slot
numbering from 0 and its own `token_ids` (prefix reuse per region). One region is exactly the single cache.
"""

from __future__ import annotations

import torch

# The capacity is a multiple of this, so a mask over the whole cache (the draft's longest bucket) has
# aligned rows for memory-efficient attention (see model.MASK_ALIGN).
CAPACITY_ALIGN = 16


def kv_capacity(*, max_model_len: int, tree_slots: int) -> int:
    """Slots the cache needs: the longest sequence plus the scratch rows of one tree, rounded up to CAPACITY_ALIGN."""
    return -(-(max_model_len + tree_slots) // CAPACITY_ALIGN) * CAPACITY_ALIGN


class KVCache:
    """Preallocated keys/values for every layer: one tensor, shape (layers, 2, kv_heads, capacity, head_dim)."""

    def __init__(
        self, *, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
        device: torch.device, data: torch.Tensor | None = None,
    ) -> None:
        self.capacity = capacity
        # One allocation for the whole cache makes compaction one gather and one scatter for all layers; a
        # region of `kv_regions` is a view of the shared tensor instead, (layers, 2, kvh, capacity, hd) all the same
        self.data = data if data is not None else torch.zeros(num_layers, 2, num_kv_heads, capacity, head_dim,
                                                              dtype=dtype, device=device)
        # Views made once: indexing `data[layer]` inside the forward would cost ops on every layer.
        self._layers = [self.data[layer] for layer in range(num_layers)]  # (2, kvh, capacity, hd)
        self._keys = [self.data[layer, 0][None] for layer in range(num_layers)]  # (1, kvh, capacity, hd)
        self._values = [self.data[layer, 1][None] for layer in range(num_layers)]
        self._views = {capacity: list(zip(self._keys, self._values))}  # length -> per layer (keys, values)
        # token_ids[i] is the token whose keys/values row i holds, for every row the target has completed
        # (prompt chunks, committed decoding steps); rows past it are scratch or stale
        self.token_ids: list[int] = []

    def reusable_prefix(self, prompt: list[int]) -> int:
        """Rows a request with `prompt` can keep: the longest common prefix of the prompt and `token_ids`,
        short of the prompt's last token (its forward gives the logits of the first new token)."""
        limit = min(len(prompt) - 1, len(self.token_ids))
        reuse = 0
        while reuse < limit and prompt[reuse] == self.token_ids[reuse]:
            reuse += 1
        return reuse

    @staticmethod
    def bytes_needed(*, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * num_kv_heads * capacity * head_dim * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Store keys and values of n tokens, kv (n, 2, kv_heads, head_dim), at cache slots (n,): one op."""
        self._layers[layer].index_copy_(2, slots, kv.permute(1, 2, 0, 3))

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots [0, length): each (kv_heads, length, head_dim), views."""
        return self.data[layer, 0, :, :length], self.data[layer, 1, :, :length]

    def keep_views(self, lengths: tuple[int, ...]) -> None:
        """Make the attention views of slots [0, length) once, for each of `lengths` (the draft's buckets)."""
        for length in lengths:
            if length not in self._views:
                self._views[length] = [(k[:, :, :length], v[:, :, :length]) for k, v in zip(self._keys, self._values)]

    def attention_views(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots [0, length) shaped for SDPA, (1, kv_heads, length, head_dim): views.

        The whole cache and the lengths given to keep_views (the draft's buckets) cost no op at all.
        """
        kept = self._views.get(length)
        if kept is not None:
            return kept[layer]
        return self._keys[layer][:, :, :length], self._values[layer][:, :, :length]

    def compact(self, *, dest_start: int, source_slots: torch.Tensor) -> None:
        """Move rows `source_slots` (ascending, all >= dest_start) to [dest_start, dest_start + len) in every layer.

        Fixed-size callers pass padding entries too: their rows land past the kept ones, in scratch slots.
        """
        count = source_slots.numel()
        rows = self.data.index_select(3, source_slots)  # gather first: source and destination ranges may overlap
        self.data[:, :, :, dest_start : dest_start + count].copy_(rows)


def kv_regions(*, num_seqs: int, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
               dtype: torch.dtype, device: torch.device) -> tuple[KVCache, ...]:
    """`num_seqs` caches of `capacity` slots each, views of one allocation (layers, 2, kvh, num_seqs * capacity, hd):
    region r holds slots [r * capacity, (r + 1) * capacity). With num_seqs 1 it is one plain KVCache."""
    if num_seqs < 1:
        raise ValueError("num_seqs must be >= 1")
    shape = dict(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, capacity=capacity,
                 dtype=dtype, device=device)
    if num_seqs == 1:
        return (KVCache(**shape),)
    data = torch.zeros(num_layers, 2, num_kv_heads, num_seqs * capacity, head_dim, dtype=dtype, device=device)
    return tuple(KVCache(**shape, data=data[:, :, :, r * capacity : (r + 1) * capacity]) for r in range(num_seqs))
