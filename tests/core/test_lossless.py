"""Losslessness: speculative greedy output is the target's greedy output, token for token."""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from subspec_core.agreement import compare_generations
from subspec_core.config import EngineConfig, SpeculationConfig
from subspec_core.loading import load_tokenizer
from subspec_core.types import GenerationRequest, SamplingParams
from tests.core.tiny import TINY_VOCAB, generate_ids, tiny_engine, tiny_hf_model

# Varied prompts for the real default model: chat, code, math, reasoning, non-English, extraction, lists.
VARIED_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring.",
    "What is 17 multiplied by 23? Explain step by step.",
    "Explique en français pourquoi le ciel est bleu.",
    "List five tips for staying productive when working from home.",
    "If all bloops are razzies and all razzies are lazzies, are all bloops lazzies? Why?",
    "Extract the names of the cities from this sentence: I flew from Paris to Tokyo and then took a train to Kyoto.",
    "Write a SQL query that finds the ten customers with the highest total order value.",
]


def chat_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def greedy(engine, prompt: list[int], max_tokens: int) -> tuple[list[int], str, object]:
    ids, text, stats = [], "", None
    for event in engine.generate(GenerationRequest("g", tuple(prompt), SamplingParams(max_tokens=max_tokens, temperature=0))):
        ids += event.token_ids
        text += event.text
        stats = event.stats or stats
    return ids, text, stats


@pytest.mark.parametrize("prompt", VARIED_PROMPTS, ids=[f"p{i}" for i in range(len(VARIED_PROMPTS))])
def test_default_model_subspec_equals_vanilla_greedy(prompt: str, default_engines, default_tokenizer) -> None:
    """The real default model, every layer streamed, int4 substitutes, depth 32 x topk 6: 48 new tokens (several
    speculative iterations, each accepting a long path; more tokens only repeat that, at a minute per prompt)."""
    ids = chat_ids(default_tokenizer, prompt)
    expected, expected_text, _ = greedy(default_engines("vanilla"), ids, 48)
    got, got_text, stats = greedy(default_engines("subspec"), ids, 48)
    assert got == expected
    assert got_text == expected_text
    assert stats.iterations < len(got)  # speculation did accept drafted tokens
    print(f"\n[{prompt[:40]}...] tokens={len(got)} mean_accept_length={stats.mean_accept_length:.2f}")


@pytest.mark.parametrize("prompt", VARIED_PROMPTS[:2], ids=["p0", "p1"])
def test_default_model_bitsandbytes_nf4_substitute_is_lossless_too(prompt: str, default_engines, default_tokenizer) -> None:
    """The design card's bitsandbytes NF4 substitute, as an option: the same target tokens."""
    ids = chat_ids(default_tokenizer, prompt)
    expected, _, _ = greedy(default_engines("vanilla"), ids, 32)
    got, _, stats = greedy(default_engines("subspec", "nf4"), ids, 32)
    assert got == expected
    assert stats.iterations < len(got)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(EngineConfig())


TREE_SHAPES = [  # (topk, max_depth, max_verify_tokens)
    (1, 1, None), (1, 8, None), (2, 5, None), (4, 6, None), (6, 4, 7), (3, 10, 12), (8, 3, 2),
]


