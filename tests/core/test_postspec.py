"""Post-speculation (subspec_core/postspec.py) over the simulated link with random delays: chained trees are
lossless, drafts do not depend on timing, the tree stays within its buffers, and no draft work outlives a
request (its end, an abort inside the verify, a close between events).

The engines keep 2 of 3 layers resident, so the draft is close to the target: whole trees are often accepted
and chains happen; the third layer streams over the link, so the extension runs in the verify's waits.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from subspec_core.config import SpeculationConfig
from subspec_core.engine import Engine
from subspec_core.grammar import regex_constraint
from subspec_core.types import GenerationRequest, SamplingParams
from tests.core.tiny import generate_ids, tiny_engine, tiny_hf_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SPEC = SpeculationConfig(topk=2, max_depth=3, post_levels=3)
LINK = dict(simulate_link_gbps=0.05, simulate_link_jitter_s=0.002)  # ~3 ms a copy: draft levels fit in the waits
PROMPTS = ([3, 1, 4, 1, 5], [9, 2, 6], list(range(20, 44)))


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_hf_model("llama", seed=7)


def pipelined(model: Any, tokenizer: Any, **overrides: Any) -> Engine:
    return tiny_engine(model, tokenizer, **{"speculation": SPEC, "max_resident_layers": 2, **LINK, **overrides})


class Spy:
    """Records the engine's draft work in order: ('grow',), ('extend',), ('plan', chained), ('layer', i)."""

    def __init__(self, engine: Engine) -> None:
        self.entries: list[tuple[Any, ...]] = []
        self.in_waits = 0  # extension levels run from inside a wait for a copy
        drafter, postspec, layers = engine.drafter, engine.postspec, engine.target_layers
        grow, extend, plan, acquire = drafter.grow, drafter.extend, postspec.plan, layers.acquire

        def spy_grow(**kwargs: Any) -> Any:
            self.entries.append(("grow",))
            return grow(**kwargs)

        def spy_extend() -> None:
            self.entries.append(("extend",))
            self.in_waits += any(frame.function == "wait_filled" for frame in inspect.stack(context=0))
            extend()

        def spy_plan(**kwargs: Any) -> Any:
            planned = plan(**kwargs)
            self.entries.append(("plan", planned.chained))
            return planned

        def spy_acquire(layer: int, *args: Any) -> Any:
            self.entries.append(("layer", layer))
            return acquire(layer, *args)

        drafter.grow, drafter.extend, postspec.plan, layers.acquire = spy_grow, spy_extend, spy_plan, spy_acquire

    def count(self, kind: str) -> int:
        return sum(1 for entry in self.entries if entry[0] == kind)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.3, top_p=0.95, seed=3)],
                         ids=["greedy", "sampled"])
def test_chained_trees_are_lossless(model, tiny_tokenizer, sampling):
    vanilla = tiny_engine(model, tiny_tokenizer, mode="vanilla")
    engine = pipelined(model, tiny_tokenizer)
    chained = 0
    for prompt in PROMPTS:
        expected, _ = generate_ids(vanilla, prompt, max_tokens=40, **sampling)
        got, stats = generate_ids(engine, prompt, max_tokens=40, **sampling)
        assert got == expected, prompt
        chained += stats.chained_iterations
    assert chained >= 2, "whole trees were accepted and their extensions verified next"
    engine.close()


def test_drafts_do_not_depend_on_timing(model, tiny_tokenizer):
    """Exactly post_levels extension levels per verify, from the draft's own rows: the same trees whatever the
    delays (no link at all, or a slow one with jitter)."""
    runs = []
    for link in ({"simulate_link_gbps": None, "simulate_link_jitter_s": 0.0}, LINK):
        engine = pipelined(model, tiny_tokenizer, **link)
        stats = [generate_ids(engine, p, max_tokens=30, temperature=0)[1] for p in PROMPTS]
        runs.append([(s.iterations, s.chained_iterations, s.drafted_tokens, s.accepted_tokens) for s in stats])
        engine.close()
    assert runs[0] == runs[1]


