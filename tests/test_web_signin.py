"""Abuse of the web page's sign-in and admin login, driven by real clients (http.client,
urllib, headless Chromium): pending sign-ins capped per address, `state` bound to the browser
that started the sign-in, back-off on failed admin logins, security headers everywhere."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import html
import http.client
import re
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import Upstream, run_service, smtp_route, wait_for, write_config
from fakes.https import server_cert_files, shared_ca
from test_auth_login import headless_chromium, login_env

from relayd.auth.passwords import hash_password, verify_password
from relayd.config import WebConfig, load_config
from relayd.web import server as web_server
from relayd.web.server import SIGNIN_COOKIE
from relayd.web.signin import MAX_PENDING_SIGNINS_PER_CLIENT

HEADERS = {"Content-Security-Policy", "X-Frame-Options", "Referrer-Policy",
           "X-Content-Type-Options"}


def signin_config(env: Any) -> Path:
    auth = (f'[auth]\npath = "{env.tmp_path / "tokens"}"\n'
            f'key_file = "{env.tmp_path / "token.key"}"\n[web]\nlisten = "127.0.0.1:0"\n')
    return write_config(env.tmp_path, env.route_toml(), extra=auth)


def get(port: int, path: str, source: str, cookie: str = "",
        method: str = "GET") -> http.client.HTTPResponse:
    """One request from `source`, as a browser at http://localhost:PORT sends it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                      source_address=(source, 0))
    headers = {"Host": f"localhost:{port}"}
    if cookie:
        headers["Cookie"] = cookie
    conn.request(method, path, headers=headers)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def assert_security_headers(headers: Any) -> None:
    missing = {h for h in HEADERS if not headers.get(h)}
    assert not missing, missing
    csp = headers["Content-Security-Policy"]
    if "script-src" in csp:
        assert "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
    assert "default-src 'none'" in csp
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["X-Content-Type-Options"] == "nosniff"


async def test_pending_sign_ins_are_capped_per_address_with_a_clear_page(
        tmp_path: Path) -> None:
    """1. 127.0.0.2 starts sign-ins without finishing them: the first five are sent to the
    provider with the sign-in cookie (HttpOnly, SameSite=Lax, Path=/signin; plain HTTP on
    loopback: not Secure), the sixth gets 429 and a page saying why 2. 127.0.0.3 can still
    start one."""
    with login_env(tmp_path) as env:
        async with run_service(signin_config(env)) as svc:
            port = svc.web_port
            assert port is not None and svc.web.signins is not None
            [key] = svc.web.signins.groups
            path = "/signin/start?" + urllib.parse.urlencode({"id": key})
            for _ in range(MAX_PENDING_SIGNINS_PER_CLIENT):
                r = await asyncio.to_thread(get, port, path, "127.0.0.2")
                assert r.status == 302 and r.headers["Location"].startswith(env.idp_url)
                cookie = r.headers["Set-Cookie"]
                assert cookie.startswith(f"{SIGNIN_COOKIE}=")
                attrs = {a.strip().lower() for a in cookie.split(";")[1:]}
                assert {"httponly", "samesite=lax", "path=/signin"} <= attrs
                assert "secure" not in attrs
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                              source_address=("127.0.0.2", 0))
            conn.request("GET", path, headers={"Host": f"localhost:{port}"})
            full = conn.getresponse()
            page = full.read().decode()
            conn.close()
            assert full.status == 429
            assert "sign-ins started from your address are not finished" in page
            assert_security_headers(full.headers)
            r = await asyncio.to_thread(get, port, path, "127.0.0.3")
            assert r.status == 302
            # Started on another host name than the redirect URI's: sent there first.
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", path, headers={"Host": f"127.0.0.1:{port}"})
            moved = conn.getresponse()
            moved.read()
            conn.close()
            assert moved.status == 302
            assert moved.headers["Location"] == f"http://localhost:{port}{path}"
            assert "Set-Cookie" not in moved.headers


async def test_a_sign_in_finished_in_another_browser_is_refused(tmp_path: Path) -> None:
    """Login CSRF: 1. the attacker starts a sign-in (getting its cookie) and signs in at the
    provider as themselves, keeping the answer (code and state) 2. the victim's browser
    (headless Chromium) is made to post that answer to relayd, from the attacker's page
    3. relayd refuses it (that browser did not start the sign-in) and stores nothing
    4. the attacker's own browser can still finish it: the cookie is what counts."""
    with login_env(tmp_path) as env, headless_chromium(tmp_path) as victim:
        from selenium.webdriver.common.by import By

        async with run_service(signin_config(env)) as svc:
            port = svc.web_port
            assert port is not None and svc.web.signins is not None
            [key] = svc.web.signins.groups
            path = "/signin/start?" + urllib.parse.urlencode({"id": key})
            started = await asyncio.to_thread(get, port, path, "127.0.0.1")
            cookie = started.headers["Set-Cookie"].split(";")[0]
            answer = await asyncio.to_thread(provider_answer, started.headers["Location"],
                                             env.ca_file, "mallory@business.com")
            assert set(answer) >= {"code", "state"}
            evil = tmp_path / "evil.html"
            fields = "".join(f'<input type="hidden" name="{html.escape(k)}" '
                             f'value="{html.escape(v)}">' for k, v in answer.items())
            evil.write_text(f'<html><body onload="document.forms[0].submit()"><form '
                            f'method="post" action="http://localhost:{port}/signin/callback">'
                            f"{fields}</form></body></html>")
            await asyncio.to_thread(victim.get, evil.as_uri())
            await wait_for(lambda: "Not signed in" in victim.page_source
                           or "Signed in" in victim.page_source, timeout=20,
                           what="relayd's answer in the victim's browser")
            text = victim.find_element(By.TAG_NAME, "body").text
            assert "Not signed in" in text and "started in another browser" in text
            assert not list(tmp_path.glob("tokens/*.token"))

            def finish_as_attacker() -> tuple[int, str]:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("POST", "/signin/callback", urllib.parse.urlencode(answer),
                             {"Host": f"localhost:{port}", "Cookie": cookie,
                              "Content-Type": "application/x-www-form-urlencoded"})
                r = conn.getresponse()
                return r.status, r.read().decode()

            status, page = await asyncio.to_thread(finish_as_attacker)
            assert status == 200 and "mallory@business.com can now send mail" in page


