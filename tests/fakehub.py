"""A fake Hugging Face hub on a loopback port: the few endpoints huggingface_hub's downloads use.

Serves the files of local folders as model repositories, so that the real hub client
(``HF_ENDPOINT`` pointed here) lists, resolves and downloads them:

- ``GET /api/models/{owner}/{name}[/revision/{rev}]``: id, sha and siblings (name, size);
- ``HEAD|GET /{owner}/{name}/resolve/{rev}/{file}``: ``X-Repo-Commit``, ``ETag`` (the
  file's sha256) and ``Content-Length``; GET honours ``Range`` (resumed downloads).

A repository that is not served answers 404 with ``X-Error-Code: RepoNotFound``, as the
hub does. File bodies go out at `rate` bytes a second (in 64 KiB pieces), so a download's
progress can be watched; `requests` records what was asked, so a test can check that no
file was fetched twice.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

PIECE = 64 * 1024


class FakeHub:
    def __init__(self, repos: dict[str, Path], rate: float = 0.0) -> None:
        self.repos = repos
        self.rate = rate  # bytes a second per file body; 0: as fast as possible
        self.requests: list[tuple[str, str]] = []
        self.sha = hashlib.sha1(b"fakehub").hexdigest()  # one commit for every repository
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def files(self, repo: str) -> list[Path]:
        root = self.repos[repo]
        return sorted(path for path in root.rglob("*") if path.is_file())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                hub.requests.append((self.command, path))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    self._info(f"{parts[2]}/{parts[3]}")
                elif len(parts) >= 5 and parts[2] == "resolve":
                    self._file(f"{parts[0]}/{parts[1]}", "/".join(parts[4:]), body)
                else:
                    self._json(404, {"error": "not found"})

            def _json(self, status: int, data: object, headers: dict[str, str] | None = None) -> None:
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(raw)

            def _missing(self) -> None:
                self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})

            def _info(self, repo: str) -> None:
                if repo not in hub.repos:
                    self._missing()
                    return
                root = hub.repos[repo]
                siblings = [
                    {"rfilename": str(path.relative_to(root)), "size": path.stat().st_size}
                    for path in hub.files(repo)
                ]
                self._json(
                    200, {"id": repo, "modelId": repo, "sha": hub.sha, "private": False, "siblings": siblings}
                )

            def _file(self, repo: str, name: str, body: bool) -> None:
                if repo not in hub.repos:
                    self._missing()
                    return
                path = hub.repos[repo] / name
                if not path.is_file():
                    self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                    return
                data = path.read_bytes()
                start = 0
                ranged = self.headers.get("Range", "")
                if body and ranged.startswith("bytes="):
                    start = int(ranged.removeprefix("bytes=").split("-")[0] or 0)
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", hub.sha)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if not body:
                    return
                for offset in range(start, len(data), PIECE):
                    piece = data[offset : offset + PIECE]
                    try:
                        self.wfile.write(piece)
                        self.wfile.flush()
                    except OSError:
                        return  # the client went away (a stopped download)
                    if hub.rate:
                        time.sleep(len(piece) / hub.rate)  # the throttle itself, not a wait for an event

        return Handler


@contextmanager
def fake_hub(repos: dict[str, Path], rate: float = 0.0) -> Iterator[FakeHub]:
    hub = FakeHub(repos, rate)
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()
