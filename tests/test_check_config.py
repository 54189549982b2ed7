"""`vlbridge check-config` refuses what `vlbridge serve` refuses, environment included; the CLI's
version, help texts and default config file. End to end: the command as a subprocess."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # seconds a refusing command may take on a busy machine (it loads nothing)


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """`vlbridge ARGS` with exactly the VLBRIDGE_* variables of *env* (none of the caller's)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("VLBRIDGE_")}
    base["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**base, **(env or {})},
        timeout=TIMEOUT,
    )


def refused(result: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a refusing command (exit status 2, no traceback)."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("vlbridge: config error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def checkpoint(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen3_vl"}')
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    return folder


# (config text, environment, words of the one error line); {tmp} is the test's folder
REFUSED = {
    "feishu without app id": (
        "[feishu]\nenabled = true\n",
        {},
        "feishu.app_id and VLBRIDGE_FEISHU_APP_SECRET",
    ),
    "feishu without secret": (
        '[feishu]\nenabled = true\napp_id = "cli_x"\n',
        {},
        "VLBRIDGE_FEISHU_APP_SECRET are required",
    ),
    "webhook without keys": (
        '[feishu]\nenabled = true\napp_id = "cli_x"\nmode = "webhook"\n',
        {"VLBRIDGE_FEISHU_APP_SECRET": "s"},
        "webhook needs VLBRIDGE_FEISHU_ENCRYPT_KEY",
    ),
    "model folder missing": ('[model]\npath = "{tmp}/no-such-model"\n', {}, "no-such-model' does not exist"),
    "relative model folder missing": ('[model]\npath = "./models/qwen"\n', {}, "does not exist"),
    "model folder not a checkpoint": ('[model]\npath = "{tmp}"\n', {}, "has no config.json"),
    "model path a file": ('[model]\npath = "{tmp}/vlbridge.toml"\n', {}, "is not a folder"),
    "storage under a file": ('[storage]\npath = "{tmp}/vlbridge.toml/data"\n', {}, "storage.path"),
    "openai backend without URLs": ('[model]\nbackend = "openai"\n', {}, "model.base_urls"),
    "redis URL": (
        '[storage]\nbackend = "redis"\nredis_url = "localhost:6379"\n',
        {},
        "storage.redis_url: expected a URL",
    ),
    "empty auth token": ('[server]\nauth_tokens = ["a", ""]\n', {}, "server.auth_tokens: expected tokens"),
    "unknown variable": ("", {"VLBRIDGE_SERVER_PROT": "9000"}, "did you mean VLBRIDGE_SERVER_PORT?"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_check_config_refuses(tmp_path: Path, case: str) -> None:
    text, env, words = REFUSED[case]
    config = tmp_path / "vlbridge.toml"
    config.write_text(text.replace("{tmp}", str(tmp_path)))
    line = refused(cli("check-config", str(config), env=env))
    assert words in line, line


@pytest.mark.parametrize("case", ["feishu without secret", "model folder missing", "storage under a file"])
def test_serve_refuses_the_same_with_the_same_line(tmp_path: Path, case: str) -> None:
    """One shared check: serve stops with check-config's line, before a model loads or a port opens."""
    text, env, _ = REFUSED[case]
    config = tmp_path / "vlbridge.toml"
    config.write_text(text.replace("{tmp}", str(tmp_path)))
    checked = refused(cli("check-config", str(config), env=env))
    served = cli("serve", "--config", str(config), "--port", "0", env=env)
    assert refused(served) == checked
    assert "executor ready" not in served.stderr and "listening" not in served.stderr


def test_check_config_accepts_a_checkpoint_folder_and_a_hub_id(tmp_path: Path) -> None:
    model = checkpoint(tmp_path / "ckpt")
    config = tmp_path / "vlbridge.toml"
    config.write_text(f'[model]\npath = "{model}"\n')
    local = cli("check-config", str(config))
    assert local.returncode == 0 and "OK" in local.stdout, local.stderr
    hub = cli("check-config", str(config), env={"VLBRIDGE_MODEL_PATH": "Qwen/Qwen3-VL-2B-Instruct"})
    assert hub.returncode == 0 and "Qwen/Qwen3-VL-2B-Instruct" in hub.stdout, hub.stderr


def test_variables_read_elsewhere_are_no_error(tmp_path: Path) -> None:
    env = {"VLBRIDGE_TOKEN": "for chat", "VLBRIDGE_CONFIG": "for compose", "VLBRIDGE_MODEL_API_KEY": "k"}
    result = cli("check-config", str(ROOT / "vlbridge.toml"), env=env)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"VLBRIDGE_SERVER_PORT": "http"}, "environment VLBRIDGE_SERVER_PORT: "),
        (
            {"VLBRIDGE_MODEL_DEVICE": "tpu"},
            "environment VLBRIDGE_MODEL_DEVICE: expected auto|cpu|cuda|cuda:N",
        ),
        (
            {"VLBRIDGE_SERVER_AUTH_TOKENS": '["a", '},
            "environment VLBRIDGE_SERVER_AUTH_TOKENS: not a valid JSON",
        ),
        ({"VLBRIDGE_MODEL_PATH": "/no/such/model"}, "environment VLBRIDGE_MODEL_PATH: '/no/such/model'"),
    ],
)
def test_a_bad_value_from_the_environment_names_the_variable_not_the_file(
    tmp_path: Path, env: dict[str, str], words: str
) -> None:
    config = tmp_path / "mine.toml"
    config.write_text("[server]\nport = 8000\n")
    line = refused(cli("check-config", str(config), env=env))
    assert words in line and "mine.toml" not in line, line


def test_check_config_reads_the_working_directorys_vlbridge_toml(tmp_path: Path) -> None:
    (tmp_path / "vlbridge.toml").write_text("[server]\nport = 65536\n")
    line = refused(cli("check-config", cwd=tmp_path))
    assert "vlbridge.toml: server.port" in line, line


def test_serve_reads_the_working_directorys_vlbridge_toml_and_says_so(tmp_path: Path) -> None:
    (tmp_path / "vlbridge.toml").write_text('[model]\npath = "./no-such-model"\n[server]\nport = 0\n')
    # --port 0: the code before this test's fix ignored the file and started serving
    result = cli("serve", "--port", "0", cwd=tmp_path, env={"VLBRIDGE_STORAGE_PATH": str(tmp_path)})
    assert "configuration: vlbridge.toml with environment VLBRIDGE_STORAGE_PATH" in result.stderr
    assert "vlbridge.toml: model.path: './no-such-model' does not exist" in refused(result)


def test_serve_says_when_it_runs_on_the_built_in_defaults(tmp_path: Path) -> None:
    result = cli("serve", "--port", "0", cwd=tmp_path, env={"VLBRIDGE_FEISHU_ENABLED": "true"})
    assert "configuration: built-in defaults with environment VLBRIDGE_FEISHU_ENABLED" in result.stderr
    refused(result)


def test_version() -> None:
    from importlib.metadata import version

    result = cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"vlbridge {version('vlbridge')}"


def _parsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(parser.prog, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _parsers(sub)
    return found


def test_every_option_of_every_command_has_help() -> None:
    parsers = _parsers(build_parser())
    assert len(parsers) >= 7  # vlbridge and its commands
    missing = [
        f"{prog} {'/'.join(action.option_strings) or action.dest}"
        for prog, parser in parsers
        for action in parser._actions
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert missing == []
