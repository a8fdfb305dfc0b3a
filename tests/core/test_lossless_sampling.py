"""Speculative sampling is lossless: the emitted tokens follow the target's own distribution.

Two levels:
1. The verifier, end to end over a small tree with hand-set target distributions (vocab 5): the joint
   distribution of the first 3 emitted tokens must be the target's chain p(t1) p(t2|t1) p(t3|t1,t2), and the
   same check must reject known-wrong verifiers (so it is not too loose to fail).
2. A tiny engine (tests/core/tiny.py): the 1st and 2nd generated tokens of `subspec` mode follow the exact
   target probabilities computed from the HF model, and seeded `subspec` output equals `vanilla` output.

All randomness comes from fixed seeds: the tests are deterministic. The p-value threshold (1e-6) is what a
correct implementation would fail with on a fresh set of seeds.
"""

from __future__ import annotations

import itertools
from typing import Callable

import pytest
import torch

from subspec_core.config import SpeculationConfig
from subspec_core.sampling import choose_tokens, gumbel_noise
from subspec_core.tree import TokenTree
from subspec_core.types import SamplingParams
from subspec_core.verify import accepted_path, emitted_tokens
from tests.core.test_sampling import P_THRESHOLD, chi_square_pvalue, reference_probabilities, total_variation
from tests.core.test_tree import grow_tree, make_tree
from tests.core.tiny import generate_ids, tiny_engine, tiny_hf_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")

CPU = torch.device("cpu")
VOCAB = 5
OBSERVED = 3  # emitted tokens whose joint distribution is checked (125 cells)
MAX_TREE_DEPTH = 3
DRAWS = 20000

Context = tuple[int, ...]


# ----------------------------------------------------------------------------------------------- the target
def target_logprobs() -> dict[Context, torch.Tensor]:
    """Hand-set target distributions p(. | context) for every context of length 0..3 (float64 log-probs).

    After a one-token context c, token (c[0] + 2) % 5 is impossible (probability 0): a drafted node carrying
    it must never be accepted.
    """
    gen = torch.Generator().manual_seed(1234)
    table = {}
    for length in range(MAX_TREE_DEPTH + 1):
        for context in itertools.product(range(VOCAB), repeat=length):
            logits = torch.randn(VOCAB, generator=gen, dtype=torch.float64) * 1.5
            if length == 1:
                logits[(context[0] + 2) % VOCAB] = float("-inf")
            table[context] = torch.log_softmax(logits, dim=-1)
    return table


LOGP = target_logprobs()


def exact_joint() -> torch.Tensor:
    """The target's chain probability of every (t1, t2, t3), flattened t1 * 25 + t2 * 5 + t3."""
    probs = torch.zeros(VOCAB**OBSERVED, dtype=torch.float64)
    for seq in itertools.product(range(VOCAB), repeat=OBSERVED):
        p = 1.0
        for i in range(OBSERVED):
            p *= float(LOGP[seq[:i]][seq[i]].exp())
        probs[seq[0] * 25 + seq[1] * 5 + seq[2]] = p
    return probs


def keyed_choices(noise: torch.Tensor) -> dict[Context, list[int]]:
    """For every context c and draw s, the target's sample after c: argmax(log p(.|c) + noise[s, len(c)]).

    `noise` (draws, positions, V) is indexed by the absolute position of the chosen token minus one, exactly
    as `choose_tokens` keys its Gumbel noise; a context of length d chooses the token at position d + 1.
    """
    return {c: torch.argmax(lp.float()[None] + noise[:, len(c)], dim=-1).tolist() for c, lp in LOGP.items()}


@pytest.fixture(scope="module")
def noise() -> torch.Tensor:
    """The engine's keyed noise for seeds 0..DRAWS-1 at positions 1..4: (draws, 4, V)."""
    return torch.stack([gumbel_noise(seed=s, positions=range(1, MAX_TREE_DEPTH + 2), vocab_size=VOCAB, device=CPU) for s in range(DRAWS)])


