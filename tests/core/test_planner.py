"""The memory planner (subspec_core/planner.py): the mode `auto` picks, and what stays resident under a GPU
budget."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from pathlib import Path

import pytest
import torch

from benchmarks import synthetic_weights as synthetic
from benchmarks.synthetic_weights import QWEN25_1_5B, TINY, TINY_QWEN3, random_weights
from subspec_core.architecture import shape_from_hf_config
from subspec_core.config import SpeculationConfig, load_yaml, resolve_engine_config
from subspec_core.planner import (
    AUTO_MAX_NUM_SEQS, DEVICE, BudgetTooSmallError, MemoryPlan, choose_mode, device_budget, plan_for, plan_memory,
)
from subspec_core.quant import substitute_bytes_per_layer
from subspec_core.reserves import CUBLAS_WORKSPACE_BYTES, draft_step_bytes, plan_sizes
from subspec_core.weights import LayerLayout, ModelShape, shared_nbytes

GiB = 2**30

# Qwen2.5-7B's dimensions (28 layers, bf16 layers of ~0.43 GiB) and a two-layer model with wide layers.
QWEN7B = ModelShape(
    architecture="qwen2", num_layers=28, hidden_size=3584, intermediate_size=18944, num_heads=28, num_kv_heads=4,
    head_dim=128, vocab_size=152064, rms_norm_eps=1e-6, qkv_bias=True, o_bias=False, tie_embeddings=False,
)
QWEN7B_SHARED = 2 * 152064 * 3584 * 2 + (2 * 28 + 1) * 3584 * 2
WIDE2 = ModelShape(
    architecture="llama", num_layers=2, hidden_size=8192, intermediate_size=28672, num_heads=64, num_kv_heads=8,
    head_dim=128, vocab_size=32000, rms_norm_eps=1e-5, qkv_bias=False, o_bias=False, tie_embeddings=False,
)


def plan(
    *, shape: ModelShape = QWEN7B, mode: str = "subspec", budget: int | None, max_resident: int | None = None,
    stream_slots: int = 2, speculation: SpeculationConfig | None = None, shared_bytes: int | None = None,
    device_type: str = "cuda",
) -> MemoryPlan:
    return plan_memory(
        shape=shape, dtype=torch.bfloat16, mode=mode, speculation=speculation or SpeculationConfig(max_depth=48),
        max_model_len=2048, prefill_chunk_size=256, stream_slots=stream_slots, budget_bytes=budget,
        max_resident_layers=max_resident,
        shared_bytes=QWEN7B_SHARED if shared_bytes is None else shared_bytes, device_type=device_type,
    )


def layer_bytes(shape: ModelShape = QWEN7B) -> int:
    return LayerLayout.for_shape(shape).nbytes(torch.bfloat16)


def test_unlimited_budget_keeps_every_layer_up_to_max_resident_layers():
    everything = plan(budget=None)
    assert everything.resident_layers == tuple(range(28)) and everything.streamed_layers == ()
    capped = plan(budget=None, max_resident=5)
    assert capped.resident_layers == tuple(range(5)) and capped.streamed_layers == tuple(range(5, 28))
    assert plan(budget=None, max_resident=0).resident_layers == ()
    assert plan(budget=None, max_resident=100).resident_layers == tuple(range(28))


@pytest.mark.parametrize("mode", ["subspec", "vanilla"])
def test_resident_layers_are_as_many_as_fit_and_monotone_in_budget(mode):
    previous = -1
    # 7.6 .. 19.6 GiB: from an 8 GB card's 95%, about the smallest budget Qwen2.5-7B plans in with its reserves
    for tenth_gib in range(76, 200, 3):
        budget = tenth_gib * GiB // 10
        p = plan(mode=mode, budget=budget)
        r = len(p.resident_layers)
        assert p.resident_layers == tuple(range(r)) and p.streamed_layers == tuple(range(r, 28))
        assert p.device_bytes <= budget
        assert r >= previous, f"{budget / GiB:.1f} GiB keeps fewer layers than a smaller budget"
        previous = r
        # as many as fit: every larger count (up to all layers) exceeds the budget
        for more in range(r + 1, 29):
            assert plan(mode=mode, budget=None, max_resident=more).device_bytes > budget, f"{more} layers would fit"
    assert previous == 28  # the sweep reaches "everything fits"


def test_max_resident_layers_is_respected_under_any_budget():
    for budget in (9 * GiB, 12 * GiB, 40 * GiB):
        p = plan(budget=budget, max_resident=4)
        assert len(p.resident_layers) <= 4
    assert len(plan(budget=40 * GiB, max_resident=4).resident_layers) == 4


def test_vanilla_fits_more_resident_layers_than_subspec_at_the_same_budget():
    strictly_more = 0
    for gib in (8, 9, 10, 12, 14, 16):
        vanilla = len(plan(mode="vanilla", budget=gib * GiB).resident_layers)
        subspec = len(plan(mode="subspec", budget=gib * GiB).resident_layers)
        assert vanilla >= subspec
        strictly_more += vanilla > subspec
    assert strictly_more >= 4
    # the paper's vanilla baseline keeps about 11 layers of Qwen2.5-7B on an 8 GB GPU: same ballpark
    assert 8 <= len(plan(mode="vanilla", budget=8 * GiB).resident_layers) <= 13


def test_mode_resident_requires_every_layer():
    needed = plan(mode="resident", budget=None).device_bytes
    p = plan(mode="resident", budget=needed, max_resident=0)  # the cap does not apply to mode 'resident'
    assert p.resident_layers == tuple(range(28)) and p.streamed_layers == ()
    with pytest.raises(BudgetTooSmallError) as err:
        plan(mode="resident", budget=needed - 1)
    message = str(err.value)
    assert "'resident'" in message and "too small" in message
    assert f"{needed / GiB:.2f} GiB" in message  # it names what everything resident needs


def needed_gib(message: str) -> float:
    match = re.search(r"needs at least ([0-9.]+) GiB", message)
    assert match, message
    return float(match.group(1))


@pytest.mark.parametrize("mode", ["subspec", "vanilla"])
def test_budget_too_small_raises_with_a_helpful_message(mode):
    with pytest.raises(BudgetTooSmallError) as err:
        plan(mode=mode, budget=2 * GiB)
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert "gpu_memory_budget 2.00 GiB" in message and f"mode {mode!r}" in message
    assert "max_model_len=2048" in message and "raise the budget" in message
    assert ("4-bit substitutes" in message) == (mode == "subspec")
    # the number it gives is enough, and it is the minimum (to the message's 0.01 GiB precision)
    need = needed_gib(message)
    assert plan(mode=mode, budget=int((need + 0.01) * GiB)).device_bytes <= (need + 0.01) * GiB
    with pytest.raises(BudgetTooSmallError):
        plan(mode=mode, budget=int((need - 0.01) * GiB))


def test_budget_message_names_the_minimum_even_when_all_resident_is_cheapest():
    # BUG (planner.py, the `need = device_total(num_layers if mode == "resident" else 0)` line): for a model
    # whose full-precision layers cost less than "all streamed + substitutes + the streaming ring" (few,
    # wide layers; or a large stream_slots), keeping every layer resident is the cheapest plan, yet the
    # error message reports the all-streamed cost as the minimum: a smaller budget than it names works.
    shared = 2 * 32000 * 8192 * 2
    all_resident = plan(shape=WIDE2, budget=None, shared_bytes=shared).device_bytes
    all_streamed = plan(shape=WIDE2, budget=None, max_resident=0, shared_bytes=shared).device_bytes
    assert all_resident < all_streamed  # the premise: here the ring costs more than the layers it replaces
    assert plan(shape=WIDE2, budget=all_resident, shared_bytes=shared).resident_layers == (0, 1)
    with pytest.raises(BudgetTooSmallError) as err:
        plan(shape=WIDE2, budget=all_resident - 1, shared_bytes=shared)
    assert needed_gib(str(err.value)) == pytest.approx(all_resident / GiB, abs=0.01)


def test_rows_account_for_every_byte():
    p = plan(budget=10 * GiB)
    r, streamed = len(p.resident_layers), len(p.streamed_layers)
    assert 0 < r < 28
    rows = {row.component: row for row in p.rows}
    assert rows["resident decoder layers"].nbytes == r * layer_bytes()
    assert rows["streamed decoder layers"].nbytes == streamed * layer_bytes()
    assert rows["streamed decoder layers"].location == "host"
    assert rows["streaming ring"].nbytes == 2 * layer_bytes()
    sub = substitute_bytes_per_layer(
        QWEN7B.linear_params_per_layer,
        QWEN7B.q_size + 2 * QWEN7B.kv_size + QWEN7B.hidden_size + 2 * QWEN7B.intermediate_size + QWEN7B.hidden_size,
        quant_type="int4", block_size=64,
    )
    assert rows["draft substitutes (int4)"].nbytes == streamed * sub
    assert rows["shared: embeddings, norms, lm_head"].nbytes == QWEN7B_SHARED
    assert p.host_bytes == streamed * layer_bytes()
    assert p.device_bytes == sum(row.nbytes for row in p.rows if row.location == DEVICE)
    # a substitute is about a quarter of its layer (4 bits + block scales vs 16 bits)
    assert 0.25 < sub / layer_bytes() < 0.3
    # three stream slots cost one more layer of ring and never keep more layers resident
    three = plan(budget=10 * GiB, stream_slots=3)
    assert dict((row.component, row.nbytes) for row in three.rows)["streaming ring"] == 3 * layer_bytes()
    assert len(three.resident_layers) <= r


def test_vanilla_plan_has_no_draft_rows_and_resident_plan_no_streaming_rows():
    vanilla = plan(mode="vanilla", budget=10 * GiB)
    names = [row.component for row in vanilla.rows]
    assert not any("substitute" in n or "tree" in n for n in names)
    assert "streaming ring" in names
    resident = plan(mode="resident", budget=None)
    names = [row.component for row in resident.rows]
    assert "streaming ring" not in names and "streamed decoder layers" not in names
    assert resident.host_bytes == 0


@pytest.mark.parametrize("mode, budget", [("subspec", 10 * GiB), ("vanilla", None), ("resident", 20 * GiB)])
def test_table_lists_every_component(mode, budget):
    p = plan(mode=mode, budget=budget)
    table = p.table()
    lines = table.splitlines()
    assert len(lines) == len(p.rows) + 6  # header, rule, rows, rule, two totals, host RAM at load
    for row in p.rows:
        assert row.component in table
        assert f"{row.nbytes / 2**20:.1f}" in table
    assert "device total" in table and "streamed from host" in table
    assert lines[-1].startswith("host RAM at load (peak)") and f"{p.host_ram_bytes / 2**20:.1f}" in lines[-1]
    assert ("budget" in table) == (budget is not None)  # the budget line only where there is one
    if budget is not None:
        assert f"budget {budget / 2**20:.1f} MiB" in table
    assert f"{p.device_bytes / 2**20:.1f}" in table
    assert " gpu " in table and " cpu " not in table


def test_table_on_a_cpu_says_cpu_and_host_and_no_budget():
    """Device-true labels: on a CPU the compute memory is "cpu", streamed layers are not "pinned"."""
    table = plan(budget=None, max_resident=10, device_type="cpu").table()
    wheres = {line[35:41].strip() for line in table.splitlines()[2:-4]}
    assert wheres == {"cpu", "host"}
    assert " gpu " not in table and "budget" not in table and "pinned" not in table
    assert "device total                       cpu" in table
    resident = plan(mode="resident", budget=None, device_type="cpu").table()
    assert "nothing streamed" in resident and "host" not in {line[35:41].strip() for line in resident.splitlines()[2:-4]}


def test_host_ram_at_load_is_the_arena_one_layer_and_the_shared_weights():
    """What loading in one pass per layer needs on the host: on a GPU the arena of streamed layers, the layer being
    read and the shared weights on their way to the device; on a CPU also everything the device rows hold."""
    gpu = plan(budget=10 * GiB)
    assert gpu.host_ram_bytes == gpu.host_bytes + layer_bytes() + QWEN7B_SHARED
    assert plan(mode="resident", budget=None).host_ram_bytes == layer_bytes() + QWEN7B_SHARED  # nothing streamed
    cpu = plan(budget=None, max_resident=10, device_type="cpu")
    assert cpu.host_ram_bytes == cpu.device_bytes + cpu.host_bytes + layer_bytes()


def test_shared_bytes_follow_from_the_shape_alone():
    """The planner sizes the shared weights from the config, before any weight is read: the same figure the
    weights report once read (untied, tied, and with Qwen3's q/k norms)."""
    assert shared_nbytes(QWEN7B, torch.bfloat16) == QWEN7B_SHARED + 64 * 4  # plus the float32 rotary table
    for shape in (TINY, TINY_QWEN3, dataclasses.replace(TINY, tie_embeddings=True)):
        shared, _ = random_weights(shape, dtype=torch.float32, device=torch.device("cpu"))
        assert shared_nbytes(shape, torch.float32) == shared.nbytes()
    tied = shared_nbytes(QWEN25_1_5B, torch.bfloat16)
    assert tied == shared_nbytes(dataclasses.replace(QWEN25_1_5B, tie_embeddings=False), torch.bfloat16) - 151936 * 1536 * 2


def test_budget_applies_on_a_gpu_only():
    assert device_budget(8 * GiB, torch.device("cpu")) is None
    assert device_budget(None, torch.device("cpu")) is None


# -- mode auto ------------------------------------------------------------------------------------------
def choose(*, requested: str = "auto", device_type: str = "cuda", budget: int | None, max_resident: int | None = None):
    plan_for = functools.partial(
        plan_memory, shape=QWEN7B, dtype=torch.bfloat16, speculation=SpeculationConfig(max_depth=48),
        max_model_len=2048, prefill_chunk_size=256, stream_slots=2, max_resident_layers=max_resident,
        shared_bytes=QWEN7B_SHARED, device_type=device_type,
    )
    return choose_mode(requested=requested, device_type=device_type, num_layers=QWEN7B.num_layers,
                       max_resident_layers=max_resident, budget_bytes=budget, plan_for=plan_for)


def test_auto_is_resident_on_a_cpu_whatever_the_model_size():
    choice = choose(device_type="cpu", budget=None)
    assert choice.mode == "resident" and "CPU" in choice.reason
    assert choice.line().startswith("mode resident (chosen by mode auto): ")


def test_auto_on_a_gpu_is_resident_when_the_whole_model_fits_and_subspec_when_layers_must_stream():
    need = plan(mode="resident", budget=None).device_bytes  # Qwen2.5-7B in bf16: ~16 GiB with its KV cache
    assert choose(budget=need).mode == "resident"
    assert choose(budget=None).mode == "resident"  # no budget given: nothing limits it
    tight = choose(budget=need - 1)
    assert tight.mode == "subspec" and "budget" in tight.reason
    assert choose(budget=8 * GiB).mode == "subspec"  # the paper's setting


def test_auto_streams_when_max_resident_layers_says_so_and_an_explicit_mode_wins():
    assert choose(device_type="cpu", budget=None, max_resident=0).mode == "subspec"  # the offload demo preset
    assert choose(budget=None, max_resident=27).mode == "subspec"
    assert choose(budget=None, max_resident=28).mode == "resident"
    for mode in ("subspec", "vanilla", "resident"):
        explicit = choose(requested=mode, device_type="cpu", budget=None)
        assert explicit.mode == mode and "as configured" in explicit.line()
    assert choose(requested="vanilla", budget=8 * GiB).mode == "vanilla"  # auto never picks vanilla; asking does


def test_an_unset_prefill_chunk_grows_into_the_slack_without_costing_a_resident_layer():
    """Each prefill chunk streams every offloaded weight once: the planner picks the largest chunk that fits."""
    def with_chunk(chunk: int | None, budget: int | None, mode: str = "subspec") -> MemoryPlan:
        return plan_memory(
            shape=QWEN7B, dtype=torch.bfloat16, mode=mode, speculation=SpeculationConfig(max_depth=48),
            max_model_len=2048, prefill_chunk_size=chunk, stream_slots=2, budget_bytes=budget, max_resident_layers=None,
            shared_bytes=QWEN7B_SHARED,
        )

    fixed = with_chunk(256, 10 * GiB)
    assert fixed.prefill_chunk_size == 256
    auto = with_chunk(None, 10 * GiB)
    assert auto.resident_layers == fixed.resident_layers  # the chunk only uses what the layers left over
    assert auto.prefill_chunk_size >= 256 and auto.device_bytes <= 10 * GiB
    roomy = with_chunk(None, 40 * GiB)
    assert roomy.prefill_chunk_size == 2048  # the whole context in one forward when memory allows
    assert with_chunk(None, None).prefill_chunk_size == 2048  # no budget (a CPU): as large as the context
    # a budget with exactly the small chunk's plan left no slack: the chunk grows only as far as it costs nothing
    # (on a GPU a 289-row verify, with its logits, holds more working memory than a prefill chunk of ~1000 rows)
    tight = with_chunk(None, fixed.device_bytes)
    assert tight.device_bytes == fixed.device_bytes and tight.resident_layers == fixed.resident_layers
    assert 256 <= tight.prefill_chunk_size < roomy.prefill_chunk_size
    # where the prefill chunk is the largest forward (one-token decoding), it stays small
    vanilla = with_chunk(256, 10 * GiB, mode="vanilla")
    tight = with_chunk(None, vanilla.device_bytes, mode="vanilla")
    assert tight.prefill_chunk_size == 256 and tight.resident_layers == vanilla.resident_layers
    rows = {row.component: row for row in auto.rows}
    assert f"prefill chunk {auto.prefill_chunk_size} (auto)" in rows["activations + logits buffers"].detail


# -- the presets in configs/ on their models' shapes ------------------------------------------------------
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def _preset_shapes() -> dict[str, ModelShape]:
    return {
        "qwen2.5-7b-instruct-8gb.yaml": synthetic.QWEN25_7B, "qwen2.5-14b-instruct-24gb.yaml": synthetic.QWEN25_14B,
        "qwen2.5-32b-instruct-24gb.yaml": synthetic.QWEN25_32B, "llama-3.1-8b-instruct-16gb.yaml": synthetic.LLAMA31_8B,
        "qwen3-8b-16gb.yaml": synthetic.QWEN3_8B, "mistral-7b-instruct-v0.3-8gb.yaml": synthetic.MISTRAL_7B,
        "phi-3-medium-128k-instruct-16gb.yaml": synthetic.PHI3_MEDIUM,
    }


def preset_plan(name: str, shape: ModelShape, **overrides) -> MemoryPlan:
    config = resolve_engine_config(yaml_data={**load_yaml(CONFIG_DIR / name), **overrides}, environ={})
    dtype = {"bfloat16": torch.bfloat16}[config.dtype]
    return plan_for(config, shape, dtype=dtype, device_type="cuda", budget_bytes=config.budget_bytes)


@pytest.mark.parametrize("name", sorted(_preset_shapes()))
def test_model_preset_fits_its_budget_and_states_the_planners_host_ram(name):
    """Each model preset streams some layers within its GPU budget, and its comment states the host RAM the planner
    prints for it (`host RAM at load (peak)`), rounded up to a whole GiB."""
    shape = _preset_shapes()[name]
    p = preset_plan(name, shape)
    assert p.budget_bytes is not None and p.device_bytes <= p.budget_bytes
    assert p.streamed_layers, "the model fits whole: the preset would not need SubSpec"
    stated = re.search(r"^# Host RAM: about (\d+) GiB for the weights at load", (CONFIG_DIR / name).read_text(), re.M)
    assert stated, f"{name} does not state its host RAM need"
    assert int(stated.group(1)) == math.ceil(p.host_ram_bytes / GiB), f"the planner says {p.host_ram_bytes / GiB:.2f} GiB"


def test_new_family_presets_fit_the_consumer_budgets():
    """Qwen3-8B keeps most layers resident on a 16 GB card and does not fit an 8 GB one (7.6 GiB) even with every
    layer streamed; Mistral-7B v0.3 fits 8 GB, Phi-3-medium 16 GiB and 12 GiB (the paper's 14B budget), all
    with some layers resident."""
    shapes = _preset_shapes()
    qwen3_16 = preset_plan("qwen3-8b-16gb.yaml", shapes["qwen3-8b-16gb.yaml"])
    qwen3_24 = preset_plan("qwen3-8b-16gb.yaml", shapes["qwen3-8b-16gb.yaml"], gpu_memory_budget="22.8GiB")
    assert 0 < len(qwen3_16.resident_layers) < len(qwen3_24.resident_layers) <= 36
    assert qwen3_24.host_ram_bytes < qwen3_16.host_ram_bytes
    with pytest.raises(BudgetTooSmallError, match="needs at least 8.1"):
        preset_plan("qwen3-8b-16gb.yaml", shapes["qwen3-8b-16gb.yaml"], gpu_memory_budget="7.6GiB")
    mistral = preset_plan("mistral-7b-instruct-v0.3-8gb.yaml", shapes["mistral-7b-instruct-v0.3-8gb.yaml"])
    assert len(mistral.resident_layers) > 0
    for budget in ("16GiB", "12GiB"):
        phi = preset_plan("phi-3-medium-128k-instruct-16gb.yaml", shapes["phi-3-medium-128k-instruct-16gb.yaml"],
                          gpu_memory_budget=budget)
        assert len(phi.resident_layers) > 0 and phi.device_bytes <= phi.budget_bytes


def test_preset_shapes_are_what_the_loader_reads_from_the_hub_configs():
    """The shapes above are the ones `shape_from_hf_config` derives from each model's published config.json."""
    from transformers import MistralConfig, Phi3Config, Qwen3Config

    shapes = _preset_shapes()
    qwen3 = Qwen3Config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
                        max_position_embeddings=40960, rope_theta=1000000, tie_word_embeddings=False)
    mistral = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=128, vocab_size=32768, rms_norm_eps=1e-5,
                            max_position_embeddings=32768, rope_theta=1000000.0, sliding_window=None)
    phi3 = Phi3Config(hidden_size=5120, intermediate_size=17920, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=10, vocab_size=32064, rms_norm_eps=1e-5, max_position_embeddings=131072,
                      original_max_position_embeddings=4096, sliding_window=131072, rope_parameters={
                          "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 64,
                          "long_factor": [1.5] * 64})
    for config, name in ((qwen3, "qwen3-8b-16gb.yaml"), (mistral, "mistral-7b-instruct-v0.3-8gb.yaml"),
                         (phi3, "phi-3-medium-128k-instruct-16gb.yaml")):
        assert shape_from_hf_config(config, max_model_len=2048) == shapes[name]


