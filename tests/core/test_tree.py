"""Pure tests of the token-tree functions (subspec_core/tree.py) and tree drafting (subspec_core/drafting.py).

Trees are hand-built and drawn in comments; node numbers are indices, index order is a topological order.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from subspec_core.drafting import TreeDrafter, draft_buckets
from subspec_core.tree import (
    TokenTree,
    causal_chunk_mask,
    expand_frontier,
    select_verify_nodes,
    subtree,
    tree_attention_mask,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ----------------------------------------------------------------------------------------------- helpers
def make_tree(parents: list[int], tokens: list[int] | None = None, scores: list[float] | None = None) -> TokenTree:
    """A TokenTree from a parent list (parents[0] == -1, parents[j] < j), with depths/ancestors by a walk."""
    size = len(parents)
    assert parents[0] == -1 and all(0 <= parents[j] < j for j in range(1, size))
    tokens = tokens if tokens is not None else list(range(100, 100 + size))
    scores = scores if scores is not None else [0.0] * size
    ancestors = torch.zeros(size, size, dtype=torch.bool)
    depths = []
    for j in range(size):
        node, depth = j, 0
        while node != -1:
            ancestors[j, node] = True
            node = parents[node]
            depth += 1
        depths.append(depth - 1)
    return TokenTree(
        tokens=torch.tensor(tokens, dtype=torch.long),
        parents=torch.tensor(parents, dtype=torch.long),
        depths=torch.tensor(depths, dtype=torch.long),
        scores=torch.tensor(scores, dtype=torch.float32),
        ancestors=ancestors,
    )


def ancestor_set(parents: list[int], j: int) -> set[int]:
    out = set()
    while j != -1:
        out.add(j)
        j = parents[j]
    return out


def random_tree(rng: random.Random, size: int) -> TokenTree:
    """A random tree whose scores are float32 parent + log-prob (<= 0), with many exact ties."""
    parents = [-1] + [rng.randrange(j) for j in range(1, size)]
    scores = [torch.tensor(0.0)]
    for j in range(1, size):
        lp = rng.choice([0.0, 0.0, -0.5, -0.5, -1.0, -rng.random() * 3])
        scores.append(scores[parents[j]] + torch.tensor(lp, dtype=torch.float32))  # float32 like grow_tree
    return make_tree(parents, scores=[float(s) for s in scores])


# Seven nodes, used by several tests (scores in brackets):
#
#                 0 [0.0]
#               /         \
#         1 [-0.2]        2 [-1.0]
#         /      \            \
#    3 [-0.3]   4 [-1.5]     5 [-1.1]
#        |
#    6 [-0.9]
SEVEN_PARENTS = [-1, 0, 0, 1, 1, 2, 3]
SEVEN_SCORES = [0.0, -0.2, -1.0, -0.3, -1.5, -1.1, -0.9]


def seven() -> TokenTree:
    return make_tree(SEVEN_PARENTS, tokens=[10, 11, 12, 13, 14, 15, 16], scores=SEVEN_SCORES)


# ----------------------------------------------------------------------------------------------- expand_frontier
def test_expand_frontier_is_a_global_top_k_over_frontier_and_vocab():
    # Frontier of two nodes (path log-probs 0 and -0.5), vocab 4. Candidate totals:
    #   row 0: log .6 = -0.51, log .3 = -1.20, log .08 = -2.53, log .02 = -3.91
    #   row 1: -0.5 + log .9 = -0.61, -0.5 + log .05 = -3.50, ...
    # Best three: (row 0, tok 0), (row 1, tok 0), (row 0, tok 1): row 1's best beats row 0's second.
    parent_scores = torch.tensor([0.0, -0.5])
    logprobs = torch.tensor([[0.6, 0.3, 0.08, 0.02], [0.9, 0.05, 0.03, 0.02]]).log()
    rows, tokens, scores = expand_frontier(parent_scores=parent_scores, logprobs=logprobs, topk=3)
    assert rows.tolist() == [0, 1, 0]
    assert tokens.tolist() == [0, 0, 1]
    expected = [math.log(0.6), -0.5 + math.log(0.9), math.log(0.3)]
    assert scores.dtype == torch.float32
    assert scores.tolist() == pytest.approx(expected, abs=1e-6)


def test_expand_frontier_matches_brute_force_on_random_inputs():
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        m, vocab, k = 1 + int(torch.randint(4, (1,), generator=gen)), 7, 1 + int(torch.randint(6, (1,), generator=gen))
        parent_scores = -torch.rand(m, generator=gen) * 3
        logprobs = torch.log_softmax(torch.randn(m, vocab, generator=gen) * 2, dim=-1)
        rows, tokens, scores = expand_frontier(parent_scores=parent_scores, logprobs=logprobs, topk=k)
        candidates = sorted(
            ((float(parent_scores[r] + logprobs[r, t]), r, t) for r in range(m) for t in range(vocab)), reverse=True
        )[:k]
        assert rows.tolist() == [c[1] for c in candidates]
        assert tokens.tolist() == [c[2] for c in candidates]
        assert scores.tolist() == pytest.approx([c[0] for c in candidates], abs=1e-5)
        # (parent, token) pairs are distinct: children of one node carry distinct tokens
        assert len(set(zip(rows.tolist(), tokens.tolist()))) == k


def test_expand_frontier_no_underflow_at_depth_48_with_tiny_probabilities():
    # Every child has probability between 1e-4 and 1e-2: after 48 levels the best path's probability is
    # around 1e-140, zero in fp16 and in float32, yet the float32 log-scores must still rank correctly.
    gen = torch.Generator().manual_seed(2)
    topk, vocab = 3, 5
    frontier_scores = torch.zeros(1)
    ref_scores = [0.0]  # float64 reference of the frontier's scores
    for depth in range(1, 49):
        m = frontier_scores.shape[0]
        probs = 10 ** (-2 - 2 * torch.rand(m, vocab, generator=gen, dtype=torch.float64))  # in [1e-4, 1e-2]
        logprobs = probs.log().float()
        rows, tokens, scores = expand_frontier(parent_scores=frontier_scores, logprobs=logprobs, topk=topk)
        candidates = sorted(
            ((ref_scores[r] + float(logprobs[r, t]), r, t) for r in range(m) for t in range(vocab)), reverse=True
        )[:topk]
        assert rows.tolist() == [c[1] for c in candidates], f"depth {depth}"
        assert tokens.tolist() == [c[2] for c in candidates], f"depth {depth}"
        assert torch.isfinite(scores).all()
        assert scores.tolist() == pytest.approx([c[0] for c in candidates], rel=1e-5)
        frontier_scores, ref_scores = scores, [c[0] for c in candidates]
    assert scores.dtype == torch.float32
    assert float(scores[0]) < -48 * math.log(100)  # below 1e-96 as a probability ...
    assert torch.exp(scores).max() == 0  # ... which float32 cannot even represent
    assert (scores[:-1] >= scores[1:]).all() and scores[0] > scores[-1]  # still ranked, still distinct


# ----------------------------------------------------------------------------------------------- select_verify_nodes
@pytest.mark.parametrize(
    "budget, expected",
    [
        (1, [0]),
        (2, [0, 1]),
        (3, [0, 1, 3]),
        (4, [0, 1, 3, 6]),
        (5, [0, 1, 2, 3, 6]),
        (6, [0, 1, 2, 3, 5, 6]),
        (7, [0, 1, 2, 3, 4, 5, 6]),
        (100, [0, 1, 2, 3, 4, 5, 6]),
    ],
)
def test_select_verify_nodes_keeps_the_best_budget_nodes(budget, expected):
    tree = seven()  # the seven-node tree drawn above
    kept = select_verify_nodes(scores=tree.scores, budget=budget)
    assert kept.tolist() == expected


def test_select_verify_nodes_with_tied_scores_stays_ancestor_closed():
    # Every child has log-prob 0 or ties with its cousins; a stable sort must put parents first.
    #
    #            0 [0]
    #          /      \
    #     1 [-.5]    2 [-.5]
    #        |          |
    #     3 [-.5]    4 [-.5]
    #        |
    #     5 [-.5]
    parents = [-1, 0, 0, 1, 2, 3]
    tree = make_tree(parents, scores=[0.0, -0.5, -0.5, -0.5, -0.5, -0.5])
    for budget, expected in [(2, [0, 1]), (3, [0, 1, 2]), (4, [0, 1, 2, 3]), (5, [0, 1, 2, 3, 4])]:
        kept = select_verify_nodes(scores=tree.scores, budget=budget).tolist()
        assert kept == expected
        assert all(parents[j] in kept for j in kept if j > 0)
    # A child with probability 1 (log-prob 0) ties with its parent and a deeper chain of such ties:
    #   0 [0] - 1 [0] - 2 [0] - 3 [0]
    chain = make_tree([-1, 0, 1, 2], scores=[0.0, 0.0, 0.0, 0.0])
    assert select_verify_nodes(scores=chain.scores, budget=2).tolist() == [0, 1]
    assert select_verify_nodes(scores=chain.scores, budget=3).tolist() == [0, 1, 2]


def test_select_verify_nodes_property_random_trees():
    rng = random.Random(3)
    for _ in range(300):
        size = rng.randint(1, 40)
        tree = random_tree(rng, size)
        parents = tree.parents.tolist()
        scores = tree.scores.tolist()
        for budget in range(1, size + 2):
            kept = select_verify_nodes(scores=tree.scores, budget=budget).tolist()
            assert len(kept) == min(budget, size)
            assert kept == sorted(set(kept)), "ascending, no duplicates"
            kept_set = set(kept)
            assert 0 in kept_set
            for j in kept:
                assert ancestor_set(parents, j) <= kept_set, f"node {j} kept without its ancestors"
            excluded = [scores[j] for j in range(size) if j not in kept_set]
            if excluded:
                assert min(scores[j] for j in kept) >= max(excluded), "kept the best nodes"


def test_select_verify_nodes_on_drafted_trees_gives_valid_subtrees():
    gen = torch.Generator().manual_seed(4)
    table = torch.randn(12, 12, generator=gen) * 2
    tree = grow_tree(
        draft_logits=lambda tokens, *_: table[tokens], root_token=torch.tensor([0]), prefix_length=3,
        topk=4, max_depth=5, temperature=0.7,
    )
    parents = tree.parents.tolist()
    for budget in range(1, tree.size + 1):
        kept = select_verify_nodes(scores=tree.scores, budget=budget)
        kept_set = set(kept.tolist())
        assert all(ancestor_set(parents, j) <= kept_set for j in kept_set)
        small = subtree(tree, kept)
        assert small.size == len(kept_set)
        assert (small.ancestors.sum(1) == small.depths + 1).all()


# ----------------------------------------------------------------------------------------------- subtree
def test_subtree_remaps_parents_and_takes_the_ancestor_submatrix():
    tree = seven()  # drawn above
    # keep 0, 1, 3, 6 (the best four):   0 - 1 - 3 - 6   ->   0 - 1 - 2 - 3
    small = subtree(tree, torch.tensor([0, 1, 3, 6]))
    assert small.parents.tolist() == [-1, 0, 1, 2]
    assert small.tokens.tolist() == [10, 11, 13, 16]
    assert small.depths.tolist() == [0, 1, 2, 3]
    assert small.scores.tolist() == pytest.approx([0.0, -0.2, -0.3, -0.9])
    assert small.ancestors.tolist() == torch.tril(torch.ones(4, 4, dtype=torch.bool)).tolist()
    # keep 0, 2, 5 and 1:   0 -> {1, 2}, 2 -> 5   becomes   0 -> {1, 2}, 2 -> 3
    small = subtree(tree, torch.tensor([0, 1, 2, 5]))
    assert small.parents.tolist() == [-1, 0, 0, 2]
    assert small.tokens.tolist() == [10, 11, 12, 15]
    assert small.depths.tolist() == [0, 1, 1, 2]
    assert small.ancestors.tolist() == make_tree([-1, 0, 0, 2]).ancestors.tolist()
    assert small.ancestors.tolist() == tree.ancestors[[0, 1, 2, 5]][:, [0, 1, 2, 5]].tolist()


def test_subtree_random_kept_sets_are_consistent():
    rng = random.Random(5)
    for _ in range(100):
        size = rng.randint(2, 25)
        tree = random_tree(rng, size)
        parents = tree.parents.tolist()
        kept = {0}
        for j in range(1, size):
            if parents[j] in kept and rng.random() < 0.6:
                kept.add(j)
        kept_list = sorted(kept)
        small = subtree(tree, torch.tensor(kept_list))
        new_parents = small.parents.tolist()
        for new_j, old_j in enumerate(kept_list):
            old_parent = parents[old_j]
            assert new_parents[new_j] == (-1 if old_parent == -1 else kept_list.index(old_parent))
        assert small.ancestors.tolist() == make_tree(new_parents).ancestors.tolist()
        assert small.depths.tolist() == make_tree(new_parents).depths.tolist()


# ----------------------------------------------------------------------------------------------- masks
def test_tree_attention_mask_sees_prefix_and_exactly_its_ancestors():
    tree = seven()  # drawn above
    prefix = 3
    mask = tree_attention_mask(ancestors=tree.ancestors, prefix_length=prefix)
    assert mask.shape == (7, prefix + 7) and mask.dtype == torch.bool
    assert mask[:, :prefix].all()
    for j in range(7):
        seen = {c - prefix for c in range(prefix, prefix + 7) if mask[j, c]}
        assert seen == ancestor_set(SEVEN_PARENTS, j)
    # spelled out for the deepest node: 6 sees 0, 1, 3 and itself
    assert mask[6, prefix:].tolist() == [True, True, False, True, False, False, True]
    # without a prefix the mask is the ancestor matrix itself
    assert torch.equal(tree_attention_mask(ancestors=tree.ancestors, prefix_length=0), tree.ancestors)


def test_causal_chunk_mask():
    mask = causal_chunk_mask(start=3, length=4, device=torch.device("cpu"))
    assert mask.shape == (4, 7) and mask.dtype == torch.bool
    for r in range(4):
        for c in range(7):
            assert bool(mask[r, c]) == (c <= 3 + r)
    assert mask[:, :3].all()  # earlier chunks are fully visible
    assert causal_chunk_mask(start=0, length=1, device=torch.device("cpu")).tolist() == [[True]]
    assert torch.equal(
        causal_chunk_mask(start=0, length=5, device=torch.device("cpu")), torch.tril(torch.ones(5, 5, dtype=torch.bool))
    )


# ----------------------------------------------------------------------------------------------- TreeDrafter
class BigramDraft:
    """A fake draft: the next-token logits depend only on the token (a fixed bigram table); records its calls."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table
        self.calls: list[dict] = []

    def __call__(self, tokens, positions, slots, bias):  # noqa: ANN001 - the DraftLogitsFn signature
        self.calls.append(dict(tokens=tokens.clone(), positions=positions.clone(), slots=slots.clone(), bias=bias.clone()))
        return self.table[tokens]


