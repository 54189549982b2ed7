"""Which torch device and dtype a config means, and how much memory that device has free.

Split from the loader so that `vlbridge doctor` can ask about the device (torch only, no
transformers) without loading a model. torch is imported when a function needs it, not with
this module: for ``model.device = "cpu"`` the answer needs no torch (2-8 s of imports saved).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

from server.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def resolve_device(spec: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a device; raises `ModelLoadError` when CUDA is
    asked for and absent."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device is {spec!r} but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelLoadError(
            f"model.device is {spec!r} but only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    import torch

    if spec != "auto":
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[spec]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a model would go, in plain values: the device, bytes per weight, bytes free there."""

    device: str  # "cpu", "cuda:0"
    dtype: str  # "bfloat16"
    bytes_per_weight: int
    free_bytes: int


def placement(device_spec: str, dtype_spec: str) -> Placement:
    """What `load_model` would pick for these config values, and the memory free on that device
    (the CUDA driver's count, or the RAM the OS can give without swapping); raises `ModelLoadError`
    like `resolve_device`."""
    if device_spec == "cpu":  # as resolve_dtype decides for the CPU, without importing torch
        dtype = "float32" if dtype_spec == "auto" else dtype_spec
        return Placement("cpu", dtype, _BYTES[dtype], int(psutil.virtual_memory().available))
    import torch

    device = resolve_device(device_spec)
    dtype_name = str(resolve_dtype(dtype_spec, device)).removeprefix("torch.")
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        return Placement(f"cuda:{index}", dtype_name, _BYTES[dtype_name], int(free))
    return Placement("cpu", dtype_name, _BYTES[dtype_name], int(psutil.virtual_memory().available))
