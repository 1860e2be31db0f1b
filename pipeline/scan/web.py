"""Images named by http(s) URLs (manifests of web links): one ranged GET each, through
fsspec's HTTP filesystem (one aiohttp session per process, its connections kept alive),
with the retries a web server's transient answers call for.

fsspec's `open` would first ask for the size (a HEAD), then GET: two round trips per image.
Links reach public addresses only, unless allowed otherwise (`web_addresses.py`).
"""
from __future__ import annotations

import importlib.metadata
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import fsspec

from pipeline.scan.web_addresses import check_literal_host, private_hosts_allowed, public_client

# Answers another try may get past: timeout, too early, rate limit, server-side failures.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class WebReads:
    """How web reads are tried."""
    attempts: int = 4  # tries per URL, the first included
    backoff_s: float = 0.5  # wait before the second try; doubled before each next one
    max_wait_s: float = 30.0  # cap on a wait, a server's Retry-After included
    connect_timeout_s: float = 30.0
    read_timeout_s: float = 60.0  # no byte for this long ends the try


def user_agent() -> str:
    """Who asks: some servers refuse a client's default agent (aiohttp's) as a bot's."""
    try:
        version = importlib.metadata.version("mirror-at-scale")
    except importlib.metadata.PackageNotFoundError:
        version = "dev"
    return f"mirror-at-scale/{version} (AI-generated image detection; python-aiohttp)"


def web_filesystem(reads: WebReads):
    """fsspec's HTTP filesystem with our timeouts and User-Agent. What fsspec's configuration
    sets (FSSPEC_HTTP='{"headers": {"Authorization": ...}}', aiohttp's client_kwargs) is
    kept and wins over ours: explicit arguments would otherwise replace it whole."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=reads.connect_timeout_s, sock_read=reads.read_timeout_s)
    headers, client = {"User-Agent": user_agent()}, {"timeout": timeout}
    for proto in ("http", "https"):
        headers.update(fsspec.config.conf.get(proto, {}).get("headers", {}))
        client.update(fsspec.config.conf.get(proto, {}).get("client_kwargs", {}))
    policy = {} if private_hosts_allowed() else {"get_client": public_client}
    return fsspec.filesystem("http", client_kwargs=client, headers=headers, **policy)


def retry_wait(err: Exception, attempt: int, reads: WebReads) -> float | None:
    """Seconds to wait before trying again after `err` on try `attempt` (0-based), or None
    when another try cannot help (404, 403, ... or the tries are spent)."""
    import aiohttp

    if attempt + 1 >= reads.attempts:
        return None
    wait = reads.backoff_s * 2**attempt
    if isinstance(err, aiohttp.ClientResponseError):
        if err.status not in RETRY_STATUSES:
            return None
        after = (err.headers or {}).get("Retry-After", "")
        if after.strip().isdigit():
            wait = float(after)
    elif not isinstance(err, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)):
        return None
    return min(wait, reads.max_wait_s)


# X-Robots-Tag directives by which a site asks that its images not be used for AI
# (training data): `mirror ingest` honours them unless told otherwise.
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai"})
AGENT_TOKEN = "mirror-at-scale"  # a directive given as "<agent>: noai" applies when it names us


class OptedOut(Exception):
    """The site asks, by X-Robots-Tag, that this image not be used for AI."""


def opt_out_directive(values: list[str]) -> str | None:
    """The first opt-out directive among X-Robots-Tag header values meant for every agent
    or for us ('noai', 'noimageai, nofollow', 'mirror-at-scale: noai'), or None."""
    for value in values:
        agent = None
        for part in value.split(","):
            name, colon, rest = part.partition(":")
            if colon and " " not in name.strip():  # 'agent: directive' (a URL's ':' has no agent)
                agent, part = name.strip().lower(), rest
            directive = part.strip().lower()
            if directive in OPT_OUT_DIRECTIVES and agent in (None, "*", AGENT_TOKEN):
                return directive
    return None


REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
CREDENTIALS = ("Authorization", "Cookie", "Proxy-Authorization")  # never sent on to another site


def _origin(url: str) -> tuple:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.hostname, parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())


async def _first_bytes(fs, url: str, limit: int, check_hosts: bool, honour_opt_out: bool) -> bytes:
    """GET asking for the first `limit` bytes, and reading no more than that of whatever
    body comes (a server that ignores the Range sends all of it: the rest is never read).
    Redirects are followed here, each hop's host checked as the first one's."""
    session = await fs.set_session()
    options = {**fs.kwargs, "headers": {**fs.kwargs.get("headers", {}), "Range": f"bytes=0-{limit - 1}"}}
    origin = _origin(url)
    for _ in range(MAX_REDIRECTS + 1):
        if check_hosts:
            check_literal_host(url)
        async with session.get(fs.encode_url(url), allow_redirects=False, **options) as response:
            if response.status in REDIRECTS and "Location" in response.headers:
                target = str(response.url.join(type(response.url)(response.headers["Location"])))
                if _origin(target) != origin:  # credentials stay with the site they were given for
                    options["headers"] = {k: v for k, v in options["headers"].items()
                                          if k.lower() not in {c.lower() for c in CREDENTIALS}}
                url = target
                continue
            if response.status == 404:
                raise FileNotFoundError(url)
            if response.status == 416:  # the range starts past the end: an empty resource
                return b""
            response.raise_for_status()
            directive = opt_out_directive(response.headers.getall("X-Robots-Tag", [])) if honour_opt_out else None
            if directive:
                raise OptedOut(f"X-Robots-Tag {directive}: {url}")
            chunks, size = [], 0
            while size < limit:
                chunk = await response.content.read(limit - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks)
    raise ValueError(f"{url}: more than {MAX_REDIRECTS} redirects")


def read_web(url: str, max_bytes: int, reads: WebReads = WebReads(), honour_opt_out: bool = False) -> bytes:
    """The first max_bytes + 1 bytes of a web resource (all of it when it is smaller), in
    one GET. A 404 raises FileNotFoundError, an AI opt-out OptedOut (when honoured);
    transient failures are tried again, the last one raised."""
    from fsspec.asyn import sync

    fs = web_filesystem(reads)
    attempt = 0
    while True:
        try:
            return sync(fs.loop, _first_bytes, fs, url, max_bytes + 1, not private_hosts_allowed(), honour_opt_out)
        except Exception as err:
            wait = retry_wait(err, attempt, reads)
            if wait is None:
                raise
        time.sleep(wait)
        attempt += 1
