"""The web console: `/` overview, `/queue` and a page per message, `/log`, `/routes`, `/tokens`,
each as HTML and as JSON (`Accept: application/json`, or the same path under `/api`).

Rules:
- `handle` is a pure request -> Response function run on the web server's request thread;
  relayd.web.server only parses HTTP and writes the answer. Authorization is the status
  page's: on a loopback address no login (the admin is then "loopback"), elsewhere HTTP Basic
  over TLS by one of `[web] admins`, or of `[web] viewers` (read-only: every page and export,
  no action: their POSTs answer 403, and the pages offer none). Without a login every page
  and API answers 401.
- The queue is read through the queue manager's read side (relayd.qmgr.view.QueueView) and
  changed through its public methods (`retry_ids`, `delete_ids`), all called on the event loop,
  never from this thread directly. Each action is a POST carrying a CSRF token (an HMAC of the
  admin's name under a key made at start), reached through a confirmation page; a POST without
  it, or with a wrong one, answers 403 and changes nothing. The queue manager journals each
  action with the admin's name.
- The journal is read newest first, a page at a time, from the day file a cursor names
  (`before=DAY:LINE`), so a page over a year of files reads only the days it shows (and, for a
  rare match, the days it skips). Export streams the whole query, oldest first, as CSV or as
  `relayd log --json`'s lines.
- `/routes` shows `relayd check --explain` (the same function), and runs `relayd route` and
  `relayd send-test` as the command line does (the same program, on the config file the daemon
  was started with), showing what they print: the page cannot drift from the CLI.
- JSON carries the CLI's `--json` objects: a queue row is `queue list --json`'s item plus
  `route` and `state`; a message is `queue show --json`'s object; a journal event is
  `relayd log --json`'s line.
Rejected alternative: a JavaScript front end calling the JSON API. It needs a build, and the
CSP (no inline script) and the Windows admins this is for are better served by plain pages.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import dataclasses
import email.parser
import email.policy
import hashlib
import hmac
import io
import itertools
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from relayd import journal
from relayd.config import Config
from relayd.escape import json_line, visible
from relayd.qmgr.view import Filter
from relayd.web import console_pages as pages

if TYPE_CHECKING:
    from relayd.qmgr.manager import QueueManager

log = logging.getLogger(__name__)

LOOP_TIMEOUT_S = 10.0  # a read or action on the event loop
CLI_TIMEOUT_S = 120.0  # relayd route / send-test run from /routes
QUEUE_PAGE = 50
LOG_PAGE = 100
BODY_SHOWN_MAX = 1024 * 1024  # bytes of a message shown on its page
HEAD_READ_BYTES = 64 * 1024  # bytes read for a message's headers
DISK_FREE_WARN = 0.05  # warn when the spool's file system has less than this fraction free
EXPIRY_WARNING_S = 30 * 86400.0  # as [notify] expiry_warning's default
EXPORT_MAX_EVENTS = 200_000  # one export at most (it is built in memory); narrow the search
HTML = "text/html; charset=utf-8"
JSON = "application/json"
LOOPBACK_ADMIN = "loopback"
PAGES = ("/", "/queue", "/log", "/routes", "/tokens", "/confirm", "/action")


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = HTML
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, str]
    authorization: str | None
    accept: str = ""
    form: Mapping[str, str] = field(default_factory=dict)
    client: str = ""  # the client's address (failed logins back off per address)


def is_console_path(path: str) -> bool:
    if path.startswith("/api/") or path == "/api":
        return True
    return path in PAGES or any(path.startswith(p + "/") for p in PAGES[1:])


class Console:
    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop, qmgr: QueueManager,
                 snapshot: Callable[[], Any],
                 admin: Callable[[str | None, str, tuple[str, ...]], bool | float],
                 journal_healthy: Callable[[], bool] = lambda: True) -> None:
        self.config = config
        self.loop = loop
        self.qmgr = qmgr
        self.snapshot = snapshot  # relayd.web.pages.Snapshot, taken on the loop
        self.admin = admin  # the status page's login check, given the names allowed
        self.journal_healthy = journal_healthy
        self._csrf_key = secrets.token_bytes(32)

    # -- plumbing ------------------------------------------------------------------------------

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the event loop (the queue manager's state lives there), wait for it."""
        async def call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(LOOP_TIMEOUT_S)

    def csrf(self, who: str) -> str:
        return hmac.new(self._csrf_key, who.encode(), hashlib.sha256).hexdigest()

    def who(self, authorization: str | None, client: str) -> tuple[str, bool] | float | None:
        """(name, may act) of the person asking; None: not allowed in; a number: the seconds
        this client must wait after failed logins."""
        web = self.config.web
        if web.loopback:
            return LOOPBACK_ADMIN, True
        allowed = self.admin(authorization, client, web.admins + web.viewers)
        if allowed is not True:
            return None if allowed is False else float(allowed)
        assert authorization is not None
        login = base64.b64decode(authorization[6:]).decode().partition(":")[0]
        return login, login in web.admins

    # -- entry ---------------------------------------------------------------------------------

    def handle(self, req: Request) -> Response:
        path = req.path.rstrip("/") or "/"
        as_json = "application/json" in req.accept
        if path == "/api" or path.startswith("/api/"):
            as_json, path = True, path[4:] or "/"
        who = self.who(req.authorization, req.client)
        if isinstance(who, float):
            wait = str(int(who) + 1)
            refused = self._error(429, "Too many failed logins", f"Try again in {wait} "
                                  "seconds.", as_json)
            refused.headers["Retry-After"] = wait
            return refused
        if who is None:
            body = (json.dumps({"error": "login required"}).encode() if as_json else
                    pages.message_page("Login required", "Log in as an administrator of this "
                                       "relay.", self.config.server.hostname))
            return Response(401, body, JSON if as_json else HTML,
                            {"WWW-Authenticate": 'Basic realm="relayd", charset="UTF-8"'})
        name, may_act = who
        if req.method == "POST":
            if not hmac.compare_digest(req.form.get("csrf", ""), self.csrf(name)):
                log.warning("web console: POST %s refused: no or a wrong CSRF token (%s)",
                            visible(path, 200), name)
                return self._error(403, "Refused", "This form is stale or was not sent by "
                                   "this console; nothing was changed.", as_json)
            if not may_act:
                return self._error(403, "Refused", "This login may look, not act.", as_json)
            if path == "/action":
                return self.action(req.form, name, as_json)
            if path == "/routes/send-test":
                return self.send_test(req.form, as_json)
            return self._error(404, "Not found", "No such action.", as_json)
        if path == "/":
            return self.overview(as_json)
        if path == "/queue":
            return self.queue(req.query, as_json, may_act)
        if path.startswith("/queue/"):
            return self.message(path[len("/queue/"):], req.query, as_json, may_act)
        if path == "/confirm":
            if not may_act:
                return self._error(403, "Refused", "This login may look, not act.", as_json)
            return self.confirm(req.query, name)
        if path == "/log":
            return self.log(req.query, as_json)
        if path == "/log/export":
            return self.export(req.query)
        if path == "/routes":
            return self.routes(req.query, name if may_act else "", as_json)
        if path == "/tokens":
            return self.tokens(as_json)
        return self._error(404, "Not found", "Try the menu above.", as_json)

    def _error(self, status: int, title: str, text: str, as_json: bool) -> Response:
        if as_json:
            return Response(status, json.dumps({"error": text}).encode(), JSON)
        return Response(status, pages.message_page(title, text, self.config.server.hostname))

    def _json(self, data: Any) -> Response:
        return Response(200, json.dumps(data, ensure_ascii=False, default=str).encode(), JSON)

    # -- overview ------------------------------------------------------------------------------

    def overview(self, as_json: bool) -> Response:
        from relayd.web.pages import status_page

        snap = self.snapshot()
        snap = dataclasses.replace(snap, attention=self.attention(snap))
        if as_json:
            return self._json(dataclasses.asdict(snap))
        return Response(200, pages.with_menu(status_page(snap)))

    def attention(self, snap: Any) -> list[str]:
        """What needs a person, most urgent first; the status page lists it before the
        config's warnings (basic-auth switch-offs) and a refused password's advice."""
        out: list[str] = []
        for t in snap.tokens:
            if t.needs_signin:
                out.append(f"route {t.route}: {t.account or 'the app'} needs a new sign-in"
                           + (f": {t.fix}" if t.fix else ""))
        for t in snap.tokens:
            cred = t.credential_expires_at
            if cred is not None and cred - snap.now <= EXPIRY_WARNING_S:
                state = "has expired" if cred <= snap.now else "expires"
                out.append(f"route {t.route}: its client secret or certificate {state} on "
                           f"{pages.utc(cred)}")
        for r in snap.routes:
            if r.failing_since is not None:
                out.append(f"route {r.name}: {r.failing_kind} failing since "
                           f"{pages.utc(r.failing_since)}: {r.last_failure_reply}")
        if not self.journal_healthy():
            out.append(f"the journal {self.config.journal.path} cannot be written")
        try:
            usage = shutil.disk_usage(self.config.queue.path)
            if usage.free < usage.total * DISK_FREE_WARN:
                out.append(f"the spool's disk is nearly full: {usage.free // 2**20} MiB free "
                           f"of {usage.total // 2**20} MiB ({self.config.queue.path})")
        except OSError:
            pass
        return list(dict.fromkeys(out))

    # -- queue ---------------------------------------------------------------------------------

    def queue(self, q: Mapping[str, str], as_json: bool, may_act: bool = True) -> Response:
        try:
            min_age = journal_age(q.get("age", ""))
        except ValueError as e:
            return self._error(400, "Bad filter", str(e), as_json)
        state = q.get("state", "")
        flt = Filter(route=q.get("route", ""), sender=q.get("sender", ""),
                     recipient=q.get("recipient", ""), min_age_s=min_age,
                     state=state if state in ("due", "active", "deferred") else "")
        offset, limit = _int(q.get("offset"), 0), _int(q.get("limit"), QUEUE_PAGE)
        view = self.qmgr.view
        result = self.on_loop(lambda: view.page(flt, offset, limit))
        data = {"now": time.time(), "queued": result.queued, "matching": result.matching,
                "offset": result.offset, "limit": result.limit,
                "messages": [{**r.summary, "state": r.state} for r in result.rows]}
        if as_json:
            return self._json(data)
        params = {k: v for k, v in q.items() if k in ("route", "sender", "recipient", "age",
                                                      "state", "limit", "done")}
        return Response(200, pages.queue_page(data, params, list(self.config.routes),
                                              self.config.server.hostname, may_act))

    def message(self, qid: str, q: Mapping[str, str], as_json: bool,
                may_act: bool = True) -> Response:
        view = self.qmgr.view
        row = self.on_loop(lambda: view.message(qid))
        if row is None:
            return self._error(404, "Not in the queue", f"{qid} is not in the queue (delivered, "
                               "bounced or deleted: see the journal).", as_json)
        assert row.entry is not None
        spool = self.qmgr.spool
        try:
            head = spool.read_data(row.entry, HEAD_READ_BYTES)
        except OSError:
            head = b""
        parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
        headers = [(k, str(v)) for k, v in parsed.items()]
        body_text = None
        if q.get("body"):
            try:
                raw = spool.read_data(row.entry, BODY_SHOWN_MAX)
            except OSError as e:
                raw = f"(cannot read the message: {e.strerror})".encode()
            body_text = raw.decode("utf-8", "replace")
        if as_json:
            data: dict[str, Any] = {**row.summary, "state": row.state,
                                    "last_reply": dict(row.last_reply), "headers": headers}
            if body_text is not None:
                data["body"] = body_text
            return self._json(data)
        detail = {"summary": row.summary, "state": row.state, "last_reply": row.last_reply,
                  "now": time.time()}
        return Response(200, pages.message_detail(detail, headers, body_text,
                                                  self.config.server.hostname,
                                                  q.get("done", ""), may_act))

    def confirm(self, q: Mapping[str, str], who: str) -> Response:
        action = q.get("action", "")
        hostname = self.config.server.hostname
        if action in ("retry", "delete") and q.get("id"):
            qid = q["id"]
            question = (f"Retry {qid} now?" if action == "retry" else
                        f"Delete {qid} from the queue? It will not be delivered, and no bounce "
                        "is sent.")
            fields = {"action": action, "id": qid}
            back = f"/queue/{qid}"
        elif action == "retry-route" and q.get("route") in self.config.routes:
            route = q["route"]
            question = f"Retry every queued message of route {route} now?"
            fields = {"action": action, "route": route}
            back = "/queue?" + urllib.parse.urlencode({"route": route})
        else:
            return self._error(400, "Nothing to confirm", "Unknown action.", False)
        return Response(200, pages.confirm_page(question, fields, self.csrf(who), back,
                                                hostname))

    def action(self, form: Mapping[str, str], who: str, as_json: bool) -> Response:
        action = form.get("action", "")
        qmgr = self.qmgr
        if action in ("retry", "delete"):
            ids = [form.get("id", "")]
        elif action == "retry-route" and form.get("route") in self.config.routes:
            flt = Filter(route=form["route"])
            ids = self.on_loop(lambda: qmgr.view.ids(flt))
        else:
            return self._error(400, "Unknown action", "Nothing was changed.", as_json)
        if action == "delete":
            done = self.on_loop(lambda: qmgr.delete_ids(ids, who))
        else:
            route = form["route"] if action == "retry-route" else None
            done = self.on_loop(lambda: qmgr.retry_ids(ids, who, route))
        text = f"{action}: {done} message(s)" + ("" if done else " (no longer queued)")
        log.info("web console: %s by %s: %d message(s)", action, who, done)
        if as_json:
            return self._json({"action": action, "done": done, "admin": who})
        back = "/queue"
        if action == "retry-route":
            back += "?" + urllib.parse.urlencode({"route": form["route"]})
        return Response(303, b"", HTML, {"Location": back + ("&" if "?" in back else "?")
                                         + urllib.parse.urlencode({"done": text})})

    # -- journal -------------------------------------------------------------------------------

    def _query(self, q: Mapping[str, str]) -> journal.Query:
        since = journal.parse_since(q["since"], time.time()) if q.get("since") else None
        return journal.Query(queue_id=q.get("id") or None,
                             message_id=q.get("message_id") or None,
                             sender=q.get("from") or None, recipient=q.get("to") or None,
                             route=q.get("route") or None, since=since)

    def log(self, q: Mapping[str, str], as_json: bool) -> Response:
        try:
            query = self._query(q)
        except ValueError as e:
            return self._error(400, "Bad filter", str(e), as_json)
        limit = max(1, min(_int(q.get("limit"), LOG_PAGE), 1000))
        events, nxt = journal.read_back(self.config.journal.path, query, q.get("before"),
                                        limit)
        ids = {str(e.get("id")) for e in events}
        view = self.qmgr.view
        queued = self.on_loop(lambda: view.queued(ids)) if ids else []
        data = {"events": events, "next": nxt, "queued": sorted(queued)}
        if as_json:
            return self._json(data)
        return Response(200, pages.log_page(data, q, self.config.server.hostname))

    def export(self, q: Mapping[str, str]) -> Response:
        try:
            query = self._query(q)
        except ValueError as e:
            return self._error(400, "Bad filter", str(e), False)
        events = list(itertools.islice(journal.read(self.config.journal.path, query),
                                       EXPORT_MAX_EVENTS + 1))
        cut = len(events) > EXPORT_MAX_EVENTS
        extra = {"X-Relayd-Truncated": f"first {EXPORT_MAX_EVENTS} events"} if cut else {}
        del events[EXPORT_MAX_EVENTS:]
        if q.get("format") == "csv":
            out = io.StringIO()
            writer = csv.writer(out)
            columns = ("time", "event", "id", "message_id", "from", "to", "route", "upstream",
                       "reply", "status", "subject", "admin")
            writer.writerow(("time_utc", *columns[1:]))
            for ev in events:
                row = [pages.utc(float(ev.get("time", 0)))]
                for key in columns[1:]:
                    value = ev.get(key, "")
                    row.append(" ".join(value) if isinstance(value, list) else str(value))
                writer.writerow(row)
            return Response(200, out.getvalue().encode(), "text/csv; charset=utf-8",
                            {"Content-Disposition": 'attachment; filename="relayd-log.csv"',
                             **extra})
        body = "".join(json_line(ev) + "\n" for ev in events)  # as `relayd log --json`
        return Response(200, body.encode(), "application/x-ndjson; charset=utf-8",
                        {"Content-Disposition": 'attachment; filename="relayd-log.jsonl"',
                         **extra})

    # -- routes --------------------------------------------------------------------------------

    def _cli(self, *args: str) -> tuple[int, str]:
        """Run a relayd command on the daemon's config file; (exit status, what it printed)."""
        if not self.config.source or not os.path.exists(self.config.source):
            return 2, "relayd was not started from a config file; run the command on the server"
        env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
        try:
            done = subprocess.run([sys.executable, "-m", "relayd", args[0], "-c",
                                   self.config.source, *args[1:]], capture_output=True,
                                  text=True, timeout=CLI_TIMEOUT_S, env=env, check=False)
        except subprocess.TimeoutExpired:
            return 1, f"relayd {args[0]} did not finish within {CLI_TIMEOUT_S:.0f} s"
        return done.returncode, done.stdout + done.stderr

    def routes(self, q: Mapping[str, str], who: str, as_json: bool) -> Response:
        """`who` "": a viewer, offered no send-test."""
        from relayd.explain import explain

        data: dict[str, Any] = {"explain": explain(self.config), "route": None}
        address = q.get("address", "").strip()
        if address:
            args = ["route", "--", address] if address.startswith("-") else ["route", address]
            if q.get("to", "").strip():
                args[1:1] = ["--to", q["to"].strip()]
            status, output = self._cli(*args)
            data["route"] = {"address": address, "exit_status": status, "output": output}
        if as_json:
            return self._json(data)
        return Response(200, pages.routes_page(data, q, self.csrf(who) if who else "",
                                               self.config.server.hostname))

    def send_test(self, form: Mapping[str, str], as_json: bool) -> Response:
        sender, to = form.get("from", "").strip(), form.get("to", "").strip()
        if not sender or not to or sender.startswith("-") or to.startswith("-"):
            return self._error(400, "Send-test", "Give a sender and a recipient.", as_json)
        status, output = self._cli("send-test", "--from", sender, "--to", to)
        data = {"from": sender, "to": to, "exit_status": status, "ok": status == 0,
                "output": output}
        if as_json:
            return self._json(data)
        return Response(200, pages.send_test_page(data, self.config.server.hostname))

    # -- tokens --------------------------------------------------------------------------------

    def tokens(self, as_json: bool) -> Response:
        from relayd.auth.health import credential_expiry

        snap = self.snapshot()
        credentials = []
        for route in self.config.routes.values():
            oauth = route.oauth
            kind = ("" if oauth is None else "client certificate" if oauth.certificate_file
                    else "client secret" if oauth.client_secret is not None else "")
            if not kind:
                continue
            credentials.append({"route": route.name, "kind": kind,
                                "expires_at": credential_expiry(route)})
        with_tokens = {t.route for t in snap.tokens}
        # Routes with no token at all: what they sign in with instead (never the secret).
        others = [{"route": r.name, "upstream": r.upstream,
                   "auth": "password" if r.uses_password else "none"}
                  for r in self.config.routes.values()
                  if r.name not in with_tokens and r.oauth is None]
        data = {"now": snap.now, "expiry_warning_s": getattr(snap, "expiry_warning_s",
                                                             EXPIRY_WARNING_S),
                "tokens": [dataclasses.asdict(t) for t in snap.tokens],
                "credentials": credentials, "without_tokens": others,
                "signin_url": "/signin" if snap.signin_routes else ""}
        if as_json:
            return self._json(data)
        return Response(200, pages.tokens_page(data, self.config.server.hostname))


def journal_age(text: str) -> float:
    """`2h` -> seconds; "" -> 0."""
    if not text.strip():
        return 0.0
    now = time.time()
    try:
        return now - journal.parse_since(text, now)
    except ValueError:
        raise ValueError(f"age {text!r}: use 30m, 2h or 3d") from None


def _int(text: str | None, default: int) -> int:
    return int(text) if text and text.isdigit() else default
