"""A model's tensors taken from its checkpoint one at a time, and assembled into our fused layer layout.

Loading in one pass per layer needs a store that hands out one named tensor without holding the others:
- `SafetensorsCheckpoint` (a `model.safetensors` file or a sharded checkpoint with its index) opens the
  file for each tensor; the tensor `safe_open` returns maps the file, so its pages count as resident memory
  only while it lives: copied into place and dropped, it costs one tensor of host memory, never the file;
- `StateDict` holds a transformers model's tensors (a `.bin` checkpoint, or a GGUF file read without the
  conversion cache) and lets go of each one as it is taken.
`layer_parts` names, per family, the checkpoint tensors that make up each fused tensor of a layer (Phi-3
stores q/k/v and gate/up already fused); `fill_layer` copies them into a layer's destination views and
`read_shared` reads embeddings, norms and lm_head.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Protocol

import torch

from subspec_core.weights import LayerNorms, ModelShape, SharedWeights

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """The checkpoint lacks a tensor the model needs, or holds one of the wrong shape."""


class TensorStore(Protocol):
    """Named checkpoint tensors, handed out one at a time."""

    def __contains__(self, name: object) -> bool: ...
    def take(self, name: str) -> torch.Tensor: ...


class SafetensorsCheckpoint:
    """A safetensors checkpoint (one file or shards), read tensor by tensor."""

    def __init__(self, files: dict[str, Path]) -> None:
        self._files = files  # tensor name -> the file that holds it

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> "SafetensorsCheckpoint":
        """Index the tensors of these files by name (reads only each file's header)."""
        from safetensors import safe_open

        files: dict[str, Path] = {}
        for path in paths:
            with safe_open(str(path), framework="pt") as handle:
                files.update((name, Path(path)) for name in handle.keys())
        return cls(files)

    @classmethod
    def from_index(cls, index: Path, shard_paths: dict[str, Path]) -> "SafetensorsCheckpoint":
        """A sharded checkpoint from its `model.safetensors.index.json` and where each shard file is."""
        weight_map = json.loads(index.read_text())["weight_map"]
        return cls({name: shard_paths[shard] for name, shard in weight_map.items()})

    def __contains__(self, name: object) -> bool:
        return name in self._files

    def take(self, name: str) -> torch.Tensor:
        """The tensor, mapped from its file (copy it where it belongs, then drop it: that unmaps it)."""
        from safetensors import safe_open

        if name not in self._files:
            raise CheckpointError(f"the checkpoint has no tensor {name!r}")
        with safe_open(str(self._files[name]), framework="pt") as handle:
            return handle.get_tensor(name)


class StateDict:
    """A transformers model's tensors by name; each is released when taken (drop the model itself first)."""

    def __init__(self, tensors: dict[str, torch.Tensor], *, consume: bool) -> None:
        self._tensors = tensors
        self._consume = consume

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def take(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise CheckpointError(f"the model has no tensor {name!r}")
        return (self._tensors.pop(name) if self._consume else self._tensors[name]).detach()


def layer_parts(shape: ModelShape, layer: int) -> dict[str, tuple[str, ...]]:
    """Checkpoint tensor names that make up each fused tensor of `layer`, in order (rows concatenated)."""
    attn, mlp = f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.mlp."
    if shape.architecture == "phi3":  # fused in the checkpoint, in our order: q, k, v and gate, up
        parts = {"qkv_weight": (f"{attn}qkv_proj.weight",), "gate_up_weight": (f"{mlp}gate_up_proj.weight",)}
    else:
        parts = {"qkv_weight": tuple(f"{attn}{p}_proj.weight" for p in "qkv"),
                 "gate_up_weight": (f"{mlp}gate_proj.weight", f"{mlp}up_proj.weight")}
    parts["o_weight"] = (f"{attn}o_proj.weight",)
    parts["down_weight"] = (f"{mlp}down_proj.weight",)
    if shape.qkv_bias:
        parts["qkv_bias"] = tuple(f"{attn}{p}_proj.bias" for p in "qkv")
    if shape.o_bias:
        parts["o_bias"] = (f"{attn}o_proj.bias",)
    return parts


def fill_layer(store: TensorStore, shape: ModelShape, layer: int, out: dict[str, torch.Tensor]) -> None:
    """Copy `layer`'s linears from `store` into `out` (named views of the layer's arena slot or device buffer),
    one checkpoint tensor at a time, converting to the destination's dtype on the way."""
    for name, parts in layer_parts(shape, layer).items():
        dest = out[name]
        row = 0
        for part in parts:
            tensor = store.take(part)
            rows = dest[row : row + tensor.shape[0]]
            if rows.shape != tensor.shape:
                raise CheckpointError(f"{part} has shape {tuple(tensor.shape)}; this model's config implies rows "
                                      f"{row}.. of a {tuple(dest.shape)} {name}")
            rows.copy_(tensor)
            row += tensor.shape[0]
            del tensor  # releases its mapped pages before the next one is touched
        if row != dest.shape[0]:
            raise CheckpointError(f"layer {layer}: {', '.join(parts)} fill {row} of the {dest.shape[0]} rows of {name}")


def _copy(tensor: torch.Tensor, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A copy that owns its memory (never a view of a mapped file), in `dtype` on `device`."""
    return torch.empty(tensor.shape, dtype=dtype, device=device).copy_(tensor)


def read_shared(
    store: TensorStore, shape: ModelShape, *, inv_freq: torch.Tensor, attention_scaling: float, dtype: torch.dtype,
    device: torch.device,
) -> SharedWeights:
    """Embeddings, norms and lm_head, read straight onto `device` (where the draft and the target share them)."""

    def take(name: str) -> torch.Tensor:
        return _copy(store.take(name), dtype=dtype, device=device)

    embed = take("model.embed_tokens.weight")
    if shape.tie_embeddings:
        lm_head = embed  # one tensor, shared: never copied twice (a stored lm_head.weight is its duplicate)
        if "lm_head.weight" in store:
            store.take("lm_head.weight")
    elif "lm_head.weight" in store:
        lm_head = take("lm_head.weight")
    else:
        raise CheckpointError("the checkpoint has no lm_head.weight and the config does not tie the embeddings")
    layer_norms = []
    group = (2, shape.head_dim // 2)
    for i in range(shape.num_layers):
        prefix = f"model.layers.{i}."
        qk_norm = None
        if shape.qk_norm:
            q_norm, k_norm = take(f"{prefix}self_attn.q_norm.weight"), take(f"{prefix}self_attn.k_norm.weight")
            qk_norm = torch.cat([q_norm.view(1, *group).expand(shape.num_heads, *group),
                                 k_norm.view(1, *group).expand(shape.num_kv_heads, *group)])
        layer_norms.append(LayerNorms(take(f"{prefix}input_layernorm.weight"),
                                      take(f"{prefix}post_attention_layernorm.weight"), qk_norm))
    return SharedWeights(
        embed=embed, lm_head=lm_head, final_norm=take("model.norm.weight"), layer_norms=layer_norms,
        inv_freq=inv_freq.to(device=device, dtype=torch.float32), attention_scaling=attention_scaling,
    )
