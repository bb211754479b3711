"""`relayd auth login --browser / --paste`: authorization code with PKCE against the fake identity
provider's login form, completed by headless Chromium or by the test itself; then a message from
the signed-in user goes out through Graph with that user's token."""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import shutil
import ssl
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from conftest import RELAYD, REPO, run_service, send, service_port, wait_for, write_config
from fakes.graph import GraphState, start_graph
from fakes.https import HttpsServer
from fakes.idp import CLIENT_ID, TENANT, IdpState, pkce_challenge, start_idp

from relayd.auth.oauth import has_signed_in
from relayd.config import Config, load_config

ALICE = "alice@business.com"
LOGIN_WAIT_S = 60.0


@dataclass
class Env:
    idp: IdpState
    graph: GraphState
    idp_url: str
    graph_url: str
    ca_file: Path
    tmp_path: Path

    def route_toml(self, **extra: Any) -> str:
        keys = {"senders": ["*@business.com"], "upstream": "graph", "endpoint": self.graph_url,
                "tenant_id": TENANT, "client_id": CLIENT_ID, "flow": "device",
                "authority": self.idp_url, "ca_file": str(self.ca_file), "timeout": "10s",
                **extra}
        return "[routes.m365]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())

    def config_file(self, **extra: Any) -> Path:
        auth = (f'[auth]\npath = "{self.tmp_path / "tokens"}"\n'
                f'key_file = "{self.tmp_path / "token.key"}"\n')
        return write_config(self.tmp_path, self.route_toml(**extra), extra=auth)

    def config(self) -> Config:
        return load_config(self.config_file())


@contextlib.contextmanager
def login_env(tmp_path: Path) -> Iterator[Env]:
    """The fake identity provider and Graph, and a delegated Graph route using them."""
    idp_server: HttpsServer = start_idp()
    idp: IdpState = idp_server.state
    graph_state = GraphState(token_ok=lambda token: idp.check_bearer(token) is not None)
    graph_server = start_graph(graph_state)
    try:
        yield Env(idp, graph_state, idp_server.base_url, graph_server.base_url,
                  graph_server.ca_file, tmp_path)
    finally:
        graph_server.stop()
        idp_server.stop()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with login_env(tmp_path) as e:
        yield e


# -- driving the CLI -----------------------------------------------------------------------------


class Login:
    """`relayd auth login` in a subprocess: its sign-in URL, then its exit and output."""

    def __init__(self, cfg: Path, user: str, mode: str, route: str = "m365") -> None:
        self.proc = subprocess.Popen(
            [*RELAYD, "auth", "login", "-c", str(cfg), route, "--user", user, f"--{mode}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            cwd=REPO, env={k: v for k, v in os.environ.items()
                           if k not in ("DISPLAY", "WAYLAND_DISPLAY")})
        self.lines: list[str] = []

    @property
    def stdout(self) -> IO[str]:
        assert self.proc.stdout is not None
        return self.proc.stdout

    def url(self) -> str:
        """The sign-in URL: printed alone on its own line."""
        for line in self.stdout:
            self.lines.append(line)
            if line.startswith("https://"):
                assert line.strip() == line.rstrip("\n") and " " not in line.strip()
                return line.strip()
        raise AssertionError("no sign-in URL: " + "".join(self.lines) + self.finish()[1])

    def paste(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = LOGIN_WAIT_S) -> tuple[int, str]:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return self.proc.returncode, "".join(self.lines) + (out or "")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the test reads Location itself: http://localhost is where relayd listens


