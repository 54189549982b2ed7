"""A hub id made a local checkpoint folder: the download, with its progress shown.

`fetch` asks the hub (``HF_ENDPOINT``) which of the model's files (weights, config,
tokenizer, processor, chat template: `MODEL_FILES`) are not in the hub cache yet
(``HF_HOME``/``HF_HUB_CACHE``), downloads them one after another on the calling thread,
and returns the snapshot folder. `model_folder` is the way in:
a local folder is only checked. The bytes done, the total and the rate go to the
`LoadProgress` (so `/health` shows them) after every chunk, to the log every
`log_interval` seconds when stderr is not a terminal, and to a live tqdm bar when it is.
A stopping service makes the next chunk raise `LoadCancelled`.

When the hub cannot be reached (or ``HF_HUB_OFFLINE`` is set), a complete copy in the
cache is used; without one, `ModelLoadError` says how to get the model onto the host.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils._paths import filter_repo_objects
from tqdm import tqdm

from server.errors import LoadCancelled, ModelLoadError
from server.inference.loading import LoadProgress
from server.inference.model.checkpoint import check_directory, is_hub_id

log = logging.getLogger("vlbridge.model")

# What loading a Qwen3-VL checkpoint reads; README, pictures and other formats stay on the hub.
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
DOWNLOAD_SPAN = (0.05, 0.55)  # the share of /health's progress the download takes
RATE_WINDOW = 10.0  # seconds of samples the shown rate averages over


def _hub_log_once() -> None:
    # huggingface_hub gives its logger a stderr handler of its own at import, and its records
    # also reach the root handler the entry point installed: every retry warning showed twice.
    hub = logging.getLogger("huggingface_hub")
    for handler in list(hub.handlers):
        hub.removeHandler(handler)


_hub_log_once()


def size(count: float) -> str:
    """Bytes for people: 512 B, 3.4 MB, 17.1 GB (powers of 1000, as the hub shows sizes)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count:.0f} B"


class Transfer:
    """The bytes of one model's download: done, total, recent rate; reported as it goes."""

    def __init__(
        self, name: str, total: int, progress: LoadProgress, log_interval: float, bar: tqdm | None = None
    ) -> None:
        self.name = name
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self._samples: deque[tuple[float, int]] = deque([(self.started, 0)])
        self._progress = progress
        self._log_interval = log_interval
        self._logged = self.started
        self._bar = bar

    def rate(self, now: float) -> float:
        """Bytes a second over the last `RATE_WINDOW` seconds."""
        while len(self._samples) > 2 and now - self._samples[1][0] > RATE_WINDOW:
            self._samples.popleft()
        first_at, first_done = self._samples[0]
        return (self.done - first_done) / (now - first_at) if now > first_at else 0.0

    def line(self, now: float) -> str:
        return f"downloading {self.name}: {size(self.done)} of {size(self.total)} at {size(self.rate(now))}/s"

    def add(self, count: int) -> None:
        """*count* more bytes arrived (negative: a resumed file starts over); raises
        `LoadCancelled` when the service is stopping."""
        self.done += count
        now = time.monotonic()
        self._samples.append((now, self.done))
        if self._bar is not None:
            self._bar.update(count)
        elif now - self._logged >= self._log_interval:
            self._logged = now
            log.info("%s", self.line(now))
        low, high = DOWNLOAD_SPAN
        share = min(1.0, self.done / self.total) if self.total else 1.0
        self._progress(low + (high - low) * share, self.line(now))


def _file_bar(transfer: Transfer) -> type[tqdm]:
    """A tqdm class for `hf_hub_download` that draws nothing and counts into *transfer*."""

    class FileBar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            if kwargs.get("initial"):
                transfer.add(int(kwargs["initial"]))  # resumed from an earlier, interrupted run

        def update(self, n: float | None = 1) -> bool | None:
            transfer.add(int(n or 0))
            return None

    return FileBar


def model_folder(path: str, progress: LoadProgress, log_interval: float = 5.0) -> Path:
    """The checked checkpoint folder *path* names: a local folder, or a hub id `fetch`ed.
    Raises `ModelLoadError` (see `checkpoint.check_directory` and `fetch`)."""
    if is_hub_id(path):
        return check_directory(str(fetch(path, progress, log_interval)))
    return check_directory(path)


