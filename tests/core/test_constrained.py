"""Structured outputs in the engine: grammar masks on the draft tree and its verification (subspec_core/grammar.py,
constrained.py). Constrained subspec output is the constrained target's: greedy token for token, seeded
sampling identical to vanilla's, and sampled first tokens distributed as the target's renormalized over what
the grammar allows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from subspec_core.config import SpeculationConfig
from subspec_core.constrained import bitmask_to_bool, end_token_mask
from subspec_core.grammar import (GrammarError, Grammars, check, choice_constraint, json_schema_constraint,
                                  lark_constraint, regex_constraint)
from tests.core.test_lossless_sampling import PROMPT
from tests.core.test_sampling import P_THRESHOLD, chi_square_pvalue, reference_probabilities
from tests.core.tiny import TINY_VOCAB, generate_ids, tiny_engine, tiny_hf_model

# Constraints whose tokens a tiny model (the default tokenizer's first 512 ids) can spell
CONSTRAINTS = {
    "regex": regex_constraint("[a-c]{3,8}-[0-9]+", "guided_regex"),
    "choice": choice_constraint(["alpha", "beta", "gamma"], "guided_choice"),
    "lark": lark_constraint('start: ("ab" | "cd")+ /[0-9]{2,4}/', "guided_grammar"),
}


@pytest.fixture(scope="module")
def grammars(tiny_tokenizer):
    return Grammars(tiny_tokenizer, [2])


def allowed_ids(words: np.ndarray) -> set[int]:
    return set(np.flatnonzero(bitmask_to_bool(words[None], TINY_VOCAB, device=torch.device("cpu"))[0].numpy()).tolist())


def test_tree_masks_are_the_states_of_each_nodes_path(grammars, tiny_tokenizer):
    """A node's mask equals a fresh state's after consuming the node's path; a token its parent refuses gets an
    empty mask; after the grammar's end only the end token follows, again."""
    constraint = json_schema_constraint({"type": "object", "properties": {"n": {"type": "integer"}},
                                         "additionalProperties": False}, "x")
    ids = tiny_tokenizer.encode('{"n": 12}', add_special_tokens=False)
    state = grammars.state(constraint)
    state.consume(ids[:1])
    tree = state.tree()  # the root: ids[0], consumed
    refused = tiny_tokenizer.encode("Z", add_special_tokens=False)[0]
    level1 = tree.add([0, 0], [ids[1], refused])
    level2 = tree.add([1], [ids[2]])
    fresh = grammars.state(constraint)
    fresh.consume(ids[:2])
    assert np.array_equal(level1[0], fresh.allowed()) and not level1[1].any()
    fresh.consume(ids[2:3])
    assert np.array_equal(level2[0], fresh.allowed())
    assert np.array_equal(tree.masks([0, 1, 3]), np.stack([tree.masks([0])[0], level1[0], level2[0]]))
    done = grammars.state(constraint)
    done.consume(ids + [2])  # the object, then the end token
    assert done.finished and allowed_ids(done.allowed()) == {2}
    after_end = done.tree().add([0], [2])
    assert allowed_ids(after_end[0]) == {2}


