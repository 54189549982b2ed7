"""Build the inference executor the configuration asks for."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from protocol.pictures import ImageLimits
from server.config import Config
from server.inference.api import Executor
from server.inference.echo import ECHO_PATH, EchoEngine
from server.inference.engine import Engine
from server.inference.executor import ExecutorLimits, InferenceExecutor
from server.inference.instant import INSTANT_PATH, InstantExecutor
from server.inference.loading import LoadProgress
from server.inference.picture_processes import prepare_processes

if TYPE_CHECKING:
    from server.inference.openai_backend import UpstreamOptions

log = logging.getLogger("vlbridge.backend")

DEMO_BANNER = """
  ****************************************************************************
  *  DEMO MODEL: no model is configured (model.path = ""), so vlbridge runs  *
  *  a tiny randomly initialised Qwen3-VL built locally. Its answers are     *
  *  RANDOM TEXT. Set model.path to e.g. "Qwen/Qwen3-VL-2B-Instruct" or a    *
  *  local checkpoint directory for real answers.                            *
  ****************************************************************************"""

# The demo model's answers are random text: a question that gives no max_tokens gets this many
# tokens at most (model.max_new_tokens still caps what a request may ask for), so trying it
# takes a second, not the 512 tokens a real model may need.
DEMO_ANSWER_TOKENS = 96


def image_limits(config: Config) -> ImageLimits:
    return ImageLimits(
        max_bytes=config.server.max_image_bytes,
        max_pixels=config.model.max_pixels,
        max_side=config.model.max_image_side,
        max_decode_pixels=config.model.max_decode_pixels,
    )


def upstream_options(config: Config) -> UpstreamOptions:
    """The openai backend's settings (``[model] backend = "openai"``) as plain values."""
    from server.inference.openai_backend import UpstreamOptions

    model = config.model
    return UpstreamOptions(
        base_urls=model.base_urls,
        model=model.model or model.path,
        api_key=model.api_key.get_secret_value(),
        connect_timeout=model.connect_timeout,
        first_token_timeout=model.first_token_timeout,
        eject_seconds=model.eject_seconds,
        max_concurrency=config.executor.max_batch,
        queue_size=config.executor.queue_size,
        request_timeout=config.executor.request_timeout,
        max_new_tokens=model.max_new_tokens,
    )


def build_openai_executor(config: Config) -> Executor:
    from server.inference.openai_backend import OpenAIExecutor

    return OpenAIExecutor(upstream_options(config))


DEMO_MODEL_ID = "vlbridge-demo-random"  # an id without spaces, for /v1/models; says what it is


def model_label(config: Config) -> str:
    """The served model's id (`/v1/models`, the `model` of OpenAI answers, /health)."""
    return config.model.path or DEMO_MODEL_ID


def build_executor(config: Config) -> Executor:
    """An executor whose engine loads on the worker thread when the executor starts
    (or, for `builtin:instant`, the zero-cost backend that has neither; for
    ``backend = "openai"``, one that asks OpenAI-compatible servers and imports no model code)."""
    if config.model.backend == "openai":
        return build_openai_executor(config)
    if config.model.path == INSTANT_PATH:
        return InstantExecutor()
    limits = image_limits(config)
    path = config.model.path

    def factory(progress: LoadProgress) -> Engine:
        if path == ECHO_PATH:
            return EchoEngine(limits)
        from server.inference.model.demo import ensure_demo_model
        from server.inference.model.fetch import model_folder  # no torch: a bad path fails at once

        source = path
        if source:
            progress(0.01, f"checking {path}")
            source = str(model_folder(path, progress, config.model.download_log_seconds))
        progress(0.05, "importing the model libraries (torch, transformers)")
        from server.inference.model.model_engine import EngineOptions, ModelEngine

        if not source:
            source = str(ensure_demo_model(Path(config.storage_path)))
            log.warning("%s", DEMO_BANNER)
        return ModelEngine.load(
            source,
            device=config.model.device,
            dtype=config.model.dtype,
            limits=limits,
            options=EngineOptions(
                max_batch=config.executor.max_batch,
                max_batch_tokens=config.executor.max_batch_tokens,
                max_context_tokens=config.model.max_context_tokens,
                max_new_tokens=config.model.max_new_tokens,
                cuda_graphs=config.model.cuda_graphs,
                kv_cache_dtype=config.model.kv_cache_dtype,
                weights_dtype=config.model.weights_dtype,
                prefix_cache=config.executor.prefix_cache,
                vision_cache_bytes=config.executor.vision_cache_mb * 2**20,
                profile_seconds=config.executor.profile_seconds,
                cpu_threads=config.model.cpu_threads,
                prepare_processes=prepare_processes(config.executor.prepare_processes, os.cpu_count() or 1),
                progress_log_seconds=config.model.download_log_seconds,
            ),
            progress=progress,
        )

    return InferenceExecutor(
        factory,
        ExecutorLimits(
            max_batch=config.executor.max_batch,
            queue_size=config.executor.queue_size,
            request_timeout=config.executor.request_timeout,
            max_new_tokens=config.model.max_new_tokens,
            default_new_tokens=None if path else min(DEMO_ANSWER_TOKENS, config.model.max_new_tokens),
            prefill_tokens=config.executor.prefill_chunk_tokens,
            prefill_tokens_decoding=config.executor.prefill_decoding_tokens,
            prefill_stall_target=config.executor.prefill_stall_target,
            profile_seconds=config.executor.profile_seconds,
            stream_interval=config.executor.stream_interval,
            max_turns=config.server.max_turns,
        ),
        model_name=model_label(config),
        prepare_workers=config.executor.prepare_workers or min(8, os.cpu_count() or 1),
    )