def grow_tree(*, draft_logits, root_token, prefix_length: int, topk: int, max_depth: int, temperature: float,
              capacity: int | None = None) -> TokenTree:
    """One tree from a fresh TreeDrafter (cache capacity: just enough, unless given), tensors cloned."""
    capacity = capacity or prefix_length + 1 + max_depth * topk
    drafter = TreeDrafter(draft_logits=draft_logits, topk=topk, max_depth=max_depth, capacity=capacity,
                          temperature=temperature, dtype=torch.float32, device=torch.device("cpu"))
    tree = drafter.grow(root_token=root_token, prefix_length=torch.tensor([prefix_length]), committed=prefix_length,
                        depth=max_depth)
    return TokenTree(*(t.clone() for t in (tree.tokens, tree.parents, tree.depths, tree.scores, tree.ancestors)))


def reference_beam(table: torch.Tensor, root: int, topk: int, depth: int, temperature: float):
    """Global beam over (frontier x vocab) by cumulative log-prob, in float64: [(token, parent, score)] per level."""
    logprobs = torch.log_softmax(table.double() / temperature, dim=-1)
    frontier = [(root, 0, 0.0)]  # (token, node index, score)
    levels = []
    for d in range(1, depth + 1):
        candidates = sorted(
            ((score + float(logprobs[tok, t]), node, t) for tok, node, score in frontier for t in range(table.shape[1])),
            reverse=True,
        )[:topk]
        start = 1 + (d - 1) * topk
        levels.append([(t, node, s) for s, node, t in candidates])
        frontier = [(t, start + i, s) for i, (s, node, t) in enumerate(candidates)]
    return levels


