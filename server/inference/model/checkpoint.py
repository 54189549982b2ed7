"""What a checkpoint folder holds, read from its files before anything is loaded.

No torch here: `vlbridge doctor` and the loader share these checks, and the memory
estimate is a pure function of file sizes and dtypes. Each check raises `ModelLoadError`
with one line that says what is wrong and what to do about it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from server.errors import ModelLoadError

QWEN3_VL_TYPES = ("qwen3_vl", "qwen3_vl_moe")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
GB = 1e9


def is_hub_id(path: str) -> bool:
    """True when *path* names a hub repository ("owner/name") rather than a folder: it does not
    exist here and has the hub's form (one slash, not starting like a path)."""
    if Path(path).expanduser().exists():
        return False
    return not path.startswith(("/", ".", "~")) and path.count("/") == 1 and " " not in path


def weight_files(directory: Path) -> tuple[list[Path], list[str]]:
    """The weight files of a checkpoint, and the shards its index names that are missing."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            present = [directory / shard for shard in shards if (directory / shard).is_file()]
            missing = [shard for shard in shards if not (directory / shard).is_file()]
            return present, missing
    found = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    return [path for path in found if path.is_file()], []


def _config(directory: Path) -> dict[str, Any]:
    try:
        loaded = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def stored_dtype(directory: Path) -> str:
    """The dtype the checkpoint's config says its weights are stored in ("" when it does not say)."""
    config = _config(directory)
    for table in (config, config.get("text_config") or {}):
        dtype = table.get("torch_dtype") or table.get("dtype")
        if isinstance(dtype, str):
            return dtype
    return ""


def weights_in_memory(file_bytes: int, stored: str, target: str) -> int:
    """Bytes the weights take once loaded as *target* dtype, from their size on disk stored as
    *stored* (an unknown dtype counts as stored as the target: the files' size)."""
    stored_bytes = DTYPE_BYTES.get(stored)
    target_bytes = DTYPE_BYTES.get(target)
    if not stored_bytes or not target_bytes:
        return file_bytes
    return file_bytes * target_bytes // stored_bytes


def check_directory(path: str) -> Path:
    """*path* as a checkpoint folder holding a Qwen3-VL model and all its weight files."""
    directory = Path(path).expanduser()
    if not directory.exists():
        raise ModelLoadError(
            f"model.path {path!r} does not exist: set it to a checkpoint folder or a hub id "
            "such as Qwen/Qwen3-VL-2B-Instruct"
        )
    if not directory.is_dir():
        raise ModelLoadError(f"model.path {path!r} is a file: set it to the checkpoint's folder")
    if not (directory / "config.json").is_file():
        raise ModelLoadError(
            f"{path} has no config.json: it is not a Hugging Face checkpoint folder; point model.path "
            "at the folder `hf download Qwen/Qwen3-VL-2B-Instruct --local-dir DIR` fills"
        )
    model_type = _config(directory).get("model_type")
    if model_type not in QWEN3_VL_TYPES:
        raise ModelLoadError(
            f"{path} holds a {model_type or 'model of unknown type'} checkpoint (config.json model_type); "
            "vlbridge serves Qwen3-VL (model_type qwen3_vl or qwen3_vl_moe): choose a Qwen3-VL model"
        )
    present, missing = weight_files(directory)
    if missing:
        raise ModelLoadError(
            f"{path} lacks {len(missing)} weight file(s) its index names ({missing[0]}, ...): "
            "the download is incomplete; download it again"
        )
    if not present:
        raise ModelLoadError(f"{path} has no weights (*.safetensors): the download is incomplete")
    return directory


def check_memory(directory: Path, dtype: str, device: str, free_bytes: int) -> int:
    """The bytes *directory*'s weights need as *dtype*; raises when *device* has less free."""
    on_disk = sum(path.stat().st_size for path in weight_files(directory)[0])
    needed = weights_in_memory(on_disk, stored_dtype(directory), dtype)
    if needed > free_bytes:
        raise ModelLoadError(
            f"not enough memory on {device}: the weights need {needed / GB:.1f} GB as {dtype} "
            f"(more for answers) and {free_bytes / GB:.1f} GB are free; free memory there "
            "(another process?), choose a smaller model, or set model.device to another GPU"
        )
    return needed
