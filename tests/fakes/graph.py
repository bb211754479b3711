"""A fake Microsoft Graph mail endpoint: MIME sendMail, drafts, attachments, upload sessions."""

from __future__ import annotations

import base64
import binascii
import email.policy
import json
import re
import secrets
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from typing import Any

from fakes.https import Handler, HttpsServer, message_id, start_https_server

# Graph refuses MIME requests over about 4 MB with 413.
MAX_REQUEST_BYTES = 4_000_000


def _utf8(text: str) -> str:
    """The parser keeps raw UTF-8 header bytes as surrogates; headers are UTF-8 (RFC 6532)."""
    return text.encode("ascii", "surrogateescape").decode("utf-8", "replace")


def header_recipients(mime: bytes) -> list[str]:
    """Every To/Cc/Bcc address, as Graph reads them from a MIME message."""
    msg = BytesParser(policy=email.policy.default).parsebytes(mime, headersonly=True)
    out: list[str] = []
    for name in ("to", "cc", "bcc"):
        for header in msg.get_all(name, []):
            out.extend(_utf8(a.addr_spec) for a in header.addresses)
    return out


def from_address(mime: bytes) -> str | None:
    msg = BytesParser(policy=email.policy.default).parsebytes(mime, headersonly=True)
    header = msg.get("from")
    if header is None or not header.addresses:
        return None
    return _utf8(str(header.addresses[0].addr_spec))


@dataclass
class Sent:
    """One message Graph accepted for delivery."""

    mailbox: str
    mime: bytes  # for the draft path: the draft's MIME, without the attachments
    recipients: list[str]
    token: str
    via: str  # "sendMail" or "draft"
    attachments: list[dict[str, Any]] = field(default_factory=list)  # with "data": bytes
    at: float = field(default_factory=time.time)  # when it was sent (Sent Items' sentDateTime)


@dataclass
class Draft:
    mailbox: str
    mime: bytes
    token: str
    attachments: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Upload:
    draft_id: str
    item: dict[str, Any]
    data: bytearray = field(default_factory=bytearray)


