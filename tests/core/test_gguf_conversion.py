"""Where a GGUF file's one-time conversion is read and written (subspec_core.conversion_cache.GgufConversion): beside
the file first (a read-only cache baked into an image), then the writable cache, which is the one written."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch

from subspec_core.conversion_cache import gguf_conversion
from subspec_core.model_source import ResolvedModel


def _gguf(directory: Path) -> ResolvedModel:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "m.gguf").write_bytes(b"GGUF")
    return ResolvedModel(str(directory), "m.gguf", "m")


def _complete(directory: Path) -> None:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")


def test_read_beside_the_file_first_and_written_to_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBSPEC_CACHE_DIR", str(tmp_path / "cache"))
    conversion = gguf_conversion(_gguf(tmp_path / "baked"))
    beside, cache = conversion.places
    assert beside.parent == tmp_path / "baked" / "converted" and cache.parent == tmp_path / "cache" / "converted"
    assert beside.name == cache.name and beside.name.startswith("m-")

    assert conversion.weights(torch.bfloat16) is None
    _complete(cache / "bfloat16")
    assert conversion.weights(torch.bfloat16) == cache / "bfloat16"
    _complete(beside / "bfloat16")
    assert conversion.weights(torch.bfloat16) == beside / "bfloat16"  # baked wins
    assert conversion.weights(torch.float32) is None

    assert conversion.writable()
    saved = conversion.save("tokenizer", lambda d: (d / "tokenizer_config.json").write_text("{}"))
    assert saved == cache / "tokenizer" == conversion.find("tokenizer")
    assert stat.S_IMODE(saved.stat().st_mode) == 0o755  # readable by another user (a baked cache)


def test_one_place_when_the_file_is_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBSPEC_CACHE_DIR", str(tmp_path))
    assert len(gguf_conversion(_gguf(tmp_path)).places) == 1


def test_a_cache_that_cannot_be_created_is_not_writable(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("SUBSPEC_CACHE_DIR", str(tmp_path / "a-file" / "cache"))  # unwritable even for root
    assert not gguf_conversion(_gguf(tmp_path / "models")).writable()


def test_a_changed_file_gets_a_new_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBSPEC_CACHE_DIR", str(tmp_path / "cache"))
    resolved = _gguf(tmp_path / "models")
    before = gguf_conversion(resolved).cache
    os.utime(tmp_path / "models" / "m.gguf", (0, 1_700_000_000))
    assert gguf_conversion(resolved).cache != before


def test_no_conversion_for_checkpoints_or_when_turned_off(tmp_path, monkeypatch):
    assert gguf_conversion(ResolvedModel(str(tmp_path), None, "m")) is None
    monkeypatch.setenv("SUBSPEC_GGUF_CONVERSION_CACHE", "0")
    assert gguf_conversion(_gguf(tmp_path / "models")) is None
