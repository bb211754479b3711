"""The HTML of the web console's pages (relayd.web.console decides what is on them).

Rules:
- Server-rendered, no script at all (the Content-Security-Policy forbids inline script, and
  nothing here needs one): plain links, GET forms for filters, POST forms for actions.
- Every value that came from a client or an upstream (addresses, Subjects, headers, replies,
  route names, what a CLI command printed) goes through `_t`: its control characters made
  visible first (relayd.escape.visible, the one escaping function: CR, LF, ESC, C1, bidi
  controls and line separators as `\\r`, `\\n`, `\\xNN`, `\\uXXXX`), then `html.escape`.
  Nothing reaches a page unescaped, so a Subject of `<script>` or `\\x1b[2J` shows as those
  characters.
- Times are UTC and say so.
"""

from __future__ import annotations

import html
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from relayd.escape import visible
from relayd.web.pages import STYLE

CONSOLE_STYLE = ("nav a{margin-right:1em}nav{margin-bottom:1em;padding-bottom:.5em;"
                 "border-bottom:1px solid #bbb}form.inline{display:inline}"
                 "pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em}"
                 ".warn{background:#ffd966;font-weight:bold;padding:0 .2em}"
                 "ul.attention li{color:#a00;margin:.3em 0}")
MENU = (("/", "Overview"), ("/queue", "Queue"), ("/log", "Journal"), ("/routes", "Routes"),
        ("/tokens", "Tokens"))

def _t(value: object) -> str:
    """Someone else's text, safe in HTML: controls visible, then html.escape."""
    return html.escape(visible(str(value)), quote=True)


def _lines(text: str) -> str:
    """Multi-line text (a command's output): each line escaped, the line breaks kept."""
    return "\n".join(_t(line) for line in text.splitlines())


def utc(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{max(seconds, 0):.0f} s"


def _link(path: str, params: Mapping[str, Any] | None = None) -> str:
    query = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v not in
                                    (None, "")})
    return html.escape(path + ("?" + query if query else ""), quote=True)


def page(title: str, body: str, hostname: str, *, notice: str = "") -> bytes:
    menu = "".join(f'<a href="{p}">{label}</a>' for p, label in MENU)
    if notice:
        body = f'<p class="ok" id="notice">{_t(notice)}</p>' + body
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{_t(title)} - relayd on {_t(hostname)}</title>"
            f"<style>{STYLE}{CONSOLE_STYLE}</style></head><body><nav>{menu}</nav>"
            f"<h1>{_t(title)}</h1>{body}</body></html>").encode()


def with_menu(status_html: bytes) -> bytes:
    """The overview: relayd.web.pages' status page, with the console's menu on top."""
    menu = "".join(f'<a href="{p}">{label}</a>' for p, label in MENU)
    top = f"<style>{CONSOLE_STYLE}</style><nav>{menu}</nav>"
    return status_html.replace(b"<body>", b"<body>" + top.encode(), 1)


