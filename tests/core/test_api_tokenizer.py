"""The API process's tokenizer (subspec_core/api_tokenizer.py): loaded without torch, and the same tokenizer
the engine loads, whether it was ready on disk or had to be made by a child process first."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from subspec_core.config import EngineConfig
from subspec_core.loading import load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["Hello world", " leading space", "你好，世界。", "x" * 40, "<|im_start|>user\nhi<|im_end|>"]
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello there"}]

# Run in a fresh interpreter: this test process has torch imported already.
PROBE = """
import json, sys, time
from subspec_core.api_tokenizer import api_tokenizer
from subspec_core.config import EngineConfig
from subspec_core.model_source import resolve_model
texts, messages, model = json.loads(sys.argv[1])
config = EngineConfig(model=model)
runs = []
for _ in range(2):
    started = time.perf_counter()
    tok = api_tokenizer(config, resolve_model(model, progress=False))
    runs.append(time.perf_counter() - started)
print(json.dumps({"torch": "torch" in sys.modules, "seconds": runs,
                  "ids": [tok.encode(t) for t in texts], "plain": [tok.encode(t, add_special_tokens=False) for t in texts],
                  "chat": tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                  "size": len(tok), "decoded": tok.decode(tok.encode(texts[2], add_special_tokens=False))}))
"""


def probe(model: str, env: dict[str, str]) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps([TEXTS, MESSAGES, model])], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_gguf_models_tokenizer_is_made_once_by_a_child_then_read_without_torch(default_model_path, tmp_path):
    """A GGUF file not converted yet (copied where no conversion exists): the child process makes the tokenizer
    into the cache; the API process never imports torch, and tokenizes and templates exactly as the engine's
    tokenizer does."""
    model = tmp_path / "models" / default_model_path.name
    model.parent.mkdir()
    shutil.copy(default_model_path, model)
    env = {**os.environ, "SUBSPEC_CACHE_DIR": str(tmp_path / "cache")}
    got = probe(str(model), env)
    reference = load_tokenizer(EngineConfig(model=str(default_model_path)))
    assert got["torch"] is False
    assert got["ids"] == [reference.encode(t) for t in TEXTS]
    assert got["plain"] == [reference.encode(t, add_special_tokens=False) for t in TEXTS]
    assert got["chat"] == reference.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert got["size"] == len(reference) and got["decoded"] == TEXTS[2]
    assert list((tmp_path / "cache" / "converted").glob("*/tokenizer/tokenizer.json"))  # made once, kept
    first, second = got["seconds"]
    assert second < first / 2, got["seconds"]  # the second read the saved tokenizer