@pytest.mark.parametrize("family", ["llama", "llama3", "qwen2", "tied"])
@pytest.mark.parametrize("shape", TREE_SHAPES, ids=[f"k{k}d{d}v{v}" for k, d, v in TREE_SHAPES])
def test_tiny_models_lossless_across_seeds_and_tree_shapes(family, shape, tokenizer) -> None:
    """Greedy and seeded sampling, token for token; a first divergence passes only at a float32 near-tie of the
    target's own decision there (agreement.py: a verify and a one-token step round differently, ~2e-5 here)."""
    topk, depth, verify = shape
    spec = SpeculationConfig(topk=topk, max_depth=depth, max_verify_tokens=verify)
    subspec = tiny_engine(tiny_hf_model(family, seed=7), tokenizer, speculation=spec)
    vanilla = tiny_engine(tiny_hf_model(family, seed=7), tokenizer, mode="vanilla")
    rng = torch.Generator().manual_seed(zlib.crc32(f"{family}{shape}".encode()))  # the same prompts in every run
    for seed in range(4):
        prompt = torch.randint(0, TINY_VOCAB, (int(torch.randint(1, 40, (1,), generator=rng)),), generator=rng).tolist()
        # greedy, then sampled with a seed: position-keyed noise makes speculation invisible in the output too
        for sampling in ({"temperature": 0}, {"temperature": 0.8, "top_p": 0.95, "seed": seed}):
            expected, _ = generate_ids(vanilla, prompt, max_tokens=30, **sampling)
            got, _ = generate_ids(subspec, prompt, max_tokens=30, **sampling)
            if got != expected:
                agreement = compare_generations(vanilla, prompt, expected, got, exact=False, dtype=torch.float32,
                                                params=SamplingParams(**sampling), seed=seed)
                assert agreement.ok, f"seed {seed}, {sampling}: speculative output differs from the target's: {agreement}"


LINKED_SHAPES = [(3, 4, None), (2, 6, 7)]  # (topk, max_depth, max_verify_tokens), each with post_levels 3


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("shape", LINKED_SHAPES, ids=[f"k{k}d{d}v{v}" for k, d, v in LINKED_SHAPES])
def test_lossless_over_a_delayed_simulated_link_with_post_speculation(family, shape, tokenizer) -> None:
    """The ring over a simulated link with random copy and compute delays (copies.SimulatedLink), and the draft
    extending each tree during the verify's waits (postspec.py): greedy and seeded sampling, token for token.
    Two layers of three resident, so the draft is near the target and whole trees get accepted and chained."""
    topk, depth, verify = shape
    spec = SpeculationConfig(topk=topk, max_depth=depth, max_verify_tokens=verify, post_levels=3)
    model = tiny_hf_model(family, seed=7)
    vanilla = tiny_engine(model, tokenizer, mode="vanilla")
    linked = tiny_engine(model, tokenizer, speculation=spec, max_resident_layers=2, simulate_link_gbps=1.0,
                         simulate_link_jitter_s=0.0005)
    rng = torch.Generator().manual_seed(zlib.crc32(f"{family}{shape}".encode()))
    chained = 0
    for seed in range(2):
        prompt = torch.randint(0, TINY_VOCAB, (int(torch.randint(1, 40, (1,), generator=rng)),), generator=rng).tolist()
        for sampling in ({"temperature": 0}, {"temperature": 0.8, "top_p": 0.95, "seed": seed}):
            expected, _ = generate_ids(vanilla, prompt, max_tokens=30, **sampling)
            got, stats = generate_ids(linked, prompt, max_tokens=30, **sampling)
            assert got == expected, f"seed {seed}, {sampling}"
            chained += stats.chained_iterations
    assert chained > 0 or verify is not None, "chained trees were verified (a pruned tree's frontier rarely is)"
    linked.close()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
def test_other_substitute_formats_are_lossless(quant_type, tokenizer) -> None:
    subspec = tiny_engine(tiny_hf_model("llama"), tokenizer, quant_type=quant_type)
    vanilla = tiny_engine(tiny_hf_model("llama"), tokenizer, mode="vanilla")
    prompt = [1, 2, 3, 4, 5]
    assert generate_ids(subspec, prompt, max_tokens=25, temperature=0)[0] == generate_ids(vanilla, prompt, max_tokens=25, temperature=0)[0]


