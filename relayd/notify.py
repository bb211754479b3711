"""[notify]: mail to the admin when something needs a person.

Policy. Every `NOTIFY_CHECK_S` the main process looks at what the rest of relayd already knows
and turns each condition that needs a person into one plain-text notice, keyed so that the same
condition is not reported twice within `notify.repeat`:

- `route:NAME:KIND`: a route failing authentication, or unable to reach its upstream, for more
  than `ROUTE_FAILING_AFTER_S` (the delivery agent's RouteStats.failing_since);
- `signin:ROUTE:ACCOUNT`: a user who must sign in again (TokenHealth.needs_signin, with its fix);
- `expiry:ROUTE`: a client secret (`client_secret_expires`) or certificate that expires
  within `notify.expiry_warning` (TokenHealth.credential_expires_at);
- `deferred:ROUTE`: a message deferred for longer than `notify.deferred_after`;
- `bounce:ROUTE`: bounces sent; each is remembered (queue id, sender, recipients, replies) and
  one notice per route per `repeat` lists all of them since the last one;
- `budget:ROUTE:MAILBOX`: a sending mailbox has spent `pacing.NOTICE_SHARE` (80 %) of its
  daily recipient budget (relayd.qmgr.pacing), so once a day at most with the default repeat;
- `blocked:MAILBOX`: the provider answered that a mailbox is blocked for sending (Exchange
  Online's Restricted entities), with the admin action that releases it.

A notice is mail like any other: stored in the spool by the intake (so it is durable, journaled
and retried) and delivered through the route of `notify.sender`. The last time each key was
sent is kept in `notify-state.json` beside the queue directory, written atomically, so a restart
within `repeat` sends nothing again; a condition that clears and comes back after `repeat` is
reported again. A notice is recorded as sent only once it is stored: a crash in between sends it
twice at most, never not at all; one that cannot be stored is logged and tried at the next check.

Notices never report themselves: they carry `client = NOTICE_CLIENT` in their envelope (and the
`X-Relayd-Notice` header for people and filters), a bounce of a notice is not reported and is
remembered (`quiet`) so that neither it nor a deferred notice becomes a "deferred" notice. The
alternative, one notice per event, was rejected: an upstream refusing everything would send the
admin one mail per message, through a relay that is already in trouble.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import email.utils
import json
import logging
import math
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relayd.auth import TokenHealth, registry
from relayd.config import Config, RouteConfig
from relayd.delivery.agent import RouteStats
from relayd.errors import QueueError
from relayd.escape import visible
from relayd.platform.fs import write_atomic
from relayd.qmgr import pacing
from relayd.queue import Entry
from relayd.reply import BLOCKED_HINT

if TYPE_CHECKING:
    from relayd.intake import Intake
    from relayd.qmgr import QueueManager

log = logging.getLogger(__name__)

NOTIFY_CHECK_S = 30.0  # how often the conditions are looked at
ROUTE_FAILING_AFTER_S = 15 * 60.0  # a route failing this long is reported
NOTICE_CLIENT = "relayd-notify"  # the envelope's client field of every notice
NOTICE_HEADER = "X-Relayd-Notice"  # the condition key, in the notice's header
STATE_FILE = "notify-state.json"  # beside the queue directory
BOUNCES_KEPT_MAX = 50  # bounces listed one by one in a notice; beyond it, only counted
STATE_VERSION = 1


@dataclass(frozen=True)
class Condition:
    """Something that needs a person: its stable key, what happened (the Subject after
    "relayd on HOST: ") and the body (what, since when, what to do)."""

    key: str
    subject: str
    body: str


@dataclass
class DeferredRoute:
    """A route's messages deferred longer than `deferred_after`."""

    count: int
    oldest_id: str
    oldest_sender: str
    oldest_received: float
    last_error: str


