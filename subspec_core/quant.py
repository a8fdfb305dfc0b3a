"""The substitute draft's low-bit linears, resident on the compute device.

For every streamed layer the draft gets a quantized copy of its fused linears; every other tensor the
draft reads (embeddings, norms, lm_head, resident layers, the KV cache) is the target's own object.

Two families of formats:
- `int4`: asymmetric group-wise int4 (a scale and a zero point per group of 64 inputs, the HQQ-style format
  the paper's authors use), multiplied by PyTorch's tinygemm kernel (`torch._weight_int4pack_mm` on CUDA,
  `torch._weight_int4pack_mm_for_cpu` on the CPU): one op per linear, fast for the few rows a draft step has.
- bitsandbytes (the design card's library): `nf4` / `fp4` (blockwise absmax 4-bit) and `int8` (LLM.int8 absmax).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from subspec_core.config import INT4_GROUP_SIZES
from subspec_core.model import DenseLinears, Linears

# tinygemm's CUDA kernel (`_weight_int4pack_mm`) is built for Ampere and newer only.
INT4_MIN_CAPABILITY = (8, 0)


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
    """One bitsandbytes-quantized weight matrix (out, in) with its bias, and how to multiply by it."""

    quant_type: str
    data: torch.Tensor  # packed 4-bit (nf4/fp4) or int8 (out, in)
    state: Any  # bitsandbytes QuantState (4-bit) or per-row scales (int8)
    bias: torch.Tensor | None
    out_features: int

    def __post_init__(self) -> None:
        self._data_t = self.data.t()  # matmul_4bit takes the transposed view; made once, not per call

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bnb = _bnb()
        if self.quant_type == "int8":
            x_q, x_scale, _ = bnb.functional.int8_vectorwise_quant(x.to(torch.float16))
            acc = bnb.functional.int8_linear_matmul(x_q, self.data)  # int32 (n, out)
            bias = None if self.bias is None else self.bias.to(torch.float16)
            return bnb.functional.int8_mm_dequant(acc, x_scale, self.state, bias=bias).to(x.dtype)
        return bnb.matmul_4bit(x, self._data_t, quant_state=self.state, bias=self.bias)

    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        if self.quant_type == "int8":
            return n + self.state.numel() * self.state.element_size()
        return n + self.state.absmax.numel() * self.state.absmax.element_size()


# tinygemm computes in bfloat16: activations are cast to it (and back) when the model runs in another dtype.
INT4_COMPUTE_DTYPE = torch.bfloat16


def substitute_quant_type(requested: str, *, device_type: str,
                          capability: tuple[int, int] | None) -> tuple[str, str | None]:
    """The substitute format this device can run, and the start-up line when it is not the one asked for.

    int4 (tinygemm) on CUDA needs compute capability 8.0+: older GPUs (Turing, sm75: RTX 20xx, T4) get
    bitsandbytes NF4, the same 4 bits per weight. Every other format, and any CPU, runs as asked.
    """
    if requested != "int4" or device_type != "cuda" or (capability is not None and capability >= INT4_MIN_CAPABILITY):
        return requested, None
    sm = "unknown" if capability is None else "sm{}{}".format(*capability)
    return "nf4", (f"substitute: int4 tinygemm needs compute capability 8.0+ and this GPU is {sm}: "
                   "nf4 (bitsandbytes) substitutes instead")


def int4_kernel_name(device: torch.device) -> str:
    """The PyTorch op that multiplies by int4 weights on `device` (recorded by the benchmarks)."""
    return "aten._weight_int4pack_mm" if device.type == "cuda" else "aten._weight_int4pack_mm_for_cpu"


@dataclass
class Int4Matrix:
    """One weight matrix (out, in) in asymmetric group-wise int4, packed for tinygemm, with its bias.

    Dequantised, w[o, i] = (q[o, i] - 8) * scale[o, g] + zero[o, g] for input group g = i // group_size.
    """

    packed: torch.Tensor  # tinygemm's layout (device-specific)
    scales_and_zeros: torch.Tensor  # (in / group_size, out, 2) bfloat16: [scale, zero]
    bias: torch.Tensor | None
    group_size: int
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x if x.dtype == INT4_COMPUTE_DTYPE else x.to(INT4_COMPUTE_DTYPE))
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, in) bfloat16 times the dequantised weight's transpose: (n, out) bfloat16, no bias."""
        if x.is_cuda:
            return torch._weight_int4pack_mm(x, self.packed, self.group_size, self.scales_and_zeros)
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)

    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_and_zeros.numel() * 2

    def dequantized(self) -> torch.Tensor:
        """The float32 (out, in) weight this matrix multiplies by, through the production kernel (x = I: row i of
        the product is column i of the weight). The shared device check (device_check.py's `int4_check`) calls
        it to compare CUDA's packing with the CPU's; keep its name and signature."""
        eye = torch.eye(self.scales_and_zeros.shape[0] * self.group_size, dtype=INT4_COMPUTE_DTYPE,
                        device=self.packed.device)
        return self._matmul(eye).float().t().contiguous()