def test_mixed_resident_and_streamed_layers_are_lossless(tokenizer) -> None:
    subspec = tiny_engine(tiny_hf_model("qwen2", num_layers=4), tokenizer, max_resident_layers=2)
    assert subspec.plan.resident_layers == (0, 1) and subspec.plan.streamed_layers == (2, 3)
    vanilla = tiny_engine(tiny_hf_model("qwen2", num_layers=4), tokenizer, mode="resident", max_resident_layers=None)
    prompt = [9, 8, 7, 6]
    assert generate_ids(subspec, prompt, max_tokens=25, temperature=0)[0] == generate_ids(vanilla, prompt, max_tokens=25, temperature=0)[0]


def test_draft_equal_to_target_accepts_whole_trees(tokenizer) -> None:
    """With every layer resident the draft IS the target: every tree is accepted to full depth (masks, positions
    and the shared KV cache are consistent between drafting and verification)."""
    engine = tiny_engine(tiny_hf_model("llama"), tokenizer, max_resident_layers=None, speculation=SpeculationConfig(topk=2, max_depth=5))
    ids, stats = generate_ids(engine, [3, 1, 4, 1, 5], max_tokens=1 + 6 * 4, temperature=0)
    assert stats.iterations == 4 and stats.accepted_tokens == 4 * 5
    assert stats.mean_accept_length == 6.0


# ------------------------------------------------------------------------------ stopping
def test_max_tokens_one_runs_no_speculative_iteration(tokenizer) -> None:
    engine = tiny_engine(tiny_hf_model("llama"), tokenizer)
    ids, stats = generate_ids(engine, [1, 2, 3], max_tokens=1, temperature=0)
    assert len(ids) == 1 and stats.iterations == 0 and stats.completion_tokens == 1


@pytest.mark.parametrize("max_tokens", [2, 3, 7, 19])
def test_max_tokens_is_exact_and_finishes_with_length(max_tokens, tokenizer) -> None:
    engine = tiny_engine(tiny_hf_model("llama"), tokenizer, speculation=SpeculationConfig(topk=2, max_depth=8))
    events = list(engine.generate(GenerationRequest("m", (1, 2, 3), SamplingParams(max_tokens=max_tokens, temperature=0))))
    assert sum(len(e.token_ids) for e in events) == max_tokens
    assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])


def test_context_limit_finishes_with_length(tokenizer) -> None:
    engine = tiny_engine(tiny_hf_model("llama"), tokenizer, max_model_len=40)
    ids, stats = generate_ids(engine, list(range(1, 31)), max_tokens=100, temperature=0)
    assert len(ids) == 10  # 30 prompt + 10 = max_model_len


@pytest.mark.parametrize("eos_at", [0, 1, 5])
def test_every_eos_id_stops_even_on_the_first_token(eos_at, tokenizer) -> None:
    vanilla = tiny_engine(tiny_hf_model("llama"), tokenizer, mode="vanilla")
    reference, _ = generate_ids(vanilla, [5, 6, 7], max_tokens=20, temperature=0)
    eos = frozenset({reference[eos_at], 511})  # several end ids, one of which occurs
    engine = tiny_engine(tiny_hf_model("llama"), tokenizer, eos_token_ids=eos)
    events = list(engine.generate(GenerationRequest("e", (5, 6, 7), SamplingParams(max_tokens=20, temperature=0))))
    ids = [t for e in events for t in e.token_ids]
    assert ids == reference[: reference.index(reference[eos_at])]
    assert events[-1].finish_reason == "stop"
    ignored = list(engine.generate(GenerationRequest("e", (5, 6, 7), SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))))
    assert [t for e in ignored for t in e.token_ids] == reference