@dataclass
class NotifyState:
    """What survives a restart: when each key was last sent, the bounces not reported yet,
    and the queue ids of bounces of notices (never reported)."""

    sent: dict[str, float] = field(default_factory=dict)
    bounces: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    bounces_dropped: dict[str, int] = field(default_factory=dict)  # beyond BOUNCES_KEPT_MAX
    quiet: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps({"v": STATE_VERSION, "sent": self.sent, "bounces": self.bounces,
                           "bounces_dropped": self.bounces_dropped, "quiet": self.quiet},
                          indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> NotifyState:
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        return cls(sent={str(k): float(v) for k, v in raw.get("sent", {}).items()},
                   bounces={str(k): list(v) for k, v in raw.get("bounces", {}).items()},
                   bounces_dropped={str(k): int(v)
                                    for k, v in raw.get("bounces_dropped", {}).items()},
                   quiet={str(k): float(v) for k, v in raw.get("quiet", {}).items()})


# -- formatting --------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """3725 -> '1h 2m'; whole days above two days ('5 days')."""
    seconds = max(0.0, seconds)
    if seconds >= 2 * 86400:
        return f"{round(seconds / 86400)} days"
    if seconds < 60:
        return f"{math.ceil(seconds)}s"
    units = (("d", 86400), ("h", 3600), ("m", 60))
    parts = []
    left = int(seconds)
    for name, size in units:
        if left >= size:
            parts.append(f"{left // size}{name}")
            left %= size
    return " ".join(parts[:2])


def when(t: float, now: float) -> str:
    """An epoch time as the admin reads it: '2026-12-01 09:30 UTC (2h 5m ago)'."""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))
    if t <= now:
        return f"{stamp} ({duration(now - t)} ago)"
    return f"{stamp} (in {duration(t - now)})"


def _upstream_words(route: RouteConfig | None) -> str:
    if route is None:
        return "its upstream"
    kind = {"smtp": "its SMTP upstream", "graph": "Microsoft Graph",
            "ews": "Exchange Web Services"}.get(route.upstream, f"its {route.upstream} upstream")
    return f"{kind} ({route.target})"


# -- the conditions (pure: what is known now -> what needs a person) ---------------------------


def route_conditions(stats: Mapping[str, RouteStats], routes: Mapping[str, RouteConfig],
                     queued: Mapping[str, tuple[int, int, float | None]], now: float,
                     failing_after_s: float) -> list[Condition]:
    out = []
    for name, st in sorted(stats.items()):
        # Refused credentials do not heal by themselves (and defer, never bounce, until
        # queue.max_age: relayd.delivery.agent.auth_refused_advice): reported at once.
        route = routes.get(name)
        password = route is not None and route.uses_password
        after_s = 0.0 if st.failing_kind == "authentication" and password else failing_after_s
        if st.failing_since is None or now - st.failing_since <= after_s:
            continue
        waiting = queued.get(name, (0, 0, None))[0]
        since = f"Since: {when(st.failing_since, now)}"
        last = f"Last reply: {st.last_failure_reply or '-'}"
        held = (f"Mail on this route is deferred, not lost: {waiting} message(s) are waiting "
                "in the queue and go out once the route works again.")
        if st.failing_kind == "authentication":
            subject = f"route {name} is failing authentication"
            what = f'Route "{name}" cannot log in to {_upstream_words(route)}.'
            what += (" relayd defers its mail, as Postfix does, and retries it until it is "
                     "older than queue.max_age, when it bounces.")
            todo = [
                f"Check the route's credentials (routes.{name}: the password file, or the app "
                "registration's client secret or certificate and its permissions).",
                "For a delegated route, the user signs in again:",
                f"    relayd auth login {name} --user ADDRESS",
                "    relayd auth status      (each token, and who must sign in)",
            ]
        else:
            subject = f"route {name} cannot reach its upstream"
            what = f'Route "{name}" cannot reach {_upstream_words(route)}.'
            todo = [
                "Check the upstream: is it up, and reachable from this machine (firewall, DNS, "
                "proxy, TLS)? To try it step by step:",
                "    relayd send-test --from SENDER --to RECIPIENT",
            ]
        todo += ["Then send what waits at once, and see the queue:",
                 "    relayd queue retry --all", "    relayd queue list"]
        out.append(Condition(f"route:{name}:{st.failing_kind or 'failing'}", subject,
                             _body(what, since, [last, "", held], todo)))
    return out