@pytest.fixture(scope="module")
def fresh_noise() -> torch.Tensor:
    """Independent Gumbel noise (draws, V) for the wrong verifiers' extra samples."""
    u = torch.rand(DRAWS, VOCAB, generator=torch.Generator().manual_seed(99))
    return -torch.log(-torch.log(u))


# ----------------------------------------------------------------------------------------------- the trees
# The hand-built tree (drafted tokens in brackets; node 6 carries a token the target never picks after (1,)):
#
#                     0 (root)
#                /       |       \
#            1 [0]     2 [1]     3 [3]
#           /    \       |
#        4 [4]  5 [0]  6 [3]
#          |
#        7 [1]
HAND_PARENTS = [-1, 0, 0, 0, 1, 1, 2, 4]
HAND_TOKENS = [0, 0, 1, 3, 4, 0, 3, 1]  # the root's token is irrelevant: contexts start after the root


def hand_tree() -> TokenTree:
    return make_tree(HAND_PARENTS, tokens=HAND_TOKENS)


def drafted_tree() -> TokenTree:
    """A tree grown by grow_tree (topk 2, depth 3) with a bigram draft that roughly imitates the target."""
    gen = torch.Generator().manual_seed(5)
    table = torch.stack([LOGP[(t,)].clamp(min=-30).float() for t in range(VOCAB)]) + torch.randn(VOCAB, VOCAB, generator=gen)
    return grow_tree(
        draft_logits=lambda tokens, *_: table[tokens], root_token=torch.tensor([0]), prefix_length=0, topk=2,
        max_depth=MAX_TREE_DEPTH, temperature=1.0,
    )


def node_contexts(tree: TokenTree) -> list[Context]:
    """The drafted tokens after the root on each node's path (the context its target distribution sees)."""
    parents, tokens = tree.parents.tolist(), tree.tokens.tolist()
    contexts: list[Context] = [()]
    for j in range(1, tree.size):
        contexts.append(contexts[parents[j]] + (tokens[j],))
    return contexts


def children_of(tree: TokenTree) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for j, p in enumerate(tree.parents.tolist()):
        if p >= 0:
            out.setdefault(p, []).append(j)
    return out


# ----------------------------------------------------------------------------------------------- verifiers
# A verifier maps (tree, draw index) to the tokens one verification emits; `continue_plain` then decodes
# plainly from the target up to OBSERVED tokens, as the engine's next iterations would.
Verifier = Callable[[int], list[int]]


def make_correct_verifier(
    tree: TokenTree, choices: dict[Context, list[int]], node_noise: torch.Tensor | None = None
) -> Verifier:
    """The engine's verifier: the target's token at every node, then accepted_path / emitted_tokens.

    The target's tokens come from the keyed noise (`choices`, as the engine does), or, with `node_noise`
    (draws, T, V), from independent noise per node: plain sampling, for which the walk is lossless too.
    """
    contexts = node_contexts(tree)
    if node_noise is None:
        per_node = torch.tensor([choices[c] for c in contexts])  # (T, draws)
    else:
        rows = torch.stack([LOGP[c].float() for c in contexts])  # (T, V)
        per_node = torch.argmax(rows[None] + node_noise, dim=-1).T.contiguous()  # (T, draws)

    def verify(s: int) -> list[int]:
        target_tokens = per_node[:, s]
        path = accepted_path(
            parents=tree.parents, tokens=tree.tokens, depths=tree.depths, ancestors=tree.ancestors,
            target_tokens=target_tokens, max_length=tree.size,
        )
        return emitted_tokens(path=path, target_tokens=target_tokens).tolist()[: int(path.length)]

    return verify