def fetch(repo_id: str, progress: LoadProgress, log_interval: float = 5.0) -> Path:
    """The snapshot folder of *repo_id* with `MODEL_FILES`, downloading what the cache lacks.

    Raises `ModelLoadError` (one line, what to do) when the repository does not exist or is
    gated, or the hub is unreachable and the cache has no copy; `LoadCancelled` when the
    service stopped meanwhile."""
    if constants.HF_HUB_OFFLINE:
        return _cached(repo_id, "HF_HUB_OFFLINE is set")
    try:
        info = HfApi().model_info(repo_id, files_metadata=True)
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as exc:
        raise _refused(repo_id, exc) from exc
    except Exception as exc:  # the hub is down or unreachable; the cause is named in the message
        return _cached(repo_id, f"the hub at {constants.ENDPOINT} is unreachable ({first_line(exc)})")
    files = list(
        filter_repo_objects(info.siblings or [], allow_patterns=MODEL_FILES, key=lambda s: s.rfilename)
    )
    missing = [
        sibling
        for sibling in files
        if not isinstance(try_to_load_from_cache(repo_id, sibling.rfilename, revision=info.sha), str)
    ]
    total = sum(sibling.size or 0 for sibling in missing)
    if missing:
        log.info(
            "fetching %s (%d files, %s; %d already cached) from %s into %s",
            repo_id,
            len(missing),
            size(total),
            len(files) - len(missing),
            constants.ENDPOINT,
            constants.HF_HUB_CACHE,
        )
        _download(repo_id, [s.rfilename for s in missing], total, progress, log_interval)
    folder = Path(hf_hub_download(repo_id, "config.json", revision=info.sha)).parent  # cached: no request
    if not missing:
        log.info("%s is in the hub cache: %s", repo_id, folder)
    return folder


def _download(
    repo_id: str, names: Sequence[str], total: int, progress: LoadProgress, interval: float
) -> None:
    live = sys.stderr.isatty()
    bar: tqdm | None = (
        tqdm(total=total, unit="B", unit_scale=True, desc=repo_id, file=sys.stderr) if live else None
    )
    transfer = Transfer(repo_id, total, progress, interval, bar)
    progress(DOWNLOAD_SPAN[0], transfer.line(transfer.started))
    try:
        for name in names:
            # revision None: the branch is resolved and recorded in the cache (refs/main), so that
            # an offline start later finds this snapshot
            hf_hub_download(repo_id, name, tqdm_class=_file_bar(transfer))
    except LoadCancelled:
        raise
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise _refused(repo_id, exc) from exc
    except Exception as exc:
        raise ModelLoadError(
            f"downloading {repo_id} failed after {size(transfer.done)} of {size(total)} "
            f"({first_line(exc)}); start again to resume, or {_local_copy(repo_id)}"
        ) from exc
    finally:
        if bar is not None:
            bar.close()
    took = time.monotonic() - transfer.started
    log.info(
        "downloaded %s: %s in %.0f s (%s/s)", repo_id, size(transfer.done), took, size(transfer.done / took)
    )


def _cached(repo_id: str, why: str) -> Path:
    """The complete cached snapshot of *repo_id*, or `ModelLoadError` saying *why* none was fetched."""
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES, local_files_only=True))
    except Exception as exc:
        raise ModelLoadError(
            f"cannot get {repo_id}: {why}, and the hub cache ({constants.HF_HUB_CACHE}) has no complete "
            f"copy; {_local_copy(repo_id)}"
        ) from exc
    log.info("%s: %s; using the copy in the hub cache: %s", repo_id, why, folder)
    return folder


def _local_copy(repo_id: str) -> str:
    return (
        f"on a host with access run `hf download {repo_id} --local-dir DIR`, copy DIR here and set "
        "model.path = DIR (or fill HF_HOME's cache there, copy it and set HF_HUB_OFFLINE=1)"
    )


def _refused(repo_id: str, exc: Exception) -> ModelLoadError:
    if isinstance(exc, GatedRepoError):
        return ModelLoadError(
            f"{repo_id} is gated on the hub: accept its terms on the model's page and set HF_TOKEN"
        )
    return ModelLoadError(
        f"the hub has no model {repo_id!r} (or it is private: set HF_TOKEN); check model.path"
    )


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
