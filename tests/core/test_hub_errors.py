"""A hub model that cannot be read ends in one line that names it and says what to do, within seconds.

The CLI runs as a user runs it (a subprocess) with the real huggingface_hub client pointed at a local fake
hub (`fake_hub.py`), a fresh HF_HOME and offline mode off; nothing reaches the internet.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.core.fake_hub import FakeHub

ROOT = Path(__file__).resolve().parents[2]
_HUB_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
            "TRANSFORMERS_CACHE", "HF_TOKEN")


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The files of a tiny Llama repository: config, random safetensors weights, a byte-level tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.core.tiny import tiny_hf_model

    folder = tmp_path_factory.mktemp("tiny-repo")
    tiny_hf_model("llama", num_layers=2).save_pretrained(folder)
    vocab = {token: i for i, token in enumerate(["<s>", "</s>"] + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # 258 ids, inside the model's 512
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.fixture(scope="module")
def hub(tiny_repo: dict[str, bytes]) -> Iterator[FakeHub]:
    with FakeHub({"org/tiny": tiny_repo}, gated={"org/gated"}, slow={"org/slow"}) as fake:
        yield fake


def closed_port_url() -> str:
    """An endpoint where nothing listens: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def run_cli(command: str, model: str, hf_home: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m server COMMAND --model MODEL ...` with its own HF_HOME; returns the result and its seconds."""
    base = {k: v for k, v in os.environ.items() if k not in _HUB_ENV}
    args = ["--prompt", "hi", "--max-tokens", "2", "--device", "cpu", "--json"] if command == "generate" else []
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "server", command, "--model", model, *args], capture_output=True, text=True,
        env={**base, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HOME": str(hf_home), **env},
        cwd=ROOT, timeout=120,
    )
    return result, time.perf_counter() - started


def one_error_line(result: subprocess.CompletedProcess, seconds: float) -> str:
    """The failed run's one error line (no traceback, no retries), which must come within seconds."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert seconds < 15, f"{seconds:.1f} s"
    assert "Traceback" not in result.stderr and "Retrying" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith(("error: ", "subspec serve: "))]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_a_hub_model_downloads_and_is_read_from_the_cache_when_the_hub_is_gone(hub, tmp_path):
    result, _ = run_cli("generate", "org/tiny", tmp_path, HF_ENDPOINT=hub.url)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(json.loads(result.stdout.strip().splitlines()[-1])["token_ids"]) == 2
    assert "HEAD /org/tiny/resolve/main/config.json" in hub.requests  # the check, before transformers' downloads
    # The hub gone, the cached snapshot is read at once (transformers alone retried for ~46 s here).
    result, seconds = run_cli("generate", "org/tiny", tmp_path, HF_ENDPOINT=closed_port_url())
    assert result.returncode == 0 and seconds < 15, (seconds, result.stderr[-3000:])
    assert "reading the cached copy in" in result.stderr and "Retrying" not in result.stderr


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_a_missing_repository(hub, tmp_path, command):
    line = one_error_line(*run_cli(command, "org/missing", tmp_path, HF_ENDPOINT=hub.url))
    assert f"model org/missing: no such local path, nor a repository on the hub at {hub.url}" in line
    assert "check the name" in line and "`hf auth login`" in line


def test_a_gated_repository(hub, tmp_path):
    line = one_error_line(*run_cli("generate", "org/gated", tmp_path, HF_ENDPOINT=hub.url))
    assert f"model org/gated: gated on the Hugging Face hub; request access at {hub.url}/org/gated" in line
    assert "`hf auth login`" in line


def test_an_unreachable_hub(tmp_path):
    endpoint = closed_port_url()
    line = one_error_line(*run_cli("generate", "org/tiny", tmp_path, HF_ENDPOINT=endpoint))
    assert f"model org/tiny: not in the Hugging Face cache, and the hub at {endpoint} cannot be reached" in line
    assert "Connection refused" in line and "HF_ENDPOINT" in line


def test_a_hub_that_does_not_answer_in_time(hub, tmp_path):
    line = one_error_line(*run_cli("generate", "org/slow", tmp_path, HF_ENDPOINT=hub.url, HF_HUB_ETAG_TIMEOUT="1"))
    assert f"model org/slow: not in the Hugging Face cache, and the hub at {hub.url} did not answer within 1 s" in line
    assert "(HF_HUB_ETAG_TIMEOUT)" in line


def test_offline_without_the_model_in_the_cache(tmp_path):
    line = one_error_line(*run_cli("generate", "org/tiny", tmp_path, HF_HUB_OFFLINE="1"))
    assert "model org/tiny: not in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it" in line
    assert "`hf download org/tiny`" in line


def test_a_local_path_that_does_not_exist(tmp_path):
    line = one_error_line(*run_cli("generate", "./no-such-model-dir", tmp_path, HF_HUB_OFFLINE="1"))
    assert "model ./no-such-model-dir: no such file or directory; pass a model directory" in line
