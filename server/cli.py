"""The `vlbridge` command line: serve, check-config, doctor, inbox, make-demo-model, chat."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from bot.inbox import StorageError
from server.config import Config, env_name, load_config
from server.errors import ConfigError, ListenError, ModelLoadError
from server.logs import configure_logging

if TYPE_CHECKING:
    from server.inference.executor import InferenceExecutor

log = logging.getLogger("vlbridge")

DEFAULT_CONFIG = "vlbridge.toml"  # read from the working directory when no --config is given
CONFIG_HELP = f"TOML config file (default: ./{DEFAULT_CONFIG} when it exists, else the built-in defaults)"


def _config_path(given: str | None) -> str | None:
    """*given*, else ./vlbridge.toml when it exists, else None (the built-in defaults)."""
    if given is not None:
        return given
    return DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None


def _read_config(given: str | None) -> Config:
    """The config `vlbridge serve --config GIVEN` would run with; raises `ConfigError`."""
    return load_config(_config_path(given), os.environ)


def _config_read(config: Config) -> str:
    """Which file (or the defaults) and which variables made *config*, for a log line."""
    where = "built-in defaults" if config.source == "<defaults>" else config.source
    if config.from_env:
        names = ", ".join(env_name(*key.split(".", 1)) for key in config.from_env)
        where += f" with environment {names}"
    return where


def _serve(args: argparse.Namespace) -> int:
    from server.app import create_app
    from server.backend import build_executor
    from server.inference.executor import InferenceExecutor
    from server.preflight import check_startable
    from server.webserver import Server, listen, uvicorn_config

    config = _read_config(args.config)
    log.info("configuration: %s", _config_read(config))
    if args.host:
        config = config.model_copy(update={"server": config.server.model_copy(update={"host": args.host})})
    if args.port is not None:
        config = config.model_copy(update={"server": config.server.model_copy(update={"port": args.port})})
    check_startable(config)  # what check-config refuses, refused before anything loads
    # Then the port: a port in use is known in a millisecond, not after minutes of loading.
    sock = listen(config.server.host, config.server.port)
    from bot.feishu import build_adapter
    from server.answers import AnswerGateway

    executor = build_executor(config)
    answers = AnswerGateway(executor)
    adapter = build_adapter(config, answers.route("feishu"))
    app = create_app(config, answers, [adapter] if adapter is not None else [])
    port = sock.getsockname()[1]
    log.info(
        "vlbridge listening on http://%s:%d (WebSocket ws://%s:%d/ws)",
        config.server.host,
        port,
        config.server.host,
        port,
    )
    # A model that cannot load ends the process (non-zero), so that a restart policy sees it.
    loader = executor if isinstance(executor, InferenceExecutor) else None
    fatal = (lambda: loader.load_failure) if loader is not None else None
    server = Server(uvicorn_config(app, config), app.state.service, fatal)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        _exit_if_left_behind(loader, 130)
        raise
    _exit_if_left_behind(loader, 0)
    if server.fatal_reason is not None:
        raise ModelLoadError(server.fatal_reason)
    return 0


def _exit_if_left_behind(loader: InferenceExecutor | None, code: int) -> None:
    """Exit now when a model load was left running at shutdown: its download threads would
    otherwise hold the interpreter's exit until they end (minutes)."""
    if loader is not None and loader.left_behind:
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)


def _check_config(args: argparse.Namespace) -> int:
    from server.preflight import check_startable

    config = _read_config(args.file)
    check_startable(config)
    model = config.model
    if model.backend == "openai":
        name = model.model or model.path or "the upstreams' first"
        answers = f"model {name} at {', '.join(model.base_urls)}"
    else:
        answers = f"model {model.path or 'demo'}"
    print(
        f"{_config_read(config)}: OK (server {config.server.host}:{config.server.port}, "
        f"{answers}, feishu {'on' if config.feishu.enabled else 'off'})"
    )
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from server.doctor import diagnose, failed, render

    findings = diagnose(_config_path(args.config), os.environ, args.proxy_idle_timeout)
    render(findings, sys.stdout)
    return 1 if failed(findings) else 0


def _inbox(args: argparse.Namespace) -> int:
    from bot.inbox_admin import retry, show

    config = _read_config(args.config)
    if args.words[:1] == ["retry"] and len(args.words) == 2:
        return retry(config, args.words[1], sys.stdout, sys.stderr)
    if args.words:
        print(
            "vlbridge inbox: usage: vlbridge inbox [options] | vlbridge inbox retry MESSAGE_ID",
            file=sys.stderr,
        )
        return 2
    return show(
        config,
        sys.stdout,
        states=args.state,
        chat_id=args.chat or "",
        since=args.since,
        limit=args.limit,
        as_json=args.json,
    )


def _make_demo_model(args: argparse.Namespace) -> int:
    from server.inference.model.demo import build_demo_model

    path = build_demo_model(args.dir, seed=args.seed)
    print(f"demo model written to {path} (random weights: its answers are gibberish)")
    return 0


