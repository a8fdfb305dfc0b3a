"""Plans that fit real cards (subspec_core/fit.py, reserves.py, shapes.py and `subspec plan`): every GPU preset
under 95% of its card class, its reserves in the table, the start-up check against a GPU's free memory imitated
with a fake `torch.cuda.mem_get_info`, and the model's shape found without weights or network."""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import pytest
import torch

from server.cli import main
from subspec_core.config import SpeculationConfig, load_yaml, resolve_engine_config
from subspec_core.fit import CARD_CLASSES, DoesNotFitError, card_bytes, card_limit, fit_device, fit_free_memory
from subspec_core.planner import CUDA_CONTEXT_ROW, BudgetTooSmallError, MemoryPlan, plan_for
from subspec_core.quant import quantize_int4
from subspec_core.reserves import QUANT_TEMP_BYTES_PER_WEIGHT
from subspec_core.shapes import QWEN25_7B, ShapeNotFoundError, find_shape
from tests.core.live_bytes import LiveBytes

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
GPU_PRESETS = sorted(p.name for p in CONFIG_DIR.glob("*.yaml") if "gpu_memory_budget" in load_yaml(p))
GiB, MiB = 2**30, 2**20


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection attempt fails the test: planning is offline."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("subspec plan tried to reach the network")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def plan_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_gpu_preset_plans_offline_under_95_percent_of_its_card(no_network, capsys):
    assert len(GPU_PRESETS) >= 8  # the model presets and default-offload
    for name in GPU_PRESETS:
        card = load_yaml(CONFIG_DIR / name)["card"]
        report = plan_json(capsys, "--config", str(CONFIG_DIR / name))
        assert report["mode"] == "subspec" and report["card"] == card, name
        assert report["device_total_bytes"] <= report["budget_bytes"] <= card_limit(card), name
        assert report["device_total_bytes"] < 0.95 * card_bytes(card), name
        assert report["reserve_bytes"] == sum(r["bytes"] for r in report["rows"] if r["reserve"]), name
        assert report["resident_layers"] + report["streamed_layers"] > 0, name
    qwen7b = plan_json(capsys, "--config", str(CONFIG_DIR / "qwen2.5-7b-instruct-8gb.yaml"))
    rows = {r["component"]: r["bytes"] for r in qwen7b["rows"]}
    assert qwen7b["reserve_bytes"] >= 300 * MiB and rows[CUDA_CONTEXT_ROW] >= 300 * MiB
    for reserve in ("library workspaces", "draft CUDA-graph pool", "sampling + logprobs peak", "load temporaries",
                    "fragmentation margin"):
        assert reserve in rows


def test_plan_text_names_the_reserves_and_the_card_and_takes_model_and_budget(no_network, capsys):
    assert main(["plan", "--config", str(CONFIG_DIR / "qwen2.5-7b-instruct-8gb.yaml")]) == 0
    text = capsys.readouterr().out
    assert "card 8GB: device total" in text and "CUDA context" in text and "fragmentation margin" in text
    assert "reserves" in text.splitlines()[-3]  # the device total line
    other = plan_json(capsys, "--config", str(CONFIG_DIR / "qwen2.5-7b-instruct-8gb.yaml"), "--model",
                      "Qwen/Qwen2.5-14B-Instruct", "--gpu-memory-budget", "24GiB")
    assert other["model"] == "Qwen/Qwen2.5-14B-Instruct" and other["budget_bytes"] == 24 * GiB
    assert main(["plan", "--config", str(CONFIG_DIR / "qwen3-8b-16gb.yaml"), "--gpu-memory-budget", "7.6GiB"]) == 2
    assert "too small" in capsys.readouterr().err  # Qwen3-8B does not fit an 8 GB card
    assert main(["plan", "--config", str(CONFIG_DIR / "default.yaml"), "--model", "someone/unknown-model"]) == 1
    assert "without downloading" in capsys.readouterr().err


def test_cards_are_named_classes():
    assert card_bytes("8GB") == 8 * GiB and card_limit("24GB") == int(24 * GiB * 0.95)
    with pytest.raises(ValueError, match=", ".join(CARD_CLASSES)):
        card_bytes("12GB")


def test_shape_from_a_local_config_json_and_the_table(tmp_path, no_network):
    from transformers import Qwen2Config

    Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512).save_pretrained(tmp_path)
    found = find_shape(str(tmp_path), max_model_len=256)
    assert (found.shape.num_layers, found.shape.hidden_size, found.shape.qkv_bias) == (3, 64, True)
    assert "config.json" in found.source
    assert find_shape("Qwen/Qwen2.5-7B-Instruct", max_model_len=2048).shape == QWEN25_7B
    with pytest.raises(ShapeNotFoundError, match="local directory"):
        find_shape("someone/unknown-model", max_model_len=2048)


# -- the start-up check against free memory (torch.cuda.mem_get_info imitated) ---------------------------------
CONFIG = resolve_engine_config(yaml_data=load_yaml(CONFIG_DIR / "qwen2.5-7b-instruct-8gb.yaml"), environ={})
# a 12 GiB budget with whole-context prefill chunks: the chunk, not the verify, is the largest forward
ROOMY = dataclasses.replace(CONFIG, gpu_memory_budget="12GiB", prefill_chunk_size=2048)


