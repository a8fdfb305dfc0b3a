"""The static KV cache (subspec_core/kv_cache.py): writes and reads by slot, and compaction of accepted rows."""

from __future__ import annotations

import random

import pytest
import torch

from subspec_core.kv_cache import KVCache

LAYERS, HEADS, HEAD_DIM, CAPACITY = 3, 2, 4, 24


def filled_cache() -> KVCache:
    """A cache whose every element is distinct: value = a unique id per (layer, k/v, head, slot, dim)."""
    cache = KVCache(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HEAD_DIM, capacity=CAPACITY, dtype=torch.float32, device=torch.device("cpu"))
    cache.data.copy_(torch.arange(cache.data.numel(), dtype=torch.float32).view_as(cache.data))
    return cache


def test_shape_and_bytes_needed():
    cache = KVCache(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HEAD_DIM, capacity=CAPACITY, dtype=torch.float16, device=torch.device("cpu"))
    assert cache.data.shape == (LAYERS, 2, HEADS, CAPACITY, HEAD_DIM)
    assert cache.capacity == CAPACITY
    needed = KVCache.bytes_needed(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HEAD_DIM, capacity=CAPACITY, dtype=torch.float16)
    assert needed == cache.data.numel() * 2
    assert KVCache.bytes_needed(num_layers=1, num_kv_heads=1, head_dim=1, capacity=1, dtype=torch.float32) == 2 * 4


def test_write_then_read_by_slots():
    cache = filled_cache()
    before = cache.data.clone()
    slots = torch.tensor([7, 2, 11])
    keys = torch.randn(3, HEADS, HEAD_DIM)
    values = torch.randn(3, HEADS, HEAD_DIM)
    cache.write(1, slots, torch.stack((keys, values), dim=1))
    k, v = cache.read(1, 12)
    assert k.shape == (HEADS, 12, HEAD_DIM) and v.shape == (HEADS, 12, HEAD_DIM)
    for i, slot in enumerate(slots.tolist()):
        assert torch.equal(k[:, slot], keys[i])
        assert torch.equal(v[:, slot], values[i])
    # nothing else changed: other slots of layer 1, and the other layers
    changed = torch.zeros_like(cache.data, dtype=torch.bool)
    changed[1, :, :, slots] = True
    assert torch.equal(cache.data[~changed], before[~changed])


def test_read_returns_views_of_the_prefix():
    cache = filled_cache()
    k, v = cache.read(2, 5)
    assert k.data_ptr() == cache.data[2, 0].data_ptr() and v.data_ptr() == cache.data[2, 1].data_ptr()
    assert torch.equal(k, cache.data[2, 0, :, :5]) and torch.equal(v, cache.data[2, 1, :, :5])
    cache.write(2, torch.tensor([3]), torch.stack((torch.full((1, HEADS, HEAD_DIM), -1.0), torch.full((1, HEADS, HEAD_DIM), -2.0)), dim=1))
    assert (k[:, 3] == -1).all() and (v[:, 3] == -2).all()  # a view sees later writes


def expected_after_compact(before: torch.Tensor, dest: int, sources: list[int]) -> torch.Tensor:
    out = before.clone()
    for i, s in enumerate(sources):
        out[:, :, :, dest + i] = before[:, :, :, s]
    return out


@pytest.mark.parametrize(
    "dest, sources",
    [
        (10, [10, 11, 14, 17]),  # root in place, accepted rows gathered after it (overlapping ranges)
        (10, [10]),  # only the root: nothing moves
        (10, [12, 13, 14]),  # source starts past dest, ranges overlap
        (5, [5, 6, 7, 8]),  # already contiguous
        (4, [9, 15, 20, 23]),  # disjoint ranges, last slot of the cache
        (0, [0, 2, 4, 6, 8, 10, 12]),  # from slot 0
    ],
)
def test_compact_moves_only_the_given_rows(dest, sources):
    cache = filled_cache()
    before = cache.data.clone()
    cache.compact(dest_start=dest, source_slots=torch.tensor(sources))
    assert torch.equal(cache.data, expected_after_compact(before, dest, sources))
    # spelled out: the prefix is untouched, and rows past the moved range keep their old contents
    assert torch.equal(cache.data[..., :dest, :], before[..., :dest, :])
    assert torch.equal(cache.data[..., dest + len(sources) :, :], before[..., dest + len(sources) :, :])
    for layer in range(LAYERS):
        for kv in range(2):
            for i, s in enumerate(sources):
                assert torch.equal(cache.data[layer, kv, :, dest + i], before[layer, kv, :, s])


