"""What the GPU checks share: engines over the device model on CUDA, and chat prompts for them.

The device bundle sets SUBSPEC_DEVICE_MODEL to the default model's GGUF file; without it the default model is
fetched as usual.
"""

from __future__ import annotations

import os
from typing import Any

from subspec_core.build import build_engine
from subspec_core.config import resolve_engine_config
from subspec_core.engine import Engine

PROMPTS = [
    "Write a haiku about autumn leaves.",
    "Write a Python function that checks whether a string is a palindrome.",
    "What is 12 times 13? Explain.",
    "Décris Paris en deux phrases.",
]


def gpu_engine(mode: str, **overrides: Any) -> Engine:
    """An engine on CUDA streaming every layer under a 4 GiB budget, one sequence at a time, unless `overrides`
    (config keys) say otherwise."""
    data = {"model": os.environ.get("SUBSPEC_DEVICE_MODEL", "default"), "mode": mode, "device": "cuda",
            "max_resident_layers": 0, "gpu_memory_budget": "4GiB", "max_num_seqs": 1, **overrides}
    return build_engine(resolve_engine_config(yaml_data=data, environ={}), progress=False)


def chat_prompt(engine: Engine, text: str) -> tuple[int, ...]:
    """`text` as one user turn under the model's chat template, ready for generation."""
    tok = engine.tokenizer
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return tuple(tok.encode(rendered, add_special_tokens=False))
