"""The draft's substitute formats (subspec_core/quant.py): group-wise int4 on tinygemm, and bitsandbytes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from subspec_core.quant import (
    INT4_COMPUTE_DTYPE, Int4Matrix, QuantizedLinears, quantize_int4, quantize_matrix, substitute_bytes_per_layer,
)

CPU = torch.device("cpu")


def weight(out: int = 96, inp: int = 192, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def dequantized(m: Int4Matrix) -> torch.Tensor:
    """The float32 (out, in) weight `m` multiplies by: row i of I @ W^T is column i of W (bias left out)."""
    eye = torch.eye(m.scales_and_zeros.shape[0] * m.group_size, dtype=INT4_COMPUTE_DTYPE, device=m.packed.device)
    return dataclasses.replace(m, bias=None)(eye).float().t().contiguous()


def test_int4_codes_are_within_half_a_step_of_every_weight() -> None:
    """Asymmetric min-max per group of 64: each weight is at most half a step (scale / 2) from its code."""
    w = weight()
    m = quantize_int4(w, None, group_size=64, device=CPU)
    deq = dequantized(m)
    groups = w.view(96, 3, 64)
    step = (groups.amax(-1) - groups.amin(-1)) / 15  # (out, groups)
    error = (deq - w).abs().view(96, 3, 64)
    # half a step, plus the bfloat16 rounding of the stored scale and zero point
    assert (error <= step[..., None] * 0.5 + groups.abs().amax(-1, keepdim=True) * 2**-7).all()
    assert m.scales_and_zeros.shape == (3, 96, 2) and m.scales_and_zeros.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_matmul_is_x_times_the_dequantized_weight(dtype: torch.dtype) -> None:
    w, bias = weight(), torch.randn(96)
    m = quantize_int4(w, bias.to(dtype), group_size=64, device=CPU)
    x = torch.randn(6, 192, dtype=dtype)
    y = m(x)
    assert y.dtype == dtype and y.shape == (6, 96)
    expected = x.to(torch.bfloat16).float() @ dequantized(m).t() + bias.to(dtype).float()
    torch.testing.assert_close(y.float(), expected, atol=0.1, rtol=0.02)  # tinygemm accumulates in bfloat16 steps


def test_int4_rejects_shapes_it_cannot_pack() -> None:
    with pytest.raises(ValueError, match="divisible by it.*nf4"):
        quantize_int4(weight(inp=96), None, group_size=64, device=CPU)  # 96 inputs: not whole groups of 64


@pytest.mark.parametrize("quant_type", ["int4", "nf4", "int8"])
def test_substitute_sizes_match_the_planner(quant_type: str) -> None:
    tensors = {"qkv_weight": weight(128, 64, 1), "qkv_bias": torch.zeros(128), "o_weight": weight(64, 64, 2),
               "gate_up_weight": weight(256, 64, 3), "down_weight": weight(64, 128, 4)}
    linears = QuantizedLinears(tensors, quant_type=quant_type, block_size=64, device=CPU)
    params = sum(t.numel() for name, t in tensors.items() if name.endswith("weight"))
    estimate = substitute_bytes_per_layer(params, 128 + 64 + 256 + 64, quant_type=quant_type, block_size=64)
    measured = linears.nbytes()
    assert estimate * 0.95 <= measured <= estimate * 1.05, (measured, estimate)


def test_every_format_approximates_the_weight() -> None:
    w, x = weight(), torch.randn(4, 192)
    exact = x @ w.t()
    for quant_type in ("int4", "nf4", "int8"):
        m = quantize_matrix(w, None, quant_type=quant_type, block_size=64, device=CPU)
        error = (m(x).float() - exact).norm() / exact.norm()
        assert error < (0.02 if quant_type == "int8" else 0.15), (quant_type, float(error))
