"""Can the configured model be loaded: the demo model, a built-in backend, a checkpoint (local
or in the hub cache) on its device with enough memory, or the OpenAI-compatible upstreams.

Nothing is loaded: a checkpoint's files are looked at, and its size is set against the memory
free on the device the loader would pick (torch is imported only to ask about a device).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from server.config import Config
from server.doctor.findings import Finding, Verdict, fail, ok, size, warn
from server.errors import ModelLoadError
from server.inference.echo import ECHO_PATH
from server.inference.instant import INSTANT_PATH
from server.inference.model.checkpoint import (  # no torch
    check_directory,
    stored_dtype,
    weight_files,
    weights_in_memory,
)
from server.inference.model.demo import is_demo_model  # reads a marker file; no torch
from server.inference.model.devices import Placement, placement  # torch only for a GPU or "auto"

ROOM = 0.8  # weights above this share of the free memory leave too little for the KV cache


def model_findings(config: Config) -> list[Finding]:
    model = config.model
    if model.backend == "openai":
        return upstream_findings(config)
    if model.path in (ECHO_PATH, INSTANT_PATH):
        return [ok("model", f"{model.path}: a built-in test backend (no model; its answers are not real)")]
    if not model.path:
        return _demo(config)
    directory = checkpoint_dir(model.path)
    if isinstance(directory, Finding):
        return [directory]
    files = checkpoint_files(directory)
    if files.verdict is not Verdict.OK:
        return [files]
    return [files, _memory(config, directory)]


def _demo(config: Config) -> list[Finding]:
    directory = config.storage_path / "demo-model"
    where = f"present in {directory}" if is_demo_model(directory) else f"built in {directory} at first start"
    findings = [
        ok("model", f"the demo model (random answers), {where}; set model.path for real answers"),
    ]
    if config.model.device != "cpu":
        device = _placement_or_fail(config)
        if isinstance(device, Finding):
            findings.append(device)
    return findings


def is_local_path(path: str) -> bool:
    """Whether `model.path` *path* means a folder on this host rather than a hub id: it exists, or
    it looks like a path (starts with / . ~, or has other than the one slash of ``org/name``)."""
    return Path(path).expanduser().exists() or path.startswith(("/", ".", "~")) or path.count("/") != 1


def checkpoint_dir(path: str) -> Path | Finding:
    """The folder holding *path*'s files (a local folder, or the hub cache's snapshot of a hub id),
    or the finding that there is none."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if is_local_path(path):
        return fail(
            "model", f"model.path {path!r} is not a folder: set it to a checkpoint folder or a hub id"
        )
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json")
    if isinstance(cached, str):
        return Path(cached).parent
    return warn(
        "model",
        f"{path} is not in the hub cache on this host: the service downloads it at first start, "
        f"which needs the hub reachable; fetch it beforehand (`hf download {path}`) to be sure",
    )


def checkpoint_files(directory: Path) -> Finding:
    """ok when *directory* holds a whole Qwen3-VL checkpoint (config.json of that architecture and
    every weight file): the loader's own check (`check_directory`), as a finding."""
    try:
        check_directory(str(directory))
    except ModelLoadError as exc:
        return fail("model", str(exc))
    present = weight_files(directory)[0]
    total = sum(path.stat().st_size for path in present)
    return ok("model", f"{directory}: config.json and {len(present)} weight file(s), {size(total)}")


def _placement_or_fail(config: Config) -> Placement | Finding:
    """The `Placement` the loader would use, or a failed finding saying why there is none."""
    try:
        return placement(config.model.device, config.model.dtype)
    except ModelLoadError as exc:
        return fail("model device", f"{exc}: set model.device (auto, cpu, cuda:N) to a device this host has")


def _memory(config: Config, directory: Path) -> Finding:
    found = _placement_or_fail(config)
    if isinstance(found, Finding):
        return found
    weights = sum(path.stat().st_size for path in weight_files(directory)[0])
    needed = weights_in_memory(weights, stored_dtype(directory), found.dtype)
    what = (
        f"the weights take about {size(needed)} as {found.dtype} on {found.device}, "
        f"which has {size(found.free_bytes)} free"
    )
    if needed > found.free_bytes:
        return fail(
            "model memory",
            f"{what}: free memory there (another process?), use a smaller model, "
            "or set model.dtype to a smaller type",
        )
    if needed > ROOM * found.free_bytes:
        return warn("model memory", f"{what}: little is left for the KV cache; expect short contexts")
    return ok("model memory", what)


# -- the openai backend ---------------------------------------------------------------------------


def upstream_findings(config: Config) -> list[Finding]:
    """One line per base URL: it answers ``GET /models`` as the service's own probe asks, and lists
    the configured model."""
    from server.backend import upstream_options
    from server.inference.openai_backend import Probe, probe, upstream_client

    options = upstream_options(config)

    async def probe_all() -> list[tuple[Probe, float]]:
        async with upstream_client(options) as client:

            async def timed(url: str) -> tuple[Probe, float]:
                started = time.perf_counter()
                result = await probe(client, url, options.connect_timeout)
                return result, time.perf_counter() - started

            return await asyncio.gather(*(timed(url) for url in options.base_urls))

    findings = []
    for url, (result, seconds) in zip(options.base_urls, asyncio.run(probe_all()), strict=True):
        check = f"upstream {url}"
        if result.error:
            findings.append(
                fail(check, f"{result.error}: start that server, or fix model.base_urls (and api_key)")
            )
        elif options.model and options.model not in result.models:
            listed = ", ".join(result.models) or "nothing"
            findings.append(
                fail(check, f"does not serve {options.model!r} (it lists {listed}): set model.model to one")
            )
        elif not result.models:
            findings.append(warn(check, "answers but lists no models: set model.model to the model's name"))
        else:
            name = options.model or result.models[0]
            findings.append(ok(check, f"serves {name} (answered in {seconds * 1000:.0f} ms)"))
    return findings
