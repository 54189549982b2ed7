"""Plot bench/serve.py results: req/s and client TTFT p95 per system and concurrency, several runs.

python bench/plot_serve.py --out plot.png LABEL=serve-2b.json [LABEL=serve-2b.json ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SYSTEMS = ("executor", "ws", "ws1", "openai")  # ws1: WebSocket clients all in one process
TARGETS = {"2b": 40.0, "8b": 20.0, "30b-a3b": 20.0}  # req/s through the server at c=64 (issue 18)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", help="LABEL=path of a bench/serve.py json")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate, ttft) = plt.subplots(1, 2, figsize=(11, 3.8))
    styles = ["o-", "s--", "^:", "d-."]
    info: dict[str, str] = {}
    for number, spec in enumerate(args.runs):
        label, path = spec.split("=", 1)
        data = json.loads(Path(path).read_text())
        info = data.get("info", info)
        for system in SYSTEMS:
            levels = sorted((int(c), r) for c, r in (data.get(system) or {}).items() if r and "rps" in r)
            if not levels:
                continue
            x = [c for c, _ in levels]
            name = f"{system} ({label})"
            style = styles[number % len(styles)]
            rate.plot(x, [r["rps"] for _, r in levels], style, label=name)
            ttft.plot(x, [r["ttft_p95"] for _, r in levels], style, label=name)
    for ax, ylabel in ((rate, "requests/s"), (ttft, "TTFT p95 at the client (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(
            f"Qwen3-VL {info.get('model', '')} ({info.get('gpu', info.get('device', ''))}), random weights"
        )
    if info.get("model") in TARGETS:  # the targets through the server
        rate.axhline(TARGETS[info["model"]], color="grey", linewidth=0.8)
    if info.get("model") == "2b":
        ttft.axhline(0.6, color="grey", linewidth=0.8)
    rate.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
