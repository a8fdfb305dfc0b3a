"""The batched draft level's CUDA graphs (subspec_core/batch_graphs.py), imitated on the CPU as
tests/core/test_step_graphs.py imitates the one-token step's: a "capture" records the level's closure, a "replay"
re-runs the recorded closure with the objects it held at capture. A replay is therefore right only where it reads
persistent buffers, as on a GPU: an input made outside the level would be the capture's, stale (the first test
shows the imitation catches that). Batched output with graphs must equal eager batched output and solo output."""

from __future__ import annotations

import functools
import logging
from typing import Hashable

import pytest
import torch

from subspec_core.batch import BatchDecoder
from subspec_core.batch_drafting import DraftRequest, grow_batched
from subspec_core.batch_graphs import BatchGraphs, LevelStep
from subspec_core.grammar import regex_constraint
from subspec_core.types import GenerationRequest, SamplingParams, TokenEvent
from tests.core.test_batch import SPEC, assert_solo_tokens, decode_together, prompt_of
from tests.core.tiny import generate_ids, tiny_engine, tiny_hf_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")


class Recorded:
    """A captured graph's stand-in: replay runs the closure the capture recorded."""

    def __init__(self, step: LevelStep) -> None:
        self.step = step

    def replay(self) -> None:
        self.step()


class ImitatedGraphs(BatchGraphs):
    """BatchGraphs with the CUDA warm-up and capture imitated; notes every composition asked for."""

    def __init__(self, max_graphs: int = 64) -> None:
        super().__init__(device=torch.device("cpu"), max_graphs=max_graphs)
        self.asked: list[Hashable] = []

    def run(self, composition: Hashable, step: LevelStep) -> None:
        self.asked.append(composition)
        super().run(composition, step)

    def _warm_up(self, step: LevelStep) -> None:
        step()

    def _record(self, step: LevelStep) -> Recorded:
        return Recorded(step)


class FailingGraphs(ImitatedGraphs):
    """Every capture fails after its warm-up (an op that cannot be captured, the pool out of memory)."""

    def _record(self, step: LevelStep) -> Recorded:
        raise RuntimeError("operation not permitted when stream is capturing")


def test_the_imitation_replays_what_the_capture_recorded_so_a_stale_input_shows() -> None:
    """A level that read a tensor made outside it would replay the capture's tensor, as a CUDA graph reads the
    captured address: the imitation gives the stale value, so a non-persistent input fails the tests below."""
    graphs, out = ImitatedGraphs(), torch.zeros(1)
    for value in (1.0, 2.0):
        graphs.run("level", functools.partial(out.copy_, torch.tensor([value])))
    assert out.item() == 1.0 and graphs.captures == 1 and graphs.replays == 1


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return tiny_hf_model("llama", seed=7)