def test_extension_runs_in_the_verify_waits(model, tiny_tokenizer):
    # every layer streamed, ~30 ms a copy: a verify waits for each layer, with room for every level
    engine = pipelined(model, tiny_tokenizer, simulate_link_gbps=0.005, max_resident_layers=0)
    spy = Spy(engine)
    generate_ids(engine, PROMPTS[0], max_tokens=12, temperature=0)
    # while a copy was in flight (the rest, if any, after a verify whose copies had all landed)
    assert spy.in_waits >= spy.count("extend") * 3 // 4 > 0
    engine.close()


def test_a_long_chain_stays_within_the_buffers_and_the_context(model, tiny_tokenizer):
    """Chains up to the end of the context: the re-rooted tree never outgrows the drafter's levels, its bucket
    or the KV capacity (which counts the draft rows of a tree and its extension, then the verify's)."""
    engine = pipelined(model, tiny_tokenizer, max_model_len=96, simulate_link_gbps=None, simulate_link_jitter_s=0.0)
    spec = engine.config.speculation
    assert engine.kv_cache.capacity >= 96 + 1 + spec.draft_levels * spec.topk + spec.verify_size
    vanilla = tiny_engine(model, tiny_tokenizer, mode="vanilla", max_model_len=96)
    prompt = list(range(30, 50))
    expected, _ = generate_ids(vanilla, prompt, max_tokens=200, temperature=0)
    got, stats = generate_ids(engine, prompt, max_tokens=200, temperature=0)
    assert got == expected and len(got) == 96 - len(prompt)
    assert stats.chained_iterations > 0
    assert engine.drafter.levels <= engine.drafter.max_levels


def test_a_request_that_ends_leaves_no_chain_to_the_next(model, tiny_tokenizer):
    engine, fresh = pipelined(model, tiny_tokenizer), pipelined(model, tiny_tokenizer)
    spy = Spy(engine)
    generate_ids(engine, PROMPTS[0], max_tokens=30, temperature=0)
    assert ("plan", True) in spy.entries
    spy.entries.clear()
    got, _ = generate_ids(engine, PROMPTS[1], max_tokens=30, temperature=0)
    assert spy.entries[[e[0] for e in spy.entries].index("plan")] == ("plan", False)  # the next starts fresh
    assert got == generate_ids(fresh, PROMPTS[1], max_tokens=30, temperature=0)[0]


