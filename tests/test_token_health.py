"""Token health: idle delegated tokens refreshed in the background, a revoked refresh token marked
"needs sign-in" with the command that fixes it (mail deferred, never bounced), app credential
expiry from the certificate and from routes.*.client_secret_expires, and `relayd auth status`."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_service, send, service_port, wait_for
from fakes.idp import make_certificate
from test_auth_login import ALICE, Env, login_env

from relayd.auth import health
from relayd.auth.oauth import login
from relayd.auth.registry import TokenRegistry, status
from relayd.config import Config, load_config

FIX = f"relayd auth login m365 --user {ALICE}"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with login_env(tmp_path) as e:
        yield e


def signed_in(env: Env, **route: object) -> Config:
    """alice signed in by the device flow (the quickest in-process sign-in)."""
    config = load_config(env.config_file(**route))
    env.idp.device_user = ALICE
    out = io.StringIO()
    assert login(config, "m365", ALICE, out) == 0, out.getvalue()
    return config


async def test_idle_token_is_refreshed_in_the_background_not_at_first_use(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """1. alice signs in 2. the daemon's background round (the token registry's keep_fresh,
    no upstream client built) with the weekly setting refreshes nothing 3. with a 0.3 s
    setting, once 0.3 s passed, it refreshes her token without any message 4. the route's
    token health shows the new expiry and refresh time 5. a second round right after does
    nothing."""
    config = await asyncio.to_thread(signed_in, env)
    reg = TokenRegistry()
    route = config.routes["m365"]
    try:
        [before] = reg.health_of(config, route)
        assert before.account == ALICE and not before.needs_signin and before.fix == ""
        assert before.last_refreshed is not None and before.expires_at is not None
        await reg.keep_fresh(config)
        assert env.idp.grants("refresh_token") == 0
        monkeypatch.setattr(health, "REFRESH_IDLE_S", 0.3)
        await reg.keep_fresh(config)
        assert env.idp.grants("refresh_token") == 0  # just signed in: not idle yet
        await asyncio.sleep(0.5)
        await reg.keep_fresh(config)
        assert env.idp.grants("refresh_token") == 1
        [after] = reg.health_of(config, route)
        assert after.last_refreshed is not None and after.last_refreshed > before.last_refreshed
        assert not after.needs_signin and after.problem == ""
        await reg.keep_fresh(config)
        assert env.idp.grants("refresh_token") == 1
        assert env.graph.sent == []  # no message was needed for it
    finally:
        reg.close()


async def test_revoked_refresh_token_needs_signin_and_mail_is_deferred_not_bounced(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """1. alice signs in 2. her refresh token is revoked 3. the background refresh fails:
    token_health says needs_signin with the fix command 4. `auth status` says the same, exit 1
    5. a message from alice through relayd is deferred, and nothing is bounced."""
    config = await asyncio.to_thread(signed_in, env)
    env.idp.revoke_user(ALICE)
    monkeypatch.setattr(health, "REFRESH_IDLE_S", 0.0)
    reg = TokenRegistry()
    try:
        await reg.keep_fresh(config)
        [h] = reg.health_of(config, config.routes["m365"])
    finally:
        reg.close()
    assert h.needs_signin and h.fix == FIX
    assert "invalid_grant" in h.problem and "AADSTS50173" in h.problem
    out = io.StringIO()
    assert status(config, out) == 1
    text = out.getvalue()
    assert f"m365: {ALICE}" in text and "NEEDS SIGN-IN" in text and FIX in text

    with env.idp.lock:  # and her access tokens stop working (continuous access evaluation)
        env.idp.access_tokens.clear()
    async with run_service(config) as svc:
        assert await send(service_port(svc), ALICE, ["bob@example.net"],
                          f"From: {ALICE}\r\nTo: bob@example.net\r\nSubject: x\r\n\r\nx\r\n"
                          .encode()) == {}
        await wait_for(lambda: any(q.attempts and q.state == "deferred"
                                   for q in svc.qmgr.view.messages()), what="deferred")
        [queued] = svc.qmgr.view.messages()
        assert queued.entry.rcpt["bob@example.net"].status != "failed"
        assert FIX in (queued.entry.last_error or "")
    assert env.graph.sent == []  # neither the message nor a bounce


def test_needs_signin_codes() -> None:
    for text in ("invalid_grant: x", "AADSTS700082: The refresh token has expired",
                 "AADSTS70043: expired due to sign-in frequency", "AADSTS50076: MFA",
                 "AADSTS50173: revoked", "interaction_required"):
        assert health.needs_signin(text), text
    for text in ("", None, "temporarily_unavailable", "unreachable: ConnectionError"):
        assert not health.needs_signin(text)


def test_refresh_is_at_most_weekly_and_jittered_per_account() -> None:
    week = health.REFRESH_IDLE_S
    assert week == 7 * 86400
    now = 1_000_000_000.0
    assert not health.refresh_due("a@x", now - week + 60, now)
    assert health.refresh_due("a@x", now - week * (1 + health.REFRESH_JITTER), now)
    dues = {round(week * (1 + health.REFRESH_JITTER)) - min(
        s for s in range(0, int(week * 0.2), 600) if health.refresh_due(f"u{i}@x",
                                                                        now - week - s, now))
        for i in range(5)}
    assert len(dues) > 1  # not every account at the same moment


async def test_credential_expiry_from_certificate_and_client_secret_expires(
        env: Env, tmp_path: Path) -> None:
    _, pem, thumb = make_certificate(tmp_path)  # valid for 30 days
    secret = tmp_path / "secret"
    secret.write_text("s")
    secret.chmod(0o600)
    config = load_config(env.config_file(flow="app", certificate_file=str(pem),
                                         thumbprint=thumb))
    [h] = TokenRegistry().health_of(config, config.routes["m365"])
    assert h.account == "" and h.credential_expires_at is not None
    assert abs(h.credential_expires_at - (time.time() + 30 * 86400)) < 86400 * 1.1

    day = dt.date.today() + dt.timedelta(days=5)
    config = load_config(env.config_file(flow="app", client_secret_file=str(secret),
                                         client_secret_expires=day.isoformat()))
    [h] = TokenRegistry().health_of(config, config.routes["m365"])
    assert h.credential_expires_at == dt.datetime(day.year, day.month, day.day,
                                                  tzinfo=dt.UTC).timestamp()
    out = io.StringIO()
    status(config, out)
    assert "app credential (client secret) expires" in out.getvalue()
    assert "(in 5 days)" in out.getvalue() or "(in 4 days)" in out.getvalue()


def test_client_secret_expires_is_validated(env: Env) -> None:
    from relayd.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(env.config_file(client_secret_expires="next year"))
    assert any(p.startswith("routes.m365.client_secret_expires:") for p in e.value.problems)