def gpu_plan(config=ROOMY, budget: int | None = 12 * GiB, chunk: int | None = None) -> MemoryPlan:
    if chunk is not None:
        config = dataclasses.replace(config, prefill_chunk_size=chunk)
    return plan_for(config, QWEN25_7B, dtype=torch.bfloat16, device_type="cuda", budget_bytes=budget)


def replan(budget: int, chunk: int | None) -> MemoryPlan:
    return gpu_plan(budget=budget, chunk=chunk)


def test_a_plan_that_fits_the_free_memory_is_kept():
    plan = gpu_plan()
    free = plan.device_bytes - plan.context_bytes  # the context already exists when mem_get_info answers
    assert fit_free_memory(plan, free_bytes=free, total_bytes=16 * GiB, replan=replan) == (plan, None)


def test_too_little_free_memory_drops_resident_layers_first_then_halves_the_prefill_chunk():
    plan = gpu_plan()
    assert len(plan.resident_layers) >= 8 and plan.prefill_chunk_size == 2048
    free = plan.device_bytes - plan.context_bytes - 3 * GiB
    smaller, note = fit_free_memory(plan, free_bytes=free, total_bytes=16 * GiB, replan=replan)
    assert len(smaller.resident_layers) < len(plan.resident_layers) and smaller.prefill_chunk_size == 2048
    assert smaller.device_bytes - smaller.context_bytes <= free
    assert f"shrunk to {len(smaller.resident_layers)} resident layers" in note and "gpu_memory_budget" in note
    # with every layer streamed the chunk is still too large: it halves until the plan fits
    streamed = dataclasses.replace(ROOMY, max_resident_layers=0)
    at_1024 = gpu_plan(streamed, budget=None, chunk=1024)
    assert at_1024.device_bytes < gpu_plan(streamed, budget=None, chunk=2048).device_bytes
    free = at_1024.device_bytes - at_1024.context_bytes
    smallest, note = fit_free_memory(plan, free_bytes=free, total_bytes=8 * GiB, replan=replan)
    assert smallest.resident_layers == () and smallest.prefill_chunk_size == 1024 and "prefill chunk of 1024" in note


def test_a_gpu_without_room_for_the_smallest_plan_is_refused_with_the_numbers():
    plan = gpu_plan()
    with pytest.raises(DoesNotFitError) as err:
        fit_free_memory(plan, free_bytes=4 * GiB, total_bytes=8 * GiB, replan=replan)
    message = str(err.value)
    assert "4.00 GiB of 8.00 GiB is free" in message
    assert f"{(plan.device_bytes - plan.context_bytes) / GiB:.2f} GiB" in message  # what the plan needs
    assert "max_model_len" in message and "--gpu-memory-budget" in message  # what to set


def test_the_start_up_check_reads_mem_get_info_on_cuda_only(monkeypatch):
    plan = gpu_plan(config=CONFIG, budget=CONFIG.budget_bytes)  # the 8 GB preset: every layer streamed already
    cuda = torch.device("cuda", 0)
    notes: list[str] = []
    free = plan.device_bytes - plan.context_bytes
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 8 * GiB))
    assert fit_device(CONFIG, QWEN25_7B, plan, dtype=torch.bfloat16, device=cuda, note=notes.append) is plan
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free - 64 * MiB, 8 * GiB))
    with pytest.raises(DoesNotFitError, match="is free"):  # a 289-row verify, not the prefill chunk, is its peak
        fit_device(CONFIG, QWEN25_7B, plan, dtype=torch.bfloat16, device=cuda, note=notes.append)
    roomy = gpu_plan()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (15 * GiB // 2, 8 * GiB))
    fitted = fit_device(ROOMY, QWEN25_7B, roomy, dtype=torch.bfloat16, device=cuda, note=notes.append)
    assert fitted.device_bytes - fitted.context_bytes <= 15 * GiB // 2 < roomy.device_bytes and len(notes) == 1
    cpu = plan_for(CONFIG, QWEN25_7B, dtype=torch.float32, device_type="cpu", budget_bytes=None)
    assert fit_device(CONFIG, QWEN25_7B, cpu, dtype=torch.float32, device=torch.device("cpu"), note=notes.append) is cpu
    assert CUDA_CONTEXT_ROW not in {row.component for row in cpu.rows} and cpu.context_bytes == 0


def test_a_budget_below_the_smallest_plan_still_raises_budget_too_small():
    with pytest.raises(BudgetTooSmallError, match="reserves"):
        gpu_plan(budget=7 * GiB)


# -- the load temporaries the planner reserves: quant.py's side of the contract ----------------------------------
def test_quantizing_one_linear_stays_within_the_load_temporaries_the_plan_reserves():
    weight = torch.randn(256, 512, dtype=torch.bfloat16)
    with LiveBytes(weight) as live:
        result = quantize_int4(weight, None, group_size=SpeculationConfig().quant_block_size, device=torch.device("cpu"))
    kept = result.nbytes()
    assert live.peak - kept <= QUANT_TEMP_BYTES_PER_WEIGHT["int4"] * weight.numel()