@pytest.mark.parametrize("where", ["inside the verify", "between events"])
def test_an_abort_leaves_no_draft_work_for_the_next_request(model, tiny_tokenizer, where):
    """Cancelled inside a verify while extension levels are pending (or closed between events with a chain
    pending): no extension level runs after it, and the next request's output (its KV rows) is a fresh
    engine's."""
    engine, fresh = pipelined(model, tiny_tokenizer), pipelined(model, tiny_tokenizer)
    spy = Spy(engine)
    state = {"aborted_at": None}

    def cancelled() -> bool:
        if state["aborted_at"] is None and where == "inside the verify":
            # a verify is running (a layer after the last plan) and the extension has started, not finished
            last_plan = max(i for i, e in enumerate(spy.entries) if e[0] == "plan") if spy.count("plan") else None
            if last_plan is not None and spy.count("plan") >= 2:
                since = spy.entries[last_plan:]
                if ("extend",) in since and since.count(("extend",)) < SPEC.post_levels:
                    state["aborted_at"] = len(spy.entries)
        return state["aborted_at"] is not None

    request = GenerationRequest("a", tuple(PROMPTS[2]), SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
    events = engine.generate(request, cancelled=cancelled)
    if where == "between events":
        for event in events:
            if engine.postspec._chain is not None:  # the next step would verify a chained tree
                state["aborted_at"] = len(spy.entries)
                events.close()
                break
    else:
        assert not any(event.finished for event in events)
    assert state["aborted_at"] is not None, "the abort arrived"
    assert ("extend",) not in spy.entries[state["aborted_at"]:]
    spy.entries.clear()
    got, _ = generate_ids(engine, PROMPTS[1], max_tokens=30, temperature=0)
    first = [e[0] for e in spy.entries if e[0] in ("grow", "extend")]
    assert first[0] == "grow", "no pending extension level ran before the next request's first tree"
    assert got == generate_ids(fresh, PROMPTS[1], max_tokens=30, temperature=0)[0]


def test_a_constrained_request_after_a_chain_is_grown_fresh_and_never_chained(model, tiny_tokenizer):
    """A constrained request's tree is grown guided (its grammar restricts every level) and is not extended:
    after a request whose trees chained (a rebase rewrote the drafter's level-1 rows), its output is still the
    constrained target's, and the unconstrained request after it is too."""
    constraint = regex_constraint("[a-c]{3,8}-[0-9]+", "guided_regex")
    vanilla = tiny_engine(model, tiny_tokenizer, mode="vanilla")
    engine = pipelined(model, tiny_tokenizer)
    _, before = generate_ids(engine, PROMPTS[0], max_tokens=40, temperature=0)
    assert before.chained_iterations > 0
    for sampling in ({"temperature": 0}, {"temperature": 0.8, "seed": 3}):
        expected, _ = generate_ids(vanilla, PROMPTS[2], max_tokens=30, constraint=constraint, **sampling)
        got, stats = generate_ids(engine, PROMPTS[2], max_tokens=30, constraint=constraint, **sampling)
        assert got == expected, sampling
        assert stats.chained_iterations == 0 and stats.iterations > 0
    expected, _ = generate_ids(vanilla, PROMPTS[0], max_tokens=40, temperature=0)
    assert generate_ids(engine, PROMPTS[0], max_tokens=40, temperature=0)[0] == expected
    engine.close()


def test_a_chain_across_an_attention_bucket_boundary_grows_fresh_in_the_longer_bucket(model, tiny_tokenizer):
    """A re-rooted tree keeps its attention bucket; once the committed prefix has moved so far that the chained
    tree's extension would write past that bucket's last slot, the iteration grows fresh (a longer bucket)
    instead of chaining. Prompts end just before the first bucket's limit, so chains cross it."""
    vanilla = tiny_engine(model, tiny_tokenizer, mode="vanilla", max_model_len=512)
    engine = pipelined(model, tiny_tokenizer, max_model_len=512, simulate_link_gbps=None, simulate_link_jitter_s=0.0)
    first = engine.drafter.buckets[0].length
    chained = 0
    for start in (first - 1 - engine.config.speculation.draft_levels * SPEC.topk - 6, first - 40):
        prompt = [(7 * i) % 500 + 3 for i in range(start)]
        expected, _ = generate_ids(vanilla, prompt, max_tokens=60, temperature=0)
        got, stats = generate_ids(engine, prompt, max_tokens=60, temperature=0)
        assert got == expected
        chained += stats.chained_iterations
    assert chained > 0


def test_one_extension_level_never_chains_a_tree_without_levels(model, tiny_tokenizer):
    """post_levels 1: the bonus token's node is on the extension's only level, so its subtree has no level below
    it; such a chain is never made (its rebase would number frontier nodes below 0)."""
    vanilla = tiny_engine(model, tiny_tokenizer, mode="vanilla")
    engine = pipelined(model, tiny_tokenizer, speculation=SpeculationConfig(topk=2, max_depth=3, post_levels=1))
    for prompt in PROMPTS:
        expected, _ = generate_ids(vanilla, prompt, max_tokens=40, temperature=0)
        got, stats = generate_ids(engine, prompt, max_tokens=40, temperature=0)
        assert got == expected and stats.chained_iterations == 0
    engine.close()
