"""Microsoft Graph upstream: the message's own MIME, base64-encoded, sent through sendMail.

What makes it fast (bench/graph/, issue 13), each measured:
- Concurrency is per mailbox, as Graph counts it: at most `MAX_REQUESTS_PER_MAILBOX` (4)
  requests in flight for one mailbox, any number of mailboxes side by side; the route's
  `max_connections` sessions share one connection pool, so a route whose senders are many
  mailboxes scales with them rather than with one mailbox's 4 x 1 / latency. Each mailbox is
  also a lane for the queue manager (`lane`), which starts no fifth attempt for a mailbox:
  one mailbox's backlog does not take the sessions that other mailboxes' mail needs.
- The access token is served from memory (`TOKEN_MEMO_S`, never within `TOKEN_MARGIN_S` of
  its expiry), one fetch at a time per account: no thread hop into msal per message.
- Requests go over HTTP/1.1 keep-alive connections spoken by h11 (relayd.delivery.graphhttp's
  `H11Pool`: a fraction of httpx's CPU per sendMail); httpx serves what the pool does not (a
  proxy from the environment, non-https URLs). Both are behind one interface
  (`graphhttp.HttpClient`); `_direct_ok` picks one per host. HTTP/2 (httpx + h2) was not
  taken: one more dependency, for a gain that the 4-requests-per-mailbox limit caps, and no h2
  server to measure it on.
- The base64 body is built once per attempt and reused for the retry after a 401.

Private-API touch points: none (here and in graphhttp, graphmime: httpx, h11 and the email
package through their public interfaces).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import email.policy
import email.utils
import json
import logging
import ssl
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from relayd.auth import TokenProvider
from relayd.auth.registry import make_token_provider
from relayd.config import Config, RouteConfig
from relayd.delivery.base import (
    SENT_CLOCK_SKEW_S,
    OutboundMessage,
    RecipientResult,
    Session,
    Status,
    Upstream,
    all_results,
)
from relayd.delivery.doubt import http_in_doubt
from relayd.delivery.graphhttp import Answer, H11Pool, HttpClient, HttpxClient
from relayd.delivery.graphmime import Attachment, prepare_mime, split_attachments
from relayd.delivery.mime import (
    mailbox_for,
    sending_mailbox,
)
from relayd.errors import (
    AuthenticationError,
    InDoubtError,
    PermanentDeliveryError,
    TransientDeliveryError,
    UpstreamUnavailableError,
)
from relayd.headers import header_facts
from relayd.reply import Reply

log = logging.getLogger(__name__)

API_VERSION = "v1.0"
# Graph refuses sendMail bodies over about 4 MB (users see 413); the body is the base64 text.
MAX_MIME_REQUEST_BYTES = 4_000_000
# Graph's own limit: 4 concurrent requests per app and mailbox.
MAX_REQUESTS_PER_MAILBOX = 4
# Attachments below 3 MB may be posted whole; larger ones need an upload session.
SMALL_ATTACHMENT_MAX_BYTES = 3_000_000
# Upload session chunks must be multiples of 320 KiB; Graph suggests at most 4 MB each.
UPLOAD_CHUNK_BYTES = 320 * 1024 * 10
# The permission a draft + upload session needs; named in the bounce when it is missing.
READWRITE_PERMISSION = "Mail.ReadWrite"
# A token from the provider is reused from memory this long, never closer than the margin to
# its expiry (msal itself renews 5 minutes early); a 401 forgets it at once.
TOKEN_MEMO_S = 60.0
TOKEN_MARGIN_S = 300.0

_PERMANENT_STATUSES = frozenset({400, 403, 404, 405, 406, 410, 411, 415, 422})
_THROTTLE_STATUSES = frozenset({429, 503})
# Graph's answer as the SMTP reply that says the same (relayd.reply): by Graph's error code
# first, then by HTTP status. The bounce's Status: comes from here, never from the HTTP status.
_SMTP_FOR_GRAPH_ERROR = {
    "ErrorSendAsDenied": (550, "5.7.1"),
    "ErrorAccessDenied": (550, "5.7.1"),
    "Authorization_RequestDenied": (550, "5.7.1"),
    "ErrorInvalidUser": (550, "5.1.1"),
    "ErrorNonExistentMailbox": (550, "5.1.1"),
    "MailboxNotEnabledForRESTAPI": (550, "5.1.1"),
    "ResourceNotFound": (550, "5.1.1"),
    "ErrorItemNotFound": (550, "5.1.1"),
    "ErrorInvalidRecipients": (550, "5.1.3"),
    "ErrorMessageSizeExceeded": (552, "5.3.4"),
}
_SMTP_FOR_STATUS = {
    403: (550, "5.7.1"), 404: (550, "5.1.1"), 410: (550, "5.1.1"), 413: (552, "5.3.4"),
    400: (554, "5.6.0"), 415: (554, "5.6.0"), 422: (554, "5.6.0"),
    429: (451, "4.7.0"), 503: (451, "4.3.2"),
}


class _TooLarge(Exception):
    """sendMail refused the size (413): take the draft path instead."""


# ---------------------------------------------------------------------------------------------


def _iso_time(text: str) -> datetime.datetime | None:
    if not text:
        return None
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _retry_after(response: Answer) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _graph_error_code(response: Answer) -> str:
    try:
        body = response.json()
    except (ValueError, json.JSONDecodeError):
        return ""
    err = body.get("error", {}) if isinstance(body, dict) else {}
    return str(err.get("code") or "") if isinstance(err, dict) else ""


def _smtp_equivalent(status: int, graph_code: str, permanent: bool) -> tuple[int, str]:
    mapped = _SMTP_FOR_GRAPH_ERROR.get(graph_code) or _SMTP_FOR_STATUS.get(status)
    if mapped is not None and (mapped[0] >= 500) == permanent:
        return mapped
    return (554, "5.0.0") if permanent else (451, "4.0.0")


def _graph_error(response: Answer) -> str:
    """Graph's own words: `ErrorSendAsDenied: ...`, or the start of whatever it answered."""
    try:
        body = response.json()
        err = body.get("error", {}) if isinstance(body, dict) else {}
        code, message = err.get("code"), err.get("message")
        if code or message:
            return f"{code or 'Error'}: {message or ''}".strip()
    except (ValueError, json.JSONDecodeError):
        pass
    text = response.text.strip().replace("\r", " ").replace("\n", " ")
    return text[:300] or (response.reason_phrase or "no reason given")


