"""Verification of a token tree against the target's choices (subspec_core/verify.py), on hand-built trees
and against a plain Python walk."""

from __future__ import annotations

import random

import pytest
import torch

from subspec_core.tree import select_verify_nodes, subtree
from subspec_core.verify import accepted_path, emitted_tokens
from tests.core.test_tree import make_tree, random_tree

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# The tree verified below (drafted tokens in brackets; target_tokens[j] is the target's choice AFTER node j):
#
#                    0 [root 10]
#                  /            \
#             1 [11]            2 [12]
#             /    \                \
#         3 [13]   4 [14]          5 [15]
#            |
#         6 [16]
PARENTS = [-1, 0, 0, 1, 1, 2, 3]
TOKENS = [10, 11, 12, 13, 14, 15, 16]


def verify(target: dict[int, int], *, parents=PARENTS, tokens=TOKENS, filler: int = 99):
    """Run accepted_path/emitted_tokens with the target's choice `target[j]` at node j (others: `filler`)."""
    tree = make_tree(parents, tokens=tokens)
    target_tokens = torch.tensor([target.get(j, filler) for j in range(len(parents))])
    return run_verifier(tree, target_tokens)


def run_verifier(tree, target_tokens: torch.Tensor) -> tuple[list[int], list[int]]:
    """(path, emitted) as lists, cut to the path's length from the fixed-size (padded) results."""
    max_length = int(tree.depths.max()) + 1
    path = accepted_path(
        parents=tree.parents, tokens=tree.tokens, depths=tree.depths, ancestors=tree.ancestors,
        target_tokens=target_tokens, max_length=max_length,
    )
    emitted = emitted_tokens(path=path, target_tokens=target_tokens)
    assert path.nodes.shape == emitted.shape == (max_length,), "fixed-size outputs, whatever the path"
    length = int(path.length)
    return path.nodes.tolist()[:length], emitted.tolist()[:length]


def reference_walk(parents: list[int], tokens: list[int], target_tokens: list[int]) -> list[int]:
    """From the root, follow the child carrying the target's token while there is one."""
    children: dict[int, dict[int, int]] = {}
    for j in range(1, len(parents)):
        children.setdefault(parents[j], {})[tokens[j]] = j
    path = [0]
    while True:
        nxt = children.get(path[-1], {}).get(target_tokens[path[-1]])
        if nxt is None:
            return path
        path.append(nxt)


def test_full_acceptance_down_the_deepest_branch_with_bonus_at_the_leaf():
    path, emitted = verify({0: 11, 1: 13, 3: 16, 6: 42})
    assert path == [0, 1, 3, 6]
    assert emitted == [11, 13, 16, 42]  # three accepted drafted tokens + the bonus chosen at leaf 6


def test_rejection_at_the_root_emits_only_the_bonus():
    path, emitted = verify({0: 77, 1: 13, 3: 16})  # the children of 0 carry 11 and 12, the target chose 77
    assert path == [0]
    assert emitted == [77]


def test_acceptance_along_a_side_branch():
    path, emitted = verify({0: 12, 2: 15, 5: 7, 1: 13, 3: 16})  # branch 1's nodes "match" but are off the path
    assert path == [0, 2, 5]
    assert emitted == [12, 15, 7]


def test_acceptance_of_the_second_child_then_bonus_at_leaf_4():
    path, emitted = verify({0: 11, 1: 14, 4: 5})
    assert path == [0, 1, 4]
    assert emitted == [11, 14, 5]


def test_rejection_mid_path_emits_the_target_choice_at_the_last_accepted_node():
    path, emitted = verify({0: 11, 1: 12, 2: 15})  # after 11 the target wants 12: no child of 1 carries it
    assert path == [0, 1]
    assert emitted == [11, 12]


def test_off_path_matches_do_not_count():
    # Node 6 "matches" its parent 3's choice, but 3 itself was not chosen at 1: the path stops at 1.
    path, emitted = verify({0: 11, 1: 55, 3: 16})
    assert path == [0, 1]
    assert emitted == [11, 55]


def test_single_node_tree():
    path, emitted = verify({0: 3}, parents=[-1], tokens=[8])
    assert path == [0] and emitted == [3]