def test_max_num_seqs_counts_a_kv_region_per_sequence_and_one_is_todays_plan():
    """max_num_seqs 1 is exactly the single-sequence plan; 4 holds four KV regions (the table says so) and the
    verify rows of four trees, and costs resident layers under the same budget."""
    common = dict(shape=QWEN7B, dtype=torch.bfloat16, mode="subspec", speculation=SpeculationConfig(max_depth=48),
                  max_model_len=2048, prefill_chunk_size=256, stream_slots=2, budget_bytes=10 * GiB,
                  max_resident_layers=None, shared_bytes=QWEN7B_SHARED)
    one = plan_memory(**common)
    assert plan_memory(**common, max_num_seqs=1) == one
    four = plan_memory(**common, max_num_seqs=4)
    kv = {p: next(r for r in p.rows if r.component == "KV cache") for p in (one, four)}
    assert kv[four].nbytes == 4 * kv[one].nbytes
    assert kv[four].detail.startswith("max_num_seqs 4 x ")
    assert "verify 1156 rows" in four.table()  # 4 x (48 x 6 + 1)
    assert len(four.resident_layers) < len(one.resident_layers)
    with pytest.raises(BudgetTooSmallError, match="max_num_seqs=64"):
        plan_memory(**{**common, "budget_bytes": 4 * GiB}, max_num_seqs=64)


