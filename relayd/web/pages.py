"""The HTML of the status and sign-in pages: plain server-rendered pages, no JavaScript.

Every value that comes from outside (addresses, replies, route names) goes through
`relayd.escape.visible` (control characters as visible escapes) and then `html.escape`. No
secret or token is ever part of a snapshot, so none can reach a page.

The status page (the web console's overview) puts first what needs a person ("Needs
attention"): what the console found (`Snapshot.attention`: sign-ins needed, secrets expiring,
failing routes, the journal or the spool's disk), provider switch-offs and refused logins; then
a failing route's row in red, a delegated route nobody has signed in to, a client secret or
certificate inside the expiry warning (`notify.expiry_warning`, 30 days), and the deferred
messages one by one. Every time is UTC and says so (an admin reads the page
beside logs and mail headers from other machines).
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from relayd.escape import visible

STYLE = ("body{font-family:sans-serif;margin:2em;max-width:70em;color:#222}"
         "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;"
         "padding:.3em .6em;text-align:left;vertical-align:top}th{background:#eee}"
         ".bad{color:#a00;font-weight:bold}.ok{color:#070}a.button{display:inline-block;"
         "padding:.5em 1em;border:1px solid #0067b8;color:#0067b8;text-decoration:none;"
         "margin:.3em 0}tr.failing td{background:#fdd}.warn{background:#ffd966;"
         "font-weight:bold;padding:0 .2em}ul.attention li{color:#a00;margin:.3em 0}")
DEFERRED_LISTED = 100  # deferred messages listed one by one; the rest are counted


@dataclass(frozen=True)
class RouteRow:
    name: str
    upstream: str  # e.g. "graph:https://graph.microsoft.com"
    last_success: float | None
    last_failure: float | None
    last_failure_reply: str
    failing_since: float | None
    failing_kind: str
    queued: int
    deferred: int
    fix: str = ""  # the provider's fix for the last failure (relayd.providers)
    advice: str = ""  # what to do about its failure, shown with it (a refused password)
    held_until: float | None = None  # its agent holds its mail (upstream unreachable) until


@dataclass(frozen=True)
class TokenRow:
    route: str
    account: str
    expires_at: float | None
    last_refreshed: float | None
    needs_signin: bool
    problem: str
    fix: str
    credential_expires_at: float | None


@dataclass(frozen=True)
class DeferredRow:
    """A message that was tried and waits for its next try."""

    queue_id: str
    route: str
    sender: str
    recipients: Sequence[str]  # those still pending
    received: float
    attempts: int
    next_attempt: float
    last_error: str


@dataclass(frozen=True)
class MailboxRow:
    """A busy sending mailbox (relayd.qmgr.pacing.MailboxUse)."""

    route: str
    mailbox: str
    used: int
    budget: int  # 0: none
    rate: str  # e.g. "30/60s"; "" for none
    frees_at: float | None
    waiting: int


@dataclass(frozen=True)
class Snapshot:
    hostname: str
    now: float
    routes: Sequence[RouteRow] = field(default_factory=tuple)
    tokens: Sequence[TokenRow] = field(default_factory=tuple)
    oldest_deferred: float | None = None  # when the oldest deferred message was received
    queued: int = 0
    signin_routes: Sequence[str] = field(default_factory=tuple)
    warnings: Sequence[str] = field(default_factory=tuple)  # the config's (switch-offs)
    deferred: Sequence[DeferredRow] = field(default_factory=tuple)  # oldest first
    deferred_total: int = 0  # all deferred messages, listed or not
    expiry_warning_s: float = 30 * 86400.0  # credentials expiring within this are shown
    attention: Sequence[str] = field(default_factory=tuple)  # more that needs a person, first
    mailboxes: Sequence[MailboxRow] = field(default_factory=tuple)


def _e(text: object) -> str:
    return html.escape(visible(str(text)), quote=True)


def _when(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    ago = now - ts
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
    if ago >= 0:
        return f"{stamp} ({_span(ago)} ago)"
    return f"{stamp} (in {_span(-ago)})"


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def page(title: str, body: str) -> bytes:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{_e(title)}</title><style>{STYLE}</style></head>"
            f"<body>{body}</body></html>").encode()


def status_page(s: Snapshot) -> bytes:
    parts = [f"<h1>relayd on {_e(s.hostname)}</h1>",
             f"<p>{s.queued} message(s) in the queue; oldest deferred: "
             f"{_e(_when(s.oldest_deferred, s.now)) if s.oldest_deferred else 'none'}. "
             f"Times are UTC; now {_e(_when(s.now, s.now).split(' (')[0])}.</p>"]
    attention = [_e(a) for a in s.attention] + [_e(w) for w in s.warnings]
    attention += [f"route {_e(r.name)}: {_e(r.advice)}" for r in s.routes
                  if r.failing_since is not None and r.advice]
    if attention:
        parts.append('<h2>Needs attention</h2><ul class="attention">'
                     + "".join(f"<li>{a}</li>" for a in attention) + "</ul>")
    parts.append("<h2>Routes</h2><table><tr><th>route</th><th>upstream</th><th>last success"
                 "</th><th>last failure</th><th>queued</th><th>deferred</th><th>health</th>"
                 "</tr>")
    for r in s.routes:
        failure = _e(_when(r.last_failure, s.now))
        if r.last_failure is not None and r.last_failure_reply:
            failure += f"<br>{_e(r.last_failure_reply)}"
            if r.fix:
                failure += f'<br><span class="fix">fix: {_e(r.fix)}</span>'
        if r.failing_since is not None:
            failure += (f'<br><span class="bad">{_e(r.failing_kind)} failing since '
                        f"{_e(_when(r.failing_since, s.now))}</span>")
        failing = ' class="failing"' if r.failing_since is not None else ""
        name = f"<strong>{_e(r.name)}</strong>" if failing else _e(r.name)
        if r.held_until is not None:
            health = (f'<span class="bad">held until {_e(_when(r.held_until, s.now))}</span>'
                      "<br>no attempts until then; a retry releases it")
        elif r.failing_since is not None:
            health = f'<span class="bad">{_e(r.failing_kind)} failing</span>'
        else:
            health = '<span class="ok">ok</span>'
        parts.append(f'<tr{failing} id="route-{_e(r.name)}"><td>{name}</td>'
                     f"<td>{_e(r.upstream)}</td><td>{_e(_when(r.last_success, s.now))}</td>"
                     f"<td>{failure}</td><td>{r.queued}</td><td>{r.deferred}</td>"
                     f"<td>{health}</td></tr>")
    parts.append("</table>")
    parts.append(_deferred_table(s))
    parts.append(_tokens_table(s))
    parts.append(_mailboxes(s))
    if s.signin_routes:
        parts.append('<p><a href="/signin">Sign-in page for users of delegated routes</a></p>')
    return page(f"relayd on {s.hostname}", "".join(parts))


def _tokens_table(s: Snapshot) -> str:
    """Each credential: its token's expiry and refresh, the credential's own expiry (shown
    within `expiry_warning_s`), and what needs a person."""
    out: list[str] = []
    out.append("<h2>Tokens and credentials</h2>")
    if not s.tokens:
        out.append("<p>No OAuth credentials in use.</p>")
    else:
        out.append("<table><tr><th>route</th><th>account</th><th>token expires</th>"
                   "<th>last refreshed</th><th>credential expires</th><th>state</th></tr>")
        for t in s.tokens:
            expiring = (t.credential_expires_at is not None
                        and t.credential_expires_at - s.now <= s.expiry_warning_s)
            if t.needs_signin:
                state = (f'<span class="bad">needs sign-in</span>: {_e(t.problem)}'
                         f"<br>{_e(t.fix)}")
            elif t.problem:
                state = f'<span class="bad">{_e(t.problem)}</span>'
            elif expiring:
                assert t.credential_expires_at is not None
                left = t.credential_expires_at - s.now
                state = (f'<span class="warn">the credential expires '
                         f"{'in ' + _span(left) if left > 0 else 'now'}</span>: renew it")
            else:
                state = '<span class="ok">ok</span>'
            cred = _e(_when(t.credential_expires_at, s.now)) if t.credential_expires_at \
                else "-"
            if expiring:
                cred = f'<span class="warn">{cred}</span>'
            out.append(f"<tr><td>{_e(t.route)}</td><td>{_e(t.account or '(app)')}</td>"
                       f"<td>{_e(_when(t.expires_at, s.now))}</td>"
                       f"<td>{_e(_when(t.last_refreshed, s.now))}</td><td>{cred}</td>"
                       f"<td>{state}</td></tr>")
        out.append("</table>")
    return "".join(out)


def _deferred_table(s: Snapshot) -> str:
    if not s.deferred_total:
        return "<h2>Deferred messages</h2><p>None.</p>"
    rows = ["<h2>Deferred messages</h2><table id=\"deferred\"><tr><th>queue id</th>"
            "<th>route</th><th>from</th><th>to (waiting)</th><th>received</th><th>tries</th>"
            "<th>next try</th><th>last reply</th></tr>"]
    for d in s.deferred:
        rows.append(f'<tr><td><a href="/queue/{_e(d.queue_id)}">{_e(d.queue_id)}</a></td>'
                    f"<td>{_e(d.route)}</td>"
                    f"<td>{_e(d.sender or '<>')}</td><td>{_e(', '.join(d.recipients))}</td>"
                    f"<td>{_e(_when(d.received, s.now))}</td><td>{d.attempts}</td>"
                    f"<td>{_e(_when(d.next_attempt, s.now))}</td><td>{_e(d.last_error)}</td>"
                    "</tr>")
    rows.append("</table>")
    if s.deferred_total > len(s.deferred):
        rows.append(f"<p>and {s.deferred_total - len(s.deferred)} more: "
                    '<a href="/queue?state=deferred">the queue</a>, or '
                    "<code>relayd queue list</code></p>")
    return "".join(rows)


def _mailboxes(s: Snapshot) -> str:
    """Each busy sending mailbox's use of its daily budget and rate."""
    if not s.mailboxes:
        return ""
    parts = ["<h2>Sending mailboxes</h2><table><tr><th>route</th><th>mailbox</th>"
             "<th>recipients in 24 h</th><th>rate</th><th>waiting</th></tr>"]
    for m in s.mailboxes:
        used = f"{m.used} of {m.budget}" if m.budget else f"{m.used} (no budget)"
        if m.budget and m.used >= m.budget:
            used = f'<span class="bad">{used}</span>'
        if m.frees_at is not None:
            used += f"<br>oldest leave {_e(_when(m.frees_at, s.now))}"
        waiting = (f"{m.waiting} waiting for mailbox {_e(m.mailbox)}'s budget or rate"
                   if m.waiting else "none")
        parts.append(f"<tr><td>{_e(m.route)}</td><td>{_e(m.mailbox)}</td><td>{used}</td>"
                     f"<td>{_e(m.rate or '-')}</td><td>{waiting}</td></tr>")
    parts.append("</table>")
    return "".join(parts)


