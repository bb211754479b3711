"""The client's address: from a socket's peername or an aiosmtpd session, parsed once."""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

from aiosmtpd.smtp import Session


def address(session: Session) -> str:
    return host(session.peer)


def host(peer: Any) -> str:
    """The client's address from a socket's peername."""
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer)


@functools.lru_cache(maxsize=4096)
def ip(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client address, parsed once per address rather than once per check (a small firm's
    clients are a handful of addresses; parsing was 2% of a session's CPU)."""
    try:
        return ipaddress.ip_address(peer.split("%")[0])
    except ValueError:
        return None


def on_loopback(session: Session) -> bool:
    return is_loopback(address(session))


def is_loopback(client: str) -> bool:
    ip_ = ip(client)
    return ip_ is not None and ip_.is_loopback

