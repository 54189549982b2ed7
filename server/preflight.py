"""What `vlbridge serve` refuses at start, checked without starting anything.

`check_startable(config)` is the one list of those checks: `vlbridge serve` asks it before a
model loads or a port is bound, and `vlbridge check-config` asks it too, so a config that one
accepts the other accepts. Checks that need the network, a device or the model itself (the hub,
Feishu's servers, GPU memory) belong to `vlbridge doctor`.
"""

from __future__ import annotations

from pathlib import Path

from server.config import Config
from server.doctor.findings import Verdict
from server.doctor.model import checkpoint_files, is_local_path
from server.doctor.storage import storage_folder, storage_uses
from server.errors import ConfigError
from server.inference.echo import ECHO_PATH
from server.inference.instant import INSTANT_PATH


def check_startable(config: Config) -> None:
    """Raise `ConfigError` (one line: where the value came from, what is wrong, what to do) for
    the first thing that would stop `vlbridge serve` with *config*: Feishu enabled without the
    credentials its mode needs, a local model folder that does not exist or holds no whole
    checkpoint, a `[storage]` folder that cannot be written or created when something is kept there.

    Loads nothing and connects nowhere; hub ids (``org/name``) are not looked up. Creates nothing
    but a probe file in the storage folder, removed at once."""
    from bot.feishu import require_credentials  # lark_oapi is not imported by this

    require_credentials(config)
    _check_model(config)
    _check_storage(config)


def _check_model(config: Config) -> None:
    path = config.model.path
    if config.model.backend != "local" or path in ("", ECHO_PATH, INSTANT_PATH) or not is_local_path(path):
        return
    directory = Path(path).expanduser()
    if not directory.is_dir():
        what = "is not a folder" if directory.exists() else "does not exist"
        raise ConfigError(
            f"{config.origin('model', 'path')}: {path!r} {what}: set it to a checkpoint folder "
            "or a hub id such as Qwen/Qwen3-VL-2B-Instruct"
        )
    files = checkpoint_files(directory)
    if files.verdict is Verdict.FAIL:
        raise ConfigError(f"{config.origin('model', 'path')}: {files.detail}")


def _check_storage(config: Config) -> None:
    uses = storage_uses(config)
    if not uses:
        return
    folder = storage_folder(config.storage_path, uses)
    if folder.verdict is Verdict.FAIL:
        raise ConfigError(f"{config.origin('storage', 'path')}: {folder.detail}")
