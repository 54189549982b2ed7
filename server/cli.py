"""The `vlbridge` command line: serve, check-config, make-demo-model."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from server.config import load_config
from server.errors import ConfigError
from server.logs import configure_logging

log = logging.getLogger("vlbridge")


def _serve(args: argparse.Namespace) -> int:
    from server.app import create_app
    from server.backend import build_executor
    from server.runner import Server, uvicorn_config

    config = load_config(args.config, os.environ)
    if args.host:
        config = config.model_copy(update={"server": config.server.model_copy(update={"host": args.host})})
    if args.port is not None:
        config = config.model_copy(update={"server": config.server.model_copy(update={"port": args.port})})
    app = create_app(config, build_executor(config))
    log.info(
        "vlbridge listening on http://%s:%d (WebSocket ws://%s:%d/ws)",
        config.server.host,
        config.server.port,
        config.server.host,
        config.server.port,
    )
    server = Server(uvicorn_config(app, config), app.state.service)
    server.run()
    return 0


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(args.file, os.environ)
    print(
        f"{args.file}: OK (server {config.server.host}:{config.server.port}, "
        f"model {config.model.path or 'demo'}, feishu {'on' if config.feishu.enabled else 'off'})"
    )
    return 0


def _make_demo_model(args: argparse.Namespace) -> int:
    from server.inference.demo_model import build_demo_model

    path = build_demo_model(args.dir, seed=args.seed)
    print(f"demo model written to {path} (random weights: its answers are gibberish)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlbridge", description="Qwen3-VL in Feishu/Lark chats")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the service")
    serve.add_argument("--config", default=None, help="TOML config file (default: built-in defaults)")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check-config", help="validate a config file without starting anything")
    check.add_argument("file")
    check.set_defaults(func=_check_config)

    demo = sub.add_parser("make-demo-model", help="build the tiny offline demo checkpoint")
    demo.add_argument("dir")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_make_demo_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"vlbridge: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
