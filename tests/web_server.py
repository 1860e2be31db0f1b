"""A real HTTP server for web-link manifests (tests and the web-reads benchmark).

Serves a folder under /files/<name>; under /whole/<name> ignoring any Range (the whole
body, as some servers send it); under /optout/<name> saying X-Robots-Tag: noai, under
/agents/<name> 'otherbot: noai, mirror-at-scale: noimageai'. /flaky/<name> answers 503
to its first GET and /limited/<name> always 429, both with Retry-After: 0; a path in
`redirects` answers 302. A Range 'bytes=A-B' (or 'bytes=A-') is honoured, and under /files/
HEAD and GET tell a file's size and an ETag that changes when it is written again.
Each request waits `delay_s` first (a distant server) and is logged as (method, path,
range header, body bytes sent).
"""
from __future__ import annotations

import http.server
import os
import re
import sys
import threading
import time


class ImageServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: str, delay_s: float = 0.0):
        self.root, self.delay_s = root, delay_s
        self.log: list[tuple[str, str, str | None, int]] = []
        self.headers_seen: list[dict[str, str]] = []  # each request's headers
        self.seen: set[str] = set()
        self.redirects: dict[str, str] = {}  # path -> Location answered with a 302
        super().__init__(("127.0.0.1", 0), _Handler)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that stopped reading
            super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> "ImageServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # connections kept alive, as a CDN's are

    def log_message(self, *args):  # the console stays clean
        pass

    def _answer(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self):
        time.sleep(self.server.delay_s)
        self.server.log.append(("HEAD", self.path, None, 0))
        if self.path.split("?", 1)[0] in self.server.redirects:
            self.send_response(302)
            self.send_header("Location", self.server.redirects[self.path.split("?", 1)[0]])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        kind, _, name = self.path.split("?", 1)[0].lstrip("/").partition("/")
        file = os.path.join(self.server.root, name)
        found = kind == "files" and os.path.isfile(file)
        self.send_response(200 if found else 404)
        self.send_header("Content-Length", str(os.path.getsize(file) if found else 0))
        self.send_header("Accept-Ranges", "bytes")
        if found:
            self.send_header("ETag", _etag(file))
        self.end_headers()

    def do_GET(self):
        time.sleep(self.server.delay_s)
        self.server.headers_seen.append(dict(self.headers))
        path = self.path.split("?", 1)[0]
        kind, _, name = path.lstrip("/").partition("/")
        wanted = self.headers.get("Range")
        if path in self.server.redirects:
            self.server.log.append(("GET", self.path, wanted, 0))
            self._answer(302, headers={"Location": self.server.redirects[path]})
            return
        if kind == "limited" or (kind == "flaky" and path not in self.server.seen):
            self.server.seen.add(path)
            self.server.log.append(("GET", self.path, wanted, 0))
            self._answer(429 if kind == "limited" else 503, headers={"Retry-After": "0"})
            return
        file = os.path.join(self.server.root, name)
        if kind not in ("files", "flaky", "whole", "optout", "agents") or not os.path.isfile(file):
            self.server.log.append(("GET", self.path, wanted, 0))
            self._answer(404)
            return
        with open(file, "rb") as f:
            data = f.read()
        headers = {"ETag": _etag(file)} if kind == "files" else {}
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted or "") if kind != "whole" else None
        if ranged:
            first = int(ranged.group(1))
            last = min(int(ranged.group(2) or len(data) - 1), len(data) - 1)
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
            data = data[first:last + 1]
        self.server.log.append(("GET", self.path, wanted, len(data)))
        robots = {"optout": "noai", "agents": "otherbot: noai, mirror-at-scale: noimageai"}.get(kind)
        if robots:
            headers["X-Robots-Tag"] = robots
        self._answer(206 if ranged else 200, data, headers=headers)


def _etag(file: str) -> str:
    stat = os.stat(file)
    return f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'
