"""docker/prometheus: the scrape configuration and the alert rules, checked and unit-tested by
promtool (Debian's prometheus package, installed by .ci/system-packages).

`promtool test rules` runs docker/prometheus/alerts_test.yml: series that fire each alert and
series beside them that must not. A rule naming a metric the service does not export would
still pass there, so the metric names the rules use are also checked against the service's
registry.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

PROMETHEUS = Path(__file__).resolve().parents[1] / "docker" / "prometheus"

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None and not os.environ.get("CI"),
    reason="promtool is not installed (.ci/system-packages installs it; in CI its absence fails the test)",
)


def promtool(*args: str) -> str:
    done = subprocess.run(
        ["promtool", *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@needs_promtool
def test_rules_and_scrape_configuration_are_valid() -> None:
    assert "SUCCESS" in promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")


@needs_promtool
def test_each_alert_fires_on_its_series_and_not_beside_them() -> None:
    promtool("test", "rules", "alerts_test.yml")
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    fired = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts == fired, f"alerts without a test that fires them: {sorted(alerts - fired)}"


def test_rules_use_only_metrics_the_service_exports() -> None:
    import bot.feishu.metrics  # noqa: F401  (registers the Feishu adapter's metrics)
    from server import metrics

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
    exported = {"up"}  # Prometheus's own, per target
    for family in metrics.REGISTRY.collect():  # families without a sample yet are named too
        exported.update(family.name + suffix for suffix in suffixes.get(family.type, [""]))
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    used = {
        name
        for group in rules["groups"]
        for rule in group["rules"]
        for name in re.findall(r"\b((?:vlbridge|process)_[a-z_]+|up)\b", rule["expr"])
    }
    assert len(used) > 10, used
    assert used <= exported, f"not exported: {sorted(used - exported)}"