@pytest.mark.parametrize("topk, depth, prefix", [(3, 4, 5), (1, 3, 0), (4, 1, 2), (2, 6, 1)])
def test_grow_tree_shape_and_beam(topk, depth, prefix):
    gen = torch.Generator().manual_seed(6)
    vocab = 9
    table = torch.randn(vocab, vocab, generator=gen) * 2
    draft = BigramDraft(table)
    tree = grow_tree(
        draft_logits=draft, root_token=torch.tensor([4]), prefix_length=prefix, topk=topk, max_depth=depth,
        temperature=0.6,
    )
    assert tree.size == 1 + depth * topk
    assert tree.tokens[0] == 4 and tree.parents[0] == -1 and tree.depths[0] == 0 and tree.scores[0] == 0
    expected_depths = [0] + [1 + (j - 1) // topk for j in range(1, tree.size)]
    assert tree.depths.tolist() == expected_depths
    parents = tree.parents.tolist()
    for j in range(1, tree.size):
        assert expected_depths[parents[j]] == expected_depths[j] - 1, "a level's parents are on the level above"
    # the ancestor matrix agrees with the parents
    assert tree.ancestors.tolist() == make_tree(parents).ancestors.tolist()
    # children of one node carry distinct tokens
    pairs = list(zip(parents[1:], tree.tokens.tolist()[1:]))
    assert len(set(pairs)) == len(pairs)
    # the levels are the global beam, best first
    for d, level in enumerate(reference_beam(table, 4, topk, depth, 0.6), start=1):
        nodes = range(1 + (d - 1) * topk, 1 + d * topk)
        assert [int(tree.tokens[j]) for j in nodes] == [t for t, _, _ in level]
        assert [parents[j] for j in nodes] == [p for _, p, _ in level]
        assert [float(tree.scores[j]) for j in nodes] == pytest.approx([s for _, _, s in level], abs=1e-4)


def test_grow_tree_passes_documented_slots_positions_and_masks():
    gen = torch.Generator().manual_seed(7)
    table = torch.randn(10, 10, generator=gen) * 2
    draft = BigramDraft(table)
    n, k, depth, capacity = 5, 3, 4, 48
    tree = grow_tree(draft_logits=draft, root_token=torch.tensor([7]), prefix_length=n, topk=k, max_depth=depth,
                     temperature=1.0, capacity=capacity)
    parents = tree.parents.tolist()
    assert len(draft.calls) == depth  # the root, then levels 1 .. depth-1

    root_call = draft.calls[0]
    assert root_call["tokens"].tolist() == [7]
    assert root_call["positions"].tolist() == [n]  # root at position N ...
    assert root_call["slots"].tolist() == [n]  # ... and slot N
    # one row over the whole cache (a static shape), seeing the prefix and itself
    assert root_call["bias"].shape == (1, capacity)
    assert (root_call["bias"] == 0).nonzero()[:, 1].tolist() == list(range(n + 1))
    assert torch.isneginf(root_call["bias"][0, n + 1 :]).all()

    for d in range(1, depth):
        call = draft.calls[d]
        level = list(range(1 + (d - 1) * k, 1 + d * k))
        assert call["tokens"].tolist() == tree.tokens[level].tolist()
        assert call["positions"].tolist() == [n + d] * k
        assert call["slots"].tolist() == [n + 1 + (d - 1) * k + i for i in range(k)]
        bias = call["bias"]
        assert bias.shape == (k, capacity), "every level has the same (topk, capacity) shape"
        assert ((bias == 0) | torch.isneginf(bias)).all()
        for i, node in enumerate(level):
            visible = {c for c in range(capacity) if bias[i, c] == 0}
            assert visible == set(range(n)) | {n + a for a in ancestor_set(parents, node)}, f"depth {d} node {node}"

    forwarded_slots = torch.cat([c["slots"] for c in draft.calls]).tolist()
    assert forwarded_slots == list(range(n, n + 1 + (depth - 1) * k)), "each node above the last level once, in order"
    deepest = range(n + 1 + (depth - 1) * k, n + 1 + depth * k)
    assert not set(forwarded_slots) & set(deepest), "the deepest level is never run through the draft"


def test_drafter_reuse_across_prefix_lengths_and_depths_gives_fresh_trees():
    """One drafter, grown again at another N and a smaller depth, gives exactly what a fresh one gives."""
    gen = torch.Generator().manual_seed(9)
    table = torch.randn(11, 11, generator=gen) * 2
    drafter = TreeDrafter(draft_logits=BigramDraft(table), topk=3, max_depth=5, capacity=64, temperature=0.5,
                          dtype=torch.float32, device=torch.device("cpu"))
    drafter.grow(root_token=torch.tensor([2]), prefix_length=torch.tensor([9]), committed=9, depth=5)
    again = drafter.grow(root_token=torch.tensor([4]), prefix_length=torch.tensor([20]), committed=20, depth=3)
    fresh = grow_tree(draft_logits=BigramDraft(table), root_token=torch.tensor([4]), prefix_length=20, topk=3,
                      max_depth=3, temperature=0.5, capacity=64)
    for name in ("tokens", "parents", "depths", "scores", "ancestors"):
        assert torch.equal(getattr(again, name), getattr(fresh, name)), name


def test_grow_tree_depth_48_tiny_probabilities_keeps_float32_scores_finite_and_ordered():
    # Near-uniform logits over 64 tokens: every child has probability ~1/64, so a depth-48 path has
    # probability ~1e-87 (zero in float32): the tree must still be ranked by exact float32 log-scores.
    gen = torch.Generator().manual_seed(8)
    table = torch.randn(64, 64, generator=gen) * 0.1
    tree = grow_tree(
        draft_logits=BigramDraft(table), root_token=torch.tensor([0]), prefix_length=10, topk=2, max_depth=48,
        temperature=1.0,
    )
    assert tree.size == 1 + 48 * 2
    assert tree.scores.dtype == torch.float32 and torch.isfinite(tree.scores).all()
    logprobs = torch.log_softmax(table.double(), dim=-1)
    parents = tree.parents.tolist()
    for j in range(1, tree.size):
        p = parents[j]
        step = float(tree.scores[j] - tree.scores[p])
        assert step == pytest.approx(float(logprobs[tree.tokens[p], tree.tokens[j]]), abs=1e-3)
        assert tree.scores[j] <= tree.scores[p]
    deepest = tree.scores[-2:]
    assert float(deepest.max()) < -48 * math.log(40)
    assert torch.exp(deepest).max() == 0
    levels = tree.scores[1:].view(48, 2)
    assert (levels[:, 0] >= levels[:, 1]).all(), "each level best first"
    assert (levels[1:, 0] < levels[:-1, 0]).all(), "deeper levels score strictly lower"


# ----------------------------------------------------------------------------------------------- draft buckets
def test_draft_buckets_hold_a_doubling_prefix_and_a_tree_then_the_capacity():
    # the 8 GB presets: max_model_len 2048, topk 6 x depth 48 (289 nodes), capacity 2048 + 289 -> 2352:
    # 256 + 289 = 545 -> 560, 512 + 289 -> 816, 1024 + 289 -> 1328, then 2048 + 289 -> 2352, the capacity
    assert draft_buckets(capacity=2352, tree_size=289) == (560, 816, 1328, 2352)
    assert draft_buckets(capacity=320, tree_size=49) == (320,)  # no room for a shorter bucket: the whole cache
    buckets = draft_buckets(capacity=208, tree_size=13, smallest=16)
    assert buckets == (32, 48, 80, 144, 208)
    assert all(length % 16 == 0 for length in buckets), "mask rows stay aligned for memory-efficient attention"


def test_the_bucket_picked_for_n_is_the_shortest_holding_n_and_the_tree_rows():
    topk, capacity = 3, 208
    drafter = TreeDrafter(draft_logits=None, topk=topk, max_depth=4, capacity=capacity, temperature=1.0,  # type: ignore[arg-type]
                          dtype=torch.float32, device=torch.device("cpu"), smallest_bucket=16)
    lengths = drafter.bucket_lengths
    for depth in range(1, 5):
        for n in range(capacity - depth * topk):
            length = drafter.bucket_for(committed=n, depth=depth).length
            needed = n + 1 + depth * topk  # the prefix, the root and every level's rows (the last level's in its mask)
            assert length >= needed and all(shorter < needed for shorter in lengths if shorter < length), (n, depth)
    with pytest.raises(ValueError, match="needs 209 slots"):
        drafter.bucket_for(committed=196, depth=4)


def test_bucketed_drafting_sees_exactly_what_the_whole_cache_mask_shows():
    """Each step's mask over its bucket is the whole-cache mask's first L columns, the columns past L are all
    masked there, so attention over L slots is the same; within a bucket the inputs' shapes do not move with N."""
    gen = torch.Generator().manual_seed(10)
    table = torch.randn(12, 12, generator=gen) * 2
    k, depth, capacity = 3, 4, 208

    def drafter(smallest: int) -> tuple[TreeDrafter, BigramDraft]:
        draft = BigramDraft(table)
        return TreeDrafter(draft_logits=draft, topk=k, max_depth=depth, capacity=capacity, temperature=0.5,
                           dtype=torch.float32, device=torch.device("cpu"), smallest_bucket=smallest), draft

    (bucketed, parts), (whole, full) = drafter(16), drafter(capacity)
    assert bucketed.bucket_lengths == (32, 48, 80, 144, 208) and whole.bucket_lengths == (capacity,)
    shapes = {}
    for n in (2, 19, 20, 35, 100, 187):
        root = torch.tensor([n % 12])
        tree = bucketed.grow(root_token=root, prefix_length=torch.tensor([n]), committed=n, depth=depth)
        reference = whole.grow(root_token=root, prefix_length=torch.tensor([n]), committed=n, depth=depth)
        assert torch.equal(tree.tokens, reference.tokens) and torch.equal(tree.parents, reference.parents)
        length = bucketed.bucket_for(committed=n, depth=depth).length
        for call, full_call in zip(parts.calls[-depth:], full.calls[-depth:]):
            assert call["bias"].shape[1] == length
            assert torch.equal(call["bias"], full_call["bias"][:, :length])
            assert torch.isneginf(full_call["bias"][:, length:]).all()
        shapes.setdefault(length, set()).add(tuple(tuple(c[name].shape for name in c) for c in parts.calls[-depth:]))
    assert sorted(shapes) == [32, 48, 144, 208]  # N = 2 and 19 share 32; 20 and 35 share 48
    assert all(len(seen) == 1 for seen in shapes.values()), "one set of input shapes per bucket"
