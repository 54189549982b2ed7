"""Which torch build `make` installs: the CPU build on machines without an NVIDIA GPU, else CUDA.

PyPI's torch for Linux is the CUDA build: it pulls several GB of CUDA libraries (``cuda-toolkit``,
``nvidia-cudnn-cu13``, ...) that a machine without an NVIDIA GPU never uses. The CPU build
(``torch==X+cpu``, ~200 MB) lives on PyTorch's own index. macOS and Windows wheels on PyPI hold no
CUDA libraries, so there PyPI's torch is right either way.

Standard library only: it runs before the project's dependencies exist. Prints the pip arguments
for the torch install on stdout (one line) and what it picked, and why, on stderr:

    python3 scripts/torch_choice.py [--build auto|cpu|cuda] [--python PYTHON]

``--build`` (the Makefile's ``TORCH``, or ``TORCH_BUILD`` in the environment) overrides the
detection. Exit status 1, with a sentence saying what to do, when the CPU build is wanted but
neither a local copy nor PyTorch's index can be reached.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TORCH_VERSION = "2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CPU_INDEX_HOST = "download.pytorch.org"
NVIDIA_PCI_VENDOR = "0x10de"
# PCI class 0x03xxxx: display controllers (VGA 0x0300, 3D controller 0x0302: data-centre GPUs).
DISPLAY_CLASS = "0x03"


class ChoiceError(Exception):
    """The wanted build cannot be installed from here; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Choice:
    build: str  # "cpu" or "cuda"
    pip_args: tuple[str, ...]  # what follows `pip install`
    reason: str


@dataclass(frozen=True, slots=True)
class Machine:
    system: str  # platform.system(): "Linux", "Darwin", "Windows"
    gpu: str | None  # what showed an NVIDIA GPU (a sentence), None when nothing did


def choose(
    build: str,
    machine: Machine,
    local_cpu_wheel: Callable[[str], bool],
    index_reachable: Callable[[], bool],
) -> Choice:
    """The torch requirement and pip options for ``build`` (auto, cpu or cuda) on ``machine``.

    ``local_cpu_wheel(requirement)`` says whether pip can install the CPU build without any index
    (a find-links folder, or already installed); ``index_reachable()`` whether PyTorch's CPU index
    answers. They are asked only when needed, in that order, so a local wheel never waits on an
    unreachable index (pip would retry it five times, and a silent host for minutes each).
    Raises `ChoiceError` when the CPU build is wanted on Linux and neither is available.
    """
    if build not in ("auto", "cpu", "cuda"):
        raise ChoiceError(f"TORCH must be auto, cpu or cuda, got {build!r}")
    plain = f"torch=={TORCH_VERSION}"
    if machine.system != "Linux":
        return Choice("cpu", (plain,), f"PyPI's torch for {machine.system} holds no CUDA libraries")
    if build == "cuda":
        return Choice("cuda", (plain,), "TORCH=cuda asked for PyPI's CUDA build")
    if build == "auto" and machine.gpu:
        return Choice("cuda", (plain,), f"{machine.gpu}: PyPI's CUDA build")
    why = "TORCH=cpu asked for the CPU build" if build == "cpu" else "no NVIDIA GPU found"
    requirement = f"{plain}+cpu"
    if local_cpu_wheel(requirement):
        return Choice("cpu", (requirement,), f"{why}; the CPU build is available locally")
    if index_reachable():
        return Choice(
            "cpu", ("--extra-index-url", CPU_INDEX, requirement), f"{why}; the CPU build from {CPU_INDEX}"
        )
    raise ChoiceError(
        f"{why}, but {CPU_INDEX} cannot be reached and no local {requirement} wheel was found: "
        f"make that index reachable, put the wheel in a pip find-links folder, or install PyPI's "
        f"CUDA build anyway (several GB) with TORCH=cuda"
    )


def nvidia_gpu(root: Path = Path("/"), smi: str | None = None) -> str | None:
    """A sentence naming what shows an NVIDIA GPU on this machine, or None.

    Asks `nvidia-smi -L` first (driver installed and working), then the driver's
    /proc/driver/nvidia/gpus, then the PCI bus (a GPU whose driver is not installed yet:
    the CUDA build is still what it will need).
    """
    if smi:
        try:
            listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            listed = None
        if listed is not None and listed.returncode == 0 and "GPU" in listed.stdout:
            return f"nvidia-smi lists {listed.stdout.strip().splitlines()[0]}"
    gpus = root / "proc/driver/nvidia/gpus"
    if gpus.is_dir() and any(gpus.iterdir()):
        return f"{gpus} lists a GPU"
    devices = root / "sys/bus/pci/devices"
    if devices.is_dir():
        for device in sorted(devices.iterdir()):
            if _read(device / "vendor") == NVIDIA_PCI_VENDOR and _read(device / "class").startswith(
                DISPLAY_CLASS
            ):
                return f"PCI device {device.name} is an NVIDIA GPU"
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip().lower()
    except OSError:
        return ""


def pip_can_install_offline(python: str, requirement: str) -> bool:
    """Whether pip finds ``requirement`` without any index (find-links, or installed already)."""
    try:
        done = subprocess.run(
            [python, "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps", "--quiet", requirement],
            capture_output=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to host:port opens within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the pip arguments for the torch build to install.")
    parser.add_argument(
        "--build",
        default=os.environ.get("TORCH_BUILD") or "auto",
        help="auto (the default: CUDA when an NVIDIA GPU is found), cpu or cuda",
    )
    parser.add_argument("--python", default=sys.executable, help="the interpreter pip installs into")
    args = parser.parse_args(argv)
    machine = Machine(platform.system(), nvidia_gpu(smi=shutil.which("nvidia-smi")))
    try:
        choice = choose(
            args.build,
            machine,
            lambda requirement: pip_can_install_offline(args.python, requirement),
            lambda: reachable(CPU_INDEX_HOST),
        )
    except ChoiceError as exc:
        print(f"torch: {exc}", file=sys.stderr)
        return 1
    print(
        f"torch: the {choice.build.upper()} build ({choice.reason}); override with TORCH=cpu|cuda",
        file=sys.stderr,
    )
    print(" ".join(choice.pip_args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