def test_stop_string_truncates_text_and_tokens(default_engines, default_tokenizer) -> None:
    engine = default_engines("subspec")
    prompt = chat_ids(default_tokenizer, "Count from 1 to 20, separated by commas.")
    full_ids, full_text, _ = greedy(engine, prompt, 60)
    stop = full_text[len(full_text) // 3 : len(full_text) // 3 + 3]
    events = list(engine.generate(GenerationRequest("s", tuple(prompt), SamplingParams(max_tokens=60, temperature=0, stop=(stop,)))))
    text = "".join(e.text for e in events)
    assert text == full_text[: full_text.index(stop)]
    assert events[-1].finish_reason == "stop"
    ids = [t for e in events for t in e.token_ids]
    assert ids == full_ids[: len(ids)] and len(ids) < len(full_ids)


def test_bad_requests_are_rejected_before_any_work(tokenizer) -> None:
    engine = tiny_engine(tiny_hf_model("llama"), tokenizer, max_model_len=32)
    for prompt, message in [((), "empty"), (tuple(range(1, 40)), "context"), ((1, 99999), "token ids")]:
        with pytest.raises(ValueError, match=message):
            next(engine.generate(GenerationRequest("bad", prompt, SamplingParams(max_tokens=4))))


def test_abort_between_events_leaves_the_engine_usable(tokenizer) -> None:
    engine = tiny_engine(tiny_hf_model("llama"), tokenizer)
    expected, _ = generate_ids(engine, [4, 4, 4], max_tokens=20, temperature=0)
    gen = engine.generate(GenerationRequest("a", (9, 9, 9, 9), SamplingParams(max_tokens=50, temperature=0)))
    next(gen), next(gen)
    gen.close()
    assert generate_ids(engine, [4, 4, 4], max_tokens=20, temperature=0)[0] == expected


def test_streamed_text_equals_decoded_tokens(default_engines, default_tokenizer) -> None:
    engine = default_engines("subspec")
    prompt = chat_ids(default_tokenizer, "Translate 'good morning, my friend' into Chinese and Japanese.")
    ids, text, _ = greedy(engine, prompt, 48)
    assert text == default_tokenizer.decode(ids, skip_special_tokens=True)


def test_repeat_requests_are_deterministic(tokenizer) -> None:
    engine = tiny_engine(tiny_hf_model("qwen2"), tokenizer)
    runs = [generate_ids(engine, [2, 7, 1, 8], max_tokens=24, temperature=0.9, seed=11)[0] for _ in range(2)]
    assert runs[0] == runs[1]
    assert list(itertools.chain(runs[0]))  # non-empty


NEW_FAMILY_TREES = [(4, 6, None), (6, 4, 7)]  # a full tree, and a verified subset of one


@pytest.mark.usefixtures("single_torch_thread")
@pytest.mark.parametrize("family", ["qwen3", "mistral", "phi3", "phi3-longrope"])
@pytest.mark.parametrize("shape", NEW_FAMILY_TREES, ids=[f"k{k}d{d}v{v}" for k, d, v in NEW_FAMILY_TREES])
def test_other_families_lossless(family, shape, tokenizer) -> None:
    """Qwen3, Mistral and Phi-3 (plain and LongRoPE): greedy and seeded sampled output of subspec equals vanilla's."""
    topk, depth, verify = shape
    subspec = tiny_engine(tiny_hf_model(family, seed=7), tokenizer,
                          speculation=SpeculationConfig(topk=topk, max_depth=depth, max_verify_tokens=verify))
    vanilla = tiny_engine(tiny_hf_model(family, seed=7), tokenizer, mode="vanilla")
    rng = torch.Generator().manual_seed(11)
    accepted = 0
    for seed in range(2):
        prompt = torch.randint(0, TINY_VOCAB, (int(torch.randint(1, 40, (1,), generator=rng)),), generator=rng).tolist()
        expected, _ = generate_ids(vanilla, prompt, max_tokens=30, temperature=0)
        got, stats = generate_ids(subspec, prompt, max_tokens=30, temperature=0)
        assert got == expected, f"seed {seed}: speculative greedy output differs from the target's"
        accepted += stats.accepted_tokens
        expected, _ = generate_ids(vanilla, prompt, max_tokens=30, temperature=0.8, top_p=0.95, seed=seed)
        got, _ = generate_ids(subspec, prompt, max_tokens=30, temperature=0.8, top_p=0.95, seed=seed)
        assert got == expected
    assert accepted > 0  # the draft did propose tokens the target kept: speculation was exercised