@pytest.mark.parametrize("graphs_kind", [ImitatedGraphs, FailingGraphs], ids=["replayed", "capture-failed"])
def test_replayed_levels_read_the_new_roots_and_prefix_lengths(model, tiny_tokenizer, graphs_kind) -> None:
    """Two grows of the same compositions (depths 6 and 3: both sequences, then one) with other roots and N: the
    second replays every level, reading the roots and N start_tree copied into the drafters' buffers, and each
    tree is the one its drafter grows alone. A failed capture leaves each level computed once, by its warm-up."""
    engine = tiny_engine(model, tiny_tokenizer, speculation=SPEC, max_num_seqs=2)
    prompts, depths = (prompt_of(10, 7), prompt_of(6, 8)), (6, 3)
    graphs = graphs_kind()
    with torch.inference_mode():
        for prompt, region in zip(prompts, engine.kv_regions):
            list(engine._prefill_chunks(prompt, cache=region))
        for round_, cut in enumerate((0, 2)):  # N = the prompt, then 2 rows less; fresh root and N tensors
            roots = [torch.tensor([p[-1 - cut] + round_]) for p in prompts]
            lengths = [len(p) - cut for p in prompts]
            alone = []
            for drafter, root, n, depth in zip(engine.drafters, roots, lengths, depths):
                tree = drafter.grow(root_token=root, prefix_length=torch.tensor([n]), committed=n, depth=depth)
                alone.append((tree.tokens.clone(), tree.parents.clone(), tree.scores.clone()))
            trees = grow_batched(requests=[
                DraftRequest(drafter=d, kv_cache=c, root_token=r, prefix_length=torch.tensor([n]), committed=n,
                             depth=depth)
                for d, c, r, n, depth in zip(engine.drafters, engine.kv_regions, roots, lengths, depths)
            ], forward=engine.draft_forward_batched, graphs=graphs)
            for tree, (tokens, parents, scores) in zip(trees, alone):
                assert torch.equal(tree.tokens, tokens) and torch.equal(tree.parents, parents)
                torch.testing.assert_close(tree.scores, scores, rtol=1e-4, atol=1e-4)  # rows beside rows round apart
    assert len(set(graphs.asked)) == 3  # the root, levels 1-2 (both), levels 3-5 (the deeper alone)
    if graphs_kind is ImitatedGraphs:
        assert graphs.captures == 3 and graphs.replays == 2 * 6 - 3
    else:
        assert graphs.captures == 0 and graphs.replays == 0 and not graphs.capturing


# "long" crosses from the 288-slot draft bucket into the 352-slot one (N + 19 tree rows > 288 once N > 269);
# "short" finishes first and "dropped" leaves mid-way, freeing regions that "late" and "later" join
SCHEDULE = (
    (0, GenerationRequest("long", tuple(prompt_of(255, 1)), SamplingParams(max_tokens=40, temperature=0))),
    (0, GenerationRequest("short", tuple(prompt_of(7, 2)), SamplingParams(max_tokens=6, temperature=0))),
    (0, GenerationRequest("dropped", tuple(prompt_of(9, 3)), SamplingParams(max_tokens=40, temperature=0))),
    (2, GenerationRequest("late", tuple(prompt_of(5, 4)), SamplingParams(max_tokens=20, temperature=0.8, seed=5))),
    (4, GenerationRequest("later", tuple(prompt_of(12, 5)), SamplingParams(max_tokens=16, temperature=0))),
)


def test_graphed_batch_equals_the_eager_batch_and_solo_across_joins_leaves_and_a_bucket(model, tiny_tokenizer):
    """Batched decoding with every draft level replayed (or captured on first use) returns the eager batch's tokens
    exactly, and each request its solo tokens, while the composition changes: joins, an early finish, a `leave`,
    shallower trees near max_tokens, and a sequence moving to the next draft bucket."""
    solo = tiny_engine(model, tiny_tokenizer, speculation=SPEC, max_model_len=320)
    got, accepted = {}, {}
    for graphs in (None, ImitatedGraphs()):
        batch = BatchDecoder(tiny_engine(model, tiny_tokenizer, speculation=SPEC, max_model_len=320, max_num_seqs=3))
        assert batch.draft_graphs is None  # a CPU engine drafts eagerly, exactly as before graphs
        batch.draft_graphs = graphs
        accepts = accepted[graphs is None] = []

        def on_step(iteration: int, events: list[TokenEvent], batch: BatchDecoder = batch,
                    accepts: list = accepts) -> None:
            accepts.append([(e.request_id, e.accept_length) for e in events])
            if iteration == 3:
                assert batch.leave("dropped")

        got[graphs is None] = decode_together(batch, SCHEDULE, on_step)
    # the tokens would match whatever the trees (verification is lossless): the accept lengths show the same trees
    assert got[False] == got[True] and accepted[False] == accepted[True]
    graphed = got[False]
    assert_solo_tokens(solo, graphed, tuple(item for item in SCHEDULE if item[1].request_id != "dropped"))
    assert graphs is not None and graphs.replays > graphs.captures > 3
    long_drafter = batch.engine.drafters[0]  # "long" joined first: region 0
    lengths = {length for composition in graphs.asked for drafter, _, length, _ in composition[1:]
               if drafter is long_drafter}
    assert lengths == {288, 352}
    assert len({tuple(entry[0] for entry in composition[1:]) for composition in graphs.asked}) >= 4