def test_the_graph_pool_holds_the_batched_draft_levels_beside_one_sequences_step():
    """With CUDA graphs and max_num_seqs 4, the reserve holds drafter 0's captured steps (Engine.generate) and the
    batched levels' own pool (batch_graphs.py), each with its warm-up's blocks: 2 x (level of topk rows + levels of
    1..4 x topk rows, captured lazily as the batch grows), and one more cuBLAS workspace for the batched warm-up
    stream. Plain modes batch eagerly."""
    spec = SpeculationConfig(topk=6, max_depth=8)
    common = dict(shape=QWEN7B, dtype=torch.bfloat16, speculation=spec, capacity=2112, chunk=256, max_model_len=2048,
                  stream_slots=2, shared_bytes=QWEN7B_SHARED, device_type="cuda", cuda_graphs=True)
    step = functools.partial(draft_step_bytes, shape=QWEN7B, dtype=torch.bfloat16, capacity=2112, device_type="cuda")
    one, four = (plan_sizes(**common, mode="subspec", max_num_seqs=n) for n in (1, 4))
    assert one.graph_pool == 2 * step(topk=6)
    assert four.graph_pool == 2 * (step(topk=6) + sum(step(topk=6 * seqs) for seqs in range(1, 5)))
    assert four.workspaces == one.workspaces + CUBLAS_WORKSPACE_BYTES
    vanilla = [plan_sizes(**common, mode="vanilla", max_num_seqs=n) for n in (1, 4)]
    assert vanilla[0].graph_pool == vanilla[1].graph_pool == 2 * step(topk=1)
    assert vanilla[0].workspaces == vanilla[1].workspaces
    assert plan_sizes(**{**common, "cuda_graphs": False}, mode="subspec", max_num_seqs=4).graph_pool == 0


