"""Real clients against the listener: AUTH as .NET, printers, swaks and curl speak it; null-sender
mail from a front MTA; TLS handshakes that fail are one WARNING line."""

from __future__ import annotations

import asyncio
import base64
import gc
import logging
import shutil
import smtplib
import socket
import ssl
import subprocess
import warnings
from pathlib import Path

import pytest
from conftest import (
    Upstream,
    message,
    read_reply,
    run_service,
    send,
    service_port,
    smtp_exchange,
    smtp_route,
    wait_for,
    write_config,
)

from relayd.auth.passwords import hash_password

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def password_hash() -> str:
    return hash_password(PASSWORD)


def users_config(tmp_path: Path, upstream: Upstream, password_hash: str, server: str = "") -> Path:
    return write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                        server=f"""
{server}
[server.users.casemanager]
password_hash = "{password_hash}"
senders = ["*@business.com"]
""")


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert bad == [], [r.getMessage() for r in bad]


async def test_auth_mechanism_names_in_lower_case_as_dotnet_sends_them(
        tmp_path: Path, upstream: Upstream, password_hash: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """1. `AUTH login` (System.Net.Mail.SmtpClient's spelling), prompts Username:/Password:
    2. `AUTH plain <initial response>` 3. both log in and send; no login_data warning."""
    caplog.set_level(logging.INFO)
    cfg = users_config(tmp_path, upstream, password_hash)
    async with run_service(cfg) as svc:
        port = service_port(svc)
        login = await smtp_exchange(port, [
            b"EHLO client\r\n", b"AUTH login\r\n", b64("casemanager") + b"\r\n",
            b64(PASSWORD) + b"\r\n", b"MAIL FROM:<alice@business.com>\r\n", b"QUIT\r\n"])
        assert login[2] == b"334 VXNlcm5hbWU6\r\n"  # "Username:"
        assert login[3] == b"334 UGFzc3dvcmQ6\r\n"  # "Password:"
        assert login[4].startswith(b"235 2.7.0 ")
        assert login[5].startswith(b"250 2.1.0 ")
        plain = base64.b64encode(f"\0casemanager\0{PASSWORD}".encode())
        replies = await smtp_exchange(port, [b"EHLO client\r\n", b"AUTH plain " + plain + b"\r\n"])
        assert replies[2].startswith(b"235 2.7.0 ")
        replies = await smtp_exchange(port, [b"EHLO client\r\n", b"AUTH Plain\r\n"])
        assert replies[2] == b"334 \r\n"

        def dotnet_like() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
                client.ehlo("client")
                client.user, client.password = "casemanager", PASSWORD
                client.auth("login", client.auth_login)  # smtplib sends the name as given
                client.sendmail("alice@business.com", ["x@example.com"], message())

        await asyncio.to_thread(dotnet_like)
        await wait_for(lambda: len(upstream.messages) == 1)
    assert upstream.messages[0].mail_from == "alice@business.com"
    assert "login_data" not in caplog.text
    assert PASSWORD not in caplog.text
    no_tracebacks(caplog)


@pytest.mark.skipif(shutil.which("swaks") is None,
                    reason="swaks not installed (.ci/run installs it)")
async def test_swaks_auth_login_sees_username_and_password_prompts(
        tmp_path: Path, upstream: Upstream, password_hash: str) -> None:
    cfg = users_config(tmp_path, upstream, password_hash)
    async with run_service(cfg) as svc:
        proc = await asyncio.create_subprocess_exec(
            "swaks", "--server", "127.0.0.1", "--port", str(service_port(svc)),
            "--from", "printer@business.com", "--to", "x@example.com",
            "--auth", "LOGIN", "--auth-user", "casemanager", "--auth-password", PASSWORD,
            "--header", "Subject: scan", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        text = out.decode()
        assert proc.returncode == 0, text
        await wait_for(lambda: len(upstream.messages) == 1)
    assert "<-  334 VXNlcm5hbWU6" in text  # Username:
    assert "<-  334 UGFzc3dvcmQ6" in text  # Password:
    assert "<-  235 2.7.0" in text
    assert upstream.messages[0].mail_from == "printer@business.com"
    assert b"Subject: scan" in upstream.messages[0].data


async def test_no_users_loopback_offers_auth_and_takes_any_login(
        tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    """The bundled config has no [server.users]: never an empty `250-AUTH`; any login on
    loopback is taken (with one INFO line saying it was not needed)."""
    caplog.set_level(logging.INFO)
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    async with run_service(cfg) as svc:
        port = service_port(svc)
        replies = await smtp_exchange(port, [b"EHLO client\r\n"])
        ehlo = replies[1].decode().split("\r\n")
        assert "250-AUTH LOGIN PLAIN" in ehlo
        assert not any(line.rstrip() == "250-AUTH" for line in ehlo)

        def with_login() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
                client.login("whatever", "typed into the app's settings")
                client.sendmail("app@business.com", ["x@example.com"], message())

        await asyncio.to_thread(with_login)
        await wait_for(lambda: len(upstream.messages) == 1)
    assert upstream.messages[0].mail_from == "app@business.com"
    notes = [r for r in caplog.records if "accepted without checking" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO
    assert "typed into" not in caplog.text
    no_tracebacks(caplog)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_curl_with_user_against_a_config_without_users(tmp_path: Path,
                                                             upstream: Upstream) -> None:
    """curl gave up with "Login denied" on the empty `250-AUTH` line."""
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    body = tmp_path / "mail.txt"
    body.write_bytes(message(sender="curl@business.com", subject="via curl"))
    async with run_service(cfg) as svc:
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--max-time", "20", f"smtp://127.0.0.1:{service_port(svc)}",
            "--user", "someone:secret", "--mail-from", "curl@business.com",
            "--mail-rcpt", "x@example.com", "-T", str(body),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, out.decode()
        await wait_for(lambda: len(upstream.messages) == 1)
    got = upstream.messages[0]
    assert (got.mail_from, got.rcpt_tos) == ("curl@business.com", ["x@example.com"])
    assert b"Subject: via curl" in got.data


async def test_null_sender_goes_through_null_sender_route(tmp_path: Path, upstream: Upstream,
                                                          upstream2: Upstream) -> None:
    """1. null_sender_route = "system" 2. a DSN with MAIL FROM:<> is accepted 3. it is
    delivered through the system route (upstream2), still with MAIL FROM:<>."""
    routes = (smtp_route("staff", '["*@business.com"]', upstream.port)
              + smtp_route("system", '["casemanager@business.com"]', upstream2.port))
    cfg = write_config(tmp_path, routes, server='null_sender_route = "system"')
    dsn = message(sender="MAILER-DAEMON@front.business.com", subject="Undelivered Mail")
    async with run_service(cfg) as svc:
        refused = await send(service_port(svc), "", ["alice@business.com"], dsn)
        assert refused == {}
        await wait_for(lambda: len(upstream2.messages) == 1, what="the DSN upstream")
    got = upstream2.messages[0]
    assert (got.mail_from, got.rcpt_tos) == ("", ["alice@business.com"])
    assert got.data == dsn
    assert upstream.messages == []


async def test_null_sender_from_loopback_takes_one_recipient(tmp_path: Path, upstream: Upstream,
                                                             upstream2: Upstream) -> None:
    """1. no [server.users], null_sender_route = "system" 2. MAIL FROM:<> from loopback with
    100 recipients: the first is taken, every other refused 452 4.5.3 3. one delivery, to the
    first recipient only."""
    routes = (smtp_route("staff", '["*@business.com"]', upstream.port)
              + smtp_route("system", '["casemanager@business.com"]', upstream2.port))
    cfg = write_config(tmp_path, routes, server='null_sender_route = "system"')
    rcpts = [f"user{i}@example.com" for i in range(100)]
    async with run_service(cfg) as svc:
        refused = await send(service_port(svc), "", rcpts, message(subject="forged"))
        await wait_for(lambda: len(upstream2.messages) == 1, what="the one delivery")
        await asyncio.sleep(0.5)
    assert sorted(refused) == sorted(rcpts[1:])
    assert {(code, text[:6]) for code, text in refused.values()} == {(452, b"4.5.3 ")}
    assert [(m.mail_from, m.rcpt_tos) for m in upstream2.messages] == [("", rcpts[:1])]
    assert upstream.messages == []


async def test_null_sender_refused_without_null_sender_route(tmp_path: Path,
                                                             upstream: Upstream) -> None:
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    async with run_service(cfg) as svc:
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            await send(service_port(svc), "", ["alice@business.com"], message())
        assert e.value.smtp_code == 550 and e.value.smtp_error.startswith(b"5.7.1 ")
        assert svc.spool.ids() == []
    assert upstream.messages == []


def tls10_client() -> ssl.SSLContext:
    """What Mono's SmtpClient and old .NET Framework apps offer: TLS 1.0 only."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0 is, that is the point
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def collect_failed_handshakes() -> None:
    """asyncio can leave the server side of a failed handshake to the garbage collector, which
    warns "unclosed transport": collect it here, where it was provoked."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


async def test_tls10_client_is_one_warning_naming_version_and_tls_legacy(
        tmp_path: Path, upstream: Upstream, password_hash: str,
        caplog: pytest.LogCaptureFixture) -> None:
    cfg = users_config(tmp_path, upstream, password_hash)
    async with run_service(cfg) as svc:
        port = service_port(svc)

        def old_client() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
                client.starttls(context=tls10_client())

        with pytest.raises((ssl.SSLError, ConnectionError, smtplib.SMTPServerDisconnected)):
            await asyncio.to_thread(old_client)
        await wait_for(lambda: "TLS handshake" in caplog.text, what="the warning")
        await asyncio.sleep(0.2)
        collect_failed_handshakes()
        await send(port, "ok@business.com", ["x@example.com"], message())
        await wait_for(lambda: len(upstream.messages) == 1)
    lines = [r for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    text = lines[0].getMessage()
    assert lines[0].levelno == logging.WARNING and lines[0].name == "relayd.listener"
    assert "127.0.0.1" in text and "TLS 1.0" in text and "server.tls_legacy" in text
    no_tracebacks(caplog)


async def test_tls10_client_sends_with_tls_legacy(tmp_path: Path, upstream: Upstream,
                                                  password_hash: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    cfg = users_config(tmp_path, upstream, password_hash, server="tls_legacy = true")
    async with run_service(cfg) as svc:
        port = service_port(svc)

        def old_client() -> tuple[str, str]:
            with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
                client.starttls(context=tls10_client())
                version = client.sock.version()  # type: ignore[union-attr]
                cipher = client.sock.cipher()[0]  # type: ignore[union-attr]
                client.login("casemanager", PASSWORD)
                client.sendmail("old@business.com", ["x@example.com"], message())
                return str(version), str(cipher)

        version, cipher = await asyncio.to_thread(old_client)
        # Forward secret even here: ECDHE with AES-CBC, never static RSA.
        assert version == "TLSv1" and cipher.startswith("ECDHE-") and "AES" in cipher
        await wait_for(lambda: len(upstream.messages) == 1)
    assert upstream.messages[0].mail_from == "old@business.com"
    no_tracebacks(caplog)


async def test_garbage_after_starttls_is_one_warning(tmp_path: Path, upstream: Upstream,
                                                     password_hash: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    cfg = users_config(tmp_path, upstream, password_hash)
    async with run_service(cfg) as svc:
        port = service_port(svc)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await read_reply(reader)
            writer.write(b"EHLO client\r\n")
            assert b"STARTTLS" in await read_reply(reader)
            writer.write(b"STARTTLS\r\n")
            assert (await read_reply(reader)).startswith(b"220 ")
            writer.write(b"MAIL FROM:<a@business.com>\r\nthis is not a TLS hello\r\n")
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing said
        finally:
            writer.close()
        await asyncio.sleep(0.2)
        collect_failed_handshakes()
        await send(port, "ok@business.com", ["x@example.com"], message())
        await wait_for(lambda: len(upstream.messages) == 1)
    lines = [r for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "127.0.0.1" in lines[0].getMessage()
    assert "did not start a TLS handshake" in lines[0].getMessage()
    no_tracebacks(caplog)


async def test_implicit_tls_port_failures_are_one_warning_each(
        tmp_path: Path, upstream: Upstream, password_hash: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """A TLS 1.0 client, then plain SMTP, on the implicit-TLS port: one WARNING each saying
    what the client offered (asyncio alone says nothing), and the port still serves curl."""
    cfg = users_config(tmp_path, upstream, password_hash, server='listen_tls = ["127.0.0.1:0"]')
    async with run_service(cfg) as svc:
        port = svc.tls_addresses[0][1]

        def old_client() -> None:
            with socket.create_connection(("127.0.0.1", port), 15) as raw:
                tls10_client().wrap_socket(raw).close()

        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.to_thread(old_client)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"EHLO client\r\nMAIL FROM:<a@business.com>\r\n")
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing said
        writer.close()
        await wait_for(lambda: caplog.text.count("TLS handshake") >= 2, what="two warnings")
        await asyncio.sleep(0.2)
        collect_failed_handshakes()
        body = tmp_path / "mail.txt"
        body.write_bytes(message(sender="scanner@business.com", subject="after"))
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--max-time", "20", "--insecure", f"smtps://127.0.0.1:{port}",
            "--user", f"casemanager:{PASSWORD}", "--mail-from", "scanner@business.com",
            "--mail-rcpt", "x@example.com", "-T", str(body),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, out.decode()
        await wait_for(lambda: len(upstream.messages) == 1)
    lines = [r for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.WARNING, logging.WARNING]
    assert "TLS 1.0" in lines[0].getMessage() and "server.tls_legacy" in lines[0].getMessage()
    assert "did not start a TLS handshake on the implicit-TLS port" in lines[1].getMessage()
    no_tracebacks(caplog)


def tls12_client(ciphers: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


@pytest.mark.parametrize("legacy", [False, True])
async def test_tls12_clients_get_forward_secret_aead_suites(
        tmp_path: Path, upstream: Upstream, password_hash: str,
        caplog: pytest.LogCaptureFixture, legacy: bool) -> None:
    """With or without tls_legacy a TLS 1.2 client gets ECDHE with an AEAD suite; a TLS 1.2
    client that offers only CBC suites gets in only with tls_legacy."""
    server = "tls_legacy = true" if legacy else ""
    cfg = users_config(tmp_path, upstream, password_hash, server=server)
    async with run_service(cfg) as svc:
        port = service_port(svc)

        def negotiate(ciphers: str | None) -> str:
            with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
                client.starttls(context=tls12_client(ciphers))
                return str(client.sock.cipher()[0])  # type: ignore[union-attr]

        cipher = await asyncio.to_thread(negotiate, None)
        assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher)
        cbc_only = "ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA:AES128-SHA:AES128-SHA256"
        if legacy:
            assert (await asyncio.to_thread(negotiate, cbc_only)).startswith("ECDHE-RSA-AES")
        else:
            with pytest.raises((ssl.SSLError, ConnectionError,
                                smtplib.SMTPServerDisconnected)):
                await asyncio.to_thread(negotiate, cbc_only)
            await wait_for(lambda: "TLS handshake" in caplog.text, what="the warning")
            await asyncio.sleep(0.2)
            collect_failed_handshakes()
            line = next(r for r in caplog.records if "TLS handshake" in r.getMessage())
            assert "offered TLS 1.2/1.3: no shared cipher" in line.getMessage()
    no_tracebacks(caplog)


@pytest.mark.skipif(shutil.which("msmtp") is None,
                    reason="msmtp not installed (.ci/run installs it)")
async def test_msmtp_with_login(tmp_path: Path, upstream: Upstream, password_hash: str) -> None:
    cfg = users_config(tmp_path, upstream, password_hash)
    async with run_service(cfg) as svc:
        proc = await asyncio.create_subprocess_exec(
            "msmtp", "--host=127.0.0.1", f"--port={service_port(svc)}", "--tls=off",
            "--auth=login", "--user=casemanager", f"--passwordeval=echo '{PASSWORD}'",
            "--from=cron@business.com", "x@example.com",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await asyncio.wait_for(
            proc.communicate(message(sender="cron@business.com", subject="via msmtp")), 30)
        assert proc.returncode == 0, out.decode()
        await wait_for(lambda: len(upstream.messages) == 1)
    got = upstream.messages[0]
    assert (got.mail_from, got.rcpt_tos) == ("cron@business.com", ["x@example.com"])
    assert b"Subject: via msmtp" in got.data


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_curl_smtps_with_login_on_the_implicit_tls_port(
        tmp_path: Path, upstream: Upstream, password_hash: str) -> None:
    cfg = users_config(tmp_path, upstream, password_hash, server='listen_tls = ["127.0.0.1:0"]')
    body = tmp_path / "mail.txt"
    body.write_bytes(message(sender="scanner@business.com", subject="via smtps"))
    async with run_service(cfg) as svc:
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--max-time", "20", "--insecure",  # relayd's self-signed certificate
            f"smtps://127.0.0.1:{svc.tls_addresses[0][1]}", "--user", f"casemanager:{PASSWORD}",
            "--mail-from", "scanner@business.com", "--mail-rcpt", "x@example.com",
            "-T", str(body), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, out.decode()
        await wait_for(lambda: len(upstream.messages) == 1)
    got = upstream.messages[0]
    assert (got.mail_from, got.rcpt_tos) == ("scanner@business.com", ["x@example.com"])
    assert b"Subject: via smtps" in got.data


def test_describe_tls_failure_names_what_the_client_offered() -> None:
    from relayd.config import ServerConfig
    from relayd.tls import describe_tls_failure, offered_version

    def hello(version: int) -> bytes:  # record header, then the ClientHello's first bytes
        return bytes([0x16, 0x03, 0x01, 0x00, 0x80, 0x01, 0x00, 0x00, 0x7C]) + \
            version.to_bytes(2, "big")

    strict, legacy = ServerConfig(), ServerConfig(tls_legacy=True)
    assert offered_version(hello(0x0301)) == 0x0301
    assert offered_version(b"EHLO x\r\n") is None and offered_version(hello(0x0301)[:8]) is None
    error = ssl.SSLError(1, "[SSL: UNSUPPORTED_PROTOCOL] unsupported protocol")
    text = describe_tls_failure(hello(0x0301), error, strict)
    assert "TLS 1.0" in text and "server.tls_legacy = true" in text
    assert "SSL 3.0" in describe_tls_failure(hello(0x0300), error, legacy)
    assert "server.tls_legacy" in describe_tls_failure(hello(0x0300), error, legacy)
    assert describe_tls_failure(b"MAIL FROM:<a@b>\r\n", error, strict) == (
        "the client did not start a TLS handshake after STARTTLS")
    assert "no TLS hello" in describe_tls_failure(b"", ConnectionAbortedError(), strict)


async def test_ehlo_never_carries_an_auth_line_without_mechanisms(tmp_path: Path,
                                                                   upstream: Upstream) -> None:
    """aiosmtpd writes "250-AUTH " whenever AUTH is allowed, mechanisms or not."""
    from aiosmtpd.smtp import Envelope, Session

    from relayd.listener import Handler

    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    async with run_service(cfg) as svc:
        handler = Handler(svc)
        session = Session(asyncio.get_running_loop())
        out = await handler.handle_EHLO(None, session, Envelope(), "client",  # type: ignore[arg-type]
                                        ["250-relay.test", "250-AUTH ", "250 HELP"])
        assert out == ["250-relay.test", "250-PIPELINING", "250-ENHANCEDSTATUSCODES",
                       "250 HELP"]
        out = await handler.handle_EHLO(None, session, Envelope(), "client",  # type: ignore[arg-type]
                                        ["250-relay.test", "250-AUTH LOGIN PLAIN", "250 HELP"])
        assert "250-AUTH LOGIN PLAIN" in out
