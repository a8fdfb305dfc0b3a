"""Where a local GGUF model's one-time conversion to a Hugging Face checkpoint lives (no torch here: the API
process reads the converted tokenizer from it).

Parsing GGUF metadata (the whole vocabulary) and dequantising takes seconds each time; the converted checkpoint
loads in a fraction of that. `gguf_conversion` finds a model's conversion directories; loading.py writes them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from subspec_core.model_source import ResolvedModel, default_cache_dir

ENV_GGUF_CONVERSION_CACHE = "SUBSPEC_GGUF_CONVERSION_CACHE"


@dataclass(frozen=True)
class GgufConversion:
    """A local GGUF model's one-time conversion to a Hugging Face checkpoint: `tokenizer/` and one directory of
    weights per dtype (`bfloat16/`, ...).

    Parsing GGUF metadata (the whole vocabulary) and dequantising takes seconds each time; the converted
    checkpoint loads in a fraction of that. A part is read from the first of `places` that holds it, and written
    to the last one, the cache directory (`$SUBSPEC_CACHE_DIR/converted`). The first is `converted/` beside the
    GGUF file, where a cache directory keeps the conversions of its own files: a read-only one baked into an
    image (`subspec prepare`) is read there, and never written.
    """

    places: tuple[Path, ...]

    @property
    def cache(self) -> Path:
        return self.places[-1]

    def find(self, part: str) -> Path | None:
        """The complete directory of `part` ('tokenizer' or a dtype name), or None when none holds it yet."""
        marker = "tokenizer_config.json" if part == "tokenizer" else "config.json"
        return next((place / part for place in self.places if (place / part / marker).is_file()), None)

    def weights(self, dtype: Any) -> Path | None:
        """The converted checkpoint in `dtype`, or None."""
        return self.find(dtype_name(dtype))

    def writable(self) -> bool:
        """Whether a part can be written to the cache (whose parent is created when missing)."""
        try:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
        return os.access(self.cache.parent, os.W_OK)

    def save(self, part: str, save: Any) -> Path:
        """Write `part` into the cache with `save(directory)`; returns where it is."""
        target = self.cache / part
        save_atomically(target, save)
        return target


def gguf_conversion(resolved: ResolvedModel) -> GgufConversion | None:
    """Where a local GGUF model's conversion is looked up and cached, or None (not a local GGUF file, or
    SUBSPEC_GGUF_CONVERSION_CACHE=0: always read the GGUF file). The key is the file's path, size and mtime:
    a changed file gets a new conversion."""
    if resolved.gguf_file is None or os.environ.get(ENV_GGUF_CONVERSION_CACHE, "1") == "0":
        return None
    gguf = Path(resolved.load_path) / resolved.gguf_file
    if not gguf.is_file():
        return None  # a GGUF file inside a hub repo: transformers resolves it, we do not cache it
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    name = f"{gguf.stem}-{key}"
    places = dict.fromkeys((gguf.parent / "converted" / name, default_cache_dir().resolve() / "converted" / name))
    return GgufConversion(tuple(places))


def save_atomically(target: Path, save: Any) -> None:
    """Write a directory with `save(tmpdir)`, then rename it into place (a crash leaves no half-written cache)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        save(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it 0700: a cache is shared data (an image bakes it as root for another user)
        os.replace(tmp, target)
    except OSError:
        if target.exists():
            return  # another process converted the same model concurrently
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def dtype_name(dtype: Any) -> str:
    """'bfloat16' for torch.bfloat16 (the name of a converted checkpoint's directory)."""
    return str(dtype).removeprefix("torch.")


def unwritable_message(conversion: GgufConversion) -> str:
    """The one line that says a conversion cannot be cached, and what to do about it."""
    return (f"{conversion.cache.parent} is not writable, so the GGUF file is read and dequantised at every start: "
            "set SUBSPEC_CACHE_DIR to a writable directory to convert it once")
