"""SMTP with XOAUTH2: an aiosmtpd upstream that checks each token with the fake identity provider
(Microsoft) or the fake Google token endpoint, reached directly and through relayd."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session
from conftest import (
    RecordingHandler,
    Upstream,
    run_service,
    send,
    service_port,
    wait_for,
    write_config,
)
from fakes.google import CLIENT_ID as GOOGLE_CLIENT_ID
from fakes.google import CLIENT_SECRET as GOOGLE_SECRET
from fakes.google import GMAIL_SCOPE, GoogleState, start_google
from fakes.https import HttpsServer, shared_ca
from fakes.idp import CLIENT_ID, CLIENT_SECRET, TENANT, IdpState, start_idp

from relayd.config import Config, parse_config
from relayd.delivery import OutboundMessage, Status, make_upstream
from relayd.errors import AuthenticationError

SMTP_APP_SCOPE = "https://outlook.office365.com/.default"
DATA = (b"From: casemanager@business.com\r\nTo: bob@example.com\r\nSubject: oauth\r\n"
        b"Message-ID: <xoauth2@test>\r\n\r\nSent with a token.\r\n")


@dataclass
class XOAuthHandler(RecordingHandler):
    """Requires AUTH XOAUTH2 before MAIL; `check(user, token)` decides, as the provider would."""

    check: Callable[[str, str], bool] = lambda user, token: False
    auths: list[tuple[str, bool]] = field(default_factory=list)

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:  # noqa: N802
        if len(args) < 2:
            return AuthResult(success=False, handled=False, message="501 5.5.2 Initial response "
                              "required")
        try:
            fields = base64.b64decode(args[1], validate=True).decode().split("\x01")
            user = fields[0].removeprefix("user=")
            token = fields[1].removeprefix("auth=Bearer ")
        except (ValueError, IndexError):
            return AuthResult(success=False, handled=False, message="501 5.5.2 Bad XOAUTH2")
        ok = self.check(user, token)
        self.auths.append((user, ok))
        if ok:
            return AuthResult(success=True, auth_data=user)
        # As Gmail and Exchange do: a JSON error challenge, then 535 after the empty reply.
        await server.challenge_auth(json.dumps({"status": "401", "schemes": "bearer"}))
        # handled=False, or aiosmtpd sends no reply at all (FIELD-NOTES).
        return AuthResult(success=False, handled=False,
                          message="535 5.7.3 Authentication unsuccessful")

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if not session.authenticated:
            return "530 5.7.0 Authentication required"
        return await super().handle_MAIL(server, session, envelope, address, mail_options)


@dataclass
class OAuthEnv:
    idp: IdpState
    idp_url: str
    google: GoogleState
    upstream: Upstream
    handler: XOAuthHandler
    tmp_path: Path

    def microsoft_route(self) -> dict[str, Any]:
        return {"senders": ["*@business.com"], "upstream": "smtp", "host": "127.0.0.1",
                "port": self.upstream.port, "tls": "starttls", "auth": "xoauth2",
                "provider": "microsoft", "tenant_id": TENANT, "client_id": CLIENT_ID,
                "client_secret_env": "MS_SECRET", "authority": self.idp_url,
                "ca_file": str(shared_ca().ca_file), "timeout": "10s"}

    def google_route(self, user: str = "casemanager@business.com") -> dict[str, Any]:
        os.environ["G_REFRESH"] = self.google.add_user(user)
        return {"senders": ["*@business.com"], "upstream": "smtp", "host": "127.0.0.1",
                "port": self.upstream.port, "tls": "starttls", "auth": "xoauth2",
                "provider": "google", "client_id": GOOGLE_CLIENT_ID,
                "client_secret_env": "G_SECRET", "refresh_token_env": "G_REFRESH",
                "authority": self.google.token_uri, "ca_file": str(shared_ca().ca_file),
                "timeout": "10s"}

    def config(self, route: dict[str, Any]) -> Config:
        return parse_config({"queue": {"path": str(self.tmp_path / "queue")},
                             "auth": {"path": str(self.tmp_path / "tokens")},
                             "routes": {"oauth": route}})

    def microsoft_token_ok(self, user: str, token: str) -> bool:
        issued = self.idp.check_bearer(token)
        return issued is not None and SMTP_APP_SCOPE in issued.scope.split()

    def google_token_ok(self, user: str, token: str) -> bool:
        issued = self.google.check_bearer(token)
        return issued is not None and issued.user == user and issued.scope == GMAIL_SCOPE


@pytest.fixture
async def oauth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[OAuthEnv]:
    monkeypatch.setenv("MS_SECRET", CLIENT_SECRET)
    monkeypatch.setenv("G_SECRET", GOOGLE_SECRET)
    monkeypatch.setenv("G_REFRESH", "")  # set per test by google_route; restored afterwards
    idp_server: HttpsServer = start_idp()
    google_server: HttpsServer = start_google()
    up = Upstream(tls_context=shared_ca().server_context(), require_starttls=True,
                  auth_require_tls=True)
    handler = XOAuthHandler()
    up.handler = handler
    await up.start()
    env = OAuthEnv(idp_server.state, idp_server.base_url, google_server.state, up, handler,
                   tmp_path)
    yield env
    await up.stop()
    google_server.stop()
    idp_server.stop()


async def deliver_direct(config: Config, data: bytes = DATA,
                         sender: str = "casemanager@business.com") -> dict[str, Any]:
    up = make_upstream(config.routes["oauth"], config)
    session = up.session()
    try:
        return await session.deliver(OutboundMessage("Q1", sender, ["bob@example.com"], data))
    finally:
        await session.close()
        await up.close()


async def test_microsoft_app_token_delivers(oauth: OAuthEnv) -> None:
    oauth.handler.check = oauth.microsoft_token_ok
    results = await deliver_direct(oauth.config(oauth.microsoft_route()))
    assert results["bob@example.com"].status is Status.DELIVERED
    assert oauth.handler.auths == [("casemanager@business.com", True)]
    [got] = oauth.upstream.messages
    assert got.data == DATA and got.rcpt_tos == ["bob@example.com"]


async def test_microsoft_expired_token_is_renewed_and_retried(oauth: OAuthEnv) -> None:
    """1. a token is issued and used 2. it expires at the provider 3. the next connection's
    AUTH gets 535, relayd renews the token once and the message is delivered."""
    oauth.handler.check = oauth.microsoft_token_ok
    config = oauth.config(oauth.microsoft_route())
    up = make_upstream(config.routes["oauth"], config)
    try:
        session = up.session()
        await session.deliver(OutboundMessage("Q1", "casemanager@business.com",
                                              ["bob@example.com"], DATA))
        await session.close()
        with oauth.idp.lock:
            for issued in oauth.idp.access_tokens.values():
                issued.expires_at = 0  # the provider now calls every token so far expired
        session = up.session()
        results = await session.deliver(OutboundMessage("Q2", "casemanager@business.com",
                                                        ["bob@example.com"], DATA))
        await session.close()
    finally:
        await up.close()
    assert results["bob@example.com"].status is Status.DELIVERED
    assert [ok for _, ok in oauth.handler.auths] == [True, False, True]
    assert oauth.idp.grants("client_credentials") == 2
    assert len(oauth.upstream.messages) == 2


async def test_microsoft_refused_token_defers(oauth: OAuthEnv) -> None:
    oauth.handler.check = lambda user, token: False
    with pytest.raises(AuthenticationError) as exc:
        await deliver_direct(oauth.config(oauth.microsoft_route()))
    assert exc.value.code == 535
    assert [ok for _, ok in oauth.handler.auths] == [False, False]  # renewed once, no more
    assert oauth.upstream.messages == []


async def test_google_refresh_token_delivers(oauth: OAuthEnv) -> None:
    oauth.handler.check = oauth.google_token_ok
    results = await deliver_direct(oauth.config(oauth.google_route()))
    assert results["bob@example.com"].status is Status.DELIVERED
    assert oauth.handler.auths == [("casemanager@business.com", True)]


async def test_google_service_account_acts_as_each_sender(oauth: OAuthEnv) -> None:
    oauth.handler.check = oauth.google_token_ok
    key = oauth.google.add_service_account(client_id="42")
    key_file = oauth.tmp_path / "sa.json"
    key_file.write_text(json.dumps(key))
    key_file.chmod(0o600)
    route = oauth.google_route()
    del route["refresh_token_env"], route["client_secret_env"]
    route.update(client_id="42", client_secret_file=str(key_file))
    config = oauth.config(route)
    for sender in ("alice@business.com", "bob@business.com"):
        results = await deliver_direct(config, sender=sender)
        assert results["bob@example.com"].status is Status.DELIVERED
    assert oauth.handler.auths == [("alice@business.com", True), ("bob@business.com", True)]


async def test_google_revoked_refresh_token_defers(oauth: OAuthEnv) -> None:
    oauth.handler.check = oauth.google_token_ok
    route = oauth.google_route()
    oauth.google.revoked.add(os.environ["G_REFRESH"])
    with pytest.raises(AuthenticationError, match="revoked"):
        await deliver_direct(oauth.config(route))
    assert oauth.handler.auths == []  # no token, so no AUTH attempt
    assert oauth.upstream.messages == []


def route_toml(route: dict[str, Any]) -> str:
    lines = ["[routes.oauth]"]
    for key, value in route.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


async def test_through_relayd_revoked_token_defers_then_delivers(
        oauth: OAuthEnv) -> None:
    """1. relayd accepts a message for a Google XOAUTH2 route 2. the refresh token is revoked:
    the message is deferred, not bounced 3. the token is reinstated (as a new consent would
    be) 4. the retry delivers it byte for byte."""
    oauth.handler.check = oauth.google_token_ok
    route = oauth.google_route()
    revoked = os.environ["G_REFRESH"]
    oauth.google.revoked.add(revoked)
    cfg = write_config(oauth.tmp_path, route_toml(route),
                       extra=f'[auth]\npath = "{oauth.tmp_path / "tokens"}"\n')
    async with run_service(cfg) as svc:
        refused = await send(service_port(svc), "casemanager@business.com",
                             ["bob@example.com"], DATA)
        assert refused == {}
        await wait_for(lambda: oauth.google.grants("refresh_token") >= 1, what="token request")
        assert oauth.upstream.messages == []
        oauth.google.revoked.discard(revoked)
        await wait_for(lambda: len(oauth.upstream.messages) == 1, what="delivery after retry")
    [got] = oauth.upstream.messages
    assert got.data == DATA and got.mail_from == "casemanager@business.com"
    # No bounce went anywhere: the only message the upstream saw is the original.
    assert got.rcpt_tos == ["bob@example.com"]


async def test_token_lifetime_is_exported_as_a_metric(oauth: OAuthEnv) -> None:
    """After a delivery over a Microsoft app-only route, /metrics shows the token's remaining
    lifetime for that route (the gauge is refreshed every few seconds)."""
    from relayd.metrics import Metrics

    oauth.handler.check = oauth.microsoft_token_ok
    cfg = write_config(oauth.tmp_path, route_toml(oauth.microsoft_route()),
                       extra=f'[auth]\npath = "{oauth.tmp_path / "tokens"}"\n')
    metrics = Metrics()
    async with run_service(cfg, observer=metrics) as svc:
        await send(service_port(svc), "casemanager@business.com", ["bob@example.com"], DATA)
        await wait_for(lambda: len(oauth.upstream.messages) == 1, what="delivery")
        await wait_for(lambda: b'relayd_token_expiry_seconds{account=' in metrics.render(),
                       timeout=20, what="the token gauge")
    line = next(x for x in metrics.render().decode().splitlines()
                if x.startswith("relayd_token_expiry_seconds{"))
    assert 'route="oauth"' in line
    assert 0 < float(line.rsplit(" ", 1)[1]) <= 3600
