"""Client and upstream text shown escaped (relayd.escape): `relayd log` and its `--json`, the
daemon log, notices."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import smtplib
import socket
import ssl
from pathlib import Path

from conftest import (
    Upstream,
    arelayd_cli,
    daemon,
    free_port,
    run_service,
    send,
    service_port,
    smtp_route,
    wait_for,
    write_config,
)

from relayd.escape import SHOWN_COMMAND_MAX, json_line, visible
from relayd.notify import Condition, _body, build_notice

# Everything a forger uses: CR and LF (fake lines), ESC [2J (clear the screen), ESC ]0; ... BEL
# (set the terminal's title), U+2028 (a line separator) and U+202E (right-to-left override).
FORGED = "ok\r\n2026-01-01 00:00:00 delivered  FAKE\x1b[2J\x1b]0;owned\x07\u2028x\u202eyz"
UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def test_visible_escapes_controls_and_keeps_text() -> None:
    assert visible("Grüße, café") == "Grüße, café"
    assert visible("a\r\nb\tc\x1b[2J\x7f\x85\u2028\u202e") == \
        "a\\r\\nb\\tc\\x1b[2J\\x7f\\x85\\u2028\\u202e"
    assert visible("bad byte \udcff") == "bad byte \\xff"  # surrogateescape'd input
    assert visible("x" * 500, 200) == "x" * 197 + "..."
    line = json_line({"s": FORGED})
    assert not UNSAFE.search(line) and "\n" not in line
    assert json.loads(line) == {"s": FORGED}


def test_notice_bodies_and_subjects_are_escaped() -> None:
    body = _body("route staff failed", "since now", [f"Last reply: 550 {FORGED}"], ["fix it"])
    assert not UNSAFE.search(body)
    assert "Last reply: 550 ok\\r\\n2026-01-01" in body
    notice, _ = build_notice(Condition("k", f"a {FORGED}", body), "relayd@business.com",
                             ["it@business.com"], "relay.test")
    head = notice.split(b"\r\n\r\n", 1)[0].decode()
    subject = next(h for h in head.split("\r\n") if h.startswith("Subject:"))
    assert "\\x1b[2J" in subject and "\x1b" not in head


async def test_relayd_log_shows_forged_subject_and_message_id_escaped(
        tmp_path: Path, upstream: Upstream) -> None:
    """1. a message whose Subject (an encoded word) and Message-ID carry CR, LF, ESC [2J,
    ESC ]0;, U+2028 and U+202E 2. delivered 3. `relayd log`: one line per event (accepted,
    delivered), the controls as visible escapes 4. `relayd log --json`: each line parses,
    no control raw in it, and the values come back exactly."""
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    encoded = base64.b64encode(FORGED.encode()).decode()
    message_id = "<id\x1b[2J\x1b]0;t\x07\u2028\u202e@test>"
    data = (f"From: alice@business.com\r\nTo: bob@example.com\r\n"
            f"Subject: =?utf-8?b?{encoded}?=\r\nMessage-ID: {message_id}\r\n\r\nhi\r\n")

    def go() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("alice@business.com", ["bob@example.com"], data.encode())

    async with run_service(cfg) as svc:
        port = service_port(svc)
        await asyncio.to_thread(go)
        await wait_for(lambda: len(upstream.messages) == 1 and not svc.qmgr.view.count(),
                       what="delivered")
    out = await arelayd_cli("log", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")[:-1]
    assert [line.split()[2] for line in lines] == ["accepted", "delivered"], lines
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in lines)
    assert not UNSAFE.search(out.stdout)
    accepted = lines[0]
    assert "subject=\"ok\\r\\n2026-01-01 00:00:00 delivered  FAKE\\x1b[2J\\x1b]0;owned" \
           "\\x07\\u2028x\\u202eyz\"" in accepted
    assert "msgid=<id\\x1b[2J\\x1b]0;t\\x07\\u2028\\u202e@test>" in lines[1]

    out = await arelayd_cli("log", "--json", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    assert not UNSAFE.search(out.stdout)
    events = [json.loads(line) for line in out.stdout.split("\n")[:-1]]
    assert [e["event"] for e in events] == ["accepted", "delivered"]
    assert events[0]["subject"] == FORGED
    assert all(e["message_id"] == message_id for e in events)
    raw = "".join(p.read_text() for p in (tmp_path / "journal").iterdir())
    assert not UNSAFE.search(raw)  # the journal file itself: one inert line per event


async def test_daemon_log_escapes_and_shortens_client_lines_and_names_the_tls_fix(
        tmp_path: Path, upstream: Upstream) -> None:
    """1. relayd serve 2. a TLS ClientHello on the plain port 3. a client sends a 600-byte
    unknown command full of controls and invalid UTF-8, and a sender address with ESC
    4. the log is text: one line for the TLS client naming the fix, the command escaped and
    cut to 200 characters, no control character but the newlines between lines."""
    port = free_port()
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       listen=f"127.0.0.1:{port}")
    log = tmp_path / "relayd.log"
    async with daemon(cfg, port, log):
        def tls_client() -> None:
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                try:
                    ctx.wrap_socket(raw, server_hostname="relay.test").close()
                except (ssl.SSLError, OSError):
                    pass

        await asyncio.to_thread(tls_client)
        # Under aiosmtpd's 512-byte command limit; escaped, far over 200 characters.
        bogus = b"X\x1b[2J\x1b]0;t\x07" + b"\x1bA" * 150 + b" \xff\xfe\r\n"

        def smtp_client() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo()
                client.send(bogus)
                client.getreply()
                client.send(b"MAIL FROM:<evil\x1b[2J@nowhere.example>\r\n")
                client.getreply()

        await asyncio.to_thread(smtp_client)
        await wait_for(lambda: "unrecognised" in log.read_text(errors="replace")
                       and "use a" in log.read_text(errors="replace"), what="the lines")
        # one more message so the log has its normal lines too
        await send(port, "alice@business.com", ["bob@example.com"], b"Subject: x\r\n\r\nx\r\n")
        await wait_for(lambda: len(upstream.messages) == 1)
    text = log.read_bytes().decode("utf-8")  # strict: the log is UTF-8 text
    assert not UNSAFE.search(text), [m for m in UNSAFE.findall(text)]
    tls = [line for line in text.splitlines() if "TLS handshake on a plain SMTP port" in line]
    assert len(tls) == 1 and "use a listen_tls port or STARTTLS" in tls[0]
    unknown = next(line for line in text.splitlines() if "unrecognised" in line)
    shown = unknown.split("unrecognised: ", 1)[1]
    assert shown.startswith("X\\x1b[2J\\x1b]0;T\\x07") and len(shown) <= SHOWN_COMMAND_MAX
    assert len(text.splitlines()) < 40