def token_conditions(health: Sequence[TokenHealth], routes: Mapping[str, RouteConfig],
                     now: float, expiry_warning_s: float) -> list[Condition]:
    out: dict[str, Condition] = {}
    for h in health:
        who = h.account or "the app"
        if h.needs_signin:
            key = f"signin:{h.route}:{h.account}"
            subject = (f"{h.account} must sign in again (route {h.route})" if h.account
                       else f"route {h.route} needs a new sign-in")
            what = (f'Route "{h.route}" can no longer get a token for {who}; mail from '
                    f"{who} is deferred (not bounced) until a new sign-in.")
            fix = h.fix or f"relayd auth login {h.route} --user {h.account or 'ADDRESS'}"
            todo = ["Sign in again (as that user, or have them use the sign-in page):",
                    f"    {fix}", "Then:", "    relayd auth status", "    relayd queue list"]
            since = (f"Last token obtained: {when(h.last_refreshed, now)}"
                     if h.last_refreshed else f"Noticed: {when(now, now)}")
            out[key] = Condition(key, subject, _body(
                what, since, [f"Why: {h.problem}"] if h.problem else [], todo))
        expires = h.credential_expires_at
        if expires is not None and expires - now <= expiry_warning_s:
            key = f"expiry:{h.route}"  # the app's credential: one notice, not one per user
            route = routes.get(h.route)
            oauth = route.oauth if route is not None else None
            cert = oauth is not None and oauth.certificate_file is not None
            thing = "client certificate" if cert else "client secret"
            left = expires - now
            subject = (f"the {thing} of route {h.route} expires in {duration(left)}" if left > 0
                       else f"the {thing} of route {h.route} has expired")
            what = (f'The app registration\'s {thing} that route "{h.route}" signs in with '
                    + ("expires" if left > 0 else "expired") + f" on {when(expires, now)}.")
            if cert:
                todo = ["Make a new certificate, upload its public part to the app registration "
                        "(Certificates & secrets), then point the route at it and reload:",
                        f"    routes.{h.route}.certificate_file and routes.{h.route}.thumbprint",
                        "    systemctl reload relayd"]
            else:
                todo = ["Renew the secret: create a new client secret in the app registration "
                        "(Certificates & secrets), put it in the route's secret file, and set "
                        "its new expiry date, then reload:",
                        f"    routes.{h.route}.client_secret_file (or client_secret_env)",
                        f'    routes.{h.route}.client_secret_expires = "YYYY-MM-DD"',
                        "    systemctl reload relayd"]
            out[key] = Condition(key, subject, _body(
                what, f"Expires: {when(expires, now)}",
                ["Once it has expired, mail on this route is deferred until it is renewed."],
                todo))
    return list(out.values())


def deferred_conditions(deferred: Mapping[str, DeferredRoute], now: float,
                        deferred_after_s: float) -> list[Condition]:
    out = []
    for name, d in sorted(deferred.items()):
        subject = (f"{d.count} message(s) deferred for more than {duration(deferred_after_s)} "
                   f"on route {name}")
        what = (f'{d.count} message(s) on route "{name}" have waited for more than '
                f"{duration(deferred_after_s)}. The oldest, {d.oldest_id} from "
                f"<{d.oldest_sender}>, was received {when(d.oldest_received, now)}.")
        todo = ["See what waits and why:", "    relayd queue list",
                f"    relayd queue show {d.oldest_id}", f"    relayd log --id {d.oldest_id}",
                "Fix the cause (the upstream's reply says it), then:",
                f"    relayd queue retry {d.oldest_id}      (or --all)",
                "Still undelivered at queue.max_age, they are bounced to their senders."]
        out.append(Condition(f"deferred:{name}", subject, _body(
            what, f"Since: {when(d.oldest_received, now)}",
            [f"Last reply: {d.last_error or '-'}"], todo)))
    return out


def bounce_condition(route: str, bounces: Sequence[Mapping[str, Any]], dropped: int,
                     now: float) -> Condition:
    total = len(bounces) + dropped
    first = min((float(b.get("at", now)) for b in bounces), default=now)
    lines = []
    for b in bounces:
        lines.append(f"- {b.get('id', '?')} from <{b.get('sender', '')}> "
                     f"(bounce {b.get('bounce', '?')}):")
        for rcpt, reply in dict(b.get("failed", {})).items():
            lines.append(f"    <{rcpt}>: {reply}")
    if dropped:
        lines.append(f"- and {dropped} more")
    what = (f'{total} message(s) on route "{route}" failed for good and were bounced to '
            "their senders, who have been told:")
    todo = ["Usually nothing: each sender got the bounce with the upstream's reply. If the "
            "recipients look right, that reply says what to fix (a mailbox that does not "
            "exist, sending as this address not allowed, a rejected message). Each message's "
            "attempts:", "    relayd log --id QUEUEID"]
    return Condition(f"bounce:{route}", f"{total} bounce(s) sent on route {route}",
                     _body(what, f"Since: {when(first, now)}", lines, todo))


