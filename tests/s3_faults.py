"""A fault-injecting HTTP proxy in front of the moto S3 server (127.0.0.1 only).

Rules, checked per request:
- deny_prefixes: paths starting with one of these answer 403 AccessDenied;
- deny_listings: listings of a key prefix starting with one of these answer 403;
- fail_every: every Nth GET of an object answers 503 SlowDown (a transient error
  every S3 client retries), counted in `injected`;
- delay_s: every request waits this long first (a distant object store).

It records every request's method and path, the query of every listing request
(`listings`), and the most requests it has held at once (`max_in_flight`).
"""
from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

ERROR_XML = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{msg}</Message>'
             '<RequestId>fault-proxy</RequestId></Error>')


class FaultProxy:
    def __init__(self, upstream: str, fail_every: int = 0, deny_prefixes: tuple[str, ...] = (), delay_s: float = 0.0,
                 deny_listings: tuple[str, ...] = ()):
        self.upstream = urlsplit(upstream)
        self.delay_s = delay_s
        self.fail_every = fail_every
        self.deny_prefixes = deny_prefixes
        self.deny_listings = deny_listings
        self.injected = 0
        self.denied = 0
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request seen
        self.listings: list[dict[str, str]] = []  # the query of every listing request
        self.in_flight = self.max_in_flight = 0
        self._gets = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _error(self, status: int, code: str, msg: str):
                body = ERROR_XML.format(code=code, msg=msg).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":  # as S3: a HEAD answer has no body (one would be read as the next answer)
                    self.wfile.write(body)

            def _forward(self):
                with proxy._lock:
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    self._answer()
                finally:
                    with proxy._lock:
                        proxy.in_flight -= 1

            def _answer(self):
                if proxy.delay_s:
                    time.sleep(proxy.delay_s)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                path = urlsplit(self.path).path
                with proxy._lock:
                    proxy.requests.append((self.command, path))
                query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
                listed = query.get("prefix")
                if "list-type" in query:
                    with proxy._lock:
                        proxy.listings.append(query)
                if any(path.startswith(p) for p in proxy.deny_prefixes) or (
                        listed is not None and any(listed.startswith(p) for p in proxy.deny_listings)):
                    with proxy._lock:
                        proxy.denied += 1
                    return self._error(403, "AccessDenied", "Access Denied")
                if self.command == "GET" and path.count("/") >= 2 and proxy.fail_every:
                    with proxy._lock:
                        proxy._gets += 1
                        fail = proxy._gets % proxy.fail_every == 0
                        proxy.injected += fail
                    if fail:
                        return self._error(503, "SlowDown", "Please reduce your request rate.")
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # a HEAD answer has no body but must keep the object's real length
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
