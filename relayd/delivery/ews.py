"""Exchange Web Services upstream: the MIME sent as-is through exchangelib, basic/NTLM or OAuth.

Touch points on exchangelib beyond its plain interface (guarded by `exchangelib>=5.4,<5.7`
in pyproject.toml; 2 documented hooks; before issue 24 also 1 private behaviour):

| exchangelib                                  | what relayd does with it (where)            |
|----------------------------------------------|---------------------------------------------|
| `BaseProtocol.HTTP_ADAPTER_CLS` (documented) | set at import: a route's ca_file is pinned  |
| `Protocol.TIMEOUT` (documented setting)      | the route's timeout, per account (_account) |

exchangelib keeps one Protocol (its HTTP sessions) per configuration, found by the
credentials' equality and hash; its OAuth credentials compare their `__dict__`, so relayd once
gave each object a serial number to keep them apart. `_ProviderCredentials` now compares by
identity (Python's own `__eq__` and `__hash__`): each object its own Protocol, whatever its
fields are.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import exchangelib  # type: ignore[import-untyped]
import exchangelib.errors as ews_errors  # type: ignore[import-untyped]
import requests
import urllib3
from exchangelib.protocol import BaseProtocol  # type: ignore[import-untyped]
from exchangelib.version import EXCHANGE_2013_SP1  # type: ignore[import-untyped]
from oauthlib.oauth2 import TokenExpiredError  # type: ignore[import-untyped]

from relayd.auth.oauth import MsalTokenProvider, app_scopes, delegated_scopes
from relayd.config import Config, EwsSettings, RouteConfig
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
from relayd.delivery.mime import mailbox_for, restrict_to_envelope
from relayd.errors import (
    AuthenticationError,
    DeliveryError,
    InDoubtError,
    PermanentDeliveryError,
    TransientDeliveryError,
    UpstreamUnavailableError,
)
from relayd.headers import header_facts
from relayd.http import EndpointPinnedAdapter

log = logging.getLogger(__name__)

EWS_PATH = "/EWS/Exchange.asmx"
# Exchange 2013 SP1's schema is understood by every Exchange since, on-premises and Online;
# naming a version means exchangelib never probes for one.
EWS_VERSION = exchangelib.Version(build=EXCHANGE_2013_SP1)
class _LookupRefused(Exception):
    """The account may not search the mailbox's Sent Items."""


MAX_ERROR_TEXT = 300  # characters of an unexpected error kept in a deferral reason
_T = TypeVar("_T")

# exchangelib logs whole HTTP exchanges, Authorization header included, at DEBUG: keep its
# records above that whatever the root level, so no token or password reaches a log.
logging.getLogger("exchangelib").setLevel(logging.INFO)

# Server answers that will never succeed, with the enhanced status code of the bounce.
_PERMANENT: dict[type[Exception], tuple[int, str]] = {
    ews_errors.ErrorSendAsDenied: (550, "5.7.60"),
    ews_errors.ErrorImpersonateUserDenied: (550, "5.7.1"),
    ews_errors.ErrorNonExistentMailbox: (550, "5.1.1"),
    ews_errors.ErrorInvalidRecipients: (550, "5.1.3"),
    ews_errors.ErrorInvalidSmtpAddress: (550, "5.1.3"),
    ews_errors.ErrorMessageSizeExceeded: (552, "5.3.4"),
    ews_errors.ErrorMimeContentConversionFailed: (554, "5.6.0"),
    ews_errors.ErrorAccessDenied: (550, "5.7.1"),
}


# exchangelib makes its own sessions: its adapter class is how a route's ca_file is pinned.
BaseProtocol.HTTP_ADAPTER_CLS = EndpointPinnedAdapter


class _ProviderCredentials(exchangelib.OAuth2AuthorizationCodeCredentials):  # type: ignore[misc]
    """OAuth credentials whose token comes from relayd's provider, never from exchangelib.

    exchangelib would fetch and refresh tokens itself only from login.microsoftonline.com. With
    `expires_at` set to the provider's renewal time, requests-oauthlib raises TokenExpiredError
    when it passes; exchangelib then calls refresh() and builds a fresh session.
    """

    def __init__(self, provider: MsalTokenProvider, account: str) -> None:
        super().__init__(client_id=provider.oauth.client_id, tenant_id=provider.oauth.tenant_id)
        self._provider = provider
        self._account = account
        self.access_token = self.fetch()

    # By identity: each object its own exchangelib Protocol (the module docstring).
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def fetch(self) -> dict[str, Any]:
        tok = self._provider.acquire(self._account)
        return {"access_token": tok.token, "token_type": "Bearer", "expires_at": tok.renew_at}

    def refresh(self, session: Any) -> None:
        self.access_token = self.fetch()


