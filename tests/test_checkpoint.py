"""What a checkpoint folder holds, read before loading: its kind, its weights, the memory they need."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.errors import LoadCancelled, ModelLoadError
from server.inference.loading import LoadProgress
from server.inference.model.checkpoint import check_directory, check_memory, is_hub_id, weights_in_memory


def _checkpoint(folder: Path, shards: dict[str, int], dtype: str = "bfloat16") -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps({"model_type": "qwen3_vl", "text_config": {"dtype": dtype}})
    )
    index = {"weight_map": {f"layer.{i}": name for i, name in enumerate(shards)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    for name, size in shards.items():
        with open(folder / name, "wb") as handle:
            handle.truncate(size)  # sparse: sizes are all that count
    return folder


def test_weights_in_memory_scales_by_dtype() -> None:
    assert weights_in_memory(16_000, "bfloat16", "bfloat16") == 16_000
    assert weights_in_memory(16_000, "bfloat16", "float32") == 32_000
    assert weights_in_memory(32_000, "float32", "float16") == 16_000
    assert weights_in_memory(16_000, "", "float32") == 16_000  # unknown: as on disk


def test_not_enough_gpu_memory_says_how_much_is_needed(tmp_path: Path) -> None:
    folder = _checkpoint(
        tmp_path / "qwen", {"model-1.safetensors": 9_000_000_000, "model-2.safetensors": 8_100_000_000}
    )
    with pytest.raises(ModelLoadError) as raised:
        check_memory(folder, "bfloat16", "cuda:0", free_bytes=12_000_000_000)
    assert str(raised.value).startswith(
        "not enough memory on cuda:0: the weights need 17.1 GB as bfloat16 (more for answers) "
        "and 12.0 GB are free;"
    )
    assert check_memory(folder, "bfloat16", "cuda:0", free_bytes=80_000_000_000) == 17_100_000_000


def test_incomplete_and_foreign_checkpoints_are_refused(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "qwen", {"model-1.safetensors": 10})
    assert check_directory(str(folder)) == folder
    (folder / "model-1.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="lacks 1 weight file"):
        check_directory(str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    with pytest.raises(ModelLoadError, match="holds a qwen2_5_vl checkpoint"):
        check_directory(str(folder))


def test_hub_ids_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("Qwen/Qwen3-VL-8B-Instruct")
    assert not is_hub_id("./Qwen3-VL-8B-Instruct")
    assert not is_hub_id("/models/Qwen3-VL-8B-Instruct")
    assert not is_hub_id("models/qwen/Qwen3-VL-8B-Instruct")
    (tmp_path / "Qwen" / "Local").mkdir(parents=True)
    assert not is_hub_id("Qwen/Local")  # a folder here wins over the hub


def test_load_progress_stops_a_load_at_its_next_report() -> None:
    progress = LoadProgress()
    progress(0.3, "downloading")
    progress(0.2)  # never goes back
    assert (progress.fraction, progress.detail) == (0.3, "downloading")
    progress.stop()
    with pytest.raises(LoadCancelled):
        progress(0.4)