def test_max_num_seqs_is_a_setting_like_every_other():
    """YAML < SUBSPEC_MAX_NUM_SEQS < --max-num-seqs, each taking a count or auto (the default); below 1, or
    anything else, is refused."""
    import argparse

    from server.engine_args import add_engine_arguments, engine_overrides

    assert resolve_engine_config(yaml_data={"max_num_seqs": 2}, environ={}).max_num_seqs == 2
    assert resolve_engine_config(yaml_data={"max_num_seqs": 2}, environ={"SUBSPEC_MAX_NUM_SEQS": "3"}).max_num_seqs == 3
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    flags = engine_overrides(parser.parse_args(["--max-num-seqs", "4"]))
    assert resolve_engine_config(environ={"SUBSPEC_MAX_NUM_SEQS": "3"}, cli_overrides=flags).max_num_seqs == 4
    assert resolve_engine_config(environ={}).max_num_seqs == "auto"
    assert resolve_engine_config(yaml_data={"max_num_seqs": 2}, environ={"SUBSPEC_MAX_NUM_SEQS": "auto"}).max_num_seqs \
        == "auto"
    assert engine_overrides(parser.parse_args(["--max-num-seqs", "AUTO"])) == {"max_num_seqs": "auto"}
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-num-seqs", "many"])
    for bad in (0, "many", True, 2.5):
        with pytest.raises(ValueError, match="max_num_seqs"):
            resolve_engine_config(environ={}, cli_overrides={"max_num_seqs": bad})