def test_compact_random_overlapping_moves():
    rng = random.Random(0)
    for _ in range(200):
        dest = rng.randrange(CAPACITY)
        count = rng.randint(1, CAPACITY - dest)
        sources = sorted(rng.sample(range(dest, CAPACITY), count))
        sources[0] = dest if rng.random() < 0.5 else sources[0]  # often the root stays in place
        sources = sorted(set(sources))
        cache = filled_cache()
        before = cache.data.clone()
        cache.compact(dest_start=dest, source_slots=torch.tensor(sources))
        assert torch.equal(cache.data, expected_after_compact(before, dest, sources))


def test_compact_after_tree_writes_keeps_the_accepted_rows_for_the_next_step():
    # Prefix of 6 rows, a tree of 5 nodes written at slots 6..10; the path 0 -> 2 -> 4 is accepted.
    cache = filled_cache()
    n = 6
    tree_k = torch.randn(LAYERS, 5, HEADS, HEAD_DIM)
    tree_v = torch.randn(LAYERS, 5, HEADS, HEAD_DIM)
    for layer in range(LAYERS):
        cache.write(layer, n + torch.arange(5), torch.stack((tree_k[layer], tree_v[layer]), dim=1))
    prefix = cache.data[..., :n, :].clone()
    path = torch.tensor([0, 2, 4])
    cache.compact(dest_start=n, source_slots=n + path)
    for layer in range(LAYERS):
        k, v = cache.read(layer, n + 3)
        assert torch.equal(k[:, :n], prefix[layer, 0])
        assert torch.equal(v[:, :n], prefix[layer, 1])
        assert torch.equal(k[:, n:], tree_k[layer, path].transpose(0, 1))
        assert torch.equal(v[:, n:], tree_v[layer, path].transpose(0, 1))


def test_kept_attention_views_are_made_once_and_equal_slices():
    """The draft's bucket lengths get their views made once (no slicing op per layer and step)."""
    cache = filled_cache()
    cache.keep_views((16,))
    keys, values = cache.attention_views(1, 16)
    assert keys is cache.attention_views(1, 16)[0] and values is cache.attention_views(1, 16)[1]
    assert torch.equal(keys[0], cache.read(1, 16)[0]) and torch.equal(values[0], cache.read(1, 16)[1])
    assert cache.attention_views(1, CAPACITY)[0].shape == (1, HEADS, CAPACITY, HEAD_DIM)
    assert torch.equal(cache.attention_views(2, 10)[1][0], cache.read(2, 10)[1])  # any other length: a slice


def test_regions_are_separate_caches_in_one_allocation():
    """kv_regions: each region numbers its slots from 0, writes and compacts only its own rows, keeps its own
    token_ids (prefix reuse per region); one region is a plain cache."""
    from subspec_core.kv_cache import kv_regions

    shape = dict(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HEAD_DIM, capacity=CAPACITY, dtype=torch.float32,
                 device=torch.device("cpu"))
    (single,) = kv_regions(num_seqs=1, **shape)
    assert single.data.shape == (LAYERS, 2, HEADS, CAPACITY, HEAD_DIM) and single.data.is_contiguous()
    regions = kv_regions(num_seqs=3, **shape)
    base = regions[0].data.untyped_storage().data_ptr()
    assert all(r.data.untyped_storage().data_ptr() == base for r in regions)  # one allocation
    kv = torch.arange(2 * 2 * HEADS * HEAD_DIM, dtype=torch.float32).view(2, 2, HEADS, HEAD_DIM) + 1
    regions[1].write(0, torch.tensor([0, 5]), kv)
    assert regions[0].data.abs().sum() == 0 and regions[2].data.abs().sum() == 0
    keys, values = regions[1].attention_views(0, 6)
    assert torch.equal(keys[0, :, 5], kv[1, 0]) and torch.equal(values[0, :, 0], kv[0, 1])
    regions[1].compact(dest_start=1, source_slots=torch.tensor([5]))
    assert torch.equal(regions[1].read(0, 2)[0][:, 1], kv[1, 0])
    assert regions[0].data.abs().sum() == 0 and regions[2].data.abs().sum() == 0
    regions[2].token_ids.extend([7, 8, 9])
    assert regions[2].reusable_prefix([7, 8, 9, 10]) == 3 and regions[1].reusable_prefix([7, 8, 9, 10]) == 0
