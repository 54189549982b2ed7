"""Summarise py-spy's folded stacks (`--format raw --threads`): the share of samples per thread, and
per thread the functions seen most (self time: a stack's last frame; inclusive: any frame).

python bench/gil_summary.py gil-ws.txt [gil-arriving.txt ...]
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "/server/", "/bench/", "/bot/", "/protocol/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['name']} ({path})"


def summarise(path: Path, top: int = 12) -> str:
    threads: Counter[str] = Counter()
    own: dict[str, Counter[str]] = {}
    inclusive: dict[str, Counter[str]] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = re.sub(r"^thread \(0x[0-9a-fA-F]+\): |^thread \(\d+\): ", "", frames[0])
        thread = re.sub(r"_\d+$|-\d+(?= )|\(\d+\)", "", thread)
        n = int(count)
        threads[thread] += n
        own.setdefault(thread, Counter())[_short(frames[-1])] += n
        seen = {_short(f) for f in frames[1:]}
        for frame in seen:
            inclusive.setdefault(thread, Counter())[frame] += n
    total = sum(threads.values()) or 1
    lines = [f"== {path.name}: {total} samples holding the GIL"]
    for thread, n in threads.most_common():
        lines.append(f"{100 * n / total:5.1f}%  {thread}")
    for thread, _ in threads.most_common(4):
        lines.append(f"-- {thread}: most inclusive")
        for frame, k in inclusive[thread].most_common(top):
            lines.append(f"  {100 * k / total:5.1f}%  {frame}")
        lines.append(f"-- {thread}: most self")
        for frame, k in own[thread].most_common(top):
            lines.append(f"  {100 * k / total:5.1f}%  {frame}")
    return "\n".join(lines)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(summarise(Path(name)))
