"""The Triton kernels of the CUDA paths, run on the CPU by Triton's interpreter (tests/interpreted.py):
CI has no GPU, and these kernels would otherwise be checked only on one (bench/gpu_check.py, and
against their references at every start on a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("check", ["experts", "fused", "fused-moe"])
def test_the_kernels_agree_with_their_references_in_tritons_interpreter(check: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.interpreted", check],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
