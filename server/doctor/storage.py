"""Can the service keep its data: the `[storage]` folder writable, the Feishu inbox usable.

`vlbridge doctor` may run beside the service: an inbox locked by a running service is reported
as in use (with the service's pid), not as a failure, and nothing is created: a folder or inbox
that does not exist yet is checked by probing the folder that would hold it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from bot.inbox import lock_holder
from bot.inbox_factory import StoreSpec
from bot.store import StorageError
from server.config import Config
from server.doctor.findings import Finding, Verdict, fail, ok, warn


def storage_uses(config: Config) -> str:
    """What this config keeps in the `[storage]` folder ("the demo model and the Feishu inbox"),
    "" when nothing."""
    uses = []
    if not config.model.path and config.model.backend == "local":
        uses.append("the demo model")
    if config.feishu.enabled and config.storage.backend == "sqlite":
        uses.append("the Feishu inbox")
    return " and ".join(uses)


def storage_findings(config: Config) -> list[Finding]:
    uses = storage_uses(config)
    if not uses:
        return [ok("storage", f"{config.storage_path} is not used by this config")]
    folder = storage_folder(config.storage_path, uses)
    findings = [folder]
    if config.feishu.enabled and folder.verdict is not Verdict.FAIL:
        findings.append(_inbox(config))
    return findings


def _probe(folder: Path) -> str:
    """ "" when a file can be created in *folder*, else why not (write access as the OS decides it,
    for root too: mode bits alone would not say)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".vlbridge-doctor-", dir=folder)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(name)
    return ""


def storage_folder(folder: Path, uses: str) -> Finding:
    """ok when *folder* is writable or can be created (for *uses*), else fail saying what to do.
    Creates nothing but a probe file it removes at once."""
    advice = f"fix its permissions for uid {os.getuid()} or set [storage] path to a writable folder"
    if folder.is_dir():
        why = _probe(folder)
        if why:
            return fail("storage", f"{folder} is not writable ({why}): {advice}")
        return ok("storage", f"{folder} is writable (for {uses})")
    if folder.exists():
        return fail("storage", f"{folder} is not a folder: set [storage] path to a folder")
    parent = folder.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return fail(
            "storage", f"{folder} cannot be created: {parent} is a file; set [storage] path elsewhere"
        )
    why = _probe(parent)
    if why:
        return fail("storage", f"{folder} cannot be created in {parent} ({why}): {advice}")
    return ok("storage", f"{folder} does not exist yet; the service creates it (for {uses})")


def _inbox(config: Config) -> Finding:
    spec = StoreSpec.from_config(config, "feishu")
    if spec.backend == "redis":
        return _redis(spec)
    path = Path(spec.where)
    if not path.exists():
        return ok("inbox", f"{path} does not exist yet; the service creates it")
    try:
        holder = lock_holder(path)
        db = spec.open()
        try:
            db.check()
        finally:
            db.close()
    except StorageError as exc:
        return fail("inbox", str(exc))
    if holder is not None:
        return ok("inbox", f"{path} is whole and writable; in use by the running service (pid {holder})")
    return ok("inbox", f"{path} is whole and writable")


def _redis(spec: StoreSpec) -> Finding:
    from bot.inbox_redis import RedisInboxDb

    try:
        db = spec.open()
        assert isinstance(db, RedisInboxDb)
        try:
            db.check_writes()
            risks = db.risks()
        finally:
            db.close()
    except StorageError as exc:
        return fail("inbox", str(exc))
    if risks:
        return warn("inbox", f"{spec.name} takes writes, but it " + "; it ".join(risks))
    return ok("inbox", f"{spec.name} takes writes; no persistence or eviction risk seen")
