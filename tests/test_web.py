"""The [web] status page, read by headless Chromium as a person would, and its login over HTTPS."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Upstream,
    message,
    run_service,
    send,
    service_port,
    smtp_route,
    wait_for,
    write_config,
)
from fakes.https import server_cert_files, shared_ca

from relayd.auth.passwords import hash_password
from relayd.config import ConfigError, WebConfig, load_config
from relayd.web.server import FAILED_LOGIN_DELAY_S

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic"]
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                    "(.ci/run installs Debian's chromium)")


async def chromium(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return await asyncio.to_thread(
        subprocess.run, [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chrome'}",
                         *args, url], capture_output=True, text=True, timeout=60)


@needs_chromium
async def test_status_page_shows_routes_and_a_failing_route(tmp_path: Path,
                                                            upstream: Upstream) -> None:
    """1. a route that delivers, then its upstream goes away 2. the status page, opened in
    headless Chromium, shows the route, its last success, the failure and its reply, the queued
    message 3. a screenshot is a real picture."""
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       extra='[web]\nlisten = "127.0.0.1:0"\n',
                       queue='retry_min = "1h"\nretry_max = "2h"')
    async with run_service(cfg) as svc:
        await send(service_port(svc), "alice@business.com", ["bob@example.com"], message())
        await wait_for(lambda: len(upstream.messages) == 1 and not svc.qmgr.view.count())
        await upstream.stop()
        await send(service_port(svc), "alice@business.com", ["carol@example.com"], message())
        await wait_for(lambda: any(q.attempts for q in svc.qmgr.view.messages()))
        url = f"http://127.0.0.1:{svc.web_port}/"
        dom = await chromium(tmp_path, url, "--dump-dom")
        shot = tmp_path / "status.png"
        await chromium(tmp_path, url, f"--screenshot={shot}", "--window-size=1200,800")
    page = dom.stdout
    assert "relayd on relay.test" in page and "<td>staff</td>" in page
    assert f"smtp:127.0.0.1:{upstream.port}" in page
    assert "unreachable failing since" in page and "cannot connect" in page
    assert "1 message(s) in the queue" in page
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000


def test_off_loopback_needs_https_and_admins(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', 2525),
                       extra='[web]\nlisten = "0.0.0.0:8025"\n')
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert any(p.startswith("web.listen: 0.0.0.0:8025 is not a loopback address: the page is "
                            "served over HTTPS") for p in e.value.problems)
    assert any(p.startswith("web.admins: required when listen") for p in e.value.problems)


async def test_off_loopback_the_status_page_needs_an_admin_login_over_https(
        tmp_path: Path, upstream: Upstream) -> None:
    """The page as served off loopback (HTTPS with server.tls_cert, admins log in), bound to
    127.0.0.1 here: no login or a non-admin gets 401, an admin sees the page."""
    ca = shared_ca()
    cert, key = server_cert_files(tmp_path)
    users = (f'tls_cert = "{cert}"\ntls_key = "{key}"\n'
             f'[server.users.it]\npassword_hash = "{hash_password("admin-pw")}"\n'
             'senders = ["*@business.com"]\n'
             f'[server.users.scanner]\npassword_hash = "{hash_password("scan-pw")}"\n'
             'senders = ["scanner@business.com"]\n')
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       server=users, extra='[web]\nlisten = "127.0.0.1:0"\nadmins = ["it"]\n')
    config = load_config(cfg)
    config = dataclasses.replace(config, web=WebConfig(config.web.listen, ("it",),
                                                       loopback=False))
    async with run_service(config) as svc:
        def get(login: str | None) -> tuple[int, str]:
            request = urllib.request.Request(f"https://127.0.0.1:{svc.web_port}/")
            if login:
                request.add_header("Authorization",
                                   "Basic " + base64.b64encode(login.encode()).decode())
            try:
                with urllib.request.urlopen(request, timeout=10,
                                            context=ca.client_context()) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        assert (await asyncio.to_thread(get, None))[0] == 401
        assert (await asyncio.to_thread(get, "scanner:scan-pw"))[0] == 401
        await asyncio.sleep(FAILED_LOGIN_DELAY_S)  # the address's back-off after a failure
        assert (await asyncio.to_thread(get, "it:wrong"))[0] == 401
        await asyncio.sleep(2 * FAILED_LOGIN_DELAY_S)
        status, body = await asyncio.to_thread(get, "it:admin-pw")
        assert status == 200 and "<td>staff</td>" in body
        assert "admin-pw" not in body

        def plain() -> None:
            with urllib.request.urlopen(f"http://127.0.0.1:{svc.web_port}/", timeout=5):
                pass

        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            await asyncio.to_thread(plain)  # no plain HTTP off loopback


# -- /signin, completed by a person in headless Chromium -----------------------------------------


def _signin_config(env: Any) -> Path:
    auth = (f'[auth]\npath = "{env.tmp_path / "tokens"}"\n'
            f'key_file = "{env.tmp_path / "token.key"}"\n[web]\nlisten = "127.0.0.1:0"\n')
    return write_config(env.tmp_path, env.route_toml(), extra=auth)


@pytest.mark.parametrize(("who", "stored"), [("alice@business.com", True),
                                             ("bob@other.example", False)])
async def test_signin_page_stores_the_token_for_the_route_that_covers_the_user(
        tmp_path: Path, who: str, stored: bool) -> None:
    """1. a user opens /signin and picks "Sign in with Microsoft" 2. signs in on the identity
    provider's form 3. is sent back to relayd, which stores the token for the delegated route
    covering that address and says so 4. that user's next message goes out with that token;
    an account no route covers is refused, nothing stored."""
    from test_auth_login import assert_next_message_uses_token_of, headless_chromium, login_env

    from relayd.auth.oauth import has_signed_in

    with login_env(tmp_path) as env, headless_chromium(tmp_path) as driver:
        from selenium.webdriver.common.by import By

        cfg = _signin_config(env)
        async with run_service(cfg) as svc:
            await asyncio.to_thread(driver.get, f"http://127.0.0.1:{svc.web_port}/signin")
            assert "Sign in to send mail through relayd" in driver.page_source
            shot = tmp_path / "signin.png"
            assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 1000
            await asyncio.to_thread(driver.find_element(By.LINK_TEXT,
                                                        "Sign in with Microsoft").click)
            await wait_for(lambda: "password" in driver.page_source, what="the login form")
            driver.find_element(By.ID, "username").clear()
            driver.find_element(By.ID, "username").send_keys(who)
            driver.find_element(By.ID, "password").send_keys("pw")
            await asyncio.to_thread(driver.find_element(By.ID, "submit").click)
            await wait_for(lambda: "/signin/callback" in driver.current_url
                           and "</h1>" in driver.page_source, what="relayd's answer")
            text = driver.find_element(By.TAG_NAME, "body").text
        config = load_config(cfg)
        route = config.routes["m365"]
        if stored:
            assert "Signed in" in text and f"{who} can now send mail" in text
            assert has_signed_in(config, route, who)
            await assert_next_message_uses_token_of(env, who)
        else:
            assert "Not signed in" in text and "no route of this relay sends" in text
            assert not list(tmp_path.glob("tokens/*.token"))


async def test_signin_page_with_google(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1. a user opens /signin, picks "Sign in with Google" and gives the address 2. signs in
    at the fake Google 3. relayd stores the refresh token for the Google route covering that
    address 4. the next message from that user goes out with XOAUTH2 as that user."""
    from fakes.google import CLIENT_SECRET, start_google
    from test_auth_login import headless_chromium
    from test_google_login import GEnv, deliver
    from test_xoauth2 import XOAuthHandler

    from relayd.delivery import Status

    monkeypatch.setenv("G_SECRET", CLIENT_SECRET)
    server = start_google()
    up = Upstream(tls_context=shared_ca().server_context(), require_starttls=True,
                  auth_require_tls=True)
    handler = XOAuthHandler()
    up.handler = handler
    await up.start()
    env = GEnv(server.state, handler, up, tmp_path)
    handler.check = env.token_ok
    try:
        cfg = env.config_file()
        cfg.write_text(cfg.read_text() + '\n[web]\nlisten = "127.0.0.1:0"\n')
        with headless_chromium(tmp_path) as driver:
            from selenium.webdriver.common.by import By

            async with run_service(cfg) as svc:
                await asyncio.to_thread(driver.get, f"http://127.0.0.1:{svc.web_port}/signin")
                await asyncio.to_thread(driver.find_element(By.LINK_TEXT,
                                                            "Sign in with Google").click)
                driver.find_element(By.ID, "address").send_keys("alice@business.com")
                await asyncio.to_thread(driver.find_element(By.ID, "continue").click)
                await wait_for(lambda: "password" in driver.page_source, what="Google's form")
                driver.find_element(By.ID, "password").send_keys("pw")
                await asyncio.to_thread(driver.find_element(By.ID, "submit").click)
                await wait_for(lambda: "/signin/callback" in driver.current_url
                               and "</h1>" in driver.page_source, what="relayd's answer")
                text = driver.find_element(By.TAG_NAME, "body").text
        assert "alice@business.com can now send mail" in text, text
        assert await deliver(env.config(), "alice@business.com") is Status.DELIVERED
        assert handler.auths == [("alice@business.com", True)]
    finally:
        await up.stop()
        server.stop()


