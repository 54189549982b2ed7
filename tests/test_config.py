from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.config import load_config
from server.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vlbridge.toml"
    path.write_text(text)
    return path


def test_example_config_loads_with_documented_defaults() -> None:
    config = load_config(ROOT / "vlbridge.toml")
    assert config.server.ping_interval == 45.0
    assert config.server.ping_timeout == 10.0
    assert config.server.max_image_bytes == 20 * 1024 * 1024
    assert config.model.path == ""
    assert config.feishu.domain == "https://open.feishu.cn"
    assert config.feishu.mode == "longconn"


def test_defaults_without_a_file() -> None:
    config = load_config(None)
    assert config.server.auth_tokens == ()
    assert config.executor.max_batch >= 1


def test_misspelled_key_names_file_key_and_the_known_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nprot = 8000\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "server.prot" in message
    assert "unknown key" in message
    assert "port" in message
    assert "\n" not in message


def test_wrong_type_names_key_expectation_and_finding(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nport = "eighty"\n')
    with pytest.raises(ConfigError, match=r"server\.port: .*integer.*found str 'eighty'"):
        load_config(path)


def test_unknown_section_and_bad_enum(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown section \[sever\]"):
        load_config(write(tmp_path, "[sever]\nport = 1\n"))
    with pytest.raises(ConfigError, match=r"model\.device: expected auto\|cpu\|cuda\|cuda:N"):
        load_config(write(tmp_path, '[model]\ndevice = "tpu"\n'))
    with pytest.raises(ConfigError, match=r"feishu\.mode"):
        load_config(write(tmp_path, '[feishu]\nmode = "polling"\n'))


def test_secret_in_file_is_refused_and_env_supplies_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="VLBRIDGE_FEISHU_APP_SECRET"):
        load_config(write(tmp_path, '[feishu]\napp_secret = "s3cret"\n'))
    config = load_config(None, {"VLBRIDGE_FEISHU_APP_SECRET": "s3cret"})
    assert config.feishu.app_secret.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(config)
    assert "s3cret" not in str(config.model_dump())


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nport = 8000\nauth_tokens = ["a"]\n')
    env = {
        "VLBRIDGE_SERVER_PORT": "9001",
        "VLBRIDGE_SERVER_AUTH_TOKENS": "x,y",
        "VLBRIDGE_FEISHU_ENABLED": "true",
        "VLBRIDGE_EXECUTOR_REQUEST_TIMEOUT": "12.5",
        "VLBRIDGE_TOKEN": "read by `vlbridge chat`, not a config key",
    }
    config = load_config(path, env)
    assert config.server.port == 9001
    assert config.server.auth_tokens == ("x", "y")
    assert config.feishu.enabled is True
    assert config.executor.request_timeout == 12.5
    with pytest.raises(ConfigError, match=r"^environment VLBRIDGE_SERVER_PORT: "):
        load_config(path, {"VLBRIDGE_SERVER_PORT": "http"})


def test_environment_sets_a_key_that_takes_a_number_or_a_word(tmp_path: Path) -> None:
    """`int | "auto"`: the string becomes the type that takes it (a number was refused before)."""
    assert load_config(None, {"VLBRIDGE_MODEL_CPU_THREADS": "3"}).model.cpu_threads == 3
    assert load_config(None, {"VLBRIDGE_MODEL_CPU_THREADS": "auto"}).model.cpu_threads == "auto"
    with pytest.raises(ConfigError, match=r"^environment VLBRIDGE_MODEL_CPU_THREADS: "):
        load_config(None, {"VLBRIDGE_MODEL_CPU_THREADS": "many"})


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def test_check_config_command(tmp_path: Path) -> None:
    ok = run_cli("check-config", str(ROOT / "vlbridge.toml"))
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    bad = run_cli("check-config", str(write(tmp_path, "[model]\nmax_new_tokens = 'many'\n")))
    assert bad.returncode != 0
    assert "model.max_new_tokens" in bad.stderr
    typo = run_cli("check-config", str(write(tmp_path, "[executor]\nmax_bacth = 4\n")))
    assert typo.returncode != 0
    assert "executor.max_bacth" in typo.stderr