def test_the_plan_says_how_many_sequences_its_budget_holds():
    """seqs_that_fit: the most sequences the same resident layers and prefill chunk leave room for; one more costs
    a resident layer. Without a budget there is no such number."""
    assert plan(budget=None).seqs_that_fit is None
    common = dict(shape=QWEN7B, dtype=torch.bfloat16, mode="subspec", speculation=SpeculationConfig(max_depth=48),
                  max_model_len=2048, prefill_chunk_size=256, stream_slots=2, max_resident_layers=None,
                  shared_bytes=QWEN7B_SHARED)
    for budget in (10 * GiB, 12 * GiB):
        one = plan_memory(**common, budget_bytes=budget)
        fit = one.seqs_that_fit
        assert fit is not None and 1 <= fit < 64 and one.max_num_seqs == 1
        fitted = plan_memory(**common, budget_bytes=budget, max_num_seqs=fit)
        assert fitted.resident_layers == one.resident_layers and fitted.device_bytes <= budget
        assert fitted.seqs_that_fit == fit
        over = plan_memory(**common, budget_bytes=budget, max_num_seqs=fit + 1)
        assert len(over.resident_layers) < len(one.resident_layers)


def test_auto_max_num_seqs_fills_the_memory_left_after_the_layers_up_to_its_cap():
    """auto places the layers as for one sequence (the same resident layers), then takes as many sequences as the
    slack holds: one more would not fit, or the cap is reached. 8 GB with every Qwen2.5-7B layer streamed has room
    for one; a larger budget for several, never a resident layer fewer."""
    common = dict(shape=QWEN7B, dtype=torch.bfloat16, mode="subspec", speculation=SpeculationConfig(max_depth=48),
                  max_model_len=2048, prefill_chunk_size=256, stream_slots=2, max_resident_layers=None,
                  shared_bytes=QWEN7B_SHARED)
    for budget, resident_cap in ((int(7.6 * GiB), None), (10 * GiB, None), (10 * GiB, 5), (40 * GiB, 0)):
        args = {**common, "budget_bytes": budget, "max_resident_layers": resident_cap}
        one = plan_memory(**args)
        auto = plan_memory(**args, max_num_seqs=None)
        assert auto.resident_layers == one.resident_layers and auto.device_bytes <= budget
        assert auto.seqs_reason.startswith("auto")
        counted = plan_memory(**args, max_num_seqs=auto.max_num_seqs)  # the same plan, but for its reason
        assert auto == dataclasses.replace(counted, seqs_reason=auto.seqs_reason)
        if auto.max_num_seqs < AUTO_MAX_NUM_SEQS:
            assert auto.seqs_that_fit == auto.max_num_seqs  # one more does not fit beside these layers
    assert plan_memory(**common, budget_bytes=int(7.6 * GiB), max_num_seqs=None).max_num_seqs == 1
    several = plan_memory(**{**common, "max_resident_layers": 5}, budget_bytes=10 * GiB, max_num_seqs=None)
    assert 1 < several.max_num_seqs <= AUTO_MAX_NUM_SEQS
    roomy = plan_memory(**{**common, "max_resident_layers": 0}, budget_bytes=40 * GiB, max_num_seqs=None)
    assert roomy.max_num_seqs == AUTO_MAX_NUM_SEQS
    assert f"max_num_seqs {several.max_num_seqs} (auto: " in several.seqs_line()
    assert f"max_num_seqs {several.max_num_seqs} x " in several.table()


