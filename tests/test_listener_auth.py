"""Listener TLS and AUTH: STARTTLS, implicit TLS, logins limited to their sender patterns,
brute force slowed and counted, no open relay, metrics."""

from __future__ import annotations

import asyncio
import gc
import logging
import smtplib
import ssl
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest
from conftest import Upstream, message, run_service, smtp_route, wait_for, write_config

from relayd.auth.passwords import hash_password
from relayd.config import load_config
from relayd.metrics import Metrics

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def password_hash() -> str:
    return hash_password(PASSWORD)


def auth_config(tmp_path: Path, upstream: Upstream, password_hash: str, extra: str = "") -> Path:
    return write_config(
        tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
        listen="127.0.0.1:0",
        server=f"""
listen_tls = ["127.0.0.1:0"]
{extra}
[server.users.casemanager]
password_hash = "{password_hash}"
senders = ["*@business.com"]
[server.users.scanner]
password_hash = "{password_hash}"
senders = ["scanner@business.com"]
""")


def unverified() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the listener's certificate is self-signed
    return ctx


def submit(port: int, user: str, password: str, sender: str, *, implicit: bool = False,
           starttls: bool = True) -> str:
    """Log in and send; SMTPSenderRefused etc. when refused."""
    cls = smtplib.SMTP_SSL if implicit else smtplib.SMTP
    kwargs = {"context": unverified()} if implicit else {}
    with cls("127.0.0.1", port, timeout=15, **kwargs) as client:  # type: ignore[arg-type]
        if starttls and not implicit:
            client.starttls(context=unverified())
        client.login(user, password)
        refused = client.sendmail(sender, ["x@example.com"], message(sender=sender))
        assert refused == {}
        return sender


