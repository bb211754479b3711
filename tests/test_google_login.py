"""`relayd auth login` for a Google XOAUTH2 route (flow = "device", no refresh_token_file): the
installed-app flow with PKCE against the fake Google, then delivery as the signed-in user, its
idle refresh and a revoked consent."""

from __future__ import annotations

import io
import json
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Upstream, write_config
from fakes.google import CLIENT_ID, CLIENT_SECRET, GMAIL_SCOPE, GoogleState, start_google
from fakes.https import HttpsServer, shared_ca
from test_auth_login import Login, headless_chromium, sign_in_by_hand
from test_xoauth2 import XOAuthHandler

from relayd.auth import health
from relayd.auth.registry import TokenRegistry, status
from relayd.config import Config, load_config
from relayd.delivery import OutboundMessage, Status, make_upstream

ALICE = "alice@business.com"
FIX = f"relayd auth login gmail --user {ALICE}"


@dataclass
class GEnv:
    google: GoogleState
    handler: XOAuthHandler
    upstream: Upstream
    tmp_path: Path

    def config_file(self) -> Path:
        keys: dict[str, Any] = {
            "senders": ["*@business.com"], "upstream": "smtp", "host": "127.0.0.1",
            "port": self.upstream.port, "tls": "starttls", "auth": "xoauth2",
            "provider": "google", "flow": "device", "client_id": CLIENT_ID,
            "client_secret_env": "G_SECRET", "authority": self.google.token_uri,
            "ca_file": str(shared_ca().ca_file), "timeout": "10s"}
        route = "[routes.gmail]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
        auth = (f'[auth]\npath = "{self.tmp_path / "tokens"}"\n'
                f'key_file = "{self.tmp_path / "token.key"}"\n')
        return write_config(self.tmp_path, route, extra=auth)

    def config(self) -> Config:
        return load_config(self.config_file())

    def token_ok(self, user: str, token: str) -> bool:
        issued = self.google.check_bearer(token)
        return issued is not None and issued.user == user and issued.scope == GMAIL_SCOPE


@pytest.fixture
async def genv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[GEnv]:
    monkeypatch.setenv("G_SECRET", CLIENT_SECRET)
    server: HttpsServer = start_google()
    up = Upstream(tls_context=shared_ca().server_context(), require_starttls=True,
                  auth_require_tls=True)
    handler = XOAuthHandler()
    up.handler = handler
    await up.start()
    env = GEnv(server.state, handler, up, tmp_path)
    handler.check = env.token_ok
    yield env
    await up.stop()
    server.stop()


async def deliver(config: Config, sender: str) -> Status:
    up = make_upstream(config.routes["gmail"], config)
    session = up.session()
    data = f"From: {sender}\r\nTo: bob@example.com\r\nSubject: g\r\n\r\nhi\r\n".encode()
    try:
        results = await session.deliver(OutboundMessage("Q1", sender, ["bob@example.com"], data))
    finally:
        await session.close()
        await up.close()
    return results["bob@example.com"].status


def paste_login(env: GEnv, user: str, signs_in_as: str) -> tuple[int, str]:
    login = Login(env.config_file(), user, "paste", route="gmail")
    url = login.url()
    assert url.startswith(env.google.auth_uri + "?")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert query["code_challenge_method"] == ["S256"] and query["access_type"] == ["offline"]
    assert GMAIL_SCOPE in query["scope"][0].split()
    login.paste(sign_in_by_hand(url, shared_ca().ca_file, signs_in_as))
    return login.finish()


async def test_google_sign_in_then_delivery_as_that_user(genv: GEnv,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """1. auth login --paste signs alice in at the fake Google 2. no refresh_token_file: the
    stored refresh token gives her an XOAUTH2 token 3. the idle refresh renews it 4. revoked:
    token_health says needs sign-in with the command."""
    rc, out = paste_login(genv, ALICE, ALICE)
    assert rc == 0, out
    assert f"Signed in as {ALICE}" in out
    config = genv.config()
    assert await deliver(config, ALICE) is Status.DELIVERED
    assert genv.handler.auths == [(ALICE, True)]

    up = make_upstream(config.routes["gmail"], config)
    reg = TokenRegistry()  # the daemon's reads and background round: its live provider
    try:
        [h] = reg.health_of(config, config.routes["gmail"])
        assert h.account == ALICE and not h.needs_signin
        refreshes = genv.google.grants("refresh_token")
        monkeypatch.setattr(health, "REFRESH_IDLE_S", 0.0)
        await reg.keep_fresh(config)
        assert genv.google.grants("refresh_token") == refreshes + 1
        genv.google.revoke_user(ALICE)
        monkeypatch.setattr(health, "IDLE_RETRY_S", 0.0)  # the next round, as if later
        await reg.keep_fresh(config)
        [h] = reg.health_of(config, config.routes["gmail"])
        assert h.needs_signin and h.fix == FIX and "invalid_grant" in h.problem
        out = io.StringIO()
        assert status(config, out) == 1
        assert f"gmail: {ALICE}" in out.getvalue() and "NEEDS SIGN-IN" in out.getvalue()
        assert FIX in out.getvalue()
    finally:
        reg.close()
        await up.close()


async def test_google_browser_sign_in_by_headless_chromium(genv: GEnv, tmp_path: Path) -> None:
    """1. auth login --browser (default) 2. Chromium opens the URL, fills Google's fake form
    3. the loopback redirect reaches relayd: exit 0 4. alice's next message authenticates
    with her token."""
    with headless_chromium(tmp_path) as chromium:
        from selenium.webdriver.common.by import By

        login = Login(genv.config_file(), ALICE, "browser", route="gmail")
        chromium.get(login.url())
        chromium.find_element(By.ID, "password").send_keys("pw")
        chromium.find_element(By.ID, "submit").click()
        rc, out = login.finish()
        assert rc == 0, out
    assert genv.google.logins == [ALICE]
    assert await deliver(genv.config(), ALICE) is Status.DELIVERED
    assert genv.handler.auths == [(ALICE, True)]


async def test_google_sign_in_as_another_account_stores_nothing(genv: GEnv) -> None:
    rc, out = paste_login(genv, ALICE, "mallory@business.com")
    assert rc == 1 and "signed in as mallory@business.com" in out, out
    assert not list(genv.tmp_path.glob("tokens/*.token"))
