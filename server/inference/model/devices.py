"""Which torch device and dtype a config means, and how much memory that device has free.

Split from the loader so that `vlbridge doctor` can ask about the device (torch only, no
transformers) without loading a model. torch is imported when a function needs it, not with
this module: for ``model.device = "cpu"`` the answer needs no torch (2-8 s of imports saved).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import psutil

from server.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

# Below this many parameters (the demo model has ~2.5 M) a step's matrices are too small for
# threads to pay: one thread is as fast on an idle machine and many times faster on a busy one.
SMALL_MODEL_PARAMETERS = 100_000_000


def cpu_threads(setting: int | Literal["auto"], cores: int, parameters: int) -> int:
    """torch's intra-op thread count for a model of ``parameters`` on the CPU (`model.cpu_threads`).

    A number is used as it is. ``auto``: 1 for small models (`SMALL_MODEL_PARAMETERS`), else one
    per usable core but one, at least 1: the event loop and picture decoding need a core, and
    torch's OpenMP threads wait for each other at every operation, so a thread that loses its
    core to another process stalls the whole step (measured with the demo model: 512 tokens in
    2.6 s idle, 74-79 s with one other busy process and torch's default of a thread per core).
    """
    if setting != "auto":
        return setting
    if parameters < SMALL_MODEL_PARAMETERS:
        return 1
    return max(1, cores - 1)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: containers and taskset narrow it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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


def send(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """*tensor* (on the CPU) on *device*, without waiting for the work queued there: from pinned
    memory, asynchronously. A blocking copy (`torch.tensor(..., device=cuda)`, `.to(cuda)`) waits for
    every kernel launched before it, and the driver may make one from pageable memory wait too."""
    if device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
