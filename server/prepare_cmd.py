"""`subspec prepare`: fetch the model and convert a GGUF file once, so that later starts read the conversion.

    subspec prepare                                              # the default model, for this machine
    SUBSPEC_CACHE_DIR=/opt/subspec/models subspec prepare --config /app/configs/default.yaml --dtype bfloat16

The Docker build runs the second line: the image then holds the default model and the bfloat16 checkpoint a
GPU start reads, in a directory its user cannot write. `--dtype auto` converts for this machine (bfloat16
with CUDA, float32 without): name the dtype when preparing for another one.
"""

from __future__ import annotations

import argparse
import sys

from server.engine_args import engine_config_from_args


def run_prepare(args: argparse.Namespace) -> int:
    """Download (the default model) and convert (a local GGUF file) into the cache; 1 if that cannot be done."""
    from subspec_core.build import resolve_device, resolve_dtype
    from subspec_core.loading import convert_gguf, gguf_conversion, load_tokenizer
    from subspec_core.model_source import ModelSourceError, resolve_model

    try:
        config = engine_config_from_args(args)
        resolved = resolve_model(config.model, config.gguf_file)
    except (OSError, ValueError, ModelSourceError) as exc:
        print(f"subspec prepare: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    dtype = resolve_dtype(config, resolve_device(config))
    conversion = gguf_conversion(resolved)
    if conversion is None:
        print(f"subspec prepare: nothing to convert: {config.model} is not a local GGUF file")
        return 0
    weights = conversion.weights(dtype)
    if weights is None and not conversion.writable():
        print(f"subspec prepare: cannot write {conversion.cache.parent}; set SUBSPEC_CACHE_DIR to a writable "
              "directory", file=sys.stderr)
        return 1
    load_tokenizer(config, resolved)  # converted too, for the API process
    weights = weights or convert_gguf(resolved, dtype, conversion)
    print(f"subspec prepare: {resolved.describe()}: {str(dtype).removeprefix('torch.')} checkpoint in {weights}")
    return 0
