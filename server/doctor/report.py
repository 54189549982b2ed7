"""The table `vlbridge doctor` prints, apart from the checks (a terminal gets colour)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from server.doctor.findings import Finding, Verdict

_STYLES = {Verdict.OK: "green", Verdict.WARN: "yellow", Verdict.FAIL: "bold red"}


def render(findings: Sequence[Finding], out: TextIO) -> None:
    """One row per finding, then a count per verdict."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("check", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    table.add_column("what was found / what to do", overflow="fold")
    for finding in findings:
        # Text, not strings: rich would read "[storage] path" in a detail as markup and drop it.
        verdict = Text(finding.verdict.value, style=_STYLES[finding.verdict])
        table.add_row(Text(finding.check), verdict, Text(finding.detail))
    console = Console(file=out, width=None if out.isatty() else 160, highlight=False)
    console.print(table)
    counts = Counter(finding.verdict for finding in findings)
    console.print(Text(", ".join(f"{counts[verdict]} {verdict.value}" for verdict in Verdict)))


def failed(findings: Sequence[Finding]) -> bool:
    return any(finding.verdict is Verdict.FAIL for finding in findings)