@dataclass
class _Slot:
    semaphore: asyncio.Semaphore
    users: int = 0


class GraphUpstream(Upstream):
    """One route's Graph client: a shared HTTPS connection pool and token provider."""

    def __init__(self, route: RouteConfig, config: Config) -> None:
        super().__init__(route, config)
        self.graph = route.graph
        self.endpoint = self.graph.endpoint.rstrip("/")
        self.delegated = route.delegated
        if self.delegated:
            scopes = [f"{self.endpoint}/Mail.Send"]
        else:
            scopes = [f"{self.endpoint}/.default"]
        self.tokens: TokenProvider = make_token_provider(route, config, scopes)
        self._client: HttpxClient | None = None
        self._pool: H11Pool | None = None
        self._direct: dict[str, bool] = {}  # host -> whether the H11Pool may serve it
        self._slots: dict[str, _Slot] = {}
        self._memo: dict[str, tuple[str, float]] = {}  # token key -> (token, use until)
        self._memo_locks: dict[str, asyncio.Lock] = {}
        self.lookup_refused = False  # Graph said 403 to reading Sent Items: dedupe is off
        if not self.graph.save_to_sent:
            # Graph has no switch for MIME sends: Exchange always keeps a copy in Sent Items.
            log.warning("route %s: save_to_sent = false cannot be honoured by Graph sendMail "
                        "with MIME content; Exchange keeps a copy in Sent Items", route.name)

    def session(self) -> Session:
        return GraphSession(self)

    def lane(self, sender: str, recipients: Sequence[str]) -> tuple[str, int] | None:
        """Graph's limit is per mailbox, so each sending mailbox is a lane of 4."""
        mailbox = sending_mailbox(self.route, sender, recipients)
        return None if mailbox is None else (mailbox.lower(), MAX_REQUESTS_PER_MAILBOX)

    def token_expiries(self) -> dict[str, float]:
        return self.tokens.expiries() if self.tokens is not None else {}

    def _ssl_context(self) -> ssl.SSLContext:
        if self.route.ca_file is not None:
            return ssl.create_default_context(cafile=str(self.route.ca_file))
        return ssl.create_default_context()

    @property
    def _max_connections(self) -> int:
        # Each session has one request in flight; the draft path's calls are sequential.
        return max(MAX_REQUESTS_PER_MAILBOX, self.route.max_connections)

    @property
    def client(self) -> HttpxClient:
        """httpx, for what the H11Pool does not do: proxies from the environment."""
        if self._client is None:
            self._client = HttpxClient(httpx.AsyncClient(
                verify=self._ssl_context(),
                # With a ca_file, the environment (CA bundles, proxies) must not override it.
                trust_env=self.route.ca_file is None,
                timeout=httpx.Timeout(self.route.timeout_s),
                limits=httpx.Limits(max_connections=self._max_connections),
                follow_redirects=False,
            ))
        return self._client

    @property
    def pool(self) -> H11Pool:
        if self._pool is None:
            self._pool = H11Pool(self._ssl_context(), self.route.timeout_s,
                                 self._max_connections)
        return self._pool

    def http_for(self, url: str) -> HttpClient:
        """The client that serves `url`: the pool when it goes straight to its server."""
        return self.pool if self._direct_ok(url) else self.client

    def _direct_ok(self, url: str) -> bool:
        """Whether a URL goes straight to its server over https (not through a proxy that
        httpx would take from the environment, as it does when the route has no ca_file)."""
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        ok = self._direct.get(host)
        if ok is None:
            ok = parts.scheme == "https"
            if ok and self.route.ca_file is None:
                proxies = urllib.request.getproxies_environment()
                if (proxies.get("https") or proxies.get("all")) and \
                        not urllib.request.proxy_bypass(host):
                    ok = False
            self._direct[host] = ok
        return ok

    async def _token(self, mailbox: str) -> str:
        """The provider's token for `mailbox`, from memory while it is fresh (TOKEN_MEMO_S)."""
        key = mailbox.lower() if self.delegated else ""
        memo = self._memo.get(key)
        if memo is not None and memo[1] > time.monotonic():
            return memo[0]
        lock = self._memo_locks.setdefault(key, asyncio.Lock())
        async with lock:  # one fetch per account; the others wait for it
            memo = self._memo.get(key)
            if memo is not None and memo[1] > time.monotonic():
                return memo[0]
            token = await self.tokens.token(mailbox)
            use_for = TOKEN_MEMO_S
            expires = self.tokens.expiries().get(key or "app")
            if expires is not None:
                use_for = min(use_for, expires - time.time() - TOKEN_MARGIN_S)
            if use_for > 0:
                self._memo[key] = (token, time.monotonic() + use_for)
            return token

    def _forget_token(self, mailbox: str) -> None:
        self._memo.pop(mailbox.lower() if self.delegated else "", None)
        self.tokens.invalidate(mailbox)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            with contextlib.suppress(Exception):
                await pool.aclose()
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):
                await client.aclose()
        closer = getattr(self.tokens, "close", None) or getattr(self.tokens, "aclose", None)
        if closer is not None:
            with contextlib.suppress(Exception):
                result = closer()
                if asyncio.iscoroutine(result):
                    await result

    async def find_sent(self, message: OutboundMessage, since: float) -> bool | None:
        """Look for the message in the mailbox's Sent Items by internetMessageId (needs
        Mail.ReadBasic or Mail.Read). Without the permission: None, logged once per route."""
        mid = header_facts(message.data)[0]
        if not mid or self.lookup_refused:
            return None
        mailbox = mailbox_for(self.route, message)
        quoted = mid.replace("'", "''")
        url = (self.url(mailbox, "mailFolders", "sentitems", "messages") + "?" +
               urllib.parse.urlencode({"$filter": f"internetMessageId eq '{quoted}'",
                                       "$select": "id,sentDateTime,internetMessageId"},
                                      quote_via=urllib.parse.quote))
        response = await self.request("GET", url, mailbox)
        if response.status_code in (401, 403):
            self.lookup_refused = True
            log.warning("route %s: dedupe is off: Graph refused to read Sent Items (%d %s); "
                        "grant the app Mail.ReadBasic (or Mail.Read) so that a message "
                        "interrupted by a crash is not sent twice", self.route.name,
                        response.status_code, _graph_error(response))
            return None
        self.check(response, "look up Sent Items")
        items = response.json().get("value", [])
        for item in items if isinstance(items, list) else []:
            sent = str(item.get("sentDateTime") or "")
            try:
                when = email.utils.parsedate_to_datetime(sent) if "," in sent else \
                    _iso_time(sent)
            except (TypeError, ValueError):
                return True  # found; its date unreadable
            if when is None or when.timestamp() >= since - SENT_CLOCK_SKEW_S:
                return True
        return False

    @contextlib.asynccontextmanager
    async def _slot(self, mailbox: str) -> AsyncIterator[None]:
        key = mailbox.lower()
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(asyncio.Semaphore(MAX_REQUESTS_PER_MAILBOX))
        slot.users += 1
        try:
            async with slot.semaphore:
                yield
        finally:
            slot.users -= 1
            if slot.users == 0:
                self._slots.pop(key, None)

    def url(self, mailbox: str, *parts: str) -> str:
        tail = "/".join(urllib.parse.quote(p, safe="") for p in parts)
        if self.personal:
            # A delegated token is the mailbox's own (its file is stored under that address),
            # and Graph knows a personal Microsoft account as /me: /users/{address} answers
            # ErrorInvalidUser for Outlook.com mailboxes.
            return f"{self.endpoint}/{API_VERSION}/me/{tail}"
        user = urllib.parse.quote(mailbox, safe="@")
        return f"{self.endpoint}/{API_VERSION}/users/{user}/{tail}"

    @property
    def personal(self) -> bool:
        """A delegated route that personal Microsoft accounts sign in to."""
        from relayd.auth.oauth import takes_personal_accounts

        return self.delegated and takes_personal_accounts(self.route)

    async def request(self, method: str, url: str, mailbox: str, *, content: bytes | None = None,
                      json_body: Mapping[str, Any] | None = None,
                      content_type: str | None = None, bearer: bool = True,
                      headers: Mapping[str, str] | None = None, sends: bool = False) -> Answer:
        """One Graph call for `mailbox`, with a token; a 401 renews the token once. `sends`:
        the call that sends the message, whose lost answer leaves it in doubt."""
        send_headers = dict(headers or {})
        if json_body is not None:
            content = json.dumps(json_body).encode()
            content_type = content_type or "application/json"
        if content_type:
            send_headers["Content-Type"] = content_type
        client = self.http_for(url)
        for attempt in (1, 2):
            if bearer:
                token = await self._token(mailbox)
                send_headers["Authorization"] = f"Bearer {token}"
            response = await self._call(client, method, url, mailbox, send_headers, content,
                                        sends)
            if response.status_code == 401 and bearer:
                self._forget_token(mailbox)
                if attempt == 1:
                    continue
                raise AuthenticationError(f"Graph refused the token twice: 401 "
                                          f"{_graph_error(response)}", 454, enhanced="4.7.0",
                                          source="graph")
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def _call(self, client: HttpClient, method: str, url: str, mailbox: str,
                    headers: Mapping[str, str], content: bytes | None, sends: bool) -> Answer:
        """One request in the mailbox's slot; httpx's errors as delivery errors."""
        try:
            async with self._slot(mailbox):
                return await client.request(method, url, headers, content)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            # Graph is unreachable: the delivery agent holds the route's other mail for a while.
            raise UpstreamUnavailableError(f"cannot reach Graph at {self.endpoint}: "
                                           f"{type(e).__name__}: {e}", source="graph"
                                           ) from None
        except httpx.HTTPError as e:
            raise self._lost_answer(e, sends) from None

    def _lost_answer(self, e: httpx.HTTPError, sends: bool) -> TransientDeliveryError:
        """A call that got no answer. A send whose request was written whole is in doubt
        (relayd.delivery.doubt): httpx's Read* errors and RemoteProtocolError come after the
        request went out (and the H11Pool raises Write* ones before)."""
        if isinstance(e, httpx.TimeoutException):
            text = f"Graph did not answer in time ({type(e).__name__})"
        else:
            text = f"cannot reach Graph at {self.endpoint}: {e}"
        written = isinstance(e, (httpx.ReadTimeout, httpx.ReadError, httpx.RemoteProtocolError))
        if sends and http_in_doubt(None, written=written):
            return InDoubtError(f"{text}; the request was sent: Graph may have sent the "
                                f"message", source="graph")
        return TransientDeliveryError(text, source="graph")

    def check(self, response: Answer, what: str, *, sends: bool = False) -> None:
        """Raise the delivery error an unsuccessful answer means. `sends`: the answer to the
        call that sends, where a gateway's 5xx leaves the message in doubt."""
        status = response.status_code
        if 200 <= status < 300:
            return
        reason = f"Graph {what}: {status} {_graph_error(response)}"
        if status == 413:
            raise _TooLarge(reason)
        permanent = status in _PERMANENT_STATUSES and status not in _THROTTLE_STATUSES
        graph_code = _graph_error_code(response)
        code, enhanced = _smtp_equivalent(status, graph_code, permanent)
        if sends and http_in_doubt(status, written=True, error_code=graph_code):
            raise InDoubtError(f"{reason} (Graph may have sent the message)", code,
                               _retry_after(response), enhanced=enhanced, source="graph")
        if permanent:
            raise PermanentDeliveryError(reason, code, enhanced=enhanced, source="graph")
        raise TransientDeliveryError(reason, code, _retry_after(response), enhanced=enhanced,
                                     source="graph")