def provider_answer(url: str, ca_file: Path, user: str) -> dict[str, str]:
    """Sign in at the fake provider by hand; the fields it would post back (form_post)."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx))
    with opener.open(url, timeout=10) as resp:
        page = resp.read().decode()
    action = html.unescape(re.search(r'<form method="post" action="([^"]+)"', page)[1])  # type: ignore[index]
    fields = {html.unescape(k): html.unescape(v) for k, v in
              re.findall(r"<input type='hidden' name='([^']+)' value='([^']*)'>", page)}
    fields.update(username=user, password="pw")
    with opener.open(urllib.request.Request(urllib.parse.urljoin(url, action),
                                            data=urllib.parse.urlencode(fields).encode()),
                     timeout=10) as resp:
        posted = resp.read().decode()
    return {html.unescape(k): html.unescape(v) for k, v in
            re.findall(r"<input type='hidden' name='([^']+)' value='([^']*)'>", posted)}


async def test_admin_login_back_off_per_address_and_headers_on_every_response(
        tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    """The page as served off loopback (HTTPS, admins). 1. a wrong password from 127.0.0.2:
    401; its next try, even with the right password, gets 429 with Retry-After until the
    back-off ends 2. 127.0.0.3 logs in at once 3. an unknown name is refused like a wrong
    password, after the same one scrypt check (counted, not timed) 4. every answer, the
    standard library's own errors (a bad request line, an unknown method) included, carries
    the security headers."""
    ca = shared_ca()
    cert, key = server_cert_files(tmp_path)
    users = (f'tls_cert = "{cert}"\ntls_key = "{key}"\n'
             f'[server.users.it]\npassword_hash = "{hash_password("admin-pw")}"\n'
             'senders = ["*@business.com"]\n')
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       server=users, extra='[web]\nlisten = "127.0.0.1:0"\nadmins = ["it"]\n')
    config = load_config(cfg)
    config = dataclasses.replace(config, web=WebConfig(config.web.listen, ("it",),
                                                       loopback=False))
    checks: list[str] = []

    def counted(password: str, stored: str) -> bool:
        checks.append(stored)
        return verify_password(password, stored)

    monkeypatch.setattr(web_server, "verify_password", counted)  # a spy: the real check runs
    async with run_service(config) as svc:
        port = svc.web_port
        assert port is not None

        def request(login: str | None, source: str, method: str = "GET",
                    target: str = "/") -> tuple[int, Any, str]:
            conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=15,
                                               source_address=(source, 0),
                                               context=ca.client_context())
            headers = {}
            if login:
                headers["Authorization"] = "Basic " + base64.b64encode(login.encode()).decode()
            conn.request(method, target, headers=headers)
            r = conn.getresponse()
            body = r.read().decode()
            conn.close()
            return r.status, r.headers, body

        status, headers, _ = await asyncio.to_thread(request, "it:wrong", "127.0.0.2")
        assert status == 401
        assert_security_headers(headers)
        status, headers, body = await asyncio.to_thread(request, "it:admin-pw", "127.0.0.2")
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert "Too many failed logins" in body
        assert_security_headers(headers)
        status, _, body = await asyncio.to_thread(request, "it:admin-pw", "127.0.0.3")
        assert status == 200 and "<td>staff</td>" in body
        checks.clear()
        status, _, _ = await asyncio.to_thread(request, "nobody:admin-pw", "127.0.0.4")
        assert status == 401
        status, _, _ = await asyncio.to_thread(request, "it:wrong", "127.0.0.6")
        assert status == 401
        assert len(checks) == 2 and all(c.startswith("scrypt$") for c in checks)
        await asyncio.sleep(1.1)  # the first back-off (1 s) is over
        status, _, _ = await asyncio.to_thread(request, "it:admin-pw", "127.0.0.2")
        assert status == 200
        # The standard library's own error answers: an unknown method, and a broken request.
        status, headers, _ = await asyncio.to_thread(request, None, "127.0.0.5", "PUT")
        assert status == 501
        assert_security_headers(headers)
        status, headers, _ = await asyncio.to_thread(request, None, "127.0.0.5", "GET",
                                                     "/nowhere")
        assert status == 404
        assert_security_headers(headers)

        def broken() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                    ca.client_context().wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"NONSENSE\r\n\r\n")
                out = b""
                while chunk := tls.recv(4096):
                    out += chunk
                return out

        said = await asyncio.to_thread(broken)
        head = said.split(b"\r\n\r\n", 1)[0].decode()
        assert head.startswith("HTTP/1.0 400")
        assert_security_headers(dict(line.split(": ", 1) for line in head.split("\r\n")[1:]))
