"""Run every check of `vlbridge doctor` in order and collect what they found."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from server.config import Config, load_config
from server.doctor.feishu import feishu_findings
from server.doctor.findings import Finding, fail, ok
from server.doctor.model import model_findings
from server.doctor.proxy import proxy_finding
from server.doctor.storage import storage_findings
from server.errors import ConfigError

log = logging.getLogger("vlbridge.doctor")

CHECKS: tuple[tuple[str, Callable[[Config], list[Finding]]], ...] = (
    ("model", model_findings),
    ("storage", storage_findings),
    ("feishu", feishu_findings),
)


def diagnose(
    path: str | Path | None, environ: Mapping[str, str], proxy_idle_timeout: float | None
) -> list[Finding]:
    """The findings for the config at *path* (None: the built-in defaults) with *environ*'s
    overrides, as `vlbridge serve` would read them. Never raises: a config that does not load is
    one failed line, and a check that breaks is a failed line of its own while the others run."""
    try:
        config = load_config(path, environ)
    except ConfigError as exc:
        return [fail("config", f"{exc}")]
    findings = [ok("config", f"{config.source} is valid")]
    for name, check in CHECKS:
        try:
            findings += check(config)
        except Exception as exc:  # a bug in one check must not hide what the others find
            log.exception("doctor: the %s check failed", name)
            findings.append(fail(name, f"the check itself failed ({type(exc).__name__}: {exc})"))
    findings.append(proxy_finding(config.server, proxy_idle_timeout))
    return findings
