"""Turn bench/executor.py JSON results into a markdown report and a plot.

    python bench/report.py bench/results/executor-2b-h100-2026-11-24.json [...] \
        --md bench/results/executor-h100-2026-11-24.md --plot bench/results/executor-h100-2026-11-24.png
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.executor import print_table


def load(path: str) -> tuple[dict[str, Any], dict[str, dict[int, dict[str, Any]]]]:
    data = json.loads(Path(path).read_text())
    results = {system: {int(c): r for c, r in levels.items()} for system, levels in data["results"].items()}
    return data["info"], results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="+")
    parser.add_argument("--md", required=True)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    runs = [load(path) for path in args.results]
    parts = []
    for (info, results), path in zip(runs, args.results, strict=True):
        levels = sorted({c for by_level in results.values() for c in by_level})
        buffer = io.StringIO()
        with redirect_stdout(buffer):
            print_table(info, {k: v for k, v in results.items() if v}, levels)
        title = f"## {info['model']} ({Path(path).name}, torch {info.get('torch')})"
        parts.append(f"{title}\n{buffer.getvalue()}")
    Path(args.md).write_text("\n".join(parts))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(runs), 2, figsize=(11, 3.6 * len(runs)), squeeze=False)
        for row, (info, results) in enumerate(runs):
            for system, by_level in results.items():
                points = sorted((c, r) for c, r in by_level.items() if r and "rps" in r)
                if not points:
                    continue
                levels = [c for c, _ in points]
                style = "o-" if system == "vlbridge" else "s--"
                axes[row][0].plot(levels, [r["rps"] for _, r in points], style, label=system)
                axes[row][1].plot(levels, [r["lat_p95"] for _, r in points], style, label=system)
            for col, label in enumerate(("requests/s", "p95 latency (s)")):
                ax = axes[row][col]
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("concurrent clients")
                ax.set_ylabel(label)
                ax.set_title(f"Qwen3-VL {info['model']} ({info.get('gpu', info['device'])}), random weights")
                ax.grid(True, which="both", alpha=0.3)
            axes[row][0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
