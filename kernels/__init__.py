"""loraledger kernels package: Triton kernels and their pure-torch twins.

Every kernel family has two backends by name, "torch" (the twins: any device, the CPU path) and "triton";
`default_backend` is the one shared rule for which runs when none is named.
"""

from __future__ import annotations

import importlib.util

import torch


def default_backend(device: torch.device | str) -> str:
    """"triton" on CUDA when triton is importable, else "torch"."""
    on_cuda = torch.device(device).type == "cuda"
    return "triton" if on_cuda and importlib.util.find_spec("triton") is not None else "torch"


def to_device(values: object, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Host values (a list, nested lists) as a tensor on `device`. On CUDA through pinned memory with a
    non-blocking copy: a plain copy from pageable memory waits for every kernel queued before it, which would
    stall the host behind a step still running on the GPU (torch's pinned allocator keeps the buffer until the
    copy is done)."""
    if torch.device(device).type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
