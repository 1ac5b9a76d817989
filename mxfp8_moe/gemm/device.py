"""What the heuristics need to know about a GPU, read once per device."""

from __future__ import annotations

import dataclasses
import functools

import torch

from ..jit.runtime import arch_name

# Largest dynamic shared memory per block by compute capability (opt-in limit), for targets that
# may be compiled for on a machine without that GPU (prewarm).
SHARED_MEMORY_LIMIT = {(8, 9): 101376, (9, 0): 232448, (12, 0): 101376, (12, 1): 101376}
SM_COUNT = {(8, 9): 128, (9, 0): 132, (12, 0): 188, (12, 1): 48}


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    capability: tuple[int, int]
    num_sms: int
    shared_memory_limit: int

    @property
    def arch(self) -> str:
        return arch_name(self.capability)

    @classmethod
    def for_arch(cls, arch: str) -> "DeviceInfo":
        """A stand-in for a GPU that is not here, from its arch name ("sm_120a")."""
        digits = arch.removeprefix("sm_").rstrip("af")
        capability = (int(digits[:-1]), int(digits[-1]))
        return cls(capability, SM_COUNT.get(capability, 132), SHARED_MEMORY_LIMIT.get(capability, 101376))


@functools.cache
def device_info(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    return DeviceInfo((props.major, props.minor), props.multi_processor_count, props.shared_memory_per_block_optin)


def current_stream(index: int) -> int:
    """The raw handle of torch's current stream on device `index` (what a launch goes on)."""
    return torch._C._cuda_getCurrentRawStream(index)


def capturing(index: int) -> bool:
    """Whether the current stream of device `index` is capturing a CUDA graph (no sync allowed)."""
    with torch.cuda.device(index):
        return torch.cuda.is_current_stream_capturing()