@dataclass
class GraphState:
    token_ok: Callable[[str], bool] = lambda token: True  # e.g. IdpState.check_bearer
    rejected_tokens: set[str] = field(default_factory=set)  # answered 401 as expired
    # Answers for the next API requests, before any checks: (status, headers, json body).
    script: deque[tuple[int, dict[str, str], dict[str, Any]]] = field(default_factory=deque)
    max_request_bytes: int = MAX_REQUEST_BYTES
    readwrite: bool = True  # the app has Mail.ReadWrite (drafts); otherwise 403
    send_as_denied: bool = False  # From must be the mailbox itself
    mailboxes: set[str] | None = None  # known mailboxes (lower case); None: any
    attachment_status: int | None = None  # answer attachment calls with this error
    delay_s: float = 0.0  # each sendMail takes this long (to observe concurrency)
    # Each sendMail waits (30 s at most) until this many are in flight at once: concurrency
    # observed without a clock, so a loaded machine cannot make it look serial. 0: no wait.
    gather: int = 0
    gathered: threading.Condition = field(default_factory=threading.Condition)
    read_sent: bool = True  # the app may read Sent Items (Mail.ReadBasic); otherwise 403
    # sendMail stalls on this event (a kill -9 of relayd mid-request), after recording the
    # message when `record_then_stall`, before it otherwise; `send_entered` says it is there.
    stall: threading.Event | None = None
    record_then_stall: bool = True
    # What the next sendMails do after keeping the message, one each (issue 30: the answer is
    # lost although the mail went out): "504", "502", "503" (a gateway's answer: an HTML body,
    # no Graph error), "late:<seconds>" (answer 202 that much later), "reset" (a TCP RST).
    after_keep: deque[str] = field(default_factory=deque)
    # Sent Items shows a sent message only this long after it was sent (Exchange's lag).
    sent_items_lag_s: float = 0.0
    lookups: int = 0  # Sent Items lookups answered
    send_entered: threading.Event = field(default_factory=threading.Event)
    sent: list[Sent] = field(default_factory=list)
    requests: list[tuple[str, str, int]] = field(default_factory=list)  # method, path, status
    tokens_seen: list[str] = field(default_factory=list)
    peers: list[int] = field(default_factory=list)  # client port of each request: reuse shows
    drafts: dict[str, Draft] = field(default_factory=dict)
    deleted_drafts: list[str] = field(default_factory=list)
    uploads: dict[str, Upload] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    max_in_flight: dict[str, int] = field(default_factory=dict)
    # Graph's limit of concurrent requests per app and mailbox (4): a sendMail beyond it is
    # answered 429 (`throttled` counts them per mailbox). None: no limit, only recorded.
    max_concurrent_per_mailbox: int | None = None
    throttled: dict[str, int] = field(default_factory=dict)
    # Per-mailbox message rate and recipient budget (fakes.limits), enforced on sendMail with
    # a 429 as Graph's throttling does; None: none.
    limits: Any = None
    in_flight_all: int = 0  # sendMail in flight over all mailboxes, and its peak
    max_in_flight_all: int = 0
    # Delegated calls to /me: the mailbox of the account a token was issued to (for example
    # from IdpState.check_bearer); None: /me is refused as it is for app-only tokens.
    me: Callable[[str], str | None] | None = None
    # Personal Microsoft accounts' mailboxes (lower case): Graph knows them as /me only, and
    # answers /users/{address} with ErrorInvalidUser (what users of personal accounts report).
    personal_mailboxes: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    base_url: str = ""

    def fail_next(self, status: int, code: str = "", message: str = "",
                  headers: dict[str, str] | None = None, times: int = 1) -> None:
        body = {"error": {"code": code or f"Http{status}", "message": message or "scripted"}}
        with self.lock:
            for _ in range(times):
                self.script.append((status, dict(headers or {}), body))

    def statuses(self, path_part: str = "") -> list[int]:
        with self.lock:
            return [s for _, p, s in self.requests if path_part in p]


_USER_PATH = re.compile(r"^/v1\.0/users/([^/]+)/(.*)$")
_ME_PATH = re.compile(r"^/v1\.0/me/(.*)$")


