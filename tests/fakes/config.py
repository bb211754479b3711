"""Config for the fakes: the `staff` route of contoso.com, signing in at the fake IdP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from relayd.config import Config, parse_config

from .https import HttpsServer
from .idp import oauth_route_keys

ALICE = "alice@contoso.com"
# What REQUESTS_CA_BUNDLE names on real machines: the system store, which does not trust the
# test CA, so a request that succeeds proves the route's own ca_file was used.
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# An EWS endpoint nothing answers on, for routes whose tests only fetch tokens.
UNREACHABLE_EWS = "https://127.0.0.1:9/EWS/Exchange.asmx"


def ews_route_keys(tmp_path: Path, idp: HttpsServer, endpoint: str, *, flow: str = "app",
                   **route: Any) -> dict[str, Any]:
    """An EWS OAuth route for *@contoso.com; `route` adds keys, and a None value drops one."""
    keys: dict[str, Any] = {"senders": ["*@contoso.com"], "upstream": "ews",
                            "service_endpoint": endpoint,
                            **oauth_route_keys(idp, tmp_path, flow=flow)}
    keys.update(route)
    return {k: v for k, v in keys.items() if v is not None}


def auth_section(tmp_path: Path) -> dict[str, str]:
    """Where signed-in users' token caches and their key live."""
    return {"path": str(tmp_path / "tokens"), "key_file": str(tmp_path / "token.key")}


def staff_config(tmp_path: Path, route: dict[str, Any]) -> Config:
    """A parsed config whose one route, `staff`, has the keys `route`."""
    return parse_config({"queue": {"path": str(tmp_path / "queue")},
                         "auth": auth_section(tmp_path), "routes": {"staff": route}})


def staff_toml(tmp_path: Path, route: dict[str, Any]) -> str:
    """The same as TOML text, for `write_config` (its [server] and [queue] come from there)."""
    def table(name: str, keys: dict[str, Any]) -> str:
        # JSON strings, lists, numbers and booleans are TOML values too.
        return f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())

    return table("auth", auth_section(tmp_path)) + "\n" + table("routes.staff", route)
