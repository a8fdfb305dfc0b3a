"""CUDA's output layouts, imitated on the CPU: the tests that run the engine see what a GPU would give them.

CUDA's flash, memory-efficient and cuDNN attention kernels return SDPA's (B, H, L, D) output with (B, L, H, D)-
ordered strides; the CPU's kernels return it laid out like the query. Code that assumes the query's layout
(a `.view` of the output) passes every CPU test and crashes on the first GPU forward. Under `cuda_layouts()`
`torch.nn.functional.scaled_dot_product_attention` returns the same values in CUDA's layout.

The other ops the engine's code reads results of were checked for a CPU/CUDA layout difference and have none:
F.linear and the int4 tinygemm matmul (`_weight_int4pack_mm`, `_for_cpu`) return contiguous (n, out) on both;
bitsandbytes' 4-bit and int8 matmuls too; topk, sort, gather, index_select and cat allocate their outputs
from shared meta functions (contiguous, or following the input), the same on both devices; scatter_ and
index_copy_ write in place. So SDPA is the one op imitated here.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes


def cuda_layout(out: torch.Tensor) -> torch.Tensor:
    """The same (B, H, L, D) values with (B, L, H, D)-ordered strides, as CUDA's fused kernels return them
    (`out.transpose(1, 2).contiguous().transpose(1, 2)`, in two ops instead of three)."""
    return torch.empty_permuted(out.shape, (0, 2, 1, 3), dtype=out.dtype, device=out.device).copy_(out)


def _imitating(sdpa: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(sdpa)
    def scaled_dot_product_attention(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = sdpa(*args, **kwargs)
        if out.device.type != "cpu" or out.dim() != 4:
            return out  # a real GPU gives its own layout
        if not torch._C._len_torch_dispatch_stack():
            return cuda_layout(out)
        # a GPU kernel writes this layout directly: the copy is not the engine's, so op counters do not see it
        with _disable_current_modes():
            return cuda_layout(out)
    scaled_dot_product_attention.imitates_cuda_layout = True  # type: ignore[attr-defined]
    return scaled_dot_product_attention


@contextlib.contextmanager
def cuda_layouts() -> Iterator[None]:
    """Inside the block, SDPA on CPU tensors returns CUDA's layout (nesting is harmless)."""
    original = F.scaled_dot_product_attention
    if getattr(original, "imitates_cuda_layout", False):
        yield
        return
    F.scaled_dot_product_attention = _imitating(original)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def imitating_cuda_layouts() -> bool:
    """Whether SDPA currently returns CUDA's layout on the CPU."""
    return bool(getattr(F.scaled_dot_product_attention, "imitates_cuda_layout", False))