def walk(tree: TokenTree, choices: dict[Context, list[int]], s: int) -> tuple[list[int], Context]:
    """Python reference walk: accepted drafted tokens and the context of the last accepted node."""
    tokens, kids = tree.tokens.tolist(), children_of(tree)
    node, context, accepted = 0, (), []
    while True:
        wanted = choices[context][s]
        nxt = next((c for c in kids.get(node, []) if tokens[c] == wanted), None)
        if nxt is None:
            return accepted, context
        node, context = nxt, context + (wanted,)
        accepted.append(wanted)


def run(verifier: Verifier, choices: dict[Context, list[int]]) -> torch.Tensor:
    """Counts (125,) of the first three tokens over all draws: the verification's tokens, then plain decoding."""
    codes = []
    for s in range(DRAWS):
        seq = verifier(s)[:OBSERVED]
        while len(seq) < OBSERVED:
            seq.append(choices[tuple(seq)][s])  # the next iteration picks position len+1 with its own noise
        codes.append(seq[0] * 25 + seq[1] * 5 + seq[2])
    return torch.bincount(torch.tensor(codes), minlength=VOCAB**OBSERVED)


@pytest.mark.parametrize("tree_fn", [hand_tree, drafted_tree], ids=["hand_tree", "drafted_tree"])
def test_verifier_emits_the_targets_joint_distribution(tree_fn, noise):
    tree = tree_fn()
    choices = keyed_choices(noise)
    # the harness's target choices are the engine's: choose_tokens over the tree's rows, keyed by position
    contexts = node_contexts(tree)
    rows = torch.stack([LOGP[c].float() for c in contexts])
    for s in range(0, DRAWS, 1999):
        engine_choice = choose_tokens(
            logits=rows, params=SamplingParams(temperature=1.0), seed=s, positions=tree.depths + 1, first_position=1,
            num_positions=MAX_TREE_DEPTH + 1,
        )
        assert engine_choice.tolist() == [choices[c][s] for c in contexts]

    verifier = make_correct_verifier(tree, choices)
    accepted = sum(len(verifier(s)) - 1 for s in range(2000))
    assert accepted > 500, "the tree is accepted often enough for the test to exercise acceptance"
    counts = run(verifier, choices)
    exact = exact_joint()
    assert chi_square_pvalue(counts, exact) > P_THRESHOLD
    assert total_variation(counts, exact) < 0.04
    # impossible tokens are never emitted: (t1 + 2) % 5 after t1 (node 6 of the hand tree carries 3 after 1)
    assert all(counts.view(VOCAB, VOCAB, VOCAB)[t1, (t1 + 2) % VOCAB].sum() == 0 for t1 in range(VOCAB))
    # with keyed noise the emitted tokens are, draw by draw, those of plain decoding (speculation-invariance)
    plain = run(make_correct_verifier(make_tree([-1], tokens=[0]), choices), choices)
    assert torch.equal(counts, plain)


@pytest.mark.parametrize("tree_fn", [hand_tree, drafted_tree], ids=["hand_tree", "drafted_tree"])
def test_verifier_with_independent_samples_per_node_is_lossless(tree_fn, noise):
    # Not the engine's keyed noise: every node's target token is an independent sample. The walk must still
    # emit the target's joint distribution (and now the outcome differs from plain decoding draw by draw).
    tree = tree_fn()
    choices = keyed_choices(noise)
    u = torch.rand(DRAWS, tree.size, VOCAB, generator=torch.Generator().manual_seed(7))
    verifier = make_correct_verifier(tree, choices, node_noise=-torch.log(-torch.log(u)))
    counts = run(verifier, choices)
    exact = exact_joint()
    assert chi_square_pvalue(counts, exact) > P_THRESHOLD
    assert total_variation(counts, exact) < 0.04
    assert not torch.equal(counts, run(make_correct_verifier(make_tree([-1], tokens=[0]), choices), choices))


