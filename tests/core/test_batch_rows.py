"""The rows of a batched forward (subspec_core/batch_rows.py), on hand-built participants."""

from __future__ import annotations

import torch

from subspec_core.batch_rows import concatenate, prefill_rows, root_only_tree, token_rows, tree_rows
from subspec_core.kv_cache import kv_regions
from subspec_core.tree import TokenTree

NEG = float("-inf")


def regions(count: int = 3):  # type: ignore[no-untyped-def]
    return kv_regions(num_seqs=count, num_layers=1, num_kv_heads=1, head_dim=2, capacity=32, dtype=torch.float32,
                      device=torch.device("cpu"))


def test_tree_rows_sit_after_the_prefix_and_see_it_and_their_ancestors():
    """A 3-node tree after N = 2 committed rows:      0 (slot 2, position 2)
                                                     / \\
                                     (slot 3, pos 3) 1   2 (slot 4, pos 3)"""
    tree = TokenTree(tokens=torch.tensor([7, 8, 9]), parents=torch.tensor([-1, 0, 0]), depths=torch.tensor([0, 1, 1]),
                     scores=torch.zeros(3), ancestors=torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool))
    rows = tree_rows(tree=tree, committed=2, kv_cache=regions()[1], dtype=torch.float32)
    assert rows.slots.tolist() == [2, 3, 4] and rows.positions.tolist() == [2, 3, 3] and rows.kv_length == 5
    assert rows.bias.tolist() == [[0, 0, 0, NEG, NEG], [0, 0, 0, 0, NEG], [0, 0, 0, NEG, 0]]


def test_token_and_prompt_chunk_rows():
    region = regions()[0]
    step = token_rows(token=torch.tensor([5]), length=torch.tensor([9]), committed=9, kv_cache=region)
    assert step.slots.tolist() == [9] and step.kv_length == 10 and step.bias is None
    chunk = prefill_rows(prompt_ids=torch.arange(10), start=4, rows=4, kv_cache=region, dtype=torch.float32)
    assert chunk.tokens.tolist() == [4, 5, 6, 7] and chunk.slots.tolist() == [4, 5, 6, 7] and chunk.kv_length == 8
    assert chunk.bias[0].tolist() == [0, 0, 0, 0, 0, NEG, NEG, NEG]  # rows [0, 4) and itself
    last = prefill_rows(prompt_ids=torch.arange(10), start=8, rows=4, kv_cache=region, dtype=torch.float32)
    assert last.tokens.tolist() == [8, 9] and last.kv_length == 10  # the prompt's end cuts the chunk


def test_concatenate_gives_each_participant_its_row_range_and_region():
    caches = regions()
    parts = [
        token_rows(token=torch.tensor([5]), length=torch.tensor([3]), committed=3, kv_cache=caches[0]),
        prefill_rows(prompt_ids=torch.tensor([1, 2, 3]), start=0, rows=16, kv_cache=caches[2], dtype=torch.float32),
        tree_rows(tree=root_only_tree(torch.tensor([6])), committed=4, kv_cache=caches[1], dtype=torch.float32),
    ]
    tokens, positions, rows = concatenate(parts)
    assert tokens.tolist() == [5, 1, 2, 3, 6] and positions.tolist() == [3, 0, 1, 2, 4]
    assert [(r.start, r.stop) for r in rows] == [(0, 1), (1, 4), (4, 5)]
    assert [r.kv_cache for r in rows] == [caches[0], caches[2], caches[1]]


def test_a_root_only_tree_is_one_node_of_its_own():
    root = torch.tensor([42])
    tree = root_only_tree(root)
    root.fill_(0)  # the cursor's root is overwritten after the verify: the tree keeps its token
    assert tree.tokens.tolist() == [42] and tree.parents.tolist() == [-1] and tree.depths.tolist() == [0]
    assert tree.ancestors.tolist() == [[True]]
