"""The draft's substitute formats (subspec_core/quant.py): group-wise int4 on tinygemm, and bitsandbytes."""

from __future__ import annotations

import pytest
import torch

from subspec_core.config import SpeculationConfig
from subspec_core.quant import (
    QuantizedLinears, quantize_int4, quantize_matrix, substitute_bytes_per_layer, substitute_quant_type,
)

CPU = torch.device("cpu")


def weight(out: int = 96, inp: int = 192, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def test_int4_codes_are_within_half_a_step_of_every_weight() -> None:
    """Asymmetric min-max per group of 64: each weight is at most half a step (scale / 2) from its code."""
    w = weight()
    m = quantize_int4(w, None, group_size=64, device=CPU)
    deq = m.dequantized()
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
    expected = x.to(torch.bfloat16).float() @ m.dequantized().t() + bias.to(dtype).float()
    torch.testing.assert_close(y.float(), expected, atol=0.1, rtol=0.02)  # tinygemm accumulates in bfloat16 steps


def test_int4_rejects_shapes_it_cannot_pack() -> None:
    with pytest.raises(ValueError, match="divisible by it.*nf4"):
        quantize_int4(weight(inp=96), None, group_size=64, device=CPU)  # 96 inputs: not whole groups of 64
    with pytest.raises(ValueError, match=r"one of \(32, 64, 128, 256\)"):
        quantize_int4(weight(inp=1024), None, group_size=512, device=CPU)  # tinygemm has no group of 512


def test_int4_group_size_is_a_config_error_naming_the_allowed_values() -> None:
    for group in (32, 64, 128, 256):
        SpeculationConfig(quant_type="int4", quant_block_size=group)
    with pytest.raises(ValueError, match=r"int4 group size.*one of \(32, 64, 128, 256\).*got 512"):
        SpeculationConfig(quant_type="int4", quant_block_size=512)
    assert SpeculationConfig(quant_type="nf4", quant_block_size=4096).quant_block_size == 4096  # bitsandbytes' own


@pytest.mark.parametrize("requested, device_type, capability, expected", [
    ("int4", "cuda", (8, 0), "int4"),  # A100: tinygemm
    ("int4", "cuda", (9, 0), "int4"),
    ("int4", "cuda", (7, 5), "nf4"),  # Turing (RTX 20xx, T4): no tinygemm kernel
    ("int4", "cuda", (7, 0), "nf4"),
    ("int4", "cpu", None, "int4"),  # the CPU kernel has no such limit
    ("nf4", "cuda", (7, 5), "nf4"),
    ("int8", "cuda", (7, 5), "int8"),
])
def test_int4_falls_back_to_nf4_below_sm80(requested, device_type, capability, expected) -> None:
    quant_type, line = substitute_quant_type(requested, device_type=device_type, capability=capability)
    assert quant_type == expected
    assert (line is None) == (quant_type == requested)
    if line:
        assert line.startswith("substitute: int4 tinygemm needs compute capability 8.0+")
        assert "sm{}{}".format(*capability) in line and "nf4" in line


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
