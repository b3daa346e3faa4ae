"""Which ``Host`` headers the service answers: a defence against DNS rebinding.

A page on ``http://evil.example:8000`` can make its own name resolve to 127.0.0.1, and the browser
then lets it read the answers of a service on the user's loopback (thumbnails, released files),
since to the browser it is the page's own origin. The request still carries ``Host:
evil.example:8000``: answering only the names the service is meant to be reached by closes that.

An IP-address ``Host`` is always accepted: a browser sends one only for a page loaded from that
address itself, which no other site can be. So are requests without a ``Host`` (HTTP/1.0; no
browser sends one).
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

LOCAL_NAMES = ("localhost",)
ANY_HOST = "*"
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")  # listen on every interface


def host_name(header: str) -> str:
    """The name in a ``Host`` header, without its port, lower case, without a final dot
    (``[::1]:8000`` → ``::1``, ``Example.COM.:80`` → ``example.com``)."""
    header = header.strip().lower()
    if header.startswith("["):  # an IPv6 literal, maybe with a port
        return header[1:].split("]", 1)[0]
    if header.count(":") == 1:
        header = header.split(":", 1)[0]
    return header.rstrip(".")


def is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def default_allowed_hosts(bound_host: str) -> tuple[str, ...]:
    """The names a service listening on ``bound_host`` answers by default: ``localhost``, the
    bound host when it is a name, and this machine's host name when it listens on every
    interface (addresses are always answered)."""
    names = list(LOCAL_NAMES)
    if bound_host in WILDCARD_ADDRESSES:
        names.append(socket.gethostname())
    elif not is_ip_address(host_name(bound_host)):
        names.append(bound_host)
    return tuple(dict.fromkeys(host_name(n) for n in names))


class HostCheckMiddleware:
    """Answers 400 to a request whose ``Host`` is neither an IP address nor one of ``allowed``
    (exact names, ``*.example.com`` for its subdomains, or ``*`` for any)."""

    def __init__(self, app: ASGIApp, allowed: Iterable[str]) -> None:
        self.app = app
        allowed = [host_name(a) for a in allowed]
        self.any = ANY_HOST in allowed
        self.names = frozenset(a for a in allowed if not a.startswith("*."))
        self.suffixes = tuple(a[1:] for a in allowed if a.startswith("*."))  # ".example.com"

    def allows(self, header: str) -> bool:
        name = host_name(header)
        return (self.any or not name or name in self.names or is_ip_address(name)
                or any(name.endswith(s) for s in self.suffixes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"), "")
            if not self.allows(header):
                body = json.dumps({"detail": (
                    f"this service does not answer to the host name {host_name(header)!r} "
                    "(start it with --allowed-hosts NAME to reach it by that name)"
                )}).encode()
                await send({"type": "http.response.start", "status": 400, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
