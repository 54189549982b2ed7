"""What one check of `vlbridge doctor` found: a verdict and one sentence."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Verdict(StrEnum):
    OK = "ok"
    WARN = "warn"  # works, but something deserves a look
    FAIL = "FAIL"  # the service will not work as configured: `vlbridge doctor` exits non-zero


@dataclass(frozen=True, slots=True)
class Finding:
    """One line of the report: *check* names what was checked, *detail* says what was found and,
    unless the verdict is ok, what to do about it."""

    check: str
    verdict: Verdict
    detail: str


def ok(check: str, detail: str) -> Finding:
    return Finding(check, Verdict.OK, detail)


def warn(check: str, detail: str) -> Finding:
    return Finding(check, Verdict.WARN, detail)


def fail(check: str, detail: str) -> Finding:
    return Finding(check, Verdict.FAIL, detail)


def size(n: float) -> str:
    """Bytes for people: ``4.4 GB``."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
