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