def mailbox_conditions(uses: Sequence[pacing.MailboxUse],
                       blocked: Mapping[str, tuple[str, float, str]], now: float,
                       window_s: float) -> list[Condition]:
    """Mailboxes near their daily budget, and mailboxes the provider blocked for sending."""
    out = []
    for use in uses:
        if not use.budget or use.used < pacing.NOTICE_SHARE * use.budget:
            continue
        share = round(100 * use.used / use.budget)
        what = (f'Mailbox {use.mailbox} (route "{use.route}") has sent to {use.used} of its '
                f"{use.budget} recipients in the last {duration(window_s)} ({share} %). "
                "Past the budget its mail waits (deferred, not bounced) until the oldest "
                "counts leave the window, so the provider never has to block it.")
        details = [f"{use.waiting} message(s) waiting for this mailbox."] if use.waiting else []
        if use.frees_at is not None:
            details.append(f"The oldest counts leave the window: {when(use.frees_at, now)}")
        todo = ["Usually nothing: mail waits for the budget and goes out as it frees. If this "
                "mailbox sends mass mail, spread it over the day, or send it from another "
                "mailbox. If the provider allows this mailbox more, raise the budget:",
                f"    routes.{use.route}.mailbox_daily_recipients",
                "See what waits:", "    relayd queue list"]
        out.append(Condition(f"budget:{use.route}:{use.mailbox}",
                             f"mailbox {visible(use.mailbox)} has spent {share} % of its "
                             "daily budget",
                             _body(what, f"Noticed: {when(now, now)}", details, todo)))
    for mailbox, (route, at, reply) in sorted(blocked.items()):
        what = (f'The provider refuses mail from mailbox {mailbox} (route "{route}"): it is '
                "blocked for sending. Its mail is deferred, not bounced.")
        todo = ["An admin releases it: " + BLOCKED_HINT.replace("MAILBOX", visible(mailbox))
                + ".",
                "Find out why it was blocked first (a sending limit passed, or a compromised "
                "account: check its sign-ins and reset its password)."]
        out.append(Condition(f"blocked:{mailbox}",
                             f"mailbox {visible(mailbox)} is blocked for sending",
                             _body(what, f"Since: {when(at, now)}", [f"Reply: {reply}"],
                                   todo)))
    return out


def _body(what: str, since: str, details: Sequence[str], todo: Sequence[str]) -> str:
    # What happened carries upstreams' replies and clients' addresses (relayd.escape).
    parts = ["What happened:", visible(what), "", visible(since)]
    if details:
        parts += ["", *map(visible, details)]
    parts += ["", "What to do:", *todo, "",
              "-- ", "relayd [notify]: at most one notice per condition per notify.repeat."]
    return "\n".join(parts) + "\n"


# -- the notifier --------------------------------------------------------------------------------