async def test_starttls_and_implicit_tls_with_login(tmp_path: Path, upstream: Upstream,
                                                    password_hash: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    cfg = auth_config(tmp_path, upstream, password_hash)
    caplog.set_level(logging.INFO)
    async with run_service(cfg) as svc:
        plain_port, tls_port = svc.addresses[0][1], svc.tls_addresses[0][1]
        await asyncio.to_thread(submit, plain_port, "casemanager", PASSWORD, "alice@business.com")
        await asyncio.to_thread(submit, tls_port, "scanner", PASSWORD, "scanner@business.com",
                                implicit=True)
        await wait_for(lambda: len(upstream.messages) == 2)
    assert sorted(m.mail_from for m in upstream.messages) == ["alice@business.com",
                                                              "scanner@business.com"]
    assert "self-signed certificate" in caplog.text
    assert (tmp_path / "queue" / "tls" / "selfsigned.key").stat().st_mode & 0o077 == 0
    assert PASSWORD not in caplog.text and password_hash not in caplog.text


async def test_aiosmtpd_command_log_masks_logins_when_on_and_says_nothing_when_off(
        tmp_path: Path, upstream: Upstream, password_hash: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """aiosmtpd logs each command line at INFO ("mail.log"), with AUTH data masked. On: the
    lines, masked. Off (WARNING, as relayd.cli sets it): none."""
    import base64

    cfg = auth_config(tmp_path, upstream, password_hash)
    secret = base64.b64encode(f"\0casemanager\0{PASSWORD}".encode()).decode()
    async with run_service(cfg) as svc:
        port = svc.tls_addresses[0][1]
        for level in (logging.INFO, logging.WARNING):
            caplog.clear()
            caplog.set_level(level, logger="mail.log")

            def plain_login() -> None:
                with smtplib.SMTP_SSL("127.0.0.1", port, timeout=15,
                                      context=unverified()) as client:
                    client.ehlo("printer")
                    code, _ = client.docmd("AUTH", "PLAIN " + secret)
                    assert code == 235
                    client.sendmail("alice@business.com", ["x@example.com"],
                                    message(sender="alice@business.com"))

            await asyncio.to_thread(plain_login)
            lines = [r.getMessage() for r in caplog.records if r.name == "mail.log"
                     and ">>" in r.getMessage()]
            if level == logging.INFO:
                assert any("AUTH PLAIN ********" in line for line in lines), lines
                # smtplib writes "mail FROM:" up to 3.12 and "mail from:" from 3.13 on
                assert any("from:<alice@business.com>" in line.lower() for line in lines)
            else:
                assert lines == []
            assert secret not in caplog.text
        await wait_for(lambda: len(upstream.messages) == 2)


async def test_later_connections_get_the_first_ones_commands_logins_and_hooks(
        tmp_path: Path, upstream: Upstream, password_hash: str) -> None:
    """aiosmtpd's __init__ works out its command and AUTH tables and the handler's hooks for
    each connection; relayd takes them from a listener's first protocol for the later ones
    (relayd.smtpfast.Tables). Later sessions must answer as the first did, and a login must
    belong to its own session: each logs in as someone else and only its own senders pass."""
    cfg = auth_config(tmp_path, upstream, password_hash)
    async with run_service(cfg) as svc:
        for port, implicit in ((svc.addresses[0][1], False), (svc.tls_addresses[0][1], True)):

            def sessions(port: int, implicit: bool) -> list[tuple[str, str]]:
                seen = []
                for user, sender in (("casemanager", "alice@business.com"),
                                     ("scanner", "scanner@business.com"),
                                     ("casemanager", "bob@business.com")):
                    cls = smtplib.SMTP_SSL if implicit else smtplib.SMTP
                    kwargs = {"context": unverified()} if implicit else {}
                    with cls("127.0.0.1", port, timeout=15, **kwargs) as client:  # type: ignore[arg-type]
                        if not implicit:
                            client.starttls(context=unverified())
                        code, ehlo = client.ehlo("printer")
                        assert code == 250
                        code, help_text = client.docmd("HELP")
                        assert code == 250
                        seen.append((ehlo.decode(), help_text.decode()))
                        client.login(user, PASSWORD)  # AUTH PLAIN: relayd's auth_PLAIN
                        if user == "scanner":  # may only send as scanner@
                            with pytest.raises(smtplib.SMTPSenderRefused):
                                client.sendmail("alice@business.com", ["x@example.com"],
                                                message(sender="alice@business.com"))
                        assert client.sendmail(sender, ["x@example.com"],
                                               message(sender=sender)) == {}
                return seen

            seen = await asyncio.to_thread(sessions, port, implicit)
            assert "AUTH LOGIN PLAIN" in seen[0][0] and "PIPELINING" in seen[0][0]
            assert "AUTH" in seen[0][1] and "DATA" in seen[0][1]
            assert seen[1] == seen[0] and seen[2] == seen[0]
        await wait_for(lambda: len(upstream.messages) == 6)
    assert sorted(m.mail_from for m in upstream.messages) == sorted(
        ["alice@business.com", "scanner@business.com", "bob@business.com"] * 2)

    # The tables themselves: what aiosmtpd's own __init__ makes, bound to each protocol.
    from relayd.listener import Handler, LoginGuard, make_protocol_factory

    config = load_config(cfg)
    handler = Handler(relay=None)  # type: ignore[arg-type]
    factory = make_protocol_factory(handler, config, set(), LoginGuard(lambda: None),
                                    starttls=ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
    first, later, again = factory(), factory(), factory()
    for protocol in (later, again):
        assert protocol.event_handler is handler
        assert protocol._handle_hooks == first._handle_hooks
        assert protocol._ehlo_hook_ver == first._ehlo_hook_ver == "new"
        assert protocol._smtp_methods.keys() == first._smtp_methods.keys()
        for name, method in protocol._smtp_methods.items():
            assert method.__self__ is protocol
            assert method.__func__ is first._smtp_methods[name].__func__
        assert protocol._auth_methods.keys() == first._auth_methods.keys() == {"LOGIN",
                                                                                "PLAIN"}
        for impl in protocol._auth_methods.values():
            assert impl.is_builtin and impl.method.__self__ is protocol  # type: ignore[attr-defined]
    assert set(dir(later)) >= {"smtp_DATA", "auth_PLAIN", "connection_made"}


async def test_tls_below_1_2_refused(tmp_path: Path, upstream: Upstream,
                                                       password_hash: str) -> None:
    cfg = auth_config(tmp_path, upstream, password_hash)
    async with run_service(cfg) as svc:
        ctx = unverified()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is, that is the point
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
            ctx.minimum_version = ssl.TLSVersion.TLSv1
        with pytest.raises((ssl.SSLError, ConnectionError, smtplib.SMTPServerDisconnected)):
            await asyncio.to_thread(smtplib.SMTP_SSL, "127.0.0.1", svc.tls_addresses[0][1],
                                    context=ctx, timeout=10)
        # asyncio (3.11) leaves the server side of a failed TLS handshake for the garbage
        # collector, which warns "unclosed transport"; collect it here, where it was provoked,
        # rather than let it surface in whichever test runs next.
        await asyncio.sleep(0.2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


async def test_a_login_may_only_use_its_own_senders(tmp_path: Path, upstream: Upstream,
                                                    password_hash: str) -> None:
    cfg = auth_config(tmp_path, upstream, password_hash)
    async with run_service(cfg) as svc:
        port = svc.addresses[0][1]
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            await asyncio.to_thread(submit, port, "scanner", PASSWORD, "ceo@business.com")
        assert e.value.smtp_code == 550 and b"5.7.1" in e.value.smtp_error
    assert upstream.messages == []


async def test_failed_logins_are_refused_slowed_counted_and_cut_off(
        tmp_path: Path, upstream: Upstream, password_hash: str) -> None:
    cfg = auth_config(tmp_path, upstream, password_hash)
    metrics = Metrics()
    async with run_service(cfg, observer=metrics) as svc:
        port = svc.addresses[0][1]

        def brute_force() -> tuple[list[int], float]:
            codes = []
            started = time.monotonic()
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.starttls(context=unverified())
                client.ehlo()
                for guess in ("123456", "password", "letmein", "qwerty"):
                    client.user, client.password = "casemanager", guess
                    try:
                        # One mechanism per try (login() would go on to the next one).
                        client.auth("PLAIN", client.auth_plain)
                    except smtplib.SMTPAuthenticationError as e:
                        codes.append(e.smtp_code)
                        if e.smtp_code == 421:
                            break
                    except smtplib.SMTPServerDisconnected:
                        codes.append(421)
                        break
            return codes, time.monotonic() - started

        codes, took = await asyncio.to_thread(brute_force)
        # Third failure closes the session; delays 1s then 2s at least before it.
        assert codes == [535, 535, 421]
        assert took >= 3.0  # 1 s after the first failure, 2 s after the second
        text = metrics.render().decode()
        assert "relayd_failed_logins_total 3.0" in text
        # The right password from elsewhere still works afterwards (after the delay).
        await asyncio.to_thread(submit, port, "casemanager", PASSWORD, "alice@business.com")
    assert len(upstream.messages) == 1


async def test_unknown_user_and_wrong_password_answer_alike(tmp_path: Path, upstream: Upstream,
                                                            password_hash: str) -> None:
    cfg = auth_config(tmp_path, upstream, password_hash)
    async with run_service(cfg) as svc:
        port = svc.addresses[0][1]

        def attempt(user: str) -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.starttls(context=unverified())
                try:
                    client.login(user, "wrong")
                except smtplib.SMTPAuthenticationError as e:
                    return e.smtp_code, e.smtp_error
            raise AssertionError("login succeeded")

        assert await asyncio.to_thread(attempt, "casemanager") == await asyncio.to_thread(
            attempt, "nobody")


async def test_loopback_client_without_login_may_send_when_users_exist(
        tmp_path: Path, upstream: Upstream, password_hash: str) -> None:
    """Local tools (relayd sendmail, cron) need no login on loopback; senders still routed."""
    cfg = auth_config(tmp_path, upstream, password_hash)
    async with run_service(cfg) as svc:
        port = svc.addresses[0][1]

        def send_plain(sender: str) -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
                client.sendmail(sender, ["x@example.com"], message(sender=sender))

        await asyncio.to_thread(send_plain, "cron@business.com")
        with pytest.raises(smtplib.SMTPSenderRefused):
            await asyncio.to_thread(send_plain, "eve@evil.example")
        await wait_for(lambda: len(upstream.messages) == 1)


async def test_crlf_in_mail_from_cannot_inject_commands(tmp_path: Path,
                                                        upstream: Upstream) -> None:
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    async with run_service(cfg) as svc:
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.addresses[0][1])
        await reader.readline()
        writer.write(b"EHLO c\r\nMAIL FROM:<a@business.com\rRCPT TO:<v@example.com>>\r\n")
        await writer.drain()
        while not (await reader.readline()).startswith(b"250 "):
            pass  # the EHLO reply's lines
        reply = await reader.readline()
        writer.close()
    assert reply[:3] in (b"501", b"553")


async def test_metrics_and_healthz_endpoints(tmp_path: Path, upstream: Upstream) -> None:
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       extra='[metrics]\nlisten = "127.0.0.1:0"')
    async with run_service(load_config(cfg), observer=Metrics()) as svc:
        from conftest import send, service_port

        await send(service_port(svc), "a@business.com", ["x@example.com"], message())
        await wait_for(lambda: len(upstream.messages) == 1)
        base = f"http://127.0.0.1:{svc.metrics_port}"

        def get(path: str) -> tuple[int, str]:
            with urllib.request.urlopen(base + path, timeout=10) as r:  # noqa: S310 - loopback
                return r.status, r.read().decode()

        status, body = await asyncio.to_thread(get, "/metrics")
        assert status == 200
        assert 'relayd_messages_accepted_total{route="staff"} 1.0' in body
        assert 'relayd_messages_delivered_total{route="staff"} 1.0' in body
        assert "relayd_delivery_latency_seconds_count" in body
        status, body = await asyncio.to_thread(get, "/healthz")
        assert status == 200 and body.strip() == "ok"


async def test_healthz_fails_when_the_spool_cannot_be_written(tmp_path: Path,
                                                              upstream: Upstream) -> None:
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       extra='[metrics]\nlisten = "127.0.0.1:0"')
    async with run_service(load_config(cfg), observer=Metrics()) as svc:
        url = f"http://127.0.0.1:{svc.metrics_port}/healthz"

        def status() -> int:
            try:
                with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - loopback
                    return int(r.status)
            except urllib.error.HTTPError as e:
                return int(e.code)

        assert await asyncio.to_thread(status) == 200
        tmp_dir = tmp_path / "queue" / "tmp"
        tmp_dir.rename(tmp_path / "tmp-moved")
        tmp_dir.write_text("a file where the spool's tmp/ should be")  # root ignores modes
        try:
            assert await asyncio.to_thread(status) == 503
        finally:
            tmp_dir.unlink()
            (tmp_path / "tmp-moved").rename(tmp_dir)
        assert await asyncio.to_thread(status) == 200


async def test_null_sender_only_for_a_login_whose_senders_include_it(
        tmp_path: Path, upstream: Upstream, password_hash: str) -> None:
    """1. null_sender_route = "staff"; casemanager's senders are ["*@business.com"], frontmta's
    ["<>"] 2. casemanager: MAIL FROM:<> refused 550 5.7.1 (its "*@business.com" says nothing
    of the null sender); a loopback client without a login too, since there are logins
    3. frontmta: MAIL FROM:<> accepted, a second RCPT refused 452 4.5.3 4. that DSN, to its one
    recipient, is delivered with the null sender; nothing else arrives."""
    cfg = auth_config(tmp_path, upstream, password_hash, extra=f"""
null_sender_route = "staff"
[server.users.frontmta]
password_hash = "{password_hash}"
senders = ["<>"]""")
    dsn = message(sender="MAILER-DAEMON@front.business.com", subject="Undelivered Mail")

    def session(user: str | None) -> tuple[int, bytes, int, bytes]:
        with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
            client.starttls(context=unverified())
            client.ehlo()
            if user is not None:
                client.login(user, PASSWORD)
            code, text = client.mail("<>")
            if code != 250:
                return code, text, 0, b""
            assert client.rcpt("alice@business.com")[0] == 250
            code2, text2 = client.rcpt("bob@example.com")
            client.data(dsn)
            return code, text, code2, text2

    async with run_service(cfg) as svc:
        port = svc.addresses[0][1]
        code, text, _, _ = await asyncio.to_thread(session, "casemanager")
        assert (code, text[:6]) == (550, b"5.7.1 ")
        code, text, _, _ = await asyncio.to_thread(session, None)
        assert (code, text[:6]) == (550, b"5.7.1 ")
        code, _, code2, text2 = await asyncio.to_thread(session, "frontmta")
        assert code == 250
        assert (code2, text2[:6]) == (452, b"4.5.3 ")
        await wait_for(lambda: len(upstream.messages) == 1, what="the DSN delivered")
        await asyncio.sleep(0.5)
    assert [(m.mail_from, m.rcpt_tos) for m in upstream.messages] == [("", ["alice@business.com"])]


async def test_auth_after_helo_is_answered_as_postfix_does(tmp_path: Path, upstream: Upstream,
                                                           password_hash: str) -> None:
    """An old printer says HELO, not EHLO, then AUTH LOGIN: Postfix answers 334 and takes the
    login; so does relayd (aiosmtpd alone: 500 command 'AUTH' not recognized). The session
    stays a HELO session, and its mail goes out."""
    import base64

    from conftest import smtp_exchange

    def b64(text: str) -> bytes:
        return base64.b64encode(text.encode()) + b"\r\n"

    cfg = auth_config(tmp_path, upstream, password_hash)
    async with run_service(cfg) as svc:
        replies = await smtp_exchange(svc.addresses[0][1], [
            b"HELO printer.business.local\r\n", b"AUTH LOGIN\r\n", b64("scanner"),
            b64(PASSWORD), b"MAIL FROM:<scanner@business.com>\r\n",
            b"RCPT TO:<x@example.com>\r\n", b"DATA\r\n",
            message(sender="scanner@business.com") + b".\r\n", b"QUIT\r\n"])
        assert replies[1].startswith(b"250 ")
        assert replies[2].startswith(b"334 ") and replies[3].startswith(b"334 ")
        assert replies[4].startswith(b"235 "), replies
        assert [r[:3] for r in replies[5:9]] == [b"250", b"250", b"354", b"250"]
        await wait_for(lambda: len(upstream.messages) == 1, what="delivered")
    assert upstream.messages[0].mail_from == "scanner@business.com"


async def test_a_client_that_refuses_the_certificate_is_logged_as_such(
        tmp_path: Path, upstream: Upstream, password_hash: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """A client that checks certificates meets relayd's self-signed one: the log says the
    client refused the certificate and what to do, not "it offered TLS 1.x: <exception>"."""
    cfg = auth_config(tmp_path, upstream, password_hash)
    async with run_service(cfg) as svc:
        strict = ssl.create_default_context()  # verifies: the self-signed one fails
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.to_thread(smtplib.SMTP_SSL, "127.0.0.1", svc.tls_addresses[0][1],
                                    context=strict, timeout=10)
        await wait_for(lambda: "TLS handshake with" in caplog.text, what="the log line")
        await asyncio.sleep(0.2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
    [line] = [r.getMessage() for r in caplog.records if "TLS handshake with" in r.getMessage()]
    assert "refused relayd's certificate" in line and "server.tls_cert" in line, line
    assert "error" not in line.lower(), line


@pytest.mark.parametrize("users", [True, False])
async def test_auth_off_loopback_is_offered_only_over_tls_and_only_with_users(
        tmp_path: Path, upstream: Upstream, password_hash: str,
        monkeypatch: pytest.MonkeyPatch, users: bool) -> None:
    """A client on the LAN (its socket's peer address seen as 192.0.2.7; the test's own
    connection is loopback) 1. EHLO on the plain port: no AUTH line, and AUTH is refused with
    538 5.7.11 (a password never crosses the LAN in clear) 2. after STARTTLS: AUTH offered and
    taken with [server.users]; without them, no AUTH line and Postfix's 503 5.5.1."""
    import relayd.smtpd

    real_host = relayd.smtpd.clients.host
    monkeypatch.setattr(relayd.smtpd.clients, "host",
                        lambda peer: "192.0.2.7" if real_host(peer) == "127.0.0.1"
                        else real_host(peer))
    if users:
        cfg = auth_config(tmp_path, upstream, password_hash,
                          extra='allowed_clients = ["127.0.0.0/8", "192.0.2.0/24"]')
    else:
        cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                           server='allowed_clients = ["127.0.0.0/8", "192.0.2.0/24"]\n'
                                  'listen_tls = ["127.0.0.1:0"]')  # so STARTTLS is offered

    def talk(port: int) -> list[tuple[bool, tuple[int, bytes]]]:
        seen = []
        with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
            client.ehlo("lan-pc")
            seen.append((client.has_extn("auth"), client.docmd("AUTH", "PLAIN")))
            client.starttls(context=unverified())
            client.ehlo("lan-pc")
            seen.append((client.has_extn("auth"), (0, b"")))
            if users:
                client.login("casemanager", PASSWORD)
            else:
                seen[-1] = (seen[-1][0], client.docmd("AUTH", "PLAIN"))
        return seen

    async with run_service(cfg) as svc:
        plain, after_tls = await asyncio.to_thread(talk, svc.addresses[0][1])
    assert plain[0] is False
    assert plain[1][0] == 538 and plain[1][1].startswith(b"5.7.11")
    if users:
        assert after_tls[0] is True  # and the login above was taken
    else:
        assert after_tls == (False, (503, b"5.5.1 Error: authentication not enabled"))