def test_auto_max_num_seqs_is_one_without_a_budget_with_post_speculation_and_in_mode_resident():
    """On a CPU nothing bounds the count but the machine, so auto keeps one (an explicit count is honoured);
    post-speculation decodes one request at a time; mode resident streams nothing to share."""
    assert plan(budget=None, device_type="cpu").max_num_seqs == 1
    cpu = plan_memory(shape=QWEN7B, dtype=torch.bfloat16, mode="subspec", speculation=SpeculationConfig(max_depth=48),
                      max_model_len=2048, prefill_chunk_size=256, stream_slots=2, budget_bytes=None,
                      max_resident_layers=None, shared_bytes=QWEN7B_SHARED, device_type="cpu", max_num_seqs=None)
    assert cpu.max_num_seqs == 1 and "no memory budget" in cpu.seqs_reason
    post = plan_memory(shape=QWEN7B, dtype=torch.bfloat16, mode="subspec",
                       speculation=SpeculationConfig(max_depth=8, post_levels=4), max_model_len=2048,
                       prefill_chunk_size=256, stream_slots=2, budget_bytes=40 * GiB, max_resident_layers=0,
                       shared_bytes=QWEN7B_SHARED, max_num_seqs=None)
    assert post.max_num_seqs == 1 and "post-speculation" in post.seqs_reason
    resident = plan_memory(shape=QWEN7B, dtype=torch.bfloat16, mode="resident", speculation=SpeculationConfig(),
                           max_model_len=2048, prefill_chunk_size=256, stream_slots=2, budget_bytes=40 * GiB,
                           max_resident_layers=None, shared_bytes=QWEN7B_SHARED, max_num_seqs=None)
    assert resident.max_num_seqs == 1 and "resident" in resident.seqs_reason and resident.seqs_that_fit > 1


