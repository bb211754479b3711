"""The SMTP upstream over STARTTLS and implicit TLS with password AUTH, certificate checks,
per-route connection limits and rate limits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from conftest import (
    Upstream,
    arelayd_cli,
    message,
    run_service,
    send,
    service_port,
    smtp_route,
    wait_for,
    write_config,
)
from fakes.https import shared_ca

from relayd.config import RateLimit, load_config
from relayd.delivery import OutboundMessage, Status
from relayd.delivery.agent import RateLimiter
from relayd.delivery.smtp import SmtpSession as UpstreamSession
from relayd.delivery.smtp import SmtpUpstream
from relayd.delivery.smtpclient import _PipeliningProtocol

USER, PASSWORD = "casemanager@business.com", "s3cret-upstream-pw"


def checker(upstream: Upstream) -> Any:
    def authenticate(server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                     auth_data: Any) -> AuthResult:
        ok = (isinstance(auth_data, LoginPassword) and auth_data.login.decode() == USER
              and auth_data.password.decode() == PASSWORD)
        if ok:
            upstream.handler.logins.append(USER)
        # handled=False, or aiosmtpd sends no 535 at all (FIELD-NOTES)
        return AuthResult(success=ok, handled=False)
    return authenticate


@pytest.fixture
async def starttls_upstream() -> AsyncIterator[Upstream]:
    up = Upstream(tls_context=shared_ca().server_context(), require_starttls=True,
                  auth_required=True)
    up.smtp_kwargs["authenticator"] = checker(up)
    await up.start()
    yield up
    await up.stop()


@pytest.fixture
async def implicit_upstream() -> AsyncIterator[Upstream]:
    # aiosmtpd cannot tell the socket is TLS, so it must not insist on STARTTLS before AUTH;
    # the recorded logins show relayd authenticated.
    up = Upstream(implicit_tls=shared_ca().server_context(), auth_require_tls=False)
    up.smtp_kwargs["authenticator"] = checker(up)
    await up.start()
    yield up
    await up.stop()


def tls_route(tmp_path: Path, port: int, tls: str, *, password: str = PASSWORD,
              ca: bool = True) -> str:
    secret = tmp_path / "upstream-password"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    route = smtp_route("staff", '["*@business.com"]', port)
    route = route.replace('tls = "none"', f'tls = "{tls}"')
    route += f'username = "{USER}"\npassword_file = "{secret}"\n'
    if ca:
        route += f'ca_file = "{shared_ca().ca_file}"\n'
    return route


async def test_starttls_with_password_auth(tmp_path: Path, starttls_upstream: Upstream) -> None:
    cfg = write_config(tmp_path, tls_route(tmp_path, starttls_upstream.port, "starttls"))
    async with run_service(cfg) as svc:
        await send(service_port(svc), "alice@business.com", ["bob@example.com"], message())
        await wait_for(lambda: len(starttls_upstream.messages) == 1)
    assert starttls_upstream.handler.logins == [USER]
    assert starttls_upstream.messages[0].mail_from == "alice@business.com"


async def test_implicit_tls_with_password_auth(tmp_path: Path, implicit_upstream: Upstream) -> None:
    cfg = write_config(tmp_path, tls_route(tmp_path, implicit_upstream.port, "implicit"))
    async with run_service(cfg) as svc:
        await send(service_port(svc), "alice@business.com", ["bob@example.com"], message())
        await wait_for(lambda: len(implicit_upstream.messages) == 1)
    assert implicit_upstream.handler.logins == [USER]


@pytest.fixture(params=["none", "starttls", "implicit"])
async def any_upstream(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, Upstream]]:
    """A plain, a STARTTLS and an implicit-TLS upstream, with the `tls` setting for each."""
    tls = request.param
    if tls == "none":
        up = Upstream()
    elif tls == "starttls":
        up = Upstream(tls_context=shared_ca().server_context(), require_starttls=True,
                      auth_required=True)
    else:
        up = Upstream(implicit_tls=shared_ca().server_context(), auth_require_tls=False)
    if tls != "none":
        up.smtp_kwargs["authenticator"] = checker(up)
    await up.start()
    yield tls, up
    await up.stop()


@pytest.mark.stdlib_loop  # asyncio's own transports (uvloop's are covered by the rest)
async def test_the_pipelining_protocol_reads_plain_starttls_and_implicit_tls_connections(
        tmp_path: Path, any_upstream: tuple[str, Upstream]) -> None:
    """relayd's protocol (smtpclient._PipeliningProtocol, given to aiosmtplib's connection
    after it is made) reads the replies on a plain connection, after STARTTLS and with
    implicit TLS: two messages over one connection arrive whole."""
    tls, upstream = any_upstream
    route = (smtp_route("staff", '["*@business.com"]', upstream.port) if tls == "none"
             else tls_route(tmp_path, upstream.port, tls))
    cfg = load_config(write_config(tmp_path, route))
    session = UpstreamSession(SmtpUpstream(cfg.routes["staff"], cfg))
    sent = [message(subject=f"n{i}", body=("x" * 70 + "\r\n") * 40) for i in range(2)]
    try:
        for i, data in enumerate(sent):
            results = await session.deliver(
                OutboundMessage(f"Q{i}", "alice@business.com", ["bob@example.com"], data))
            assert {r.status for r in results.values()} == {Status.DELIVERED}, results
        assert session.client is not None
        protocol = session.client.protocol
        assert isinstance(protocol, _PipeliningProtocol)
    finally:
        await session.close()
    assert [m.data for m in upstream.messages] == sent
    assert upstream.handler.connections == 1


async def test_wrong_password_defers_never_bounces(tmp_path: Path,
                                                   starttls_upstream: Upstream) -> None:
    cfg = write_config(tmp_path, tls_route(tmp_path, starttls_upstream.port, "starttls",
                                           password="wrong"))
    async with run_service(cfg) as svc:
        await send(service_port(svc), "alice@business.com", ["bob@example.com"], message())
        await wait_for(lambda: any(e.attempts >= 2 for e in svc.qmgr.view.messages()),
                       what="two deferred attempts")
        [entry] = [q.entry for q in svc.qmgr.view.messages()]
        assert "refused the credentials" in entry.last_error and "535" in entry.last_error
        assert len(svc.spool.ids()) == 1  # no bounce was queued
    assert starttls_upstream.messages == []
    assert PASSWORD not in entry.last_error and "wrong" not in entry.last_error


async def test_untrusted_certificate_defers(tmp_path: Path, starttls_upstream: Upstream) -> None:
    """Without ca_file the test CA is not trusted: nothing is sent, the mail waits."""
    cfg = write_config(tmp_path, tls_route(tmp_path, starttls_upstream.port, "starttls",
                                           ca=False))
    async with run_service(cfg) as svc:
        await send(service_port(svc), "alice@business.com", ["bob@example.com"], message())
        await wait_for(lambda: any(e.attempts >= 1 for e in svc.qmgr.view.messages()))
        [entry] = [q.entry for q in svc.qmgr.view.messages()]
        assert "CERTIFICATE_VERIFY_FAILED" in entry.last_error or "certificate" in \
            entry.last_error.lower()
    assert starttls_upstream.messages == [] and starttls_upstream.handler.logins == []


async def test_max_connections_bounds_parallel_upstream_sessions(tmp_path: Path,
                                                                 upstream: Upstream) -> None:
    release = asyncio.Event()
    original = upstream.handler.handle_DATA

    async def slow(*args: Any) -> str:
        await release.wait()
        return await original(*args)

    upstream.handler.handle_DATA = slow  # type: ignore[method-assign]
    cfg = write_config(tmp_path, smtp_route("staff", '["*"]', upstream.port,
                                            "max_connections = 2"))
    async with run_service(cfg) as svc:
        for i in range(6):
            await send(service_port(svc), "a@business.com", ["b@example.com"],
                       message(subject=f"{i}"))
        await wait_for(lambda: upstream.handler.connections >= 2)
        await asyncio.sleep(0.3)
        assert upstream.handler.open_max == 2
        release.set()
        await wait_for(lambda: len(upstream.messages) == 6)
    assert upstream.handler.open_max == 2


async def test_rate_limiter_token_bucket() -> None:
    """2 per minute: two go at once, the third waits (about 30 s)."""
    limiter = RateLimiter(RateLimit(2, 60.0))
    await asyncio.wait_for(limiter.acquire(), 1)
    await asyncio.wait_for(limiter.acquire(), 1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(limiter.acquire(), 0.2)


async def test_send_test_prints_connect_starttls_and_auth(tmp_path: Path,
                                                          starttls_upstream: Upstream) -> None:
    """`relayd send-test` shows each step it takes: connect, STARTTLS, EHLO, AUTH, delivery."""
    cfg = write_config(tmp_path, tls_route(tmp_path, starttls_upstream.port, "starttls"))
    out = await arelayd_cli("send-test", "-c", str(cfg), "--from", "alice@business.com",
                            "--to", "bob@example.com")
    assert out.returncode == 0, out.stdout + out.stderr
    steps = out.stdout.splitlines()
    assert f"   connected to 127.0.0.1:{starttls_upstream.port}: 220 " in "\n".join(steps)
    tls = next(s for s in steps if s.startswith("   STARTTLS: "))
    assert "TLSv1." in tls and "certificate verified" in tls
    assert any(s.startswith("   EHLO: ") and "auth" in s for s in steps)
    assert f"   AUTH as {USER}: 235 " in "\n".join(steps)
    assert PASSWORD not in out.stdout
    assert "<bob@example.com>: delivered: 250" in out.stdout
    assert starttls_upstream.handler.logins == [USER]
