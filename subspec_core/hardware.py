"""What the compute device is and which libraries drive it: read once, used to check capabilities before use
(attention kernels, int4 tinygemm) and recorded by every benchmark result."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class DeviceInfo:
    """The compute device and the library versions that run on it; CUDA fields are None on a CPU."""

    type: str  # "cuda" | "cpu"
    name: str  # the GPU's name, or "cpu"
    capability: tuple[int, int] | None  # CUDA compute capability (8, 0) = sm80
    torch: str
    cuda: str | None
    cudnn: int | None

    @classmethod
    def of(cls, device: torch.device) -> "DeviceInfo":
        if device.type != "cuda":
            return cls(type=device.type, name=device.type, capability=None, torch=torch.__version__, cuda=None,
                       cudnn=None)
        return cls(type="cuda", name=torch.cuda.get_device_name(device),
                   capability=torch.cuda.get_device_capability(device), torch=torch.__version__,
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())

    def as_dict(self) -> dict[str, object]:
        """JSON-ready: {"device": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "torch": ..., ...}."""
        fields = asdict(self)
        fields["compute_capability"] = None if self.capability is None else "{}.{}".format(*self.capability)
        fields["device"] = fields.pop("name")
        del fields["capability"], fields["type"]
        return fields
