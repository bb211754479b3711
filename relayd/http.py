"""requests clients (msal, google-auth, exchangelib) that trust a route's ca_file and timeout.

requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE replace a session's `verify` when it merges
the environment into each request; a transport adapter sees the final value, so pinning `verify`
there is what makes a route's `ca_file` win. Unlike trust_env = False, proxy variables keep working.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import requests
import requests.adapters

from relayd.config import RouteConfig


class PinnedAdapter(requests.adapters.HTTPAdapter):
    """Sends every request with this adapter's CA file and timeout, whatever the caller said.

    Callers' own timeouts are overridden too: google-auth passes 120 s, and the route's timeout
    is the administrator's choice.
    """

    def __init__(self, ca_file: str | Path | None = None, timeout_s: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ca_file = str(ca_file) if ca_file is not None else None
        self.timeout_s = timeout_s

    def ca_for(self, url: str) -> str | None:
        """The CA file that must verify `url`; None leaves requests' own choice."""
        return self.ca_file

    def send(self, request: requests.PreparedRequest, *args: Any,
             **kwargs: Any) -> requests.Response:
        ca = self.ca_for(request.url or "")
        if ca is not None:
            kwargs["verify"] = ca
        if self.timeout_s is not None:
            kwargs["timeout"] = self.timeout_s
        return super().send(request, *args, **kwargs)


class EndpointPinnedAdapter(PinnedAdapter):
    """For exchangelib, which builds its own sessions and adapters (no per-route arguments):
    the CA file comes from a process-wide table of endpoint URL -> CA file."""

    ca_files: ClassVar[dict[str, str]] = {}
    lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def pin(cls, endpoint: str, ca_file: str | Path) -> None:
        with cls.lock:
            cls.ca_files[endpoint] = str(ca_file)

    def ca_for(self, url: str) -> str | None:
        with self.lock:
            return _longest_prefix(self.ca_files, url)


def _longest_prefix(table: Mapping[str, str], url: str) -> str | None:
    # The most specific endpoint wins when one URL is a prefix of another.
    matches = [k for k in table if url.startswith(k)]
    return table[max(matches, key=len)] if matches else None


def pinned_session(ca_file: str | Path | None, timeout_s: float) -> requests.Session:
    """A session whose every request trusts `ca_file` (when given) and times out after
    `timeout_s`."""
    session = requests.Session()
    adapter = PinnedAdapter(ca_file, timeout_s)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def route_session(route: RouteConfig) -> requests.Session:
    """The HTTP client for everything a route talks to, trusting its `ca_file` when given."""
    return pinned_session(route.ca_file, route.timeout_s)
