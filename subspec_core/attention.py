"""Which fused attention kernel each of the engine's call shapes runs on CUDA, chosen once at start.

PyTorch's own pick is not left to run. On recent GPUs it prefers cuDNN for bf16, which builds a new plan for
every new KV length (40-400 ms each: once per vanilla token, per verify, per prefill chunk), and it falls back
to MATH (unfused, memory-hungry) when a fused kernel declines a call. So each call shape gets one fused kernel:
- masked calls (prefill chunks, the draft's root and level steps, the verify tree): memory-efficient attention,
  the fused kernel that takes an additive mask (model.py pads the mask's rows to its alignment);
- the one-token step, which needs no mask: flash attention in bf16/fp16 on sm80+, else memory-efficient.
Only that kernel is enabled for the call, so a call it cannot run raises instead of falling back.
On a CPU nothing is restricted: PyTorch's choice runs, as it always has.

`sdpa_kernel` sets host-side flags read when SDPA dispatches (so it works while a CUDA graph is captured; a
replay runs no host code at all). Entering it costs ~10 us: the engine enters it once per forward, not per layer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import ContextManager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

_NAMES = {SDPBackend.FLASH_ATTENTION: "flash", SDPBackend.EFFICIENT_ATTENTION: "efficient"}
_HALF = (torch.float16, torch.bfloat16)
_LABELS = {"prefill_chunk": "prefill chunk", "draft_root": "draft root", "draft_level": "draft level",
           "verify_tree": "verify tree", "one_token_step": "one-token step"}


def choose_backend(*, device_type: str, dtype: torch.dtype, masked: bool, head_dim: int,
                   capability: tuple[int, int] | None) -> SDPBackend | None:
    """The one fused SDPA kernel for a call shape; None on a CPU (PyTorch's own choice).

    Never MATH (unfused) and never cuDNN (a plan per KV length) on CUDA. Flash takes no additive mask, needs
    bf16/fp16, sm80+ and head_dim <= 256; memory-efficient takes masks and every dtype. Both need head_dim a
    multiple of 8: a model without one cannot run fused attention and is refused here, at start.
    """
    if device_type != "cuda":
        return None
    if head_dim % 8:
        raise ValueError(f"fused attention on CUDA needs head_dim a multiple of 8; this model has {head_dim}")
    flash_ok = dtype in _HALF and head_dim <= 256 and capability is not None and capability >= (8, 0)
    return SDPBackend.FLASH_ATTENTION if not masked and flash_ok else SDPBackend.EFFICIENT_ATTENTION


@dataclass(frozen=True)
class AttentionBackends:
    """The kernel of each call shape (None: PyTorch's choice, on a CPU)."""

    prefill_chunk: SDPBackend | None
    draft_root: SDPBackend | None
    draft_level: SDPBackend | None
    verify_tree: SDPBackend | None
    one_token_step: SDPBackend | None

    @classmethod
    def choose(cls, *, device_type: str, dtype: torch.dtype, head_dim: int,
               capability: tuple[int, int] | None) -> "AttentionBackends":
        """Every call shape but the one-token step carries an additive mask."""
        def pick(masked: bool) -> SDPBackend | None:
            return choose_backend(device_type=device_type, dtype=dtype, masked=masked, head_dim=head_dim,
                                  capability=capability)
        masked = pick(True)
        return cls(prefill_chunk=masked, draft_root=masked, draft_level=masked, verify_tree=masked,
                   one_token_step=pick(False))

    def as_dict(self) -> dict[str, str]:
        """{"prefill_chunk": "efficient", ...}; "default" where PyTorch chooses (a CPU)."""
        return {f.name: _NAMES.get(getattr(self, f.name), "default") for f in fields(self)}

    def line(self) -> str:
        """The start-up line: `attention: prefill chunk efficient, ..., one-token step flash`."""
        names = self.as_dict()
        if set(names.values()) == {"default"}:
            return "attention: PyTorch's choice per call (no restriction off CUDA)"
        return "attention: " + ", ".join(f"{_LABELS[shape]} {name}" for shape, name in names.items())


def attention_kernel(backend: SDPBackend | None) -> ContextManager[object]:
    """Restrict SDPA to `backend` inside the block; nothing when None."""
    return contextlib.nullcontext() if backend is None else sdpa_kernel([backend])
