"""Attention on CUDA's terms, checked on the CPU: the kernel chosen per call shape, the masks it wants, and the
output layouts it returns (tests/cuda_layouts.py imitates them for every test in tests/core)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from subspec_core.attention import AttentionBackends, attention_kernel, choose_backend
from subspec_core.model import MASK_ALIGN
from tests.core.tiny import generate_ids, tiny_engine, tiny_hf_model
from tests.cuda_layouts import imitating_cuda_layouts

FLASH, EFFICIENT = SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION
H100, RTX_3090, T4 = (9, 0), (8, 6), (7, 5)


@pytest.mark.parametrize("device_type, dtype, masked, head_dim, capability, expected", [
    ("cpu", torch.float32, True, 64, None, None),  # PyTorch's own choice off CUDA, as before
    ("cpu", torch.bfloat16, False, 64, None, None),
    ("cuda", torch.bfloat16, True, 128, H100, EFFICIENT),  # the additive tree / chunk mask: memory-efficient
    ("cuda", torch.bfloat16, False, 128, H100, FLASH),  # the one-token step has no mask: flash
    ("cuda", torch.float16, False, 64, RTX_3090, FLASH),
    ("cuda", torch.float32, False, 128, H100, EFFICIENT),  # flash has no fp32
    ("cuda", torch.float16, False, 128, T4, EFFICIENT),  # flash needs sm80+
    ("cuda", torch.bfloat16, False, 512, H100, EFFICIENT),  # flash stops at head_dim 256
])
def test_backend_per_call_shape(device_type, dtype, masked, head_dim, capability, expected) -> None:
    """Never MATH, never cuDNN (a plan build per new KV length) on CUDA; unrestricted on a CPU."""
    assert choose_backend(device_type=device_type, dtype=dtype, masked=masked, head_dim=head_dim,
                          capability=capability) == expected


def test_backends_line_and_record() -> None:
    gpu = AttentionBackends.choose(device_type="cuda", dtype=torch.bfloat16, head_dim=128, capability=H100)
    assert gpu.line() == ("attention: prefill chunk efficient, draft root efficient, draft level efficient, "
                          "verify tree efficient, one-token step flash")
    assert gpu.as_dict()["one_token_step"] == "flash" and gpu.as_dict()["verify_tree"] == "efficient"
    cpu = AttentionBackends.choose(device_type="cpu", dtype=torch.float32, head_dim=64, capability=None)
    assert set(cpu.as_dict().values()) == {"default"} and "no restriction" in cpu.line()
    with pytest.raises(ValueError, match="multiple of 8"):
        choose_backend(device_type="cuda", dtype=torch.bfloat16, masked=True, head_dim=100, capability=H100)


def test_attention_kernel_restricts_sdpa_only_inside() -> None:
    with attention_kernel(None):
        pass
    with attention_kernel(EFFICIENT):
        assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.math_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()


def test_tests_here_see_cuda_layouts(request) -> None:
    """The imitation is on for tests/core (unless --cpu-sdpa-layout): SDPA's output is laid out as (B, L, H, D)."""
    if request.config.getoption("--cpu-sdpa-layout"):
        pytest.skip("--cpu-sdpa-layout: the CPU's own layout")
    assert imitating_cuda_layouts()
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    out = F.scaled_dot_product_attention(q, k, v)
    assert out.shape == (1, 2, 5, 8) and out.stride() == (80, 8, 16, 1) and not out.is_contiguous()


@pytest.fixture(scope="module")
def engine(tiny_tokenizer):
    return tiny_engine(tiny_hf_model("qwen2"), tiny_tokenizer, speculation=None)


def test_masks_reach_sdpa_with_aligned_rows(engine, monkeypatch) -> None:
    """Memory-efficient attention copies and pads a mask whose row stride is not a multiple of its alignment, on
    every call: the prefill's, the draft's and the verify's masks arrive aligned (the one-token step has none)."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append(None if attn_mask is None else (attn_mask.shape[-1], attn_mask.stride()))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    prompt = list(range(5, 26))  # 21 tokens: chunks of 16 and 5, KV lengths 16 and 21
    generate_ids(engine, prompt, max_tokens=6, temperature=0)
    masks = [m for m in seen if m is not None]
    assert masks and {cols for cols, _ in masks} >= {16, 21, engine.kv_cache.capacity}
    for cols, stride in masks:
        assert stride[-2] % MASK_ALIGN == 0 and stride[-1] == 1, (cols, stride)
