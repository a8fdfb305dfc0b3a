"""The model's tokenizer for the API process, loaded without importing torch.

The API process templates and tokenizes prompts but must never touch the GPU, so it never imports torch
(transformers' AutoTokenizer does, through its config classes). It reads a directory holding a
`tokenizer.json` with transformers' fast tokenizer class, which is torch-free. The directory is the first of:
- `--tokenizer`, a local directory or a hub id (its tokenizer files, from the cache or the hub);
- a GGUF model's converted tokenizer (subspec_core/conversion_cache.py);
- the model's own directory, or its hub repository's tokenizer files.
A tokenizer only transformers' converters can produce (a GGUF file not converted yet, a model that ships no
`tokenizer.json`) is made once by a child process (`python -m subspec_core.api_tokenizer`, which may import
torch) with the engine's own loader, and saved: into the GGUF conversion cache, or under
`$SUBSPEC_CACHE_DIR/tokenizers/`. So both processes tokenize with the same files.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from subspec_core.config import EngineConfig
from subspec_core.conversion_cache import gguf_conversion, save_atomically
from subspec_core.model_source import ResolvedModel, default_cache_dir

TOKENIZER_FILE = "tokenizer.json"
# What a tokenizer directory may hold: the vocabulary and its settings, the chat template, special tokens.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "added_tokens.json", "generation_config.json")


def api_tokenizer(config: EngineConfig, resolved: ResolvedModel) -> Any:
    """The tokenizer of `resolved` (or of `config.tokenizer`), without importing torch in this process."""
    from transformers import PreTrainedTokenizerFast

    directory = _ready_directory(config, resolved)
    if directory is None:
        directory = _made_by_child(config, resolved)
    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def _ready_directory(config: EngineConfig, resolved: ResolvedModel) -> Path | None:
    """A directory that already holds the tokenizer as `tokenizer.json`, or None."""
    if config.tokenizer:
        return _with_tokenizer_json(config.tokenizer)
    conversion = gguf_conversion(resolved)
    if conversion is not None:
        return conversion.find("tokenizer")
    if resolved.gguf_file is not None:
        return None  # a GGUF file inside a hub repository: transformers' converter reads it
    return _with_tokenizer_json(resolved.load_path)


def _with_tokenizer_json(source: str) -> Path | None:
    """`source` (a local directory, or a hub id whose tokenizer files are fetched or read from the cache) as a
    directory holding tokenizer.json, or None."""
    local = Path(source).expanduser()
    if local.is_dir():
        return local if (local / TOKENIZER_FILE).is_file() else None
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(source, allow_patterns=list(TOKENIZER_FILES)))
    except Exception:  # noqa: BLE001 - not reachable, not cached: the child's loader says why, in one line
        return None
    return snapshot if (snapshot / TOKENIZER_FILE).is_file() else None


def _made_by_child(config: EngineConfig, resolved: ResolvedModel) -> Path:
    """Have a child process make the tokenizer with the engine's loader and save it; where it is now."""
    conversion = gguf_conversion(resolved) if not config.tokenizer else None
    if conversion is not None and conversion.writable():
        target = conversion.cache / "tokenizer"  # the engine's loader saves it there itself
    else:
        key = hashlib.sha1(json.dumps([config.tokenizer, resolved.load_path, resolved.gguf_file]).encode())
        target = default_cache_dir() / "tokenizers" / key.hexdigest()[:16]
    if not (target / TOKENIZER_FILE).is_file():
        arguments = json.dumps({"tokenizer": config.tokenizer, "model": resolved.load_path,
                                "gguf_file": resolved.gguf_file})
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _run_child(arguments, target)
        except OSError:  # an unwritable cache: a directory that lives as long as this process
            target = Path(tempfile.mkdtemp(prefix="subspec-tokenizer-")) / "tokenizer"
            _run_child(arguments, target)
    return target


def _run_child(arguments: str, target: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "subspec_core.api_tokenizer", arguments, str(target)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr.strip() or "no output").splitlines()
        raise OSError(f"could not prepare the tokenizer of {json.loads(arguments)['model']}: {lines[-1]}")


def _child_main(arguments: str, target: str) -> None:
    """In the child: load the tokenizer as the engine does (transformers, torch allowed) and save it."""
    from subspec_core.loading import load_tokenizer

    given = json.loads(arguments)
    config = EngineConfig(model=given["model"], gguf_file=given["gguf_file"], tokenizer=given["tokenizer"])
    resolved = ResolvedModel(given["model"], given["gguf_file"], given["model"])
    tokenizer = load_tokenizer(config, resolved)
    path = Path(target)
    if not (path / TOKENIZER_FILE).is_file():
        save_atomically(path, tokenizer.save_pretrained)


if __name__ == "__main__":
    _child_main(*sys.argv[1:3])