async def test_status_page_shows_what_needs_a_person_in_chromium(
        tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    """The status page read by headless Chromium (selenium): 1. a delegated route nobody has
    signed in to has a row saying so 2. a client secret expiring in 26 days (inside the 30-day
    warning) is highlighted, not "ok" 3. a deferred message is listed with its recipient and
    reply 4. every time carries UTC 5. the failing route's row is emphasised 6. the basic SMTP
    AUTH switch-off of an smtp.office365.com route is named."""
    import datetime as dt
    import re

    from conftest import dead_port
    from selenium.webdriver.common.by import By
    from test_auth_login import headless_chromium

    monkeypatch.setenv("WEB_TEST_SECRET", "s3cret")
    upstream.handler.rcpt_replies["later@example.com"] = "451 4.2.0 mailbox busy"
    expires = (dt.datetime.now(dt.UTC) + dt.timedelta(days=26)).date().isoformat()
    routes = (smtp_route("staff", '["*@business.com"]', upstream.port)
              + smtp_route("down", '["down@business.com"]', dead_port())
              + f"""
[routes.people]
senders = ["*@people.business.com"]
upstream = "graph"
tenant_id = "tenant"
client_id = "people-client"
flow = "device"

[routes.app]
senders = ["app@business.com"]
upstream = "graph"
tenant_id = "tenant"
client_id = "app-client"
client_secret_env = "WEB_TEST_SECRET"
client_secret_expires = "{expires}"

[routes.system]
senders = ["casemanager@business.com"]
upstream = "smtp"
host = "smtp.office365.com"
username = "casemanager@business.com"
password_env = "WEB_TEST_SECRET"
""")
    cfg = write_config(tmp_path, routes, queue='retry_min = "1h"\nretry_max = "2h"',
                       extra=f'[web]\nlisten = "127.0.0.1:0"\n[auth]\npath = '
                             f'"{tmp_path / "tokens"}"\nkey_file = "{tmp_path / "token.key"}"\n')
    async with run_service(cfg) as svc:
        port = service_port(svc)
        await send(port, "alice@business.com", ["bob@example.com", "later@example.com"],
                   message())
        await send(port, "down@business.com", ["carol@example.com"], message())
        await wait_for(lambda: sum(1 for q in svc.qmgr.view.messages() if q.attempts) == 2,
                       what="both messages deferred")
        [deferred_id] = [m.id for m in svc.qmgr.view.messages()
                         if "later@example.com" in m.entry.pending()]
        url = f"http://127.0.0.1:{svc.web_port}/"

        def read_page() -> dict[str, Any]:
            with headless_chromium(tmp_path) as driver:
                driver.get(url)
                rows = driver.find_elements(By.CSS_SELECTOR, "tr")
                return {
                    "rows": [r.text for r in rows],
                    "failing": [r.text for r in
                                driver.find_elements(By.CSS_SELECTOR, "tr.failing")],
                    "warn": [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".warn")],
                    "deferred": driver.find_element(By.ID, "deferred").text,
                    "attention": driver.find_element(By.CSS_SELECTOR, "ul.attention").text,
                    "text": driver.find_element(By.TAG_NAME, "body").text,
                }

        def days_left() -> str:  # the page rounds what is left until 00:00 UTC of that day
            until = dt.datetime.fromisoformat(expires).replace(tzinfo=dt.UTC)
            return f"expires in {(until - dt.datetime.now(dt.UTC)).total_seconds() / 86400:.0f} d"

        shown = {days_left()}  # 26 d before 12:00 UTC, 25 d after
        got = await asyncio.to_thread(read_page)
        shown.add(days_left())
    [people] = [r for r in got["rows"] if r.startswith("people (nobody signed in)")]
    assert "needs sign-in" in people and "relayd auth login people" in people
    [app] = [r for r in got["rows"] if r.startswith("app (app)")]
    assert "ok" not in app.split() and any(s in app for s in shown), (app, shown)
    assert any(expires in w for w in got["warn"]) and any("expires" in w for w in got["warn"])
    assert deferred_id in got["deferred"] and "later@example.com" in got["deferred"]
    assert "451 4.2.0 mailbox busy" in got["deferred"] and "carol@example.com" in got["deferred"]
    stamps = re.findall(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?: UTC)?", got["text"])
    assert len(stamps) >= 5 and all(t.endswith(" UTC") for t in stamps), stamps
    assert [r.split()[0] for r in got["failing"]] == ["down"]
    assert "cannot connect to 127.0.0.1:" in got["failing"][0]
    assert "Error connecting to" not in got["text"]  # said once, not twice
    assert "end of December 2026" in got["attention"] and "m365-graph-app.toml" in \
        got["attention"]
