"""The demo model behind the real executor on the CPU, as several test files build it."""

from __future__ import annotations

from pathlib import Path

from protocol.pictures import ImageLimits
from server.inference.executor import ExecutorLimits, InferenceExecutor
from server.inference.model.model_engine import EngineOptions, ModelEngine


def demo_executor(
    model_dir: Path, options: EngineOptions, *, queue_size: int = 16, request_timeout: float = 60
) -> InferenceExecutor:
    """An executor (not started) whose engine loads the checkpoint in *model_dir* with *options*."""
    return InferenceExecutor(
        lambda progress: ModelEngine.load(
            str(model_dir),
            device="cpu",
            dtype="float32",
            limits=ImageLimits(),
            options=options,
            progress=progress,
        ),
        ExecutorLimits(
            max_batch=options.max_batch,
            queue_size=queue_size,
            request_timeout=request_timeout,
            max_new_tokens=options.max_new_tokens,
        ),
        model_name="demo",
    )
