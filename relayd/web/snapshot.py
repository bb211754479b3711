"""The status page's snapshot: what relayd.web.pages.status_page shows, taken on the event loop
from the queue manager's read side (relayd.qmgr.view) and the token registry
(relayd.auth.registry). Reading it builds nothing: no delivery agent, no upstream client; a
route that has sent nothing shows empty counters.
"""

from __future__ import annotations

import dataclasses
import time

from relayd.auth import registry
from relayd.config import Config
from relayd.delivery.agent import RouteStats, auth_refused_advice
from relayd.providers import fix_for
from relayd.qmgr.view import QueueView, RouteCount
from relayd.web.pages import (
    DEFERRED_LISTED,
    DeferredRow,
    MailboxRow,
    RouteRow,
    Snapshot,
    TokenRow,
)


def take_snapshot(config: Config, view: QueueView) -> Snapshot:
    counts = view.route_counts()
    stats = view.route_stats()
    held = view.held_until(time.time())
    routes: list[RouteRow] = []
    for route in config.routes.values():
        st = stats.get(route.name) or RouteStats()
        count = counts.get(route.name, RouteCount())
        advice = (auth_refused_advice(route.name, st.last_failure_reply)
                  if st.failing_kind == "authentication" and route.uses_password
                  else "")
        routes.append(RouteRow(route.name, route.upstream_name, st.last_success,
                               st.last_failure, st.last_failure_reply, st.failing_since,
                               st.failing_kind, count.queued, count.deferred,
                               fix_for(route, st.last_failure_reply)
                               if st.last_failure_reply else "", advice,
                               held.get(route.name)))
    waiting, waiting_total = view.deferred(DEFERRED_LISTED)
    listed = [DeferredRow(m.id, m.route, m.summary["sender"],
                          [r for r, rs in m.summary["rcpt"].items()
                           if rs["status"] == "pending"],
                          m.summary["received"], m.summary["attempts"],
                          m.summary["next_attempt"], m.summary["last_error"])
              for m in waiting]
    oldest = [c.oldest_deferred for c in counts.values() if c.oldest_deferred is not None]
    signin = [r.name for r in config.routes.values() if r.delegated]
    expiry_warning_s = (config.notify.expiry_warning_s if config.notify
                        else Snapshot.expiry_warning_s)
    mailboxes = [MailboxRow(u.route, u.mailbox, u.used, u.budget,
                            f"{u.rate.count}/{u.rate.per_s:g}s" if u.rate else "",
                            u.frees_at, u.waiting) for u in view.mailboxes()]
    return Snapshot(config.server.hostname, time.time(), routes, _tokens(config),
                    min(oldest) if oldest else None, view.count(), signin,
                    warnings=config.warnings, deferred=listed,
                    deferred_total=waiting_total, expiry_warning_s=expiry_warning_s,
                    mailboxes=mailboxes)


def _tokens(config: Config) -> list[TokenRow]:
    """Each route's token health (relayd.auth.registry), and a row for each delegated route
    nobody has signed in to (it refuses every sender at MAIL FROM)."""
    by_route: dict[str, list[TokenRow]] = {}
    for h in registry.token_health(config):
        by_route.setdefault(h.route, []).append(TokenRow(**dataclasses.asdict(h)))
    tokens: list[TokenRow] = []
    for route in config.routes.values():
        rows = by_route.get(route.name, [])
        tokens.extend(rows)
        if not rows and route.delegated:
            how = ("each user signs in at /signin, or an administrator runs"
                   if config.web.listen is not None else "an administrator runs")
            tokens.append(TokenRow(
                route.name, "(nobody signed in)", None, None, True,
                "nobody has signed in to this route yet: its senders are refused "
                "(550 5.7.1)", f"{how} `relayd auth login {route.name} --user ADDRESS`",
                None))
    return tokens
