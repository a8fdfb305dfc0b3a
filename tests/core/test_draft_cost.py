"""The lean draft step's targets, counted on the CPU with the draft-cost benchmark's own instruments.

- at most 30 aten dispatches per decoder layer per draft step (bfloat16, the GPU's dtype), at most 40 for
  the tree bookkeeping of a level;
- exactly one host read of device data per speculative iteration and per vanilla token;
- level steps dispatch the same ops on the same shapes whatever N and the depth within a bucket (CUDA-graph
  ready), and read the KV rows of their bucket, not of the whole cache: the read grows with the live prefix.
The instruments themselves are tested first, so a target cannot pass because a counter counts nothing.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.draft_cost import (
    DispatchRecorder,
    SyncCounter,
    count_dispatches,
    draft_kv_read_bytes,
    draft_step_times,
    level_step_ops,
    random_engine,
    static_shapes,
    syncs_per_step,
)
from benchmarks.provenance import engine_record
from benchmarks.synthetic_weights import TINY, TINY_QWEN3
from subspec_core.drafting import TreeDrafter
from subspec_core.kv_cache import KVCache
from subspec_core.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.usefixtures("single_torch_thread")

MAX_DISPATCHES_PER_LAYER = 30
MAX_BOOKKEEPING_PER_LEVEL = 40


def test_sync_counter_sees_every_kind_of_host_read() -> None:
    x = torch.arange(6)
    reads = [
        lambda: x[0].item(), lambda: x.tolist(), lambda: x.cpu(), lambda: x.numpy(), lambda: bool(x[1]),
        lambda: int(x[2]), lambda: float(x[3]), lambda: [10, 20, 30][x[1]], lambda: x.nonzero(),
        lambda: x[x > 2], lambda: torch.tensor([1, 2], device="cpu"),
    ]
    for read in reads:
        counter = SyncCounter()
        with counter.installed():
            read()
        assert len(counter.events) == 1, (read, counter.events)
    counter = SyncCounter()
    with counter.installed():  # device-side work only: nothing to count
        y = torch.where(x > 2, x, 0).index_select(0, torch.zeros(1, dtype=torch.long)) + torch.full((1,), 3)
    assert counter.events == [] and y.shape == (1,)
    assert torch.Tensor.item(torch.tensor(4)) == 4  # restored after use


def test_dispatch_recorder_records_shapes() -> None:
    with DispatchRecorder() as small:
        torch.ones(2, 3).sum(0)
    with DispatchRecorder() as large:
        torch.ones(4, 3).sum(0)
    assert [name for name, _ in small.ops] == [name for name, _ in large.ops]
    assert small.ops != large.ops, "a shape change must show"


@pytest.mark.parametrize("quant_type", ["int4", "nf4"])
def test_draft_step_dispatch_budget(quant_type: str) -> None:
    counts = count_dispatches(TINY, quant_type=quant_type, dtype="bfloat16")
    print(f"\n{quant_type}: {counts}")
    assert counts["bookkeeping_dispatches_per_level"] <= MAX_BOOKKEEPING_PER_LEVEL
    assert counts["ops_per_layer"].get("aten.scaled_dot_product_attention.default") == 1
    assert counts["ops_per_layer"].get("aten.rms_norm.default") == 2
    if quant_type == "int4":  # the headline format: bitsandbytes' wrapper adds a view per linear
        assert counts["dispatches_per_layer"] <= MAX_DISPATCHES_PER_LAYER


@pytest.mark.parametrize("quant_type", ["int4", "nf4"])
def test_level_steps_have_static_shapes_and_one_sync_per_iteration(quant_type: str) -> None:
    engine = random_engine(TINY, quant_type=quant_type, dtype="float32", max_depth=6, device="cpu")
    assert static_shapes(engine)
    forward, step = level_step_ops(engine, prefix=9, level=3)
    assert 0 < len(forward) < len(step)
    assert syncs_per_step(engine) == 1


def test_one_sync_per_vanilla_token() -> None:
    engine = random_engine(TINY, quant_type="int4", dtype="float32", mode="vanilla", device="cpu")
    assert syncs_per_step(engine) == 1


def test_qwen3_draft_step_stays_within_the_budget() -> None:
    """Qwen3's q/k norms cost one RMSNorm over the fused q and k heads and one multiply written in place (plus the
    slice that views them); no q/k/v bias add, so a layer stays within the budget."""
    counts = count_dispatches(TINY_QWEN3, quant_type="int4", dtype="bfloat16")
    print(f"\nqwen3 int4: {counts}")
    assert counts["ops_per_layer"].get("aten.rms_norm.default") == 3
    assert counts["dispatches_per_layer"] <= MAX_DISPATCHES_PER_LAYER


def test_draft_kv_read_scales_with_the_live_prefix_and_shapes_hold_within_a_bucket() -> None:
    # topk 6 x depth 4: 25 tree rows; max_model_len 1024: capacity 1056, buckets 256 + 25 -> 288, 544, 1056
    engine = random_engine(TINY, quant_type="int4", dtype="float32", max_depth=4, max_model_len=1024, device="cpu")
    assert engine.drafter is not None and engine.drafter.bucket_lengths == (288, 544, 1056)
    row = KVCache.bytes_needed(num_layers=TINY.num_layers, num_kv_heads=TINY.num_kv_heads, head_dim=TINY.head_dim,
                               capacity=1, dtype=torch.float32)
    assert draft_kv_read_bytes(engine, prefix=100) == 288 * row, "the smallest bucket's rows, not the capacity's"
    assert draft_kv_read_bytes(engine, prefix=300) == 544 * row
    _, near = level_step_ops(engine, prefix=12, level=2)
    _, far = level_step_ops(engine, prefix=260, level=3)  # 260 + 25 rows: still the 288-slot bucket
    _, longer = level_step_ops(engine, prefix=270, level=2)  # the next bucket: the same ops on longer rows
    assert near == far
    assert [name for name, _ in longer] == [name for name, _ in near] and longer != near
    engine.close()


def test_bucketed_drafts_equal_whole_cache_drafts_logit_for_logit() -> None:
    """Generation across four buckets drafts the same logits, trees and accepted lengths as a drafter that
    attends over the whole cache (the draft before buckets)."""
    engine = random_engine(TINY, quant_type="int4", dtype="float32", topk=3, max_depth=4, max_model_len=128,
                           device="cpu")
    spec = engine.config.speculation

    def run(smallest_bucket: int) -> tuple[list, list[torch.Tensor], set[int]]:
        logits: list[torch.Tensor] = []
        lengths: set[int] = set()

        def recorded(tokens, positions, slots, bias):  # noqa: ANN001, ANN202 - drafting.DraftLogitsFn
            lengths.add(bias.shape[1])
            logits.append(engine.draft_logits(tokens, positions, slots, bias))
            return logits[-1]

        engine.drafter = TreeDrafter(
            draft_logits=recorded, topk=spec.topk, max_depth=spec.max_depth, capacity=engine.kv_cache.capacity,
            temperature=spec.draft_temperature, dtype=torch.float32, device=engine.device, smallest_bucket=smallest_bucket,
        )
        engine.kv_cache.keep_views(engine.drafter.bucket_lengths)
        engine.kv_cache.token_ids.clear()  # no prefix reuse between the two runs
        request = GenerationRequest("b", tuple(range(3, 13)), SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
        events = [(e.token_ids, e.accept_length, e.drafted_tokens) for e in engine.generate(request)]
        return events, logits, lengths

    bucketed, bucketed_logits, lengths = run(16)  # buckets 32, 48, 80, 144 (the capacity)
    whole, whole_logits, whole_lengths = run(engine.kv_cache.capacity)
    assert lengths == {32, 48, 80, 144} and whole_lengths == {144}
    assert bucketed == whole
    assert len(bucketed_logits) == len(whole_logits)
    assert all(torch.equal(a, b) for a, b in zip(bucketed_logits, whole_logits))
    engine.close()


def test_draft_step_times_say_whether_graphs_ran() -> None:
    """A timing is labelled by what ran: on a CPU nothing is captured, so no GPU timing of either kind."""
    engine = random_engine(TINY, quant_type="int4", dtype="float32", max_depth=2, device="cpu")
    times = draft_step_times(engine, repeats=1)
    assert times["graphed"] is False and times["host_ms_per_step"] > 0
    assert "gpu_ms_per_step_graphed" not in times and "gpu_ms_per_step_eager" not in times
    assert engine_record(engine)["cuda_graphs"] is None