def message_page(title: str, text: str, hostname: str, ok: bool = False) -> bytes:
    cls = "ok" if ok else "bad"
    return page(title, f'<p class="{cls}" id="result">{_t(text)}</p>', hostname)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], ident: str) -> str:
    out = [f'<table id="{ident}"><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows]
    return "".join(out) + "</table>"


def _field(name: str, label: str, value: str, *, ident: str = "") -> str:
    return (f'<label>{label} <input type="text" name="{name}" id="{ident or "f-" + name}" '
            f'value="{_t(value)}"></label> ')


def _pager(path: str, params: Mapping[str, Any], offset: int, limit: int, matching: int) -> str:
    links = []
    if offset > 0:
        links.append(f'<a href="{_link(path, {**params, "offset": max(0, offset - limit)})}"'
                     ' id="prev">previous page</a>')
    if offset + limit < matching:
        links.append(f'<a href="{_link(path, {**params, "offset": offset + limit})}" '
                     'id="next">next page</a>')
    return "<p>" + " ".join(links) + "</p>"


def queue_page(data: Mapping[str, Any], params: Mapping[str, str], routes: Sequence[str],
               hostname: str, may_act: bool = True) -> bytes:
    states = "".join(f'<option value="{s}"{" selected" if params.get("state") == s else ""}>'
                     f"{s or 'any'}</option>" for s in ("", "due", "active", "deferred"))
    route_opts = "".join(
        f'<option value="{_t(r)}"{" selected" if params.get("route") == r else ""}>'
        f"{_t(r or 'any')}</option>" for r in ("", *routes))
    form = ('<form method="get" action="/queue" id="filter"><p>'
            f'<label>route <select name="route" id="f-route">{route_opts}</select></label> '
            + _field("sender", "from", params.get("sender", ""))
            + _field("recipient", "to", params.get("recipient", ""))
            + _field("age", "older than (e.g. 1h, 2d)", params.get("age", ""))
            + f'<label>state <select name="state" id="f-state">{states}</select></label> '
            '<button type="submit" id="apply">Show</button></p></form>')
    now = data["now"]
    rows = []
    for m in data["messages"]:
        rows.append([
            f'<a href="/queue/{_t(m["id"])}">{_t(m["id"])}</a>', _t(m.get("route") or "-"),
            _t(m["state"]), _t(m["sender"] or "<>"),
            _t(", ".join(r for r, s in m["rcpt"].items() if s["status"] == "pending")),
            f"{_t(utc(m['received']))} ({_age(now - m['received'])} ago)",
            str(m["attempts"]),
            "now" if m["next_attempt"] <= now else _t(utc(m["next_attempt"])),
            _t(m["last_error"])])
    shown = (f"<p id=\"count\">{data['matching']} of {data['queued']} queued message(s) match; "
             f"showing {data['offset'] + 1 if rows else 0}-{data['offset'] + len(rows)}.</p>")
    route = params.get("route", "")
    retry_route = ""
    if route and data["matching"] and may_act:
        url = _link("/confirm", {"action": "retry-route", "route": route})
        retry_route = (f'<p><a href="{url}" id="retry-route">Retry all messages of route '
                       f"{_t(route)}</a></p>")
    body = (form + shown + retry_route
            + _table(["queue id", "route", "state", "from", "to (pending)", "received",
                      "tries", "next try", "last error"], rows, "messages")
            + _pager("/queue", {k: v for k, v in params.items() if k != "done"},
                     data["offset"], data["limit"], data["matching"]))
    return page("Queue", body, hostname, notice=params.get("done", ""))


def message_detail(m: Mapping[str, Any], headers: Sequence[tuple[str, str]],
                   body_text: str | None, hostname: str, notice: str = "",
                   may_act: bool = True) -> bytes:
    s = m["summary"]
    now = m["now"]
    facts = [("queue id", _t(s["id"])), ("state", _t(m["state"])),
             ("route", _t(s.get("route") or "none in the current config")
              + (" (pinned)" if s.get("route_pinned") else "")),
             ("sender", _t(f"<{s['sender']}>" if s["sender"] else "<> (a bounce)")),
             ("received", f"{_t(utc(s['received']))} from {_t(s.get('client') or '-')}"
              + (f", login {_t(s['login'])}" if s.get("login") else "")),
             ("size", f"{s['size']} bytes"), ("message-id", _t(s.get("message_id", "") or "-")),
             ("tries", f"{s['attempts']}, next "
              + ("now" if s["next_attempt"] <= now else _t(utc(s["next_attempt"])))),
             ("last error", _t(s.get("last_error") or "-"))]
    parts = [_table(["", ""], [[k, v] for k, v in facts], "envelope"),
             "<h2>Recipients</h2>"]
    rows = []
    for rcpt, st in s["rcpt"].items():
        said = f"{st['code']} {st['text']}".strip() if st["code"] is not None else st["text"]
        rows.append([_t(rcpt), _t(st["status"]),
                     _t(m["last_reply"].get(rcpt) or said or "-")])
    parts.append(_table(["recipient", "state", "last reply"], rows, "recipients"))
    qid = s["id"]
    retry = _link("/confirm", {"action": "retry", "id": qid})
    delete = _link("/confirm", {"action": "delete", "id": qid})
    journal = f'<a href="{_link("/log", {"id": qid})}">Journal</a>'
    if may_act:
        parts.append(f'<p><a href="{retry}" id="retry">Retry now</a> <a href="{delete}" '
                     f'id="delete">Delete</a> {journal}</p>')
    else:
        parts.append(f"<p>{journal}</p>")
    parts.append("<h2>Headers</h2>")
    parts.append(_table(["name", "value"], [[_t(k), _t(v)] for k, v in headers], "headers"))
    if body_text is None:
        parts.append(f'<p><a href="/queue/{_t(qid)}?body=1" id="show-body">Show the message'
                     "</a></p>")
    else:
        parts.append(f'<h2>Message</h2><pre id="body">{_lines(body_text)}</pre>')
    return page(f"Message {qid}", "".join(parts), hostname, notice=notice)


def confirm_page(question: str, fields: Mapping[str, str], csrf: str, back: str,
                 hostname: str) -> bytes:
    hidden = "".join(f'<input type="hidden" name="{_t(k)}" value="{_t(v)}">'
                     for k, v in {**fields, "csrf": csrf}.items())
    body = (f"<p id=\"question\">{_t(question)}</p>"
            f'<form method="post" action="/action">{hidden}'
            '<button type="submit" id="confirm">Yes, do it</button> '
            f'<a href="{_t(back)}" id="cancel">No, go back</a></form>')
    return page("Please confirm", body, hostname)


LOG_FIELDS = (("message_id", "message-id"), ("id", "queue id"), ("from", "from"),
              ("to", "to"), ("route", "route"), ("since", "since (2h, 3d, YYYY-MM-DD)"))


def log_page(data: Mapping[str, Any], params: Mapping[str, str], hostname: str) -> bytes:
    form = ('<form method="get" action="/log" id="filter"><p>'
            + "".join(_field(k, label, params.get(k, "")) for k, label in LOG_FIELDS)
            + '<button type="submit" id="apply">Search</button></p></form>')
    filters = {k: params.get(k, "") for k, _ in LOG_FIELDS}
    rows = []
    queued = set(data.get("queued", ()))
    for e in data["events"]:
        qid = str(e.get("id", "-"))
        ident = (f'<a href="/queue/{_t(qid)}">{_t(qid)}</a>' if qid in queued else _t(qid))
        to = e.get("to") or []
        rows.append([_t(utc(float(e.get("time", 0)))), _t(e.get("event", "?")), ident,
                     _t(e.get("from", "")), _t(", ".join(str(x) for x in to)),
                     _t(e.get("route", "")), _t(e.get("reply", "") or e.get("status", "")),
                     _t(e.get("subject", "")), _t(e.get("admin", ""))])
    csv_url = _link("/log/export", {**filters, "format": "csv"})
    jsonl_url = _link("/log/export", {**filters, "format": "jsonl"})
    export = (f'<p>Export this search: <a href="{csv_url}" id="export-csv">CSV</a> '
              f'<a href="{jsonl_url}" id="export-jsonl">JSON lines</a></p>')
    more = ""
    if data.get("next"):
        more = (f'<p><a href="{_link("/log", {**filters, "before": data["next"]})}" id="older">'
                "older events</a></p>")
    count = f'<p id="count">{len(data["events"])} event(s), newest first.</p>'
    body = (form + count + export
            + _table(["time", "event", "queue id", "from", "to", "route", "upstream's answer",
                      "subject", "admin"], rows, "events") + more)
    return page("Journal", body, hostname)


def routes_page(data: Mapping[str, Any], params: Mapping[str, str], csrf: str,
                hostname: str) -> bytes:
    parts = ["<h2>What each route does (relayd check --explain)</h2>",
             f'<pre id="explain">{_lines(chr(10).join(data["explain"]))}</pre>',
             '<h2>Which route sends for an address (relayd route)</h2>'
             '<form method="get" action="/routes" id="route-form"><p>'
             + _field("address", "sender", params.get("address", ""))
             + _field("to", "recipient (optional)", params.get("to", ""))
             + '<button type="submit" id="lookup">Look up</button></p></form>']
    if data.get("route") is not None:
        parts.append(f'<pre id="route-result">{_lines(data["route"]["output"])}</pre>')
    if not csrf:  # a viewer: no actions
        return page("Routes", "".join(parts), hostname)
    parts.append("<h2>Send a test message (relayd send-test)</h2>"
                 '<form method="post" action="/routes/send-test" id="send-test-form"><p>'
                 + _field("from", "from", params.get("from", ""), ident="test-from")
                 + _field("to", "to", "", ident="test-to")
                 + f'<input type="hidden" name="csrf" value="{_t(csrf)}">'
                 '<button type="submit" id="send-test">Send</button></p></form>')
    return page("Routes", "".join(parts), hostname)


def send_test_page(data: Mapping[str, Any], hostname: str) -> bytes:
    cls = "ok" if data["ok"] else "bad"
    body = (f'<p class="{cls}" id="result">{"delivered" if data["ok"] else "not delivered"}'
            f' (exit status {data["exit_status"]})</p><pre id="steps">{_lines(data["output"])}'
            '</pre><p><a href="/routes">Back to the routes</a></p>')
    return page(f"Send-test from {data['from']}", body, hostname)


def tokens_page(data: Mapping[str, Any], hostname: str) -> bytes:
    now = data["now"]
    warn_s = data["expiry_warning_s"]
    rows = []
    for t in data["tokens"]:
        if t["needs_signin"]:
            state = f'<span class="bad">needs sign-in</span>: {_t(t["problem"])}'
        elif t["problem"]:
            state = f'<span class="bad">{_t(t["problem"])}</span>'
        else:
            state = '<span class="ok">ok</span>'
        fix = _t(t["fix"]) if t["fix"] else ""
        if t["needs_signin"] and data.get("signin_url"):
            fix += f' or <a href="{_t(data["signin_url"])}">the sign-in page</a>'
        token_exp = t["expires_at"]
        token_cell = _t(utc(token_exp))
        if token_exp and token_exp - now <= 0:
            token_cell = f'<span class="warn">{token_cell} (expired)</span>'
        rows.append([_t(t["route"]), _t(t["account"] or "(app)"), token_cell,
                     _t(utc(t["last_refreshed"])), state, fix])
    parts = [_table(["route", "account", "access token expires", "last refreshed", "state",
                     "what to do"], rows, "tokens"),
             "<h2>Secrets and certificates</h2>"]
    crow = []
    for c in data["credentials"]:
        when = c["expires_at"]
        cell = _t(utc(when)) if when else "no expiry known"
        if when and when - now <= warn_s:
            left = "expired" if when <= now else f"expires in {_age(when - now)}"
            cell = f'<span class="warn">{cell} ({left}): renew it</span>'
        crow.append([_t(c["route"]), _t(c["kind"]), cell])
    parts.append(_table(["route", "credential", "expires"], crow, "credentials"))
    if data["without_tokens"]:
        parts.append("<h2>Routes without OAuth tokens</h2>")
        parts.append(_table(["route", "upstream", "signs in with"],
                            [[_t(r["route"]), _t(r["upstream"]), _t(r["auth"])]
                             for r in data["without_tokens"]], "without-tokens"))
    return page("Tokens and credentials", "".join(parts), hostname)