class GraphHandler(Handler):
    state: GraphState  # type: ignore[assignment]

    def answer(self, status: int, body: dict[str, Any] | None = None,
               headers: dict[str, str] | None = None) -> None:
        with self.state.lock:
            self.state.requests.append((self.command, self.path, status))
            self.state.peers.append(int(self.client_address[1]))
        data = json.dumps(body).encode() if body is not None else b""
        # Graph names each request (its support asks for it): the journal records it.
        self.reply(status, data, "application/json",
                   {"request-id": secrets.token_hex(16), **(headers or {})})

    def error(self, status: int, code: str, message: str) -> None:
        self.answer(status, {"error": {"code": code, "message": message,
                                       "innerError": {"request-id": secrets.token_hex(8)}}})

    def read_body(self) -> bytes:
        """Content-Length or chunked (Node clients stream a body as chunks, as Graph allows)."""
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return super().read_body()
        out = bytearray()
        while True:
            size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailer fields
                return bytes(out)
            out += self.rfile.read(size)
            self.rfile.readline(1024)  # the CRLF after each chunk

    # -- dispatch --------------------------------------------------------------------------

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        self.dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802 - stdlib naming
        self.dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802 - stdlib naming
        self.dispatch("DELETE")

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self.dispatch("GET")

    def dispatch(self, method: str) -> None:
        body = self.read_body()
        path = self.path.split("?")[0]
        if path.startswith("/upload/"):
            self.upload(method, path.removeprefix("/upload/"), body)
            return
        m = _USER_PATH.match(path)
        me = _ME_PATH.match(path)
        if not m and not me:
            self.error(404, "UnknownError", f"no such resource {path}")
            return
        st = self.state
        with st.lock:
            scripted = st.script.popleft() if st.script else None
        if scripted is not None:
            self.answer(scripted[0], scripted[2], scripted[1])
            return
        token = self.bearer()
        if token is None:
            return
        if m:
            mailbox = urllib.parse.unquote(m.group(1))
            if mailbox.lower() in st.personal_mailboxes:
                self.error(404, "ErrorInvalidUser",
                           f"The requested user '{mailbox}' is invalid.")
                return
            tail = m.group(2)
        else:
            signed_in = st.me(token) if st.me is not None else None
            if signed_in is None:
                self.error(400, "BadRequest",
                           "/me request is only valid with delegated authentication flow.")
                return
            mailbox, tail = signed_in, me.group(1) if me else ""
        if st.mailboxes is not None and mailbox.lower() not in st.mailboxes:
            self.error(404, "ErrorInvalidUser",
                       f"The requested user '{mailbox}' is invalid.")
            return
        rest = tail.split("/")
        if method == "POST" and rest == ["sendMail"]:
            self.send_mail(mailbox, body, token)
        elif method == "POST" and rest == ["messages"]:
            self.create_draft(mailbox, body, token)
        elif method == "POST" and len(rest) == 3 and rest[0] == "messages" and rest[2] == "send":
            self.send_draft(mailbox, rest[1], token)
        elif method == "POST" and rest[-1] in ("attachments", "createUploadSession") and \
                st.attachment_status:
            self.error(st.attachment_status, "ServiceUnavailable", "scripted attachment failure")
        elif method == "POST" and len(rest) == 3 and rest[2] == "attachments":
            self.add_attachment(rest[1], body)
        elif method == "POST" and len(rest) == 4 and rest[3] == "createUploadSession":
            self.create_upload(rest[1], body)
        elif method == "GET" and rest == ["mailFolders", "sentitems", "messages"]:
            self.find_sent(mailbox)
        elif method == "DELETE" and len(rest) == 2 and rest[0] == "messages":
            with st.lock:
                found = st.drafts.pop(rest[1], None)
                st.deleted_drafts.append(rest[1])
            self.answer(204 if found else 404)
        else:
            self.error(400, "BadRequest", f"unsupported {method} {path}")

    def bearer(self) -> str | None:
        st = self.state
        auth = self.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else ""
        with st.lock:
            st.tokens_seen.append(token)
            rejected = token in st.rejected_tokens
        if not token or rejected or not st.token_ok(token):
            self.error(401, "InvalidAuthenticationToken",
                       "Lifetime validation failed, the token is expired.")
            return None
        return token

    def mime(self, body: bytes) -> bytes | None:
        st = self.state
        if len(body) > st.max_request_bytes:
            self.error(413, "RequestEntityTooLarge", "The request is too large.")
            return None
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "text/plain":
            self.error(415, "UnsupportedMediaType", "MIME content must be sent as text/plain")
            return None
        try:
            return base64.b64decode(body, validate=True)
        except binascii.Error:
            self.error(400, "ErrorMimeContentInvalidBase64String",
                       "Invalid base64 string for MIME content.")
            return None

    def check_send_as(self, mailbox: str, mime: bytes) -> bool:
        sender = from_address(mime)
        if self.state.send_as_denied and sender and sender.lower() != mailbox.lower():
            self.error(403, "ErrorSendAsDenied", "The user account which was used to submit "
                       "this request does not have the right to send mail on behalf of the "
                       "specified sending account.")
            return False
        return True

    # -- endpoints -------------------------------------------------------------------------

    def send_mail(self, mailbox: str, body: bytes, token: str) -> None:
        st = self.state
        mime = self.mime(body)
        if mime is None:
            return
        recipients = header_recipients(mime)
        if not recipients:
            self.error(400, "ErrorInvalidRecipients", "At least one recipient isn't valid.")
            return
        if not self.check_send_as(mailbox, mime):
            return
        if st.limits is not None and st.limits.admit(mailbox, len(recipients)) is not None:
            self.answer(429, {"error": {"code": "ErrorExceededMessageLimit",
                                        "message": "Mailbox is over its sending limit."}},
                        {"Retry-After": "1"})
            return
        key = mailbox.lower()
        with st.lock:
            limit = st.max_concurrent_per_mailbox
            over = limit is not None and st.in_flight.get(key, 0) >= limit
            if over:
                st.throttled[key] = st.throttled.get(key, 0) + 1
            else:
                st.in_flight[key] = st.in_flight.get(key, 0) + 1
                st.max_in_flight[key] = max(st.max_in_flight.get(key, 0), st.in_flight[key])
                st.in_flight_all += 1
                st.max_in_flight_all = max(st.max_in_flight_all, st.in_flight_all)
        if over:
            self.answer(429, {"error": {
                "code": "ApplicationThrottled",
                "message": "Application is over its MailboxConcurrency limit."}},
                {"Retry-After": "1"})
            return
        try:
            if st.gather:
                with st.gathered:
                    st.gathered.notify_all()
                    # the peak, not the count now: the first ones let go leave at once
                    st.gathered.wait_for(lambda: st.max_in_flight_all >= st.gather, timeout=30)
            if st.delay_s:
                time.sleep(st.delay_s)
            stall = st.stall
            if stall is not None and not st.record_then_stall:
                st.send_entered.set()
                stall.wait(30)
                self.connection.close()  # relayd is gone; nothing is sent
                return
            with st.lock:
                st.sent.append(Sent(mailbox, mime, recipients, token, "sendMail"))
                after = st.after_keep.popleft() if st.after_keep else None
            if after is not None and self.lose_answer(after):
                return
            if stall is not None:
                st.send_entered.set()
                stall.wait(30)
                self.connection.close()  # relayd is gone; the copy stays in Sent Items
                return
        finally:
            with st.lock:
                st.in_flight[key] -= 1
                st.in_flight_all -= 1
        self.answer(202)

    def lose_answer(self, action: str) -> bool:
        """After the message was kept: answer as `GraphState.after_keep` says; False to go on
        and answer 202."""
        if action in ("502", "503", "504"):
            with self.state.lock:
                self.state.requests.append((self.command, self.path, int(action)))
            phrase = {"502": "Bad Gateway", "503": "Service Unavailable",
                      "504": "Gateway Timeout"}[action]
            self.reply(int(action), f"<html><body><h1>{action} {phrase}</h1></body></html>",
                       "text/html")
            return True
        if action == "reset":
            self.reset_connection()
            return True
        if action.startswith("late:"):
            time.sleep(float(action.split(":", 1)[1]))
            return False
        raise ValueError(f"unknown after_keep action {action!r}")

    def find_sent(self, mailbox: str) -> None:
        """GET .../mailFolders/sentitems/messages?$filter=internetMessageId eq '<id>'"""
        st = self.state
        if not st.read_sent:
            self.error(403, "ErrorAccessDenied", "Access is denied. Check credentials and try "
                       "again.")
            return
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        m = re.fullmatch(r"internetMessageId eq '(.*)'", query.get("$filter", [""])[0])
        if not m:
            self.error(400, "BadRequest", "unsupported $filter")
            return
        wanted = m.group(1).replace("''", "'")
        shown_before = time.time() - st.sent_items_lag_s
        with st.lock:
            st.lookups += 1
            found = [s for s in st.sent if s.mailbox.lower() == mailbox.lower() and
                     message_id(s.mime) == wanted and s.at <= shown_before]
        self.answer(200, {"value": [
            {"id": f"AAMk{i}", "internetMessageId": wanted,
             "sentDateTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s.at))}
            for i, s in enumerate(found)]})

    def create_draft(self, mailbox: str, body: bytes, token: str) -> None:
        st = self.state
        if not st.readwrite:
            self.error(403, "ErrorAccessDenied", "Access is denied. Check credentials and try "
                       "again.")
            return
        mime = self.mime(body)
        if mime is None:
            return
        draft_id = "AAMk" + secrets.token_urlsafe(12)
        with st.lock:
            st.drafts[draft_id] = Draft(mailbox, mime, token)
        self.answer(201, {"id": draft_id, "isDraft": True})

    def add_attachment(self, draft_id: str, body: bytes) -> None:
        st = self.state
        item = json.loads(body)
        with st.lock:
            draft = st.drafts.get(draft_id)
        if draft is None:
            self.error(404, "ErrorItemNotFound", "The specified object was not found.")
            return
        if item.get("@odata.type") != "#microsoft.graph.fileAttachment":
            self.error(400, "ErrorInvalidRequest", "expected a fileAttachment")
            return
        data = base64.b64decode(item.pop("contentBytes"), validate=True)
        if len(data) >= 3 * 1024 * 1024:
            self.error(413, "ErrorRequestEntityTooLarge", "use an upload session above 3 MB")
            return
        with st.lock:
            draft.attachments.append({**item, "data": data})
        self.answer(201, {"id": "att-" + secrets.token_hex(4)})

    def create_upload(self, draft_id: str, body: bytes) -> None:
        st = self.state
        item = json.loads(body).get("AttachmentItem", {})
        with st.lock:
            found = draft_id in st.drafts
        if not found:
            self.error(404, "ErrorItemNotFound", "The specified object was not found.")
            return
        if item.get("attachmentType") != "file" or not isinstance(item.get("size"), int):
            self.error(400, "ErrorInvalidRequest", "AttachmentItem needs attachmentType and size")
            return
        sid = secrets.token_urlsafe(12)
        with st.lock:
            st.uploads[sid] = Upload(draft_id, item)
        self.answer(201, {"uploadUrl": f"{st.base_url}/upload/{sid}",
                          "expirationDateTime": "2099-01-01T00:00:00Z",
                          "nextExpectedRanges": ["0-"]})

    def upload(self, method: str, sid: str, body: bytes) -> None:
        st = self.state
        if self.headers.get("Authorization"):
            # Graph: the upload URL is pre-authenticated; a bearer token gets 401.
            self.error(401, "InvalidAuthenticationToken", "Authorization header not allowed")
            return
        with st.lock:
            up = st.uploads.get(sid)
        m = re.match(r"^bytes (\d+)-(\d+)/(\d+)$", self.headers.get("Content-Range", ""))
        if method != "PUT" or up is None or not m:
            self.error(400, "ErrorInvalidRequest", "bad upload request")
            return
        start, end, total = (int(g) for g in m.groups())
        if start != len(up.data) or end - start + 1 != len(body) or total != up.item["size"]:
            self.error(416, "ErrorInvalidRange", "unexpected range")
            return
        up.data.extend(body)
        if len(up.data) < total:
            self.answer(200, {"nextExpectedRanges": [f"{len(up.data)}-"]})
            return
        with st.lock:
            draft = st.drafts[up.draft_id]
            draft.attachments.append({**up.item, "data": bytes(up.data), "upload": True})
            del st.uploads[sid]
        self.answer(201)

    def send_draft(self, mailbox: str, draft_id: str, token: str) -> None:
        st = self.state
        with st.lock:
            draft = st.drafts.get(draft_id)
        if draft is None:
            self.error(404, "ErrorItemNotFound", "The specified object was not found.")
            return
        recipients = header_recipients(draft.mime)
        if not recipients:
            self.error(400, "ErrorInvalidRecipients", "At least one recipient isn't valid.")
            return
        if not self.check_send_as(mailbox, draft.mime):
            return
        with st.lock:
            del st.drafts[draft_id]
            st.sent.append(Sent(mailbox, draft.mime, recipients, token, "draft",
                                draft.attachments))
        self.answer(202)


def start_graph(state: GraphState | None = None) -> HttpsServer:
    """Start a fake Graph; its endpoint (for a route's `endpoint`) is `server.base_url`."""
    st = state or GraphState()
    server = start_https_server(GraphHandler, st)
    st.base_url = server.base_url
    return server