def _chat(args: argparse.Namespace) -> int:
    from client.command import ChatOptions, run_chat

    if args.log_level == "info":  # the chat shows connection news itself
        logging.getLogger("vlbridge.client").setLevel(logging.WARNING)
    options = ChatOptions(
        url=args.url,
        token=args.token or os.environ.get("VLBRIDGE_TOKEN") or None,
        images=args.image,
        question=" ".join(args.question) if args.question else None,
        give_up_after=args.give_up_after,
        color="NO_COLOR" not in os.environ,
        max_tokens=args.max_tokens,
    )
    return run_chat(options, sys.stdin, sys.stdout, sys.stderr)


def _positive_int(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlbridge", description="Qwen3-VL in Feishu/Lark chats")
    parser.add_argument("--version", action="version", version=f"vlbridge {_version()}")
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="log lines as (default: %(default)s)"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="least severity logged (default: %(default)s)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")

    serve = sub.add_parser(
        "serve",
        help="run the service",
        description="Run the service with the config file (and VLBRIDGE_<SECTION>_<KEY> overrides).",
    )
    serve.add_argument("--config", default=None, help=CONFIG_HELP)
    serve.add_argument("--host", default=None, help="address to listen on (default: [server] host)")
    serve.add_argument("--port", type=int, default=None, help="port to listen on (default: [server] port)")
    serve.set_defaults(func=_serve)

    check = sub.add_parser(
        "check-config",
        help="refuse what `vlbridge serve` would refuse, without starting anything",
        description="Check a config file and the VLBRIDGE_* environment as `vlbridge serve` would at "
        "start (the model folder, Feishu credentials, storage), without loading or connecting anything.",
        epilog="exit status: 0 serve would start, 2 it would refuse (the reason is printed)",
    )
    check.add_argument("file", nargs="?", default=None, help=CONFIG_HELP)
    check.set_defaults(func=_check_config)

    doctor = sub.add_parser(
        "doctor",
        help="check a deployment from inside: config, model, storage, Feishu, proxy timeout",
        description="Check what `vlbridge serve --config FILE` would need, beside the running service "
        "or before it starts; one line per check (ok, warn, FAIL and what to do).",
        epilog="exit status: 0 nothing failed (warnings allowed), 1 a check failed",
    )
    doctor.add_argument("--config", default=None, help=CONFIG_HELP)
    doctor.add_argument(
        "--proxy-idle-timeout",
        type=float,
        default=None,
        metavar="S",
        help="idle timeout of the proxy or load balancer in front (nginx proxy_read_timeout, "
        "HAProxy timeout tunnel), checked against the WebSocket pings",
    )
    doctor.set_defaults(func=_doctor)

    inbox = sub.add_parser(
        "inbox",
        help="list the Feishu messages the service accepted (state, age, attempts, reason); retry one",
        description="List accepted messages, newest first; `vlbridge inbox retry MESSAGE_ID` queues a "
        "failed one again for the running service.",
    )
    inbox.add_argument("words", nargs="*", metavar="retry MESSAGE_ID", help="re-queue a failed message")
    inbox.add_argument("--config", default=None, help=CONFIG_HELP + "; for [storage]")
    inbox.add_argument(
        "--state",
        action="append",
        default=[],
        choices=("received", "running", "answered", "failed", "ignored"),
        help="only messages in this state (repeatable)",
    )
    inbox.add_argument("--chat", default=None, metavar="ID", help="only this chat")
    inbox.add_argument(
        "--since", default=None, metavar="AGE", help="only messages received within AGE (90s, 15m, 1h, 2d)"
    )
    inbox.add_argument("--limit", type=int, default=200, help="at most this many (default: %(default)s)")
    inbox.add_argument("--json", action="store_true", help="one JSON object per line")
    inbox.set_defaults(func=_inbox)

    demo = sub.add_parser("make-demo-model", help="build the tiny offline demo checkpoint")
    demo.add_argument("dir", help="folder to write the checkpoint to")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    demo.set_defaults(func=_make_demo_model)

    chat = sub.add_parser(
        "chat",
        help="ask a running server from the terminal (one question, or interactive)",
        description="Ask QUESTION (or, without one, start an interactive session) over protocol v1.",
        epilog="exit status: 0 answered, 1 the question failed, 2 bad usage or picture, "
        "3 no connection, 130 interrupted",
    )
    chat.add_argument("question", nargs="*", help="the question; none: interactive")
    chat.add_argument("--url", default="ws://127.0.0.1:8000/ws", help="default: %(default)s")
    chat.add_argument("--token", default=None, help="auth token (default: $VLBRIDGE_TOKEN)")
    chat.add_argument(
        "--image", action="append", default=[], metavar="PATH", help="a picture (repeatable; - = stdin)"
    )
    chat.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=None,
        metavar="N",
        help="answer in at most N tokens (the server may allow fewer; default: the server's length)",
    )
    chat.add_argument(
        "--give-up-after",
        type=float,
        default=120.0,
        metavar="S",
        help="stop reconnecting after S seconds without a connection (default: %(default)s)",
    )
    chat.set_defaults(func=_chat)
    return parser


def _version() -> str:
    try:
        return version("vlbridge")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(version unknown: not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"vlbridge: config error: {exc}", file=sys.stderr)
        return 2
    except StorageError as exc:
        print(f"vlbridge: storage error: {exc}", file=sys.stderr)
        return 1
    except ListenError as exc:
        print(f"vlbridge: {exc}", file=sys.stderr)
        return 1
    except ModelLoadError as exc:
        print(f"vlbridge: the model failed to load: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