def test_sequences_come_before_an_unset_prefill_chunk():
    """With both left to the planner, the sequences take the slack first and the chunk grows into what is left."""
    common = dict(shape=QWEN7B, dtype=torch.bfloat16, mode="subspec", speculation=SpeculationConfig(max_depth=48),
                  max_model_len=2048, prefill_chunk_size=None, stream_slots=2, budget_bytes=10 * GiB,
                  max_resident_layers=5, shared_bytes=QWEN7B_SHARED)
    auto = plan_memory(**common, max_num_seqs=None)
    counted = plan_memory(**{**common, "prefill_chunk_size": 256}, max_num_seqs=None)
    assert auto.max_num_seqs == counted.max_num_seqs > 1
    assert auto.prefill_chunk_size >= 256 and auto.device_bytes <= 10 * GiB


def test_subspec_plan_prints_the_sequences_it_chose_and_why(capsys):
    """`subspec plan` shows max_num_seqs with its KV cost and reason; --json carries both."""
    import argparse
    import json

    from server.plan_cmd import add_plan_arguments, run_plan

    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    preset = str(CONFIG_DIR / "qwen2.5-7b-instruct-8gb.yaml")
    assert run_plan(parser.parse_args(["--config", preset, "--gpu-memory-budget", "7.9GiB", "--json"])) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_num_seqs"] > 1 and report["max_num_seqs_reason"].startswith("auto")
    assert report["kv_bytes"] > 0
    assert run_plan(parser.parse_args(["--config", preset, "--max-num-seqs", "auto"])) == 0
    out = capsys.readouterr().out
    assert re.search(r"^max_num_seqs 1 \(auto: [^)]*\): KV cache [\d.]+ MiB", out, re.M), out
    assert run_plan(parser.parse_args(["--config", preset, "--max-num-seqs", "2"])) == 2
    assert "max_num_seqs=2" in capsys.readouterr().err