def test_bitmask_rows_become_bool_masks_and_an_empty_row_allows_the_end():
    words = np.zeros((3, (TINY_VOCAB + 31) // 32), dtype=np.int32)
    words[0, 0] = 0b101  # tokens 0 and 2
    words[1, 15] = -(2**31)  # bit 31 of word 15: token 511, the sign bit
    cpu = torch.device("cpu")
    allowed = bitmask_to_bool(words, TINY_VOCAB + 8, device=cpu)  # a model vocabulary past the tokenizer's
    assert allowed[0].nonzero().flatten().tolist() == [0, 2]
    assert allowed[1].nonzero().flatten().tolist() == [511]
    assert allowed[2].all()  # no end token known: an empty row allows everything rather than nothing
    ends = bitmask_to_bool(words, TINY_VOCAB, device=cpu, end_mask=end_token_mask([2, 7], TINY_VOCAB, cpu))
    assert ends[2].nonzero().flatten().tolist() == [2, 7] and ends[0].nonzero().flatten().tolist() == [0, 2]


def test_invalid_grammars_name_the_field():
    for constraint, part in ((json_schema_constraint({"type": "strin"}, "response_format"), "strin"),
                             (regex_constraint("[a-", "guided_regex"), "regex"),
                             (lark_constraint("start: (", "guided_grammar"), "")):
        with pytest.raises(GrammarError) as info:
            check(constraint)
        assert info.value.origin == constraint.origin and part in info.value.reason


@pytest.mark.parametrize("family, topk, depth", [("llama", 3, 6), ("qwen2", 2, 5), ("llama3", 6, 4)])
def test_constrained_subspec_equals_constrained_vanilla(family, topk, depth, grammars, tiny_tokenizer):
    subspec = tiny_engine(tiny_hf_model(family, seed=7), tiny_tokenizer,
                          speculation=SpeculationConfig(topk=topk, max_depth=depth))
    vanilla = tiny_engine(tiny_hf_model(family, seed=7), tiny_tokenizer, mode="vanilla")
    for name, constraint in CONSTRAINTS.items():
        for sampling in ({"temperature": 0}, {"temperature": 0.8, "seed": 3}):
            expected, _ = generate_ids(vanilla, [1, 2, 3, 4], max_tokens=30, constraint=constraint, **sampling)
            got, stats = generate_ids(subspec, [1, 2, 3, 4], max_tokens=30, constraint=constraint, **sampling)
            assert got == expected, (name, sampling)
            state = grammars.state(constraint)  # the output is a sentence of the grammar, then end tokens
            end = got.index(2) if 2 in got else len(got)
            state.consume(got[:end])
            assert state.accepting or end == len(got), (name, tiny_tokenizer.decode(got))
    assert stats.accepted_tokens > 0, "drafted tokens were accepted under the constraint"


def test_constrained_sampled_tokens_follow_the_renormalized_target(grammars, tiny_tokenizer):
    """The first two sampled tokens of constrained subspec decoding (the 2nd from a verified tree): chi-square
    against the target's probabilities with the disallowed tokens removed, and against the unconstrained
    target's (rejected)."""
    llama = tiny_hf_model("llama")
    engine = tiny_engine(llama, tiny_tokenizer, mode="subspec", speculation=SpeculationConfig(topk=3, max_depth=3))
    constraint = regex_constraint("[a-e]{2,8}", "guided_regex")

    def allowed_after(prefix: list[int]) -> set[int]:
        state = grammars.state(constraint)
        state.consume(prefix)
        return allowed_ids(state.allowed())

    def masked_probabilities(logits: list[float], allowed: set[int]) -> list[float]:
        return reference_probabilities([x if t in allowed else float("-inf") for t, x in enumerate(logits)],
                                       temperature=1.0)

    allowed1 = allowed_after([])
    with torch.no_grad():
        logits1 = llama(torch.tensor([PROMPT])).logits[0, -1].double().tolist()
    p1 = torch.tensor(masked_probabilities(logits1, allowed1), dtype=torch.float64)
    support = p1.nonzero().flatten().tolist()
    with torch.no_grad():
        logits2 = llama(torch.tensor([PROMPT + [t1] for t1 in support])).logits[:, -1].double().tolist()
    p2 = torch.zeros(TINY_VOCAB, dtype=torch.float64)
    for t1, row in zip(support, logits2):
        p2 += p1[t1] * torch.tensor(masked_probabilities(row, allowed_after([t1])), dtype=torch.float64)
    draws, accepted = [], 0
    for seed in range(400):
        ids, stats = generate_ids(engine, PROMPT, max_tokens=4, seed=seed, temperature=1.0, constraint=constraint)
        draws.append(ids[:2])
        accepted += stats.accepted_tokens
    assert accepted > 0, "drafted tokens were accepted: the constrained verify is exercised"
    tokens = torch.tensor(draws)
    counts1 = torch.bincount(tokens[:, 0], minlength=TINY_VOCAB)
    counts2 = torch.bincount(tokens[:, 1], minlength=TINY_VOCAB)
    assert chi_square_pvalue(counts1, p1) > P_THRESHOLD
    assert chi_square_pvalue(counts2, p2) > P_THRESHOLD
    unconstrained = torch.tensor(reference_probabilities(logits1, temperature=1.0), dtype=torch.float64)
    assert chi_square_pvalue(counts1, unconstrained) < P_THRESHOLD
    assert all(t2 in allowed_after([t1]) for t1, t2 in draws)


def test_default_model_constrained_subspec_equals_vanilla(default_engines, default_tokenizer):
    """The real default model, every layer streamed, depth 32 x topk 6, under a JSON schema: the same tokens as
    constrained plain decoding, the JSON valid, and drafted tokens accepted under the masks."""
    import json

    import jsonschema

    from tests.core.test_lossless import chat_ids

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    constraint = json_schema_constraint(schema, "response_format.json_schema.schema")
    ids = chat_ids(default_tokenizer, 'Give me a person as JSON, like {"name": "Ada", "age": 36}.')
    expected, _ = generate_ids(default_engines("vanilla"), ids, max_tokens=40, temperature=0, constraint=constraint)
    got, stats = generate_ids(default_engines("subspec"), ids, max_tokens=40, temperature=0, constraint=constraint)
    assert got == expected
    assert stats.accepted_tokens > 0 and stats.grammar_s > 0
    jsonschema.validate(json.loads(default_tokenizer.decode(got, skip_special_tokens=True)), schema)