def test_levels_growing_a_constrained_request_are_replayed_with_its_staged_masks(model, tiny_tokenizer):
    """A level growing a constrained request's tree reads its masks from its drafter's staged buffer, so it is
    captured and replayed like the others, guided or not being part of the composition: the graphed batch grows the
    eager batch's trees (its accept lengths; the imitation replays the recorded closure, so masks passed as fresh
    tensors would be the capture's stale ones and grow other trees), and each request returns its solo tokens, the
    constrained one exactly."""
    solo = tiny_engine(model, tiny_tokenizer, speculation=SPEC)
    constrained = GenerationRequest("constrained", tuple(prompt_of(6, 31)), SamplingParams(
        max_tokens=24, temperature=0.8, seed=4, constraint=regex_constraint("[a-c]{3,8}-[0-9]+", "x")))
    schedule = ((0, GenerationRequest("free", tuple(prompt_of(9, 32)), SamplingParams(max_tokens=40, temperature=0))),
                (0, constrained))
    got, accepted = {}, {}
    for graphs in (None, ImitatedGraphs()):
        batch = BatchDecoder(tiny_engine(model, tiny_tokenizer, speculation=SPEC, max_num_seqs=2))
        batch.draft_graphs = graphs
        accepts = accepted[graphs is None] = []
        got[graphs is None] = decode_together(
            batch, schedule, lambda _, events, accepts=accepts: accepts.append(
                [(e.request_id, e.accept_length) for e in events]))
    assert got[False] == got[True] and accepted[False] == accepted[True]
    expected, _ = generate_ids(solo, list(constrained.prompt_token_ids), **constrained.sampling.__dict__)
    assert got[False]["constrained"] == expected
    assert_solo_tokens(solo, got[False], schedule[:1])
    guided = [composition for composition in graphs.asked if any(entry[3] for entry in composition[1:])]
    assert len(set(guided)) < len(guided) and graphs.replays > graphs.captures  # guided levels replayed


def test_at_most_max_graphs_are_kept_least_recently_used_dropped() -> None:
    graphs, runs = ImitatedGraphs(max_graphs=2), []
    for key in ("a", "b", "a", "c", "b"):  # "a" replayed, so "c" drops "b"; "b" is captured again (dropping "a")
        graphs.run(key, functools.partial(runs.append, key))
    assert runs == ["a", "b", "a", "c", "b"] and len(graphs) == 2
    assert graphs.captures == 4 and graphs.replays == 1
    graphs.run("c", functools.partial(runs.append, "c?"))
    assert runs[-1] == "c" and graphs.replays == 2  # "c" kept: its recorded step replayed


def test_a_failed_capture_warns_once_and_drafts_eagerly(caplog) -> None:
    graphs, runs = FailingGraphs(), []
    with caplog.at_level(logging.WARNING, logger="subspec_core.batch_graphs"):
        for key in ("a", "b", "a"):
            graphs.run(key, functools.partial(runs.append, key))
    assert runs == ["a", "b", "a"]  # each level once: the failed capture's warm-up was the level
    assert len(graphs) == 0 and not graphs.capturing
    assert ["batched draft level" in r.getMessage() for r in caplog.records] == [True]


def test_a_capture_mid_serving_keeps_the_allocators_cached_blocks() -> None:
    """`keeping_cached_blocks`, around BatchGraphs' torch.cuda.graph, makes the cache-emptying that graph's entry
    does a no-op (the verify's blocks stay cached), and only while it is entered."""
    from subspec_core.batch_graphs import keeping_cached_blocks

    real = torch.cuda.empty_cache
    with keeping_cached_blocks():
        assert torch.cuda.empty_cache is not real
        torch.cuda.empty_cache()  # a no-op, whatever the device
    assert torch.cuda.empty_cache is real
