"""docker/sysctl.conf names settings this kernel has, and none of the folklore docs/deploy.md warns about."""

from __future__ import annotations

from pathlib import Path

SYSCTL = Path(__file__).resolve().parents[1] / "docker" / "sysctl.conf"


def settings() -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in SYSCTL.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    return {key.strip(): value.strip() for key, value in pairs}


def test_every_key_is_a_kernel_setting_and_the_removed_ones_are_absent() -> None:
    found = settings()
    assert "net.core.somaxconn" in found
    for key in found:
        if key.startswith("net.netfilter."):
            continue  # exists only once the nf_conntrack module is loaded
        assert Path("/proc/sys", *key.split(".")).exists(), f"{key}: no such kernel setting here"
    # removed in Linux 4.12 (sysctl -p would stop at it); lowered keepalives fight the ping
    assert not {"net.ipv4.tcp_tw_recycle", "net.ipv4.tcp_keepalive_time"} & found.keys()
