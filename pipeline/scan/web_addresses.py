"""Which addresses a manifest's web links may reach.

A manifest is data, often from elsewhere: a link to the cloud's metadata service
(http://169.254.169.254/...), to localhost or to a machine of the cluster's own network
would have every node fetch it, and `mirror ingest` would store what it answers in its
shards. So links reach public addresses only: a link whose host is, resolves to, or is
redirected to a private, loopback, link-local, shared or reserved address is refused
before any connection to it. Set MIRROR_WEB_PRIVATE_HOSTS=allow (on every node: the
runtime environment's env_vars) to read links served inside your own network.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from urllib.parse import urlsplit

PRIVATE_HOSTS_ENV = "MIRROR_WEB_PRIVATE_HOSTS"


class PrivateAddressRefused(Exception):
    """A web link that would reach a non-public address (not an OSError: no retry heals it)."""


def private_hosts_allowed() -> bool:
    return os.environ.get(PRIVATE_HOSTS_ENV, "").strip().lower() == "allow"


def is_public(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%", 1)[0])  # an IPv6 zone is no part of the address
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def _refusal(what: str, addresses: list[str]) -> PrivateAddressRefused:
    return PrivateAddressRefused(f"{what} {', '.join(addresses)}: not a public address (set "
                                 f"{PRIVATE_HOSTS_ENV}=allow to read links inside your network)")


def check_literal_host(url: str) -> None:
    """Refuses a link whose host is a non-public IP address (names are checked as they
    resolve, by PublicResolver)."""
    host = urlsplit(url).hostname or ""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return
    if not is_public(host):
        raise _refusal(f"{url}: host", [host])


def public_resolver():
    """An aiohttp resolver that gives a connection only the public addresses of a name, and
    refuses a name that has none (a name made to resolve to 127.0.0.1 reaches nothing)."""
    import aiohttp

    class PublicResolver(aiohttp.ThreadedResolver):
        async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET):
            found = await super().resolve(host, port, family)
            public = [r for r in found if is_public(r["host"])]
            if not public:
                raise _refusal(f"{host} resolves to", sorted({r["host"] for r in found}))
            return public

    return PublicResolver()


async def public_client(**kwargs):
    """fsspec's `get_client`: an aiohttp session whose connections reach public addresses only."""
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=public_resolver()), **kwargs)