def signin_page(hostname: str, choices: Sequence[tuple[str, str]], note: str = "") -> bytes:
    """`choices`: (label, URL) per provider."""
    body = [f"<h1>Sign in to send mail through relayd on {_e(hostname)}</h1>",
            "<p>Sign in with the account whose address you send from. relayd then sends your "
            "mail as that account; it never sees your password.</p>"]
    if note:
        body.append(f"<p>{_e(note)}</p>")
    for label, url in choices:
        body.append(f'<p><a class="button" href="{_e(url)}">{_e(label)}</a></p>')
    if not choices:
        body.append("<p>No route here uses delegated sign-in.</p>")
    return page("Sign in", "".join(body))


def address_page(hostname: str) -> bytes:
    """Google's sign-in wants the address up front: a one-field form, no script."""
    return page("Sign in with Google", f"<h1>Sign in with Google to send through relayd on "
                f"{_e(hostname)}</h1>"
                '<form method="get" action="/signin/google/start"><p><label>Your address '
                '<input type="email" name="address" id="address" required></label></p>'
                '<p><button type="submit" id="continue">Continue to Google</button></p>'
                "</form>")


def message_page(title: str, text: str, ok: bool) -> bytes:
    cls = "ok" if ok else "bad"
    return page(title, f'<h1>{_e(title)}</h1><p class="{cls}">{_e(text)}</p>'
                       '<p><a href="/signin">Back to the sign-in page</a></p>')


def continue_page(action: str, fields: dict[str, str]) -> bytes:
    """The provider's answer, posted again from relayd's own page (same site, so the browser
    sends the sign-in's SameSite=Lax cookie with it); /signin/continue.js submits it, and the
    button does for a browser without script."""
    hidden = "".join(f'<input type="hidden" name="{_e(k)}" value="{_e(v)}">'
                     for k, v in fields.items())
    return page("Finishing the sign-in",
                f'<h1>Finishing the sign-in</h1><form method="post" action="{_e(action)}">'
                f'{hidden}<button type="submit">Continue</button></form>'
                '<script src="/signin/continue.js"></script>')
