"""Mono's System.Net.Mail.SmtpClient, the API Windows line-of-business apps send with: plain, with
a login on loopback, and with EnableSsl (STARTTLS, TLS 1.0 only) against relayd with and without
server.tls_legacy. (Mono sends `AUTH LOGIN`; Microsoft's own SmtpClient sends `AUTH login`,
which tests/test_listener_clients.py sends byte for byte.)"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import Upstream, run_service, service_port, smtp_route, wait_for, write_config

from relayd.auth.passwords import hash_password

pytestmark = pytest.mark.skipif(
    shutil.which("mcs") is None or shutil.which("mono") is None,
    reason="needs Mono (mono-mcs mono-runtime libmono-system-net4.0-cil; .ci/run installs it)")

PASSWORD = "correct horse battery staple"

SEND_CS = """
using System;
using System.Net;
using System.Net.Mail;

class Send {
    static int Main(string[] a) {
        // relayd's certificate is self-signed here.
        ServicePointManager.ServerCertificateValidationCallback = (s, c, ch, e) => true;
        var client = new SmtpClient(a[0], int.Parse(a[1]));
        client.EnableSsl = a[2] == "ssl";
        if (a[3] != "-") client.Credentials = new NetworkCredential(a[3], a[4]);
        client.Timeout = 15000;
        var msg = new MailMessage(a[5], a[6], a[7], "Sent by System.Net.Mail.SmtpClient.");
        try { client.Send(msg); Console.WriteLine("sent"); return 0; }
        catch (Exception e) { Console.WriteLine(e.ToString()); return 1; }
    }
}
"""


@pytest.fixture(scope="module")
def send_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("mono")
    (where / "send.cs").write_text(SEND_CS)
    subprocess.run(["mcs", "-nowarn:618", "-r:System.dll", "-out:send.exe", "send.cs"],
                   cwd=where, check=True, capture_output=True, timeout=120)
    return where / "send.exe"


@pytest.fixture(scope="module")
def password_hash() -> str:
    return hash_password(PASSWORD)


async def dotnet_send(exe: Path, port: int, *, ssl: bool = False, user: str = "-",
                      password: str = "-", sender: str = "app@business.com",
                      subject: str = "from .NET") -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "mono", str(exe), "127.0.0.1", str(port), "ssl" if ssl else "plain", user, password,
        sender, "x@example.com", subject, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def config(tmp_path: Path, upstream: Upstream, password_hash: str | None = None,
           server: str = "") -> Path:
    users = "" if password_hash is None else f"""
[server.users.casemanager]
password_hash = "{password_hash}"
senders = ["*@business.com"]
"""
    return write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                        server=server + users)


async def test_plain_without_login(tmp_path: Path, upstream: Upstream, send_exe: Path) -> None:
    async with run_service(config(tmp_path, upstream)) as svc:
        code, out = await dotnet_send(send_exe, service_port(svc))
        assert code == 0, out
        await wait_for(lambda: len(upstream.messages) == 1)
    got = upstream.messages[0]
    assert (got.mail_from, got.rcpt_tos) == ("app@business.com", ["x@example.com"])
    assert b"Subject: from .NET" in got.data


async def test_login_on_loopback(tmp_path: Path, upstream: Upstream, send_exe: Path,
                                 password_hash: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with run_service(config(tmp_path, upstream, password_hash)) as svc:
        code, out = await dotnet_send(send_exe, service_port(svc), user="casemanager",
                                      password=PASSWORD)
        assert code == 0, out
        await wait_for(lambda: len(upstream.messages) == 1)
    assert "login casemanager from 127.0.0.1" in caplog.text
    assert upstream.messages[0].mail_from == "app@business.com"


async def test_any_login_on_loopback_without_users(tmp_path: Path, upstream: Upstream,
                                                   send_exe: Path) -> None:
    """The bundled config: the app sends the login typed into its settings anyway."""
    async with run_service(config(tmp_path, upstream)) as svc:
        code, out = await dotnet_send(send_exe, service_port(svc), user="whoever",
                                      password="whatever")
        assert code == 0, out
        await wait_for(lambda: len(upstream.messages) == 1)


async def test_enable_ssl_with_tls_legacy(tmp_path: Path, upstream: Upstream, send_exe: Path,
                                          password_hash: str) -> None:
    cfg = config(tmp_path, upstream, password_hash, server="tls_legacy = true")
    async with run_service(cfg) as svc:
        code, out = await dotnet_send(send_exe, service_port(svc), ssl=True,
                                      user="casemanager", password=PASSWORD,
                                      subject="over TLS")
        assert code == 0, out
        await wait_for(lambda: len(upstream.messages) == 1)
    assert b"Subject: over TLS" in upstream.messages[0].data


async def test_enable_ssl_without_tls_legacy_fails_with_a_warning_naming_it(
        tmp_path: Path, upstream: Upstream, send_exe: Path, password_hash: str,
        caplog: pytest.LogCaptureFixture) -> None:
    async with run_service(config(tmp_path, upstream, password_hash)) as svc:
        code, out = await dotnet_send(send_exe, service_port(svc), ssl=True,
                                      user="casemanager", password=PASSWORD)
        assert code == 1, out
        await wait_for(lambda: "TLS handshake" in caplog.text, what="the warning")
    lines = [r for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "TLS 1.0" in lines[0].getMessage() and "server.tls_legacy" in lines[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert upstream.messages == []
