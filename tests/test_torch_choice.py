"""scripts/torch_choice.py: which torch build `make` installs, from the machine and TORCH."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from scripts.torch_choice import (
    CPU_INDEX,
    ChoiceError,
    Machine,
    choose,
    nvidia_gpu,
    pip_can_install_offline,
    reachable,
)

ROOT = Path(__file__).resolve().parent.parent
LINUX = Machine("Linux", None)
LINUX_GPU = Machine("Linux", "nvidia-smi lists GPU 0: NVIDIA H200")
CPU = "torch==2.13.0+cpu"
CUDA = "torch==2.13.0"


class Probes:
    """Answers for the two probes, recording which were asked."""

    def __init__(self, local: bool, index: bool) -> None:
        self.local, self.index = local, index
        self.asked: list[str] = []

    def local_wheel(self, requirement: str) -> bool:
        self.asked.append(f"local {requirement}")
        return self.local

    def index_reachable(self) -> bool:
        self.asked.append("index")
        return self.index


def pick(build: str, machine: Machine, probes: Probes) -> tuple[str, tuple[str, ...]]:
    choice = choose(build, machine, probes.local_wheel, probes.index_reachable)
    return choice.build, choice.pip_args


def test_cpu_machine_prefers_the_local_wheel_and_never_asks_the_index() -> None:
    probes = Probes(local=True, index=True)
    assert pick("auto", LINUX, probes) == ("cpu", (CPU,))
    assert probes.asked == [f"local {CPU}"]


def test_cpu_machine_without_a_local_wheel_uses_the_pytorch_cpu_index() -> None:
    probes = Probes(local=False, index=True)
    assert pick("auto", LINUX, probes) == ("cpu", ("--extra-index-url", CPU_INDEX, CPU))


def test_cpu_build_that_cannot_be_reached_is_an_error_saying_what_to_do() -> None:
    with pytest.raises(ChoiceError, match=r"cannot be reached.*TORCH=cuda"):
        choose("auto", LINUX, Probes(False, False).local_wheel, Probes(False, False).index_reachable)


def test_gpu_machine_gets_pypis_cuda_build_without_probing() -> None:
    probes = Probes(local=True, index=True)
    choice = choose("auto", LINUX_GPU, probes.local_wheel, probes.index_reachable)
    assert (choice.build, choice.pip_args) == ("cuda", (CUDA,))
    assert "NVIDIA H200" in choice.reason
    assert probes.asked == []


def test_overrides_win_over_detection() -> None:
    assert pick("cpu", LINUX_GPU, Probes(local=True, index=False)) == ("cpu", (CPU,))
    assert pick("cuda", LINUX, Probes(local=True, index=True)) == ("cuda", (CUDA,))


@pytest.mark.parametrize("system", ["Darwin", "Windows"])
@pytest.mark.parametrize("build", ["auto", "cpu"])
def test_macos_and_windows_take_pypis_torch_which_has_no_cuda(system: str, build: str) -> None:
    probes = Probes(local=False, index=False)
    assert pick(build, Machine(system, None), probes) == ("cpu", (CUDA,))
    assert probes.asked == []


def test_an_unknown_build_is_refused() -> None:
    with pytest.raises(ChoiceError, match="auto, cpu or cuda"):
        pick("rocm", LINUX, Probes(True, True))


def pci_device(root: Path, name: str, vendor: str, klass: str) -> None:
    device = root / "sys/bus/pci/devices" / name
    device.mkdir(parents=True)
    (device / "vendor").write_text(vendor + "\n")
    (device / "class").write_text(klass + "\n")


def test_gpu_detection_reads_the_pci_bus(tmp_path: Path) -> None:
    pci_device(tmp_path, "0000:00:03.0", "0x1af4", "0x020000")  # a virtio NIC
    pci_device(tmp_path, "0000:00:04.0", "0x10de", "0x040300")  # NVIDIA HDMI audio: not a GPU
    assert nvidia_gpu(tmp_path) is None
    pci_device(tmp_path, "0000:17:00.0", "0x10de", "0x030200")  # a 3D controller (H100, H200)
    assert nvidia_gpu(tmp_path) == "PCI device 0000:17:00.0 is an NVIDIA GPU"


def test_gpu_detection_reads_the_driver_and_nvidia_smi(tmp_path: Path) -> None:
    assert nvidia_gpu(tmp_path) is None
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-1234)'\n")
    smi.chmod(0o755)
    assert nvidia_gpu(tmp_path, str(smi)) == "nvidia-smi lists GPU 0: NVIDIA H200 (UUID: GPU-1234)"
    broken = tmp_path / "broken-smi"  # installed, but the driver does not answer
    broken.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    broken.chmod(0o755)
    assert nvidia_gpu(tmp_path, str(broken)) is None
    (tmp_path / "proc/driver/nvidia/gpus/0000:17:00.0").mkdir(parents=True)
    assert nvidia_gpu(tmp_path, str(broken)) is not None


def test_reachable_is_a_quick_tcp_probe() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert reachable("127.0.0.1", port)
    started = time.monotonic()
    assert not reachable("127.0.0.1", port)  # closed now: refused at once
    assert not reachable("host.invalid", 443, timeout=3.0)  # no such name (RFC 2606)
    assert time.monotonic() - started < 30


def fake_wheel(folder: Path, name: str, version: str) -> None:
    """A minimal wheel pip's resolver accepts (METADATA, WHEEL, RECORD)."""
    dist = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        wheel.writestr(
            f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{dist}/RECORD", "")


def test_pip_finds_a_wheel_in_find_links_without_an_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_wheel(tmp_path, "vlbridge_probe", "1.0+cpu")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    assert pip_can_install_offline(sys.executable, "vlbridge_probe==1.0+cpu")
    assert not pip_can_install_offline(sys.executable, "vlbridge_probe==2.0+cpu")


def test_the_script_prints_pip_arguments_and_why() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts/torch_choice.py"), "--build", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [CUDA]
    assert "CUDA build (TORCH=cuda asked for PyPI's CUDA build)" in done.stderr
    refused = subprocess.run(
        [sys.executable, str(ROOT / "scripts/torch_choice.py"), "--build", "rocm"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert refused.returncode == 1
    assert "TORCH must be auto, cpu or cuda" in refused.stderr
