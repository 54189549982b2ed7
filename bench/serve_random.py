"""`vlbridge serve` over a random-weight model built in GPU memory: no checkpoint on disk.

    python bench/serve_random.py 30b-a3b DEMO_DIR      # environment as for `vlbridge serve`

For architectures too big to write to the benchmark machine's disk (30B-A3B: 58 GiB) and to
save minutes of writing and reading for the others. The service is unchanged; only its
loader returns the in-memory model (bench/architectures.py) for whatever model.path says.
bench/serve.py starts it with `--weights memory`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    name, demo = sys.argv[1], Path(sys.argv[2])
    from bench.architectures import load_in_memory
    from server.cli import main as serve
    from server.inference.model import runner

    def load(path: str, device: str = "auto", dtype: str = "auto", *progress: Any) -> Any:
        return load_in_memory(name, demo, "bfloat16" if dtype == "auto" else dtype)

    setattr(runner, "load_model", load)  # noqa: B010  # the one place the service loads weights
    return serve(["serve"])


if __name__ == "__main__":
    sys.exit(main())