class GraphSession(Session):
    """Delivers one message at a time through its upstream's shared client."""

    def __init__(self, upstream: GraphUpstream) -> None:
        self.up = upstream

    async def deliver(self, message: OutboundMessage) -> dict[str, RecipientResult]:
        mailbox = mailbox_for(self.up.route, message)
        prepared = prepare_mime(message, mailbox, from_rewrite=self.up.graph.from_rewrite,
                                is_bounce=not message.sender)
        route = self.up.route.name
        if prepared.removed:
            log.info("%s route=%s: headers name %d address(es) not in this attempt's envelope; "
                     "removed from To/Cc/Bcc so Graph does not send to them",
                     message.queue_id, route, len(prepared.removed))
        body = base64.b64encode(prepared.mime)
        try:
            if len(body) > MAX_MIME_REQUEST_BYTES:
                raise _TooLarge(f"{len(body)} bytes of base64")
            request_id = await self._send_mime(mailbox, body)
            how = "sendMail"
        except _TooLarge:
            request_id = await self._send_draft(mailbox, prepared.mime, message.queue_id)
            how = "draft + upload session"
        # The queue manager logs the delivery with this reply: one line per state change.
        log.debug("%s route=%s: accepted by Graph for mailbox %s (%s)", message.queue_id,
                  route, mailbox, how)
        rid = f", request-id {request_id}" if request_id else ""
        return all_results(message.recipients, RecipientResult(Status.DELIVERED, Reply(
            250, "2.0.0", f"accepted by Graph {how} for {mailbox} (HTTP 202{rid})", "graph")))

    async def _send_mime(self, mailbox: str, body: bytes) -> str:
        """Returns Graph's request-id for the journal."""
        up = self.up
        response = await up.request("POST", up.url(mailbox, "sendMail"), mailbox,
                                    content=body, content_type="text/plain", sends=True)
        up.check(response, "sendMail", sends=True)
        return str(response.headers.get("request-id", ""))

    async def _send_draft(self, mailbox: str, mime: bytes, queue_id: str) -> str:
        """Large mail: a draft from the MIME without attachments, then the attachments, then
        send. Needs Mail.ReadWrite; without it the message bounces saying so."""
        up = self.up
        skeleton, attachments = split_attachments(mime)
        body = base64.b64encode(skeleton)
        if len(body) > MAX_MIME_REQUEST_BYTES:
            raise PermanentDeliveryError(
                f"message too large for Graph: even without attachments it is {len(skeleton)} "
                f"bytes, over the {MAX_MIME_REQUEST_BYTES * 3 // 4} Graph takes in one request",
                552, enhanced="5.3.4", source="graph")
        response = await up.request("POST", up.url(mailbox, "messages"), mailbox, content=body,
                                    content_type="text/plain")
        if response.status_code == 403:
            raise PermanentDeliveryError(
                f"message of {len(mime)} bytes is over the about 4 MB Graph sendMail takes in "
                f"one request; sending it as a draft with an upload session was refused "
                f"({_graph_error(response)}). Grant the app the {READWRITE_PERMISSION} "
                f"permission (application, or delegated for device sign-in) for this mailbox "
                f"to send large messages", 552, enhanced="5.3.4", source="graph")
        try:
            up.check(response, "create draft")
        except _TooLarge:
            raise PermanentDeliveryError(f"Graph refused the draft as too large: "
                                         f"{_graph_error(response)}", 552, enhanced="5.3.4",
                                         source="graph") from None
        draft_id = str(response.json().get("id", ""))
        if not draft_id:
            raise TransientDeliveryError("Graph created a draft but returned no id",
                                         source="graph")
        sent = False
        try:
            for att in attachments:
                await self._attach(mailbox, draft_id, att)
            response = await up.request("POST", up.url(mailbox, "messages", draft_id, "send"),
                                        mailbox, content=b"", sends=True)
            up.check(response, "send draft", sends=True)
            sent = True
            return str(response.headers.get("request-id", ""))
        except _TooLarge as e:
            raise PermanentDeliveryError(f"Graph refused an attachment as too large: {e}",
                                         552, enhanced="5.3.4", source="graph") from None
        finally:
            if not sent:
                # Leave no half-built draft behind in the user's mailbox.
                with contextlib.suppress(Exception):
                    await up.request("DELETE", up.url(mailbox, "messages", draft_id), mailbox)
                log.info("%s route=%s: removed unsent Graph draft", queue_id, up.route.name)

    async def _attach(self, mailbox: str, draft_id: str, att: Attachment) -> None:
        up = self.up
        item: dict[str, Any] = {"name": att.name, "contentType": att.content_type,
                                "isInline": att.inline}
        if att.content_id:
            item["contentId"] = att.content_id
        if len(att.data) < SMALL_ATTACHMENT_MAX_BYTES:
            payload = {"@odata.type": "#microsoft.graph.fileAttachment",
                       "contentBytes": base64.b64encode(att.data).decode("ascii"), **item}
            response = await up.request("POST", up.url(mailbox, "messages", draft_id,
                                                       "attachments"), mailbox,
                                        json_body=payload)
            up.check(response, "add attachment")
            return
        session_body = {"AttachmentItem": {"attachmentType": "file", "size": len(att.data),
                                           **item}}
        response = await up.request(
            "POST", up.url(mailbox, "messages", draft_id, "attachments", "createUploadSession"),
            mailbox, json_body=session_body)
        up.check(response, "create upload session")
        upload_url = str(response.json().get("uploadUrl", ""))
        if not upload_url.startswith("https://"):
            raise TransientDeliveryError("Graph upload session has no https uploadUrl",
                                         source="graph")
        total = len(att.data)
        for start in range(0, total, UPLOAD_CHUNK_BYTES):
            chunk = att.data[start:start + UPLOAD_CHUNK_BYTES]
            end = start + len(chunk) - 1
            # The upload URL carries its own credential; an Authorization header is refused.
            response = await up.request(
                "PUT", upload_url, mailbox, content=chunk, bearer=False,
                content_type="application/octet-stream",
                headers={"Content-Range": f"bytes {start}-{end}/{total}"})
            up.check(response, "upload attachment")

