"""A local stand-in for the Hugging Face hub: just enough of its HTTP API for the real huggingface_hub client.

    hub = FakeHub(repos={"org/tiny": {"config.json": b"..."}}, gated={"org/gated"}, slow={"org/slow"})
    with hub:                      # serves on 127.0.0.1 in a thread; HF_ENDPOINT=hub.url points a client at it
        ...
    hub.requests                   # ["HEAD /org/tiny/resolve/main/config.json", ...]

It answers as the hub does (huggingface_hub.utils._http.hf_raise_for_status reads the error headers):
a file HEAD/GET with ETag, X-Repo-Commit and Content-Length; a missing file 404 + `X-Error-Code: EntryNotFound`;
an unknown repository 404 + `RepoNotFound`; a gated one 401 + `GatedRepo`; and the model-info and file-tree
API endpoints that transformers may ask for. A `slow` repository answers nothing for SLOW_S seconds.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Mapping

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # every repository sits at this one commit
SLOW_S = 3.0
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/[^/]+/(?P<path>.+)$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?P<rest>/.*)?$")


class FakeHub:
    """Serves `repos` (repo id -> file name -> bytes); the ids in `gated` answer as gated repositories, those in
    `slow` after SLOW_S seconds (as a repository that is not there)."""

    def __init__(self, repos: Mapping[str, Mapping[str, bytes]], gated: set[str] = frozenset(),
                 slow: set[str] = frozenset()) -> None:
        self.repos = repos
        self.gated = gated
        self.slow = slow
        self.requests: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def answer(self, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body for one request (the body is dropped for HEAD by the handler)."""
        self.requests.append(f"{method} {path}")
        match = _RESOLVE.match(path) or _API.match(path)
        if match is None:
            return 404, {}, b"Not Found"
        repo = match["repo"]
        if repo in self.slow:
            time.sleep(SLOW_S)
        if repo in self.gated:
            return 401, {"X-Error-Code": "GatedRepo",
                         "X-Error-Message": f"Access to model {repo} is restricted."}, b""
        files = self.repos.get(repo)
        if files is None:
            return 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b""
        if "path" in match.groupdict():  # a file of the repository
            data = files.get(match["path"])
            if data is None:
                return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, b""
            return 200, {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": COMMIT,
                         "Content-Type": "application/octet-stream"}, data
        if (match["rest"] or "").startswith("/tree/"):  # a listing: the top level only (no folders here)
            if match["rest"].count("/") > 2:
                return 404, {"X-Error-Code": "EntryNotFound"}, b""
            tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in files.items()]
            return 200, {"Content-Type": "application/json"}, json.dumps(tree).encode()
        info = {"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "gated": False,
                "siblings": [{"rfilename": name} for name in files]}
        return 200, {"Content-Type": "application/json"}, json.dumps(info).encode()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client expects of the hub

        def do_HEAD(self) -> None:
            self._reply(with_body=False)

        def do_GET(self) -> None:
            self._reply(with_body=True)

        def _reply(self, *, with_body: bool) -> None:
            status, headers, body = hub.answer(self.command, self.path.split("?")[0])
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # the test reads hub.requests instead
            pass

    return Handler