class Notifier:
    """Looks at the queue manager, the delivery agents and the token health every
    `NOTIFY_CHECK_S`, and queues one notice per condition per `repeat` (main process only)."""

    def __init__(self, config: Config, qmgr: QueueManager, intake: Intake, *,
                 clock: Callable[[], float] = time.time,
                 token_health: Callable[[], list[TokenHealth]] | None = None,
                 state_path: Path | None = None) -> None:
        self.config = config
        self.queue = qmgr.view  # all that notify reads of the queue (relayd.qmgr.view)
        self.intake = intake
        self.clock = clock
        self.token_health = token_health or self._registry_token_health
        self.state_path = state_path or config.queue.path.parent / STATE_FILE
        self.state = NotifyState()
        self._loaded = False
        self._dirty = False
        self._wake = asyncio.Event()
        self._checking = asyncio.Lock()

    def reload(self, config: Config) -> None:
        self.config = config

    def _registry_token_health(self) -> list[TokenHealth]:
        """Every OAuth route's, idle ones too, from relayd.auth.registry (no upstream client
        is built to answer)."""
        return registry.token_health(self.config)

    # -- what the queue manager calls ----------------------------------------------------------

    def on_bounce(self, original: Entry, bounce: Entry) -> None:
        """A bounce is stored (QueueManager.on_bounce): remember it for the route's notice."""
        if self.config.notify is None:
            return
        now = self.clock()
        if original.client == NOTICE_CLIENT or original.id in self.state.quiet:
            # A notice that failed: its bounce goes to notify.sender; never a notice about it.
            log.warning("%s: a notice could not be delivered (bounce %s); it is not reported "
                        "by another notice", original.id, bounce.id)
            self.state.quiet[bounce.id] = now
            self._dirty = True
            return
        route = self.queue.route_for(original)
        name = route.name if route else (bounce.route or "-")
        failed = {}
        for rcpt in bounce.bounce_rcpts:
            state = original.rcpt.get(rcpt)
            if state is not None:
                failed[rcpt] = f"{state.code} {state.text}" if state.code else state.text
        kept = self.state.bounces.setdefault(name, [])
        if len(kept) < BOUNCES_KEPT_MAX:
            kept.append({"id": original.id, "sender": original.sender, "bounce": bounce.id,
                         "failed": failed, "at": now})
        else:
            self.state.bounces_dropped[name] = self.state.bounces_dropped.get(name, 0) + 1
        self._dirty = True
        self._wake.set()

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, interval_s: float | None = None) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - the next check tries again
                log.exception("notify: the check failed; trying again at the next one")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval_s or NOTIFY_CHECK_S)

    async def check(self, health: Sequence[TokenHealth] | None = None) -> list[str]:
        """Queue a notice for each condition due; returns their keys. `health` replaces what
        the routes' upstreams report (TokenHealth values)."""
        async with self._checking:  # the loop's and a caller's, one after the other
            return await self._check(health)

    async def _check(self, health: Sequence[TokenHealth] | None) -> list[str]:
        notify = self.config.notify
        if notify is None:
            return []
        if not self._loaded:
            await asyncio.to_thread(self._load)
        now = self.clock()
        conditions = self.conditions(now, self.token_health() if health is None else health)
        # The bounces each bounce notice lists: those arriving while it is stored wait for
        # the next one.
        reported = {route: (len(b), self.state.bounces_dropped.get(route, 0))
                    for route, b in self.state.bounces.items()}
        sent = []
        for cond in conditions:
            last = self.state.sent.get(cond.key)
            if last is not None and now - last < notify.repeat_s:
                continue
            if await self._send(cond):
                self.state.sent[cond.key] = now
                self._dirty = True
                sent.append(cond.key)
                if cond.key.startswith("bounce:"):
                    route = cond.key.partition(":")[2]
                    listed, dropped = reported.get(route, (0, 0))
                    del self.state.bounces.setdefault(route, [])[:listed]
                    left = self.state.bounces_dropped.pop(route, 0) - dropped
                    if left > 0:
                        self.state.bounces_dropped[route] = left
                    if not self.state.bounces[route]:
                        del self.state.bounces[route]
        self._prune(now)
        if self._dirty:
            await asyncio.to_thread(self._save)
        return sent

    def conditions(self, now: float, health: Sequence[TokenHealth]) -> list[Condition]:
        notify = self.config.notify
        assert notify is not None
        routes = self.config.routes
        counts = {name: (c.queued, c.deferred, c.oldest_deferred)
                  for name, c in self.queue.route_counts().items()}
        out = route_conditions(self.queue.route_stats(), routes, counts, now,
                               ROUTE_FAILING_AFTER_S)
        out += token_conditions(health, routes, now, notify.expiry_warning_s)
        out += deferred_conditions(self._deferred(now, notify.deferred_after_s), now,
                                   notify.deferred_after_s)
        # A blocked reply older than `repeat` is not reported: only if the provider says so again.
        blocked = {m: b for m, b in self.queue.blocked().items()
                   if now - b[1] <= notify.repeat_s}
        out += mailbox_conditions(self.queue.mailboxes(), blocked, now,
                                  self.queue.budget_window_s())
        for route, bounces in sorted(self.state.bounces.items()):
            dropped = self.state.bounces_dropped.get(route, 0)
            if bounces or dropped:
                out.append(bounce_condition(route, bounces, dropped, now))
        return out

    def _deferred(self, now: float, after_s: float) -> dict[str, DeferredRoute]:
        """Messages deferred longer than `after_s`, per route (the queue manager's read side,
        relayd.qmgr.view); notices and the bounces of notices are left out (they must not
        report themselves)."""
        quiet = self.state.quiet
        groups = self.queue.deferred_by_route(
            now, after_s, lambda qid, client: client == NOTICE_CLIENT or qid in quiet)
        return {name: DeferredRoute(g.count, g.oldest_id, g.oldest_sender, g.oldest_received,
                                    g.last_error) for name, g in groups.items()}

    async def _send(self, cond: Condition) -> bool:
        """Store the notice and hand it to the queue manager; False (logged) if it cannot be
        stored: the next check tries again."""
        notify = self.config.notify
        assert notify is not None
        route = self.queue.route_for_sender(notify.sender)
        if route is None:
            log.error("notify: no route for notify.sender <%s>; notice %r not sent",
                      notify.sender, cond.key)
            return False
        host = self.hostname()
        data, options = build_notice(cond, notify.sender, notify.to, host)
        try:
            entry = await self.intake.store(notify.sender, list(notify.to), data, options,
                                             NOTICE_CLIENT, route.name)
        except (QueueError, OSError) as e:
            log.error("notify: cannot queue the notice %r (%s); trying again at the next check",
                      cond.key, e)
            return False
        log.info("%s: notice %r to %s via %s: %s", entry.id, cond.key, ", ".join(notify.to),
                 route.name, cond.subject)
        return True

    def hostname(self) -> str:
        name = self.config.server.hostname
        return name if name and name != "localhost" else socket.gethostname()

    # -- the state file ------------------------------------------------------------------------

    def _prune(self, now: float) -> None:
        notify = self.config.notify
        assert notify is not None
        for key, t in list(self.state.sent.items()):
            if now - t >= notify.repeat_s:  # due again anyway: no need to keep it
                del self.state.sent[key]
                self._dirty = True
        keep_quiet_s = self.config.queue.max_age_s + 86400
        for qid, t in list(self.state.quiet.items()):
            if now - t > keep_quiet_s:
                del self.state.quiet[qid]
                self._dirty = True

    def _load(self) -> None:
        self._loaded = True
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("notify: cannot read %s (%s); notices sent before may be sent again",
                        self.state_path, e.strerror)
            return
        try:
            loaded = NotifyState.from_json(data)
        except (ValueError, TypeError, AttributeError) as e:
            log.warning("notify: %s is not valid (%s); notices sent before may be sent again",
                        self.state_path, e)
            return
        # What happened before the load (a bounce at startup) is kept as well.
        for route, bounces in self.state.bounces.items():
            loaded.bounces.setdefault(route, []).extend(bounces)
        loaded.quiet.update(self.state.quiet)
        self.state = loaded

    def _save(self) -> None:
        try:
            write_atomic(self.state_path, self.state.to_json(), self.state_path.parent)
        except OSError as e:
            log.warning("notify: cannot write %s (%s); after a restart some notices may be sent "
                        "again", self.state_path, e.strerror)
            return
        self._dirty = False


def build_notice(cond: Condition, sender: str, to: Sequence[str],
                 hostname: str) -> tuple[bytes, list[str]]:
    """The notice as a plain-text message, and the MAIL FROM options it needs."""
    utf8 = not (sender.isascii() and all(a.isascii() for a in to))
    # Headers unfolded up to RFC 5322's 998: folding a long Subject would start it with a space.
    policy = (email.policy.SMTPUTF8 if utf8 else email.policy.SMTP).clone(max_line_length=998)
    msg = EmailMessage(policy=policy)
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    msg["Subject"] = visible(f"relayd on {hostname}: {cond.subject}")
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=hostname)
    msg["Auto-Submitted"] = "auto-generated"
    msg[NOTICE_HEADER] = cond.key
    msg.set_content(cond.body, cte="7bit" if cond.body.isascii() else "quoted-printable")
    return msg.as_bytes(), ["SMTPUTF8"] if utf8 else []