def _inner_k_tiles(in_features: int) -> int:
    """tinygemm's K tiling: the largest of 8, 4, 2 whose tile (16 inputs each) divides `in_features`."""
    for tiles in (8, 4, 2):
        if in_features % (tiles * 16) == 0:
            return tiles
    raise ValueError(f"int4 needs in_features divisible by 32, got {in_features}")


def quantize_int4(weight: torch.Tensor, bias: torch.Tensor | None, *, group_size: int, device: torch.device) -> Int4Matrix:
    """Asymmetric min-max int4 per group of `group_size` inputs, packed for `device`'s tinygemm kernel."""
    out_features, in_features = weight.shape
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES} (tinygemm's), got {group_size}")
    if in_features % group_size:
        raise ValueError(
            f"int4 with group size {group_size} needs in_features divisible by it, got {in_features}; "
            "use speculation.quant_type nf4 or another quant_block_size"
        )
    # One float32 working copy, turned into codes in place: at load the planner reserves that copy plus the codes
    # (QUANT_TEMP_BYTES_PER_WEIGHT), not a temporary per step. (`copy=True`: never write into the caller's weights.)
    w = weight.to(device=device, dtype=torch.float32, copy=True)
    w = w.reshape(out_features, in_features // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)  # (out, groups)
    # the stored (bfloat16) parameters are the ones the kernel uses: quantize against exactly those
    scales = ((high - low).clamp(min=1e-6) / 15).to(INT4_COMPUTE_DTYPE)
    zeros = (low + scales.float() * 8).to(INT4_COMPUTE_DTYPE)
    base = zeros.float() - scales.float() * 8  # the value of code 0
    w.sub_(base[..., None]).div_(scales.float()[..., None]).round_().clamp_(0, 15)
    q = w.to(torch.int32).reshape(out_features, in_features)
    del w
    tiles = _inner_k_tiles(in_features)
    if device.type == "cuda":
        if out_features % 8:
            raise ValueError(f"int4 on CUDA needs out_features divisible by 8, got {out_features}")
        pairs = q[:, ::2] << 4
        pairs |= q[:, 1::2]  # two codes per byte, as the CUDA kernel's packing wants them
        packed = torch._convert_weight_to_int4pack(pairs.to(torch.uint8), tiles)
    else:
        packed = torch._convert_weight_to_int4pack_for_cpu(q, tiles)
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # (groups, out, 2)
    dev_bias = None if bias is None else bias.to(device)
    return Int4Matrix(packed, scales_and_zeros, dev_bias, group_size, out_features)


def quantize_matrix(weight: torch.Tensor, bias: torch.Tensor | None, *, quant_type: str, block_size: int,
                    device: torch.device) -> QuantizedMatrix | Int4Matrix:
    """Quantize a (out, in) weight on `device`: int4 (group-wise, tinygemm), bitsandbytes 4-bit with blockwise
    absmax, or bitsandbytes int8 with per-row absmax."""
    if quant_type == "int4":
        return quantize_int4(weight, bias, group_size=block_size, device=device)
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
    # packed nibbles + 4 bytes per block: a bfloat16 scale and zero (int4), or a float32 absmax (nf4/fp4)
    return linear_params // 2 + 4 * (-(-linear_params // block_size))


class DraftLayers:
    """The draft's layer source: the target's resident linears (shared objects) or the 4-bit substitutes."""

    def __init__(self, *, resident: dict[int, DenseLinears], substitutes: dict[int, QuantizedLinears]) -> None:
        self.resident = resident
        self.substitutes = substitutes

    def acquire(self, layer: int) -> Linears:
        linears = self.resident.get(layer)
        return linears if linears is not None else self.substitutes[layer]

    def release(self, layer: int) -> None:
        pass