@dataclass
class _Target:
    account: Any  # exchangelib.Account
    credentials: Any


def endpoint(ews: EwsSettings) -> str:
    """The EWS URL: service_endpoint, or the standard path on `server`. Never autodiscover."""
    return ews.service_endpoint or f"https://{ews.server}{EWS_PATH}"


class EwsUpstream(Upstream):
    """One route's EWS endpoint: a bounded thread pool and one exchangelib Account per mailbox."""

    def __init__(self, route: RouteConfig, config: Config) -> None:
        super().__init__(route, config)
        self.ews = route.ews
        self.endpoint = endpoint(self.ews)
        self.delegated = route.delegated
        self.provider: MsalTokenProvider | None = None
        if self.ews.oauth is not None:  # auth = "oauth"
            scopes = delegated_scopes(route) if self.delegated else app_scopes(route)
            self.provider = MsalTokenProvider(route, config, scopes)
        # exchangelib blocks: its calls run here, at most max_connections at once.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=route.max_connections, thread_name_prefix=f"ews-{route.name}")
        self._targets: dict[str, _Target] = {}
        self._lock = threading.Lock()
        self.lookup_refused = False  # Exchange refused to search Sent Items: dedupe is off
        if route.ca_file is not None:
            EndpointPinnedAdapter.pin(self.endpoint, route.ca_file)

    def session(self) -> Session:
        return EwsSession(self)

    def token_expiries(self) -> dict[str, float]:
        return self.provider.expiries() if self.provider is not None else {}

    async def close(self) -> None:
        targets = list(self._targets.values())
        self._targets.clear()

        def shut() -> None:
            for t in targets:
                t.account.protocol.close()
            if self.provider is not None:
                self.provider.close()

        await asyncio.to_thread(shut)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def find_sent(self, message: OutboundMessage, since: float) -> bool | None:
        """Look for the message in the mailbox's Sent Items (FindItem restricted on
        message:InternetMessageId). None when Exchange keeps no copy (save_to_sent = false) or
        refuses the lookup (logged once per route)."""
        mid = header_facts(message.data)[0]
        if not mid or not self.ews.save_to_sent or self.lookup_refused:
            return None
        mailbox = mailbox_for(self.route, message)

        def look() -> list[float | None]:
            try:
                items = self.target(mailbox).account.sent.filter(message_id=mid).only(
                    "datetime_sent")
                return [i.datetime_sent.timestamp() if i.datetime_sent else None
                        for i in items[:10]]
            except (ews_errors.ErrorAccessDenied, ews_errors.ErrorItemNotFound,
                    ews_errors.ErrorFolderNotFound) as e:
                self.lookup_refused = True
                log.warning("route %s: dedupe is off: Exchange refused to search Sent Items "
                            "of %s (%s); give the account read access to the mailbox so that "
                            "a message interrupted by a crash is not sent twice",
                            self.route.name, mailbox, type(e).__name__)
                raise _LookupRefused from None
            except Exception as e:  # noqa: BLE001 - every library error is translated here
                raise self.translate(e, mailbox) from None

        try:
            sent = await self.run(look)
        except _LookupRefused:
            return None
        return any(when is None or when >= since - SENT_CLOCK_SKEW_S for when in sent)

    async def run(self, fn: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    # -- the blocking side (pool threads) ----------------------------------------------------

    def target(self, mailbox: str) -> _Target:
        key = mailbox.lower()
        with self._lock:
            t = self._targets.get(key)
        if t is not None:
            return t
        creds: Any
        if self.provider is not None:
            shared = None
            if not self.delegated:
                # App-only: one token (and one Protocol, one connection pool) for every mailbox.
                with self._lock:
                    shared = next((x.credentials for x in self._targets.values()), None)
            creds = shared or _ProviderCredentials(self.provider, key if self.delegated else "")
            auth_type = exchangelib.OAUTH2
        else:
            ews = self.ews
            assert ews.username is not None and ews.password is not None
            creds = exchangelib.Credentials(ews.username, ews.password.reveal())
            auth_type = exchangelib.NTLM if ews.auth == "ntlm" else exchangelib.BASIC
        conf = exchangelib.Configuration(
            service_endpoint=self.endpoint, credentials=creds, auth_type=auth_type,
            version=EWS_VERSION, max_connections=self.route.max_connections)
        access = exchangelib.IMPERSONATION if (self.provider is not None and not self.delegated) \
            else exchangelib.DELEGATE
        account = exchangelib.Account(primary_smtp_address=mailbox, config=conf,
                                      autodiscover=False, access_type=access)
        account.protocol.TIMEOUT = self.route.timeout_s
        t = _Target(account, creds)
        with self._lock:
            return self._targets.setdefault(key, t)

    def send_blocking(self, message: OutboundMessage) -> None:
        mailbox = mailbox_for(self.route, message)
        try:
            target = self.target(mailbox)
            # relayd's recipient policy (relayd.delivery.mime): header addresses outside the
            # envelope are removed; envelope recipients no header names go as BccRecipients,
            # which leaves the MIME as it was sent.
            restricted = restrict_to_envelope(message.data, message.recipients)
            if restricted.removed:
                log.info("%s route=%s: headers name %d address(es) not in this attempt's "
                         "envelope; removed from To/Cc/Bcc so Exchange does not send to them",
                         message.queue_id, self.route.name, len(restricted.removed))
            bcc = [exchangelib.Mailbox(email_address=r) for r in restricted.unnamed]
            msg = exchangelib.Message(account=target.account, mime_content=restricted.data,
                                      bcc_recipients=bcc or None)
            msg.send(save_copy=self.ews.save_to_sent)
        except Exception as e:  # noqa: BLE001 - every library error is translated here
            raise self.translate(e, mailbox, sends=True) from None

    def translate(self, e: Exception, mailbox: str, *, sends: bool = False) -> DeliveryError:
        """exchangelib / requests / msal failures -> relayd's transient or permanent errors,
        whose reply says it came from EWS (the SMTP codes are the equivalents relayd chose).
        `sends`: the failure of a send, which a lost answer leaves in doubt."""
        if isinstance(e, DeliveryError):
            return e
        facts = _lost_answer(e) if sends else None
        if facts is not None and http_in_doubt(facts[0], written=facts[1]):
            text = (str(e).strip() or type(e).__name__)[:MAX_ERROR_TEXT]
            error: DeliveryError = InDoubtError(
                f"4.4.1 {type(e).__name__}: {text}; the request was sent: Exchange may have "
                f"sent the message", 451)
        else:
            error = self._translate(e, mailbox)
        error.reply = dataclasses.replace(error.reply, source="ews")
        return error

    def _translate(self, e: Exception, mailbox: str) -> DeliveryError:
        name = type(e).__name__
        text = str(e).strip() or name
        for cls, (code, enhanced) in _PERMANENT.items():
            if isinstance(e, cls):
                return PermanentDeliveryError(f"{enhanced} {name}: {text}", code)
        if isinstance(e, ews_errors.UnauthorizedError):
            self.forget_token(mailbox)
            return AuthenticationError(f"4.7.0 EWS refused the credentials of route "
                                       f"{self.route.name} for {mailbox} (HTTP 401)", 454)
        if isinstance(e, ews_errors.ErrorServerBusy):
            return TransientDeliveryError(f"4.3.2 {name}: {text}", 451,
                                          retry_after=getattr(e, "back_off", None))
        if isinstance(e, TokenExpiredError):
            return AuthenticationError(f"4.7.0 OAuth token for {mailbox} expired", 454)
        if isinstance(e, (ews_errors.TransportError, requests.RequestException, OSError)):
            # The endpoint is unreachable: the delivery agent holds the route's other mail a while.
            return UpstreamUnavailableError(f"4.4.1 cannot reach {self.endpoint}: {name}: "
                                            f"{text[:MAX_ERROR_TEXT]}", 451)
        if isinstance(e, ews_errors.ErrorTimeoutExpired):
            return TransientDeliveryError(f"4.4.1 {name}: {text[:MAX_ERROR_TEXT]}", 451)
        if isinstance(e, ews_errors.ResponseMessageError):
            return TransientDeliveryError(f"4.3.0 {name}: {text[:MAX_ERROR_TEXT]}", 451)
        # Unknown: defer (never bounce on a guess); the queue's max_age bounds the retries.
        return TransientDeliveryError(f"4.3.0 EWS error {name}: {text[:MAX_ERROR_TEXT]}", 451)

    def forget_token(self, mailbox: str) -> None:
        """After a 401: the next attempt gets a fresh token and fresh connections."""
        if self.provider is None:
            return
        self.provider.invalidate(mailbox)
        key = mailbox.lower()
        with self._lock:
            if self.delegated:
                dropped = [self._targets.pop(key, None)]
            else:
                dropped = list(self._targets.values())
                self._targets.clear()
        for t in dropped:
            if t is not None:
                t.account.protocol.close()


# -- which failures leave a send in doubt (relayd.delivery.doubt) --------------------------------

_STATUS_IN_TEXT = re.compile(r"\bCode: (\d{3})\b")  # exchangelib's MalformedResponseError


def _chain(e: BaseException) -> list[BaseException]:
    """`e` and what it was raised from or while handling, outermost first. exchangelib
    re-raises: a read timeout or reset becomes ErrorTimeoutExpired, a 503
    ErrorInternalServerTransientError, and with several sessions either becomes
    ErrorServerBusy ("Reraised from ..."), each with the original as its context."""
    out: list[BaseException] = []
    x: BaseException | None = e
    while x is not None and len(out) < 8:
        out.append(x)
        x = x.__cause__ or x.__context__
    return out


def _before_request(e: BaseException) -> bool:
    """A requests failure that happened before the request reached a server: refused, no
    such host, connect timeout, TLS handshake."""
    if isinstance(e, (requests.exceptions.ConnectTimeout, requests.exceptions.SSLError)):
        return True
    if isinstance(e, requests.exceptions.ConnectionError) and e.args:
        reason = getattr(e.args[0], "reason", None)  # urllib3's MaxRetryError
        return isinstance(reason, urllib3.exceptions.ConnectTimeoutError)  # NewConnectionError
    return isinstance(e, ConnectionRefusedError)


def _lost_answer(e: Exception) -> tuple[int | None, bool] | None:
    """A failed send as doubt.http_in_doubt's facts: (the HTTP status, None when no status line
    came; whether the request was written). None when Exchange answered with a response code
    of its own (ErrorServerBusy's throttling, ErrorSendAsDenied, ...): nothing was sent."""
    chain = _chain(e)
    for x in chain:
        if isinstance(x, (requests.exceptions.RequestException, OSError)):
            return None, not _before_request(x)
    for x in chain:
        if isinstance(x, ews_errors.ErrorInternalServerTransientError) and "HTTP 503" in str(x):
            return 503, True
        if isinstance(x, ews_errors.MalformedResponseError) and \
                (m := _STATUS_IN_TEXT.search(str(x))) is not None:
            return int(m.group(1)), True
        if isinstance(x, ews_errors.ErrorServerBusy) and "closed connection" in str(x):
            return None, True  # a non-200 answer exchangelib did not read, connection closed
    if any(isinstance(x, (ews_errors.ErrorTimeoutExpired, ews_errors.ErrorInternalServerError,
                          ews_errors.ErrorInternalServerTransientError)) for x in chain):
        return 500, True  # Exchange's own timeout or failure, mid-operation
    return None


class EwsSession(Session):
    def __init__(self, upstream: EwsUpstream) -> None:
        self.upstream = upstream

    async def deliver(self, message: OutboundMessage) -> dict[str, RecipientResult]:
        up = self.upstream
        if not message.recipients:
            return {}
        await up.run(lambda: up.send_blocking(message))
        disposition = "sent and saved" if up.ews.save_to_sent else "sent"
        return all_results(message.recipients,
                           RecipientResult.smtp(Status.DELIVERED, 250,
                                           f"2.0.0 {disposition} via EWS {up.endpoint}"))
