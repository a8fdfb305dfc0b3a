"""The peak of tensor memory a piece of code allocates, measured on a CPU: what the planner's reserves bound.

`LiveBytes` is a dispatch mode: every storage an op returns is counted until it is freed (a weakref finalizer),
so `peak` is the most bytes alive at once that the code inside allocated. Storages of tensors passed in as
`existing` (the code's inputs) are not counted, nor views of them.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map


class LiveBytes(TorchDispatchMode):
    def __init__(self, *existing: torch.Tensor) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = {t.untyped_storage().data_ptr() for t in existing}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        tree_map(self._count, out)
        return out

    def _count(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes and key not in self._seen:
                self._seen.add(key)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key, nbytes)
        return value

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)