def sign_in_by_hand(url: str, ca_file: Path, user: str, password: str = "pw") -> str:
    """What a person's browser does: open the login page, submit the form; the address the
    browser is sent to (http://localhost...?code=...&state=...)."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), _NoRedirect)
    with opener.open(url, timeout=10) as resp:
        page = resp.read().decode()
    assert "<form" in page and 'name="password"' in page
    action = html.unescape(re.search(r'<form method="post" action="([^"]+)"', page)[1])  # type: ignore[index]
    fields = {html.unescape(k): html.unescape(v) for k, v in
              re.findall(r"<input type='hidden' name='([^']+)' value='([^']*)'>", page)}
    fields.update(username=user, password=password)
    target = urllib.parse.urljoin(url, action)
    data = urllib.parse.urlencode(fields).encode()
    try:
        opener.open(urllib.request.Request(target, data=data), timeout=10)
    except urllib.error.HTTPError as e:
        assert e.code == 302, e.read()
        return str(e.headers["Location"])
    raise AssertionError("the login form did not redirect")


async def assert_next_message_uses_token_of(env: Env, user: str) -> None:
    """A running relayd delivers the user's next message through Graph with the user's token."""
    async with run_service(env.config()) as svc:
        assert await send(service_port(svc), user, ["bob@example.net"],
                          f"From: {user}\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nhi\r\n"
                          .encode()) == {}
        await wait_for(lambda: len(env.graph.sent) == 1, what="Graph sendMail")
    [sent] = env.graph.sent
    assert sent.mailbox == user
    issued = env.idp.check_bearer(sent.token)
    assert issued is not None and issued.user == user and issued.kind == "user"
    assert "Mail.Send" in issued.scope


# -- --paste -------------------------------------------------------------------------------------


async def test_paste_completes_the_exchange_and_the_next_message_uses_the_token(
        env: Env) -> None:
    """1. relayd auth login --paste prints the URL 2. the test signs in with the form and pastes
    the redirected address 3. exit 0, the token is stored 4. relayd sends alice's next message
    with her token."""
    login = Login(env.config_file(), ALICE, "paste")
    url = login.url()
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert query["code_challenge_method"] == ["S256"] and query["code_challenge"][0]
    assert query["login_hint"] == [ALICE] and query["state"][0]
    assert query["redirect_uri"] == ["http://localhost"]
    back = sign_in_by_hand(url, env.ca_file, ALICE)
    assert back.startswith("http://localhost") and "code=" in back
    login.paste(back)
    rc, out = login.finish()
    assert rc == 0, out
    assert f"Signed in as {ALICE}" in out
    assert env.idp.grants("authorization_code") == 1
    assert has_signed_in(env.config(), env.config().routes["m365"], ALICE)
    await assert_next_message_uses_token_of(env, ALICE)


async def test_auth_login_output_has_no_python_warning(env: Env) -> None:
    """msal warns "response_mode='form_post' is recommended" whenever a sign-in starts; that is
    for web apps, and an admin at `relayd auth login` sees no Python warning (as run, with
    Python's default warning filters: stderr is part of the output read here)."""
    login = Login(env.config_file(), ALICE, "paste")
    login.paste(sign_in_by_hand(login.url(), env.ca_file, ALICE))
    rc, out = login.finish()
    assert rc == 0, out
    assert "Warning" not in out and "form_post" not in out and "warn" not in out.lower(), out


async def test_wrong_account_stores_nothing(env: Env) -> None:
    login = Login(env.config_file(), ALICE, "paste")
    login.paste(sign_in_by_hand(login.url(), env.ca_file, "mallory@business.com"))
    rc, out = login.finish()
    assert rc == 1, out
    assert "signed in as mallory@business.com" in out and "nothing stored" in out
    config = env.config()
    assert not has_signed_in(config, config.routes["m365"], ALICE)
    assert not has_signed_in(config, config.routes["m365"], "mallory@business.com")
    assert not list(env.tmp_path.glob("tokens/*.token"))


async def test_pasted_address_of_another_sign_in_is_refused(env: Env) -> None:
    """The state of another sign-in (or a forged one) is refused by msal: nothing stored."""
    other = Login(env.config_file(), ALICE, "paste")
    back = sign_in_by_hand(other.url(), env.ca_file, ALICE)
    other.proc.kill()
    other.finish()
    login = Login(env.config_file(), ALICE, "paste")
    login.url()
    login.paste(back)
    rc, out = login.finish()
    assert rc == 1 and "does not belong to this sign-in" in out, out
    assert env.idp.grants("authorization_code") == 0


async def test_pasting_something_else_is_refused(env: Env) -> None:
    login = Login(env.config_file(), ALICE, "paste")
    login.url()
    login.paste("I don't know")
    rc, out = login.finish()
    assert rc == 1 and "no code=" in out, out


# -- --browser, completed by headless Chromium ---------------------------------------------------


@contextlib.contextmanager
def headless_chromium(tmp_path: Path) -> Iterator[Any]:
    """A selenium driver of Debian's chromium, headless, as root (FIELD-NOTES' flags)."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1000,800",
                 # the fake identity provider's certificate comes from the test CA
                 "--ignore-certificate-errors"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options,
                              service=Service(executable_path=shutil.which("chromedriver")))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Any]:
    with headless_chromium(tmp_path) as driver:
        yield driver


async def test_browser_sign_in_by_headless_chromium(env: Env, chromium: Any,
                                                    tmp_path: Path) -> None:
    """1. relayd auth login --browser prints the URL and listens on localhost 2. Chromium opens
    it, fills the fake login form, submits 3. the redirect reaches relayd, which answers with a
    page saying it worked 4. exit 0 5. relayd sends alice's next message with her token."""
    from selenium.webdriver.common.by import By

    login = Login(env.config_file(), ALICE, "browser")
    url = login.url()
    redirect = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["redirect_uri"][0]
    assert re.fullmatch(r"http://localhost:\d+", redirect), redirect
    chromium.get(url)
    assert chromium.find_element(By.ID, "username").get_attribute("value") == ALICE
    shot = tmp_path / "login.png"
    assert chromium.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 1000
    chromium.find_element(By.ID, "password").send_keys("pw")
    chromium.find_element(By.ID, "submit").click()
    rc, out = login.finish()
    assert rc == 0, out
    await wait_for(lambda: "Signed in" in chromium.page_source, what="relayd's answer page")
    assert ALICE in chromium.find_element(By.ID, "result").text
    assert chromium.current_url.startswith(redirect)
    assert env.idp.logins == [ALICE]
    await assert_next_message_uses_token_of(env, ALICE)


async def test_browser_gives_up_after_the_timeout(env: Env) -> None:
    proc = subprocess.run(
        [*RELAYD, "auth", "login", "-c", str(env.config_file()), "m365", "--user", ALICE],
        capture_output=True, text=True, cwd=REPO, timeout=60,
        env={**os.environ, "RELAYD_TEST_LOGIN_TIMEOUT_S": "1"})
    assert proc.returncode == 1
    assert "no sign-in within" in proc.stdout and "nothing stored" in proc.stdout


# -- the fake identity provider refuses what the real one would -------------------------------


def _code_for(env: Env, verifier: str, redirect: str = "http://localhost:1234") -> str:
    query = urllib.parse.urlencode({
        "client_id": CLIENT_ID, "response_type": "code", "redirect_uri": redirect,
        "scope": "openid offline_access", "state": "s-1", "code_challenge":
        pkce_challenge(verifier), "code_challenge_method": "S256"})
    back = sign_in_by_hand(f"{env.idp_url}/{TENANT}/oauth2/v2.0/authorize?{query}", env.ca_file,
                           ALICE)
    got = urllib.parse.parse_qs(urllib.parse.urlsplit(back).query)
    assert got["state"] == ["s-1"]
    return got["code"][0]


def _redeem(env: Env, code: str, verifier: str,
            redirect: str = "http://localhost:1234") -> tuple[int, dict[str, Any]]:
    ctx = ssl.create_default_context(cafile=str(env.ca_file))
    data = urllib.parse.urlencode({"grant_type": "authorization_code", "client_id": CLIENT_ID,
                                   "code": code, "redirect_uri": redirect,
                                   "code_verifier": verifier}).encode()
    try:
        with urllib.request.urlopen(f"{env.idp_url}/{TENANT}/oauth2/v2.0/token", data,
                                    context=ctx, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_fake_refuses_a_wrong_code_verifier(env: Env) -> None:
    code = _code_for(env, "v" * 50)
    status, body = _redeem(env, code, "w" * 50)
    assert status == 400 and body["error"] == "invalid_grant"
    assert "Code_Verifier" in body["error_description"]


def test_fake_refuses_another_redirect_uri_and_a_second_use(env: Env) -> None:
    code = _code_for(env, "v" * 50)
    status, body = _redeem(env, code, "v" * 50, redirect="http://localhost:9999")
    assert status == 400 and body["error"] == "invalid_grant"
    status, body = _redeem(env, code, "v" * 50)
    assert status == 400 and "already used" in body["error_description"]


def test_fake_takes_the_right_verifier_once(env: Env) -> None:
    code = _code_for(env, "v" * 50)
    status, body = _redeem(env, code, "v" * 50)
    assert status == 200 and body["refresh_token"] and body["access_token"]