def test_plain_decoding_through_the_harness_is_exact(noise):
    # Sanity of the harness itself: with no tree (a root only) every token comes from plain decoding.
    choices = keyed_choices(noise)
    counts = run(make_correct_verifier(make_tree([-1], tokens=[0]), choices), choices)
    assert chi_square_pvalue(counts, exact_joint()) > P_THRESHOLD


def wrong_accept_if_possible(tree: TokenTree, choices, s: int, fresh: torch.Tensor) -> list[int]:
    """Wrong: accept the draft's best child whenever the target gives it probability > 0 (draft-driven)."""
    tokens, kids = tree.tokens.tolist(), children_of(tree)
    node, context, accepted = 0, (), []
    while True:
        nxt = next((c for c in kids.get(node, []) if LOGP[context][tokens[c]] > float("-inf")), None)
        if nxt is None:
            return accepted + [choices[context][s]]
        node, context = nxt, context + (tokens[nxt],)
        accepted.append(tokens[nxt])


def wrong_resample_bonus(tree: TokenTree, choices, s: int, fresh: torch.Tensor) -> list[int]:
    """Wrong: on rejection, draw the bonus token again from the target (fresh noise) instead of the rejected choice."""
    accepted, context = walk(tree, choices, s)
    return accepted + [int(torch.argmax(LOGP[context].float() + fresh[s]))]


def wrong_bonus_from_draft(tree: TokenTree, choices, s: int, fresh: torch.Tensor) -> list[int]:
    """Wrong: the bonus token is sampled from a (flatter) draft distribution."""
    accepted, context = walk(tree, choices, s)
    draft = torch.log_softmax(LOGP[context].clamp(min=-30).float() * 0.3, dim=-1)
    return accepted + [int(torch.argmax(draft + fresh[s]))]


WRONG = [wrong_accept_if_possible, wrong_resample_bonus, wrong_bonus_from_draft]


@pytest.mark.parametrize("wrong", WRONG, ids=lambda f: f.__name__)
@pytest.mark.parametrize("tree_fn", [hand_tree, drafted_tree], ids=["hand_tree", "drafted_tree"])
def test_the_check_rejects_known_wrong_verifiers(wrong, tree_fn, noise, fresh_noise):
    tree = tree_fn()
    choices = keyed_choices(noise)
    counts = run(lambda s: wrong(tree, choices, s, fresh_noise), choices)
    assert chi_square_pvalue(counts, exact_joint()) < P_THRESHOLD, f"{wrong.__name__} was not detected"


@pytest.mark.parametrize("tree_fn", [hand_tree, drafted_tree], ids=["hand_tree", "drafted_tree"])
def test_the_check_rejects_noise_keyed_by_seed_only(tree_fn, noise):
    # Wrong sampler, right walk: the same Gumbel noise at every position (keyed by seed, not seed and position).
    tree = tree_fn()
    choices = keyed_choices(noise[:, :1].expand_as(noise))
    counts = run(make_correct_verifier(tree, choices), choices)
    assert chi_square_pvalue(counts, exact_joint()) < P_THRESHOLD


# ----------------------------------------------------------------------------------------------- tiny engine
PROMPT = [5, 17, 42, 99]
ENGINE_SEEDS = 500
ENGINE_CASES = [dict(temperature=1.0), dict(temperature=1.0, top_p=0.9, top_k=20)]


@pytest.fixture(scope="module")
def llama():
    return tiny_hf_model("llama")


@pytest.fixture(scope="module", params=["plain", "delayed_link_post_speculation"])
def subspec_engine(request, llama, tiny_tokenizer):
    """Subspec as it runs on a CPU, and over a simulated link with random delays, extending trees during the
    verify (postspec.py)."""
    if request.param == "plain":
        yield tiny_engine(llama, tiny_tokenizer, mode="subspec", speculation=SpeculationConfig(topk=3, max_depth=3))
        return
    engine = tiny_engine(llama, tiny_tokenizer, mode="subspec", simulate_link_gbps=2.0, simulate_link_jitter_s=0.0002,
                         speculation=SpeculationConfig(topk=3, max_depth=3, post_levels=2))
    yield engine
    engine.close()


