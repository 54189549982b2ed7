"""Pictures into vision-encoder patches, in two halves: decoded on the CPU, the rest on the device.

The image processor (resize to multiples of patch x merge, rescale, normalize, repeat each
frame over the temporal patch, flatten the patches) cost ~35-48 ms of a preparation thread
per 1024x1024 picture on an H200 host, ~4 times the JPEG decoding itself, and made a float32
copy 8 times the size of the picture. Under a wave of pictures the preparation threads were
the queue (issue 18). Now a preparation thread only decodes (Pillow) and computes the grid
(`PixelSpec.target`, the processor's own `smart_resize`); the uint8 pixels (`Decoded`, 3 bytes
a pixel) go to the device as they are, and `patches` does the rest there in a few kernels per
picture, for all the pictures of a prefill at once, on the caller's stream (0.43 ms for 3
pictures of 1024x1024 on an H200).

Values: the processor's up to rounding. The resize is torch's antialiased bicubic, the same
filter as Pillow's BICUBIC (the PIL processor) and torch's uint8 kernel (the torchvision one),
pass by pass and rounded to uint8 as both do; rescale and normalize as the processor fuses
them, in float32, then one rounding to the model's dtype (`tests/test_pixels.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize


@dataclass(frozen=True)
class PixelSpec:
    """What the image processor would do to a picture, as plain numbers."""

    patch: int
    merge: int
    temporal: int
    mean: tuple[float, ...]  # per channel, of values in [0, 1]
    std: tuple[float, ...]
    rescale: float  # uint8 to [0, 1]
    min_pixels: int
    max_pixels: int

    @classmethod
    def of(cls, processor: Any, max_pixels: int) -> PixelSpec:
        """The spec of a Qwen2-VL-style image processor, at most *max_pixels* pixels a picture
        and at least one merged token's patches (what the service has always asked it for)."""
        patch = int(processor.patch_size)
        merge = int(getattr(processor, "merge_size", 2))
        factor = patch * merge
        return cls(
            patch=patch,
            merge=merge,
            temporal=int(getattr(processor, "temporal_patch_size", 2)),
            mean=tuple(float(m) for m in processor.image_mean),
            std=tuple(float(s) for s in processor.image_std),
            rescale=float(processor.rescale_factor),
            min_pixels=factor * factor,
            max_pixels=max_pixels,
        )

    def target(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) a picture is resized to; ValueError for an extreme aspect ratio."""
        factor = self.patch * self.merge
        h, w = smart_resize(
            height, width, factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels
        )
        return int(h), int(w)


@dataclass
class Decoded:
    """One decoded picture, not yet resized: what a preparation thread hands on."""

    pixels: torch.Tensor  # (height, width, 3) uint8, on the CPU (pinned for a CUDA model)
    size: tuple[int, int]  # (height, width) it is resized to, multiples of patch x merge
    spec: PixelSpec
    digest: bytes = b""  # hash of the picture's bytes, when it came from bytes (prompt.py)

    @classmethod
    def of(cls, image: Image.Image, spec: PixelSpec, digest: bytes = b"") -> Decoded:
        """*image* (RGB) as a tensor; ValueError if no grid fits it."""
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # a writable copy (PIL's is read-only)
        return cls(pixels, spec.target(int(pixels.shape[0]), int(pixels.shape[1])), spec, digest)

    @property
    def grid(self) -> torch.Tensor:
        """(1, 3): frames, rows and columns of patches, as the processor's `image_grid_thw`."""
        return torch.tensor([[1, self.size[0] // self.spec.patch, self.size[1] // self.spec.patch]])

    @property
    def patch_count(self) -> int:
        return (self.size[0] // self.spec.patch) * (self.size[1] // self.spec.patch)

    @property
    def nbytes(self) -> int:
        return int(self.pixels.nbytes)

    def pinned(self) -> Decoded:
        return Decoded(self.pixels.pin_memory(), self.size, self.spec, self.digest)


def patches(pictures: Sequence[Decoded], device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """The vision encoder's input for *pictures* (one spec), concatenated in order:
    (patches, channels x temporal x patch x patch), as the processor's `pixel_values`.

    Runs where *device* is, on its current stream; the copies from pinned memory do not wait.
    """
    spec = pictures[0].spec
    mean, std = _normalization(spec, torch.device(device))
    out: list[torch.Tensor] = []
    for picture in pictures:
        image = picture.pixels.to(device, non_blocking=True).permute(2, 0, 1).float()
        image = _resize(image, picture.size).sub_(mean).div_(std)
        # in the model's dtype before the copy that repeats each frame: half the bytes to move
        out.append(_patchify(image.to(dtype), spec))
    return out[0] if len(out) == 1 else torch.cat(out)


@functools.lru_cache(maxsize=8)
def _normalization(spec: PixelSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std on *device*, made once: copying them there at each call would
    wait for everything queued on the device (a decode step launched before the prefill).
    As the processor fuses rescale and normalize: (x - mean / r) / (std / r)."""
    mean = torch.tensor([m / spec.rescale for m in spec.mean], device=device)[:, None, None]
    std = torch.tensor([s / spec.rescale for s in spec.std], device=device)[:, None, None]
    return mean, std


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """*image* (channels, height, width; uint8 values as floats) resized to *size* as Pillow's
    BICUBIC does it: the columns first, then the rows, each pass rounded and clipped to uint8.
    One float pass instead differs by up to ~20 levels on noisy pictures, where the cubic's
    overshoot is clipped between Pillow's passes; torch's own uint8 kernel (the torchvision
    processor on a CPU) also works pass by pass."""
    height, width = size
    if image.shape[2] != width:
        image = _pass(image, (image.shape[1], width))
    if image.shape[1] != height:
        image = _pass(image, (height, width))
    return image


def _pass(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    resized = torch.nn.functional.interpolate(
        image[None], size=size, mode="bicubic", align_corners=False, antialias=True
    )[0]
    return resized.round_().clamp_(0, 255)


def _patchify(image: torch.Tensor, spec: PixelSpec) -> torch.Tensor:
    """(channels, height, width) to (patches, channels x temporal x patch x patch), patches in the
    order the encoder merges them (merge x merge blocks, row-major), each frame repeated."""
    channels, height, width = image.shape
    p, m = spec.patch, spec.merge
    rows, columns = height // p, width // p
    blocks = image.reshape(channels, rows // m, m, p, columns // m, m, p)
    blocks = blocks.permute(1, 4, 2, 5, 0, 3, 6)  # (rows/m, columns/m, m, m, channels, p, p)
    repeated = blocks.unsqueeze(5).expand(-1, -1, -1, -1, -1, spec.temporal, -1, -1)
    return repeated.reshape(rows * columns, channels * spec.temporal * p * p)
