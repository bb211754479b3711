"""The bench's fake Microsoft cloud: one HTTPS port serving the identity provider, Graph and a
forward proxy, built from the test fakes (tests/fakes/idp.py, tests/fakes/graph.py).

- Graph: every path under /v1.0/ and /upload/ (tests/fakes/graph.py GraphHandler).
- Identity provider: every other path (tests/fakes/idp.py IdpHandler), tenant `TENANT`.
- Proxy: a request in absolute form (`POST https://graph.microsoft.com/v1.0/... HTTP/1.1`, what
  axios sends to its `proxy`, SMTP2Graph's `httpProxy`) is served as if it came straight here.
  The server certificate also names graph.microsoft.com and login.microsoftonline.com, because
  Node sends the target's name as SNI and checks the certificate against it.
- Control (plain JSON, same port): POST /_bench/reset {"delay_s", "mailbox_limit"} forgets what
  was sent and sets the added latency and the per-mailbox concurrency limit (beyond it: 429,
  as Graph answers the fifth concurrent request of one app and mailbox); GET /_bench/stats.

Run with the project venv: `python bench/graph/fake_graph.py --state-file F`; it writes F
(JSON: port, ca_file, tenant, client_id, client_secret, pid) once it listens, and stops on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from fakes.graph import GraphHandler, GraphState  # noqa: E402
from fakes.https import (  # noqa: E402
    SERVER_IDENTITIES,
    Handler,
    TestCA,
    message_id,
    start_https_server,
)
from fakes.idp import CLIENT_ID, CLIENT_SECRET, IdpHandler, IdpState  # noqa: E402

# A GUID tenant: smtp-oauth-relay takes only GUIDs (or base64url of one) in its user name.
TENANT = "9b1c3c2e-5d7a-4f21-9e0b-0c6a1f2d3e4f"
CLOUD_NAMES = ("graph.microsoft.com", "login.microsoftonline.com")


class BenchState:
    def __init__(self, base_url: str) -> None:
        self.idp = IdpState(tenant=TENANT, token_lifetime_s=3600)
        self.idp.base_url = base_url
        self.graph = GraphState(token_ok=lambda t: self.idp.check_bearer(t) is not None)
        self.graph.base_url = base_url
        self.reset_at = time.time()
        self.lock = threading.Lock()

    def reset(self, delay_s: float, mailbox_limit: int | None) -> None:
        g, i = self.graph, self.idp
        with g.lock:
            g.sent.clear()
            g.requests.clear()
            g.tokens_seen.clear()
            g.peers.clear()
            g.in_flight.clear()
            g.max_in_flight.clear()
            g.throttled.clear()
            g.delay_s = delay_s
            g.max_concurrent_per_mailbox = mailbox_limit
        with i.lock:
            i.requests.clear()
        self.reset_at = time.time()

    def stats(self) -> dict[str, Any]:
        g, i = self.graph, self.idp
        with g.lock:
            sent = list(g.sent)
            statuses: dict[str, int] = {}
            for _, _, status in g.requests:
                statuses[str(status)] = statuses.get(str(status), 0) + 1
            peers = len(set(g.peers))
            max_in_flight = dict(g.max_in_flight)
            throttled = dict(g.throttled)
        with i.lock:
            token_requests = len(i.requests)
        ids = [message_id(s.mime) for s in sent]
        per_mailbox: dict[str, int] = {}
        for s in sent:
            per_mailbox[s.mailbox.lower()] = per_mailbox.get(s.mailbox.lower(), 0) + 1
        return {
            "sent": len(sent), "unique": len(set(ids)), "duplicates": len(ids) - len(set(ids)),
            "sent_at": sorted(s.at for s in sent), "per_mailbox": per_mailbox,
            "max_in_flight": max_in_flight, "throttled": throttled, "statuses": statuses,
            "client_ports": peers, "token_requests": token_requests,
            "message_ids": ids,
        }


def _route(handler: Handler) -> None:
    """Pick the fake for this request: absolute form (proxy) first, then the path."""
    path = handler.path
    if path.startswith(("http://", "https://")):
        parts = urllib.parse.urlsplit(path)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        handler.path = path
    if path.startswith("/_bench/"):
        handler.__class__ = ControlHandler
    elif path.startswith(("/v1.0/", "/upload/")):
        handler.__class__ = BenchGraphHandler
    else:
        handler.__class__ = BenchIdpHandler


class _Routed:
    """parse_request, then become the handler the request is for (its do_* run next)."""

    server: Any
    path: str

    def parse_request(self) -> bool:
        if not super().parse_request():  # type: ignore[misc]
            return False
        _route(self)  # type: ignore[arg-type]
        return True


class BenchGraphHandler(_Routed, GraphHandler):
    @property  # type: ignore[override]
    def state(self) -> GraphState:
        return self.server.state.graph  # type: ignore[no-any-return]


class BenchIdpHandler(_Routed, IdpHandler):
    @property  # type: ignore[override]
    def state(self) -> IdpState:
        return self.server.state.idp  # type: ignore[no-any-return]


class ControlHandler(_Routed, Handler):
    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        st: BenchState = self.server.state
        if self.path.startswith("/_bench/stats"):
            self.reply(200, json.dumps(st.stats()), "application/json")
        else:
            self.reply(404, "no such control")

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        st: BenchState = self.server.state
        body = json.loads(self.read_body() or b"{}")
        if self.path.startswith("/_bench/reset"):
            limit = body.get("mailbox_limit")
            st.reset(float(body.get("delay_s", 0.0)), int(limit) if limit else None)
            self.reply(200, "{}", "application/json")
        else:
            self.reply(404, "no such control")


class FirstHandler(_Routed, Handler):
    """Every connection starts here; its first request decides the class."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--state-file", required=True, type=Path)
    args = ap.parse_args()
    ca = TestCA()
    ca.server_cert = ca.ca.issue_cert(*SERVER_IDENTITIES, *CLOUD_NAMES)
    server = start_https_server(FirstHandler, None, ca)
    state = BenchState(server.base_url)
    server._server.state = state
    server.state = state
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    tmp = args.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({
        "port": server.port, "base_url": server.base_url, "ca_file": str(ca.ca_file),
        "tenant": TENANT, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
        "pid": os.getpid()}))
    tmp.rename(args.state_file)
    stop.wait()
    server.stop()
    ca.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