def random_target_tokens(rng: random.Random, parents: list[int], tokens: list[int]) -> list[int]:
    """Mostly one of the node's children's tokens (so paths are long), sometimes a token no child has."""
    children: dict[int, list[int]] = {}
    for j in range(1, len(parents)):
        children.setdefault(parents[j], []).append(tokens[j])
    out = []
    for j in range(len(parents)):
        if children.get(j) and rng.random() < 0.8:
            out.append(rng.choice(children[j]))
        else:
            out.append(rng.randrange(20))
    return out


def random_drafted_tree(rng: random.Random, size: int) -> tuple[list[int], list[int]]:
    """Random parents, children of one node carrying distinct tokens from a small vocabulary."""
    parents, tokens = [-1], [rng.randrange(20)]
    used: dict[int, set[int]] = {}
    for j in range(1, size):
        while True:
            p = rng.randrange(j)
            free = [t for t in range(20) if t not in used.get(p, set())]
            if free:
                break
        t = rng.choice(free)
        used.setdefault(p, set()).add(t)
        parents.append(p)
        tokens.append(t)
    return parents, tokens


def test_greedy_walk_matches_python_reference_on_random_trees():
    rng = random.Random(11)
    lengths = []
    for _ in range(500):
        size = rng.randint(1, 30)
        parents, tokens = random_drafted_tree(rng, size)
        target = random_target_tokens(rng, parents, tokens)
        path, emitted = verify(dict(enumerate(target)), parents=parents, tokens=tokens)
        expected_path = reference_walk(parents, tokens, target)
        assert path == expected_path
        assert emitted == [target[j] for j in expected_path]
        # every emitted token but the last is the drafted token of the next path node (accepted drafts)
        assert emitted[:-1] == [tokens[j] for j in expected_path[1:]]
        lengths.append(len(path))
    assert max(lengths) >= 5, "the random targets exercise long acceptances"


def test_greedy_walk_matches_reference_after_pruning():
    rng = random.Random(12)
    for _ in range(200):
        size = rng.randint(2, 30)
        tree = random_tree(rng, size)
        # random_tree's tokens are distinct, so any children carry distinct tokens; make them collide across
        # branches (different parents may share tokens) to test that only the path's own children count
        tokens = [100] + [rng.randrange(6) for _ in range(size - 1)]
        parents = tree.parents.tolist()
        seen: set[tuple[int, int]] = set()
        for j in range(1, size):
            while (parents[j], tokens[j]) in seen:
                tokens[j] += 6
            seen.add((parents[j], tokens[j]))
        tree.tokens = torch.tensor(tokens)
        small = subtree(tree, select_verify_nodes(scores=tree.scores, budget=rng.randint(1, size)))
        target = random_target_tokens(rng, small.parents.tolist(), small.tokens.tolist())
        path, _ = run_verifier(small, torch.tensor(target))
        assert path == reference_walk(small.parents.tolist(), small.tokens.tolist(), target)


@pytest.mark.parametrize("seed", range(5))
def test_tree_walk_equals_plain_greedy_decoding(seed):
    # A deterministic "target" f(prefix) -> next token. Verifying any tree whose nodes carry tokens and whose
    # target choices are f(path to node) emits exactly the first tokens of plain greedy decoding with f.
    rng = random.Random(seed)

    def f(prefix: tuple[int, ...]) -> int:
        return hash((seed,) + prefix) % 4

    plain, prefix = [], ()
    for _ in range(12):
        prefix += (f(prefix),)
        plain.append(prefix[-1])
    for _ in range(40):
        parents, tokens = random_drafted_tree(rng, rng.randint(1, 25))
        tokens = [t % 4 for t in tokens]
        # restore distinct child tokens after the modulo by dropping duplicate children's subtrees
        keep, seen = [0], set()
        for j in range(1, len(parents)):
            if parents[j] in keep and (parents[j], tokens[j]) not in seen:
                keep.append(j)
                seen.add((parents[j], tokens[j]))
        parents = [-1] + [keep.index(parents[j]) for j in keep[1:]]
        tokens = [tokens[j] for j in keep]
        contexts: list[tuple[int, ...]] = [()]
        for j in range(1, len(parents)):
            contexts.append(contexts[parents[j]] + (tokens[j],))
        target = [f(c) for c in contexts]
        _, emitted = verify(dict(enumerate(target)), parents=parents, tokens=tokens)
        assert emitted == plain[: len(emitted)]