def exact_first_two(hf_model, case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact target probabilities of the 1st token (V,) and of the pair (V * V,) flattened t1 * V + t2, from HF."""
    with torch.no_grad():
        logits1 = hf_model(torch.tensor([PROMPT])).logits[0, -1].double()
        p1 = torch.tensor(reference_probabilities(logits1.tolist(), **case), dtype=torch.float64)
        vocab = p1.shape[0]
        support = p1.nonzero().squeeze(1)
        batch = torch.cat([torch.tensor([PROMPT]).expand(len(support), -1), support[:, None]], dim=1)
        logits2 = hf_model(batch).logits[:, -1].double()
    joint = torch.zeros(vocab, vocab, dtype=torch.float64)
    for row, t1 in enumerate(support.tolist()):
        joint[t1] = p1[t1] * torch.tensor(reference_probabilities(logits2[row].tolist(), **case), dtype=torch.float64)
    return p1, joint.flatten()


def exact_third(hf_model, case: dict, joint: torch.Tensor) -> torch.Tensor:
    """Exact marginal (V,) of the 3rd token, summing over the (t1, t2) pairs of positive probability."""
    pairs = joint.nonzero().squeeze(1)
    vocab = int(round(joint.numel() ** 0.5))
    batch = torch.cat([torch.tensor([PROMPT]).expand(len(pairs), -1), (pairs // vocab)[:, None], (pairs % vocab)[:, None]], dim=1)
    with torch.no_grad():
        logits3 = hf_model(batch).logits[:, -1].double()
    p3 = torch.zeros(vocab, dtype=torch.float64)
    for row, pair in enumerate(pairs.tolist()):
        p3 += joint[pair] * torch.tensor(reference_probabilities(logits3[row].tolist(), **case), dtype=torch.float64)
    return p3


@pytest.mark.parametrize("case", ENGINE_CASES, ids=["temperature=1", "top_p=0.9,top_k=20"])
def test_subspec_first_tokens_follow_the_target(case, llama, subspec_engine):
    p1, joint = exact_first_two(llama, case)
    vocab = p1.shape[0]
    draws, accepted = [], 0
    for seed in range(ENGINE_SEEDS):
        # max_tokens 4: the 1st token comes from prefill, the 2nd (and, when a child is accepted, the 3rd and
        # 4th) from one verified depth-2 tree
        ids, stats = generate_ids(subspec_engine, PROMPT, max_tokens=4, seed=seed, **case)
        assert len(ids) == 4
        draws.append(ids)
        accepted += stats.accepted_tokens
    assert accepted > ENGINE_SEEDS // 4, "drafted tokens were accepted: the speculative path is exercised"
    tokens = torch.tensor(draws)  # (seeds, 4)
    counts1 = torch.bincount(tokens[:, 0], minlength=vocab)
    counts2 = torch.bincount(tokens[:, 1], minlength=vocab)
    counts12 = torch.bincount(tokens[:, 0] * vocab + tokens[:, 1], minlength=vocab * vocab)
    p2 = joint.view(vocab, vocab).sum(0)
    assert chi_square_pvalue(counts1, p1) > P_THRESHOLD
    assert chi_square_pvalue(counts2, p2) > P_THRESHOLD
    assert chi_square_pvalue(counts12, joint) > P_THRESHOLD
    # the same check rejects a slightly different target (temperature 1.25 instead of 1)
    hotter_p1, hotter_joint = exact_first_two(llama, {**case, "temperature": 1.25})
    assert chi_square_pvalue(counts1, hotter_p1) < P_THRESHOLD
    assert chi_square_pvalue(counts2, hotter_joint.view(vocab, vocab).sum(0)) < P_THRESHOLD
    assert chi_square_pvalue(counts12, hotter_joint) < P_THRESHOLD
    if "top_k" in case:  # a small support: the 3rd token's exact marginal is cheap (<= 400 contexts)
        counts3 = torch.bincount(tokens[:, 2], minlength=vocab)
        assert chi_square_pvalue(counts3, exact_third(llama, case, joint)) > P_THRESHOLD
        assert chi_square_pvalue(counts3, exact_third(llama, {**case, "temperature": 1.25}, hotter_joint)) < P_THRESHOLD


SPECULATIONS = [
    SpeculationConfig(topk=3, max_depth=4),
    SpeculationConfig(topk=4, max_depth=5, max_verify_tokens=7),  # a pruned tree (select_verify_nodes + subtree)
]


@pytest.mark.parametrize("speculation", SPECULATIONS, ids=["whole_tree", "pruned_tree"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_seeded_subspec_output_equals_vanilla(family, speculation, llama, tiny_tokenizer):
    # Position-keyed noise makes a seeded speculative run pick, position by position, the token plain decoding
    # picks: the outputs are equal token for token (greedy as well).
    model = llama if family == "llama" else tiny_hf_model("qwen2")
    subspec = tiny_engine(model, tiny_tokenizer, mode="subspec", speculation=speculation)
    vanilla = tiny_engine(model, tiny_tokenizer, mode="vanilla")
    accepted = 0
    cases = [dict(temperature=1.0), dict(temperature=0.8, top_p=0.9, top_k=20), dict(temperature=0.0)]
    for seed in range(3):
        for case in cases:
            spec_ids, stats = generate_ids(subspec, [1, 2, 3], max_tokens=20, seed=seed, ignore_eos=True, **case)
            plain_ids, _ = generate_ids(vanilla, [1, 2, 3], max_tokens=20, seed=seed, ignore_eos=True, **case)
            assert spec_ids == plain_ids, f"seed {seed} {case}"
            accepted += stats.accepted_tokens
    assert accepted > 10, "speculation accepted drafted tokens, so the equality is not trivial"


def test_seeded_subspec_over_a_delayed_link_with_post_speculation_equals_vanilla(llama, tiny_tokenizer):
    vanilla = tiny_engine(llama, tiny_tokenizer, mode="vanilla")
    linked = tiny_engine(llama, tiny_tokenizer, mode="subspec", max_resident_layers=2, simulate_link_gbps=1.0,
                         simulate_link_jitter_s=0.0005, speculation=SpeculationConfig(topk=3, max_depth=4, post_levels=3))
    for seed in range(3):
        for case in (dict(temperature=1.0), dict(temperature=0.8, top_p=0.9, top_k=20), dict(temperature=0.0)):
            got, _ = generate_ids(linked, [1, 2, 3], max_tokens=20, seed=seed, ignore_eos=True, **case)
            assert got == generate_ids(vanilla, [1, 2, 3], max_tokens=20, seed=seed, ignore_eos=True, **case)[0]
    linked.close()


def test_an_unseeded_request_takes_the_configured_seed_else_a_fresh_one(llama, tiny_tokenizer):
    """seed=None: the operator's EngineConfig.seed when set (repeatable), else a fresh seed per request, so
    unseeded sampling is not repeatable (OpenAI's semantics)."""
    sampling = dict(max_tokens=8, temperature=4.0)  # nearly flat: two independent draws of 8 tokens differ
    unseeded = tiny_engine(llama, tiny_tokenizer, mode="vanilla")
    assert len({tuple(generate_ids(unseeded, PROMPT, **sampling)[0]) for _ in range(3)}) > 1
    configured = tiny_engine(llama, tiny_tokenizer, mode="vanilla", seed=7)
    first = generate_ids(configured, PROMPT, **sampling)[0]
    assert generate_ids(configured, PROMPT, **sampling)[0] == first == generate_ids(unseeded, PROMPT, seed=7, **sampling)[0]
