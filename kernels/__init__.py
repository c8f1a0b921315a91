"""loraledger kernels package: Triton kernels and their pure-torch twins.

Every kernel family has two backends by name, "torch" (the twins: any device, the CPU path) and "triton";
`default_backend` is the one shared rule for which runs when none is named.
"""

from __future__ import annotations

import array
import importlib.util

import torch


def default_backend(device: torch.device | str) -> str:
    """"triton" on CUDA when triton is importable, else "torch"."""
    on_cuda = torch.device(device).type == "cuda"
    return "triton" if on_cuda and importlib.util.find_spec("triton") is not None else "torch"


# array module type codes of the dtypes host lists are sent in (flat lists go through `array`, a C loop)
_ARRAY_CODES: dict[torch.dtype, str] = {torch.int64: "q", torch.int32: "i", torch.float32: "f", torch.float64: "d"}


def to_device(values: object, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Host values (a list, nested lists) as a tensor on `device`. On CUDA through pinned memory with a
    non-blocking copy: a plain copy from pageable memory waits for every kernel queued before it, which would
    stall the host behind a step still running on the GPU (torch's pinned allocator keeps the buffer until the
    copy is done). A flat list of ints or floats is read by `array` (a third of `torch.tensor`'s time on a
    list; the engine sends a few per step)."""
    code = _ARRAY_CODES.get(dtype)
    host: torch.Tensor | None = None
    if code is not None and isinstance(values, list) and values and not isinstance(values[0], (list, tuple)):
        host = torch.frombuffer(array.array(code, values), dtype=dtype)  # shares the array's memory
    dev = torch.device(device)
    if host is None:
        if dev.type == "cuda":
            return torch.tensor(values, dtype=dtype, pin_memory=True).to(dev, non_blocking=True)
        return torch.tensor(values, dtype=dtype, device=dev)
    if dev.type == "cuda":
        return host.pin_memory().to(dev, non_blocking=True)
    return host.to(dev)  # the CPU: the tensor itself
