"""The substitute draft's low-bit linears (bitsandbytes), resident on the compute device.

For every streamed layer the draft gets a quantized copy of its fused linears; every other tensor the
draft reads (embeddings, norms, lm_head, resident layers, the KV cache) is the target's own object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm import tqdm

from subspec_core.model import DenseLinears, Linears


def _bnb() -> Any:
    """bitsandbytes, imported once at engine build; a missing install fails loudly with the fix."""
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("the subspec draft needs bitsandbytes: pip install 'bitsandbytes>=0.46'") from exc
    return bitsandbytes


@dataclass
class QuantizedMatrix:
    """One quantized weight matrix (out, in) with its bias, and how to multiply by it."""

    quant_type: str
    data: torch.Tensor  # packed 4-bit (nf4/fp4) or int8 (out, in)
    state: Any  # bitsandbytes QuantState (4-bit) or per-row scales (int8)
    bias: torch.Tensor | None
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bnb = _bnb()
        if self.quant_type == "int8":
            x_q, x_scale, _ = bnb.functional.int8_vectorwise_quant(x.to(torch.float16))
            acc = bnb.functional.int8_linear_matmul(x_q, self.data)  # int32 (n, out)
            bias = None if self.bias is None else self.bias.to(torch.float16)
            return bnb.functional.int8_mm_dequant(acc, x_scale, self.state, bias=bias).to(x.dtype)
        return bnb.matmul_4bit(x, self.data.t(), quant_state=self.state, bias=self.bias)

    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        if self.quant_type == "int8":
            return n + self.state.numel() * self.state.element_size()
        return n + self.state.absmax.numel() * self.state.absmax.element_size()


def quantize_matrix(weight: torch.Tensor, bias: torch.Tensor | None, *, quant_type: str, block_size: int, device: torch.device) -> QuantizedMatrix:
    """Quantize a (out, in) weight on `device`: 4-bit with blockwise absmax, or int8 with per-row absmax."""
    bnb = _bnb()
    w = weight.to(device)
    dev_bias = None if bias is None else bias.to(device)
    if quant_type == "int8":
        data, row_scales, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16))
        return QuantizedMatrix("int8", data, row_scales, dev_bias, w.shape[0])
    data, state = bnb.functional.quantize_4bit(w, blocksize=block_size, quant_type=quant_type, compress_statistics=False)
    return QuantizedMatrix(quant_type, data, state, dev_bias, w.shape[0])


class QuantizedLinears:
    """A streamed layer's substitute: the four fused linears, quantized."""

    __slots__ = ("_qkv", "_o", "_gate_up", "_down")

    def __init__(self, tensors: dict[str, torch.Tensor], *, quant_type: str, block_size: int, device: torch.device) -> None:
        q = dict(quant_type=quant_type, block_size=block_size, device=device)
        self._qkv = quantize_matrix(tensors["qkv_weight"], tensors.get("qkv_bias"), **q)
        self._o = quantize_matrix(tensors["o_weight"], tensors.get("o_bias"), **q)
        self._gate_up = quantize_matrix(tensors["gate_up_weight"], None, **q)
        self._down = quantize_matrix(tensors["down_weight"], None, **q)

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        return self._qkv(x)

    def o(self, x: torch.Tensor) -> torch.Tensor:
        return self._o(x)

    def gate_up(self, x: torch.Tensor) -> torch.Tensor:
        return self._gate_up(x)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        return self._down(x)

    def nbytes(self) -> int:
        return sum(m.nbytes() for m in (self._qkv, self._o, self._gate_up, self._down))


def substitute_bytes_per_layer(linear_params: int, out_rows: int, *, quant_type: str, block_size: int) -> int:
    """Planner estimate of one layer's substitute size on the device."""
    if quant_type == "int8":
        return linear_params + 4 * out_rows
    return linear_params // 2 + 4 * (-(-linear_params // block_size))  # packed nibbles + float32 absmax per block


class DraftLayers:
    """The draft's layer source: the target's resident linears (shared objects) or the 4-bit substitutes."""

    def __init__(self, *, resident: dict[int, DenseLinears], substitutes: dict[int, QuantizedLinears]) -> None:
        self.resident = resident
        self.substitutes = substitutes

    def begin_forward(self) -> None:
        pass

    def acquire(self, layer: int) -> Linears:
        linears = self.resident.get(layer)
        return linears if linears is not None else self.substitutes[layer]

    def release(self, layer: int) -> None:
        pass


def build_substitutes(
    *,
    layer_linears: list[dict[str, torch.Tensor]],
    layer_ids: Sequence[int],
    quant_type: str,
    block_size: int,
    device: torch.device,
    progress: bool = True,
) -> dict[int, QuantizedLinears]:
    """Quantize the streamed layers' linears, one layer at a time (device memory holds one fp layer at most)."""
    substitutes = {}
    for i in tqdm(layer_ids, desc=f"quantizing draft ({quant_type})", unit="layer", disable=not progress):
        substitutes[i] = QuantizedLinears(layer_linears[i], quant_type=quant_type, block_size=block_size, device=device)
    return substitutes
