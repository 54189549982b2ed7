"""The exception trees drawn in server/errors.py and client/errors.py list every exception the
project defines, under the right parent."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import client.errors
import server.errors

PACKAGES = ("server", "bot", "client", "protocol")
OPTIONAL = {"triton"}
ROOTS = ("VlbridgeError", "ClientError", "PictureRejected")


def _defined_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for package in PACKAGES:
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, f"{package}."):
            if info.name.endswith("__main__"):
                continue
            try:
                module = importlib.import_module(info.name)
            except ModuleNotFoundError as exc:  # GPU-only modules (Triton kernels) on a CPU machine
                if exc.name not in OPTIONAL:
                    raise
                continue
            for name, value in vars(module).items():
                if (
                    inspect.isclass(value)
                    and issubclass(value, BaseException)
                    and value.__module__ == info.name
                ):
                    found[name] = value
    return found


def _drawn(tree: str) -> dict[str, int]:
    """Each name in a drawn tree with its depth (the column of its first letter)."""
    drawn = {}
    for line in tree.splitlines():
        match = re.match(r"^([\s│]*(?:[├└]── )?)([A-Z][A-Za-z]+)\b", line)
        if match:
            drawn[match.group(2)] = len(match.group(1))
    return drawn


def test_every_exception_is_drawn_in_a_tree_under_its_parent() -> None:
    server_tree, client_tree = _drawn(server.errors.__doc__ or ""), _drawn(client.errors.__doc__ or "")
    assert "VlbridgeError" in server_tree and "ClientError" in client_tree
    defined = _defined_exceptions()
    assert {"VlbridgeError", "InvalidFrame", "FeishuApiError", "ClientError"} <= defined.keys()
    for name, cls in defined.items():
        tree = client_tree if issubclass(cls, client.errors.ClientError) else server_tree
        assert name in tree, f"{cls.__module__}.{name} is not drawn in the exception tree"
        parent = cls.__mro__[1].__name__
        if name not in ROOTS:
            assert parent in tree and tree[parent] < tree[name], f"{name} should be drawn under {parent}"
