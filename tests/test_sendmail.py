"""`relayd sendmail` against a real aiosmtpd recording server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from relayd import sendmail

HOSTNAME = "relay.business.local"
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    options: list[str]


@dataclass
class Recorder:
    """An upstream that records each transaction, or answers with a set reply."""

    messages: list[Received] = field(default_factory=list)
    mail_reply: dict[str, str] = field(default_factory=dict)
    rcpt_reply: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    rcpt_attempts: list[str] = field(default_factory=list)

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if address in self.mail_reply:
            return self.mail_reply[address]
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        self.rcpt_attempts.append(address)
        if address in self.rcpt_reply:
            return self.rcpt_reply[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_reply:
            return self.data_reply
        assert envelope.mail_from is not None
        assert isinstance(envelope.original_content, bytes)
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                      envelope.original_content, list(envelope.mail_options)))
        return "250 OK queued"


@dataclass
class Upstream:
    recorder: Recorder
    port: int
    config: Path


def _write_config(tmp_path: Path, listen: str) -> Path:
    path = tmp_path / "relayd.toml"
    path.write_text(f"""
[server]
listen = ["{listen}"]
hostname = "{HOSTNAME}"
max_message_size = "1MB"

[routes.drafts]
senders = ["*"]
upstream = "outbox"
path = "{tmp_path / 'outbox'}"
""")
    return path


@pytest.fixture
async def upstream(tmp_path: Path) -> AsyncIterator[Upstream]:
    recorder = Recorder()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(recorder, hostname="upstream.test"),
                                      "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Upstream(recorder, port, _write_config(tmp_path, f"127.0.0.1:{port}"))
    finally:
        server.close()
        await server.wait_closed()


async def _run(argv: list[str], message: bytes, config: Path | None) -> int:
    return await asyncio.to_thread(sendmail.main, argv, io.BytesIO(message),
                                   str(config) if config else None)


def _headers(data: bytes) -> list[tuple[str, str]]:
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    return [(k.lower(), v.strip()) for k, v in
            (line.split(":", 1) for line in head.split("\r\n"))]


def _login() -> str:
    from relayd.platform.proc import user_name

    return user_name()


MESSAGE = (b"From: Case Manager <casemanager@business.com>\n"
           b"To: Alice <alice@business.com>\n"
           b"Subject: hello\n"
           b"\n"
           b"line one\n"
           b"line two\n")


async def test_plain_submission(upstream: Upstream, capsys: pytest.CaptureFixture[str]) -> None:
    """1. recipients as arguments 2. sender from From 3. Date and Message-ID added, CRLF."""
    rc = await _run(["-oi", "alice@business.com", "Bob <bob@example.org>"], MESSAGE,
                    upstream.config)
    assert rc == sendmail.EX_OK
    assert capsys.readouterr().err == ""
    [msg] = upstream.recorder.messages
    assert msg.sender == "casemanager@business.com"
    assert msg.recipients == ["alice@business.com", "bob@example.org"]
    assert b"\n" not in msg.data.replace(b"\r\n", b"")
    assert msg.data.endswith(b"\r\n\r\nline one\r\nline two\r\n")
    headers = _headers(msg.data)
    names = [k for k, _ in headers]
    assert names[:3] == ["from", "to", "subject"]
    assert names.count("date") == 1
    assert names.count("message-id") == 1
    assert dict(headers)["message-id"].endswith(f"@{HOSTNAME}>")


async def test_existing_date_and_message_id_kept(upstream: Upstream) -> None:
    original = (b"From: casemanager@business.com\r\nDate: Mon, 2 Nov 2026 10:00:00 +0000\r\n"
                b"Message-ID: <abc@cm>\r\n\r\nbody\r\n")
    assert await _run(["alice@business.com"], original, upstream.config) == 0
    [msg] = upstream.recorder.messages
    assert msg.data == original


async def test_extract_recipients_and_remove_bcc(upstream: Upstream) -> None:
    """-t takes To, Cc and Bcc (folded too), adds argument recipients, and drops Bcc."""
    message = (b"From: casemanager@business.com\n"
               b"To: alice@business.com, \"Carol, C.\" <carol@business.com>\n"
               b"Cc: dave@example.org\n"
               b"Bcc: secret1@example.org,\n"
               b"  secret2@example.org\n"
               b"Subject: -t\n"
               b"\n"
               b"Bcc: this line is body, not a header\n")
    assert await _run(["-t", "-i", "extra@example.org"], message, upstream.config) == 0
    [msg] = upstream.recorder.messages
    assert msg.recipients == ["extra@example.org", "alice@business.com", "carol@business.com",
                              "dave@example.org", "secret1@example.org", "secret2@example.org"]
    assert b"secret" not in msg.data.split(b"\r\n\r\n")[0]
    assert b"secret2" not in msg.data
    assert msg.data.endswith(b"\r\n\r\nBcc: this line is body, not a header\r\n")


async def test_extract_without_recipients_is_a_data_error(upstream: Upstream) -> None:
    assert await _run(["-t"], b"Subject: nobody\n\nhi\n", upstream.config) == sendmail.EX_DATAERR
    assert upstream.recorder.messages == []


async def test_envelope_sender_from_f(upstream: Upstream) -> None:
    for args in (["-f", "bounces@business.com"], ["-fbounces@business.com"],
                 ["-f", "<bounces@business.com>"], ["-r", "bounces@business.com"]):
        assert await _run([*args, "alice@business.com"], MESSAGE, upstream.config) == 0
    assert [m.sender for m in upstream.recorder.messages] == ["bounces@business.com"] * 4
    # The From header is the message's own.
    assert all(b"From: Case Manager <casemanager@business.com>\r\n" in m.data
               for m in upstream.recorder.messages)


async def test_no_from_uses_login_and_full_name(upstream: Upstream) -> None:
    """cron style: no headers at all, -F sets the display name, bare user names qualified."""
    rc = await _run(["-FCron Daemon", "-i", "-B8BITMIME", "-oem", "root"],
                    b"job output\n", upstream.config)
    assert rc == 0
    [msg] = upstream.recorder.messages
    sender = f"{_login()}@{HOSTNAME}"
    assert msg.sender == sender
    assert msg.recipients == [f"root@{HOSTNAME}"]
    headers = dict(_headers(msg.data))
    assert headers["from"] == f"Cron Daemon <{sender}>"
    assert msg.data.endswith(b"\r\n\r\njob output\r\n")


async def test_f_also_fills_missing_from(upstream: Upstream) -> None:
    assert await _run(["-f", "app@business.com", "alice@business.com"], b"Subject: x\n\nhi\n",
                      upstream.config) == 0
    [msg] = upstream.recorder.messages
    assert dict(_headers(msg.data))["from"] == "app@business.com"


async def test_dot_ends_input_unless_i(upstream: Upstream) -> None:
    message = MESSAGE + b".\nafter the dot\n"
    assert await _run(["alice@business.com"], message, upstream.config) == 0
    assert await _run(["-i", "alice@business.com"], message, upstream.config) == 0
    assert await _run(["-oi", "alice@business.com"], message, upstream.config) == 0
    without, with_i, with_oi = (m.data for m in upstream.recorder.messages)
    assert without.endswith(b"line two\r\n")
    assert with_i.endswith(b"line two\r\n.\r\nafter the dot\r\n")
    assert with_oi.endswith(b"line two\r\n.\r\nafter the dot\r\n")


async def test_line_endings_normalised(upstream: Upstream) -> None:
    message = b"From: casemanager@business.com\r\nSubject: mixed\n\rbody\rone\r\ntwo"
    assert await _run(["alice@business.com"], message, upstream.config) == 0
    [msg] = upstream.recorder.messages
    assert msg.data.endswith(b"\r\n\r\nbody\r\none\r\ntwo\r\n")
    assert b"\r\n" + b"\r" not in msg.data.replace(b"\r\n\r\n", b"")


async def test_wildcard_listen_submits_to_loopback(upstream: Upstream, tmp_path: Path) -> None:
    config = _write_config(tmp_path, f"0.0.0.0:{upstream.port}")
    assert await _run(["alice@business.com"], MESSAGE, config) == 0
    assert len(upstream.recorder.messages) == 1


async def test_config_from_environment(upstream: Upstream,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAYD_CONFIG", str(upstream.config))
    assert await _run(["alice@business.com"], MESSAGE, None) == 0
    assert len(upstream.recorder.messages) == 1


async def test_tempfail_when_relayd_is_down(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:   # a port nobody listens on once this closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = _write_config(tmp_path, f"127.0.0.1:{port}")
    assert await _run(["alice@business.com"], MESSAGE, config) == sendmail.EX_TEMPFAIL
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("relayd sendmail: relayd at 127.0.0.1:")
    assert "not reachable" in err


async def test_sender_refused_5xx_is_nouser(upstream: Upstream,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    upstream.recorder.mail_reply["casemanager@business.com"] = (
        "550 5.7.1 sender not allowed: no route")
    assert await _run(["alice@business.com"], MESSAGE, upstream.config) == sendmail.EX_NOUSER
    err = capsys.readouterr().err
    assert err == ("relayd sendmail: sender <casemanager@business.com> refused by relayd at "
                   f"127.0.0.1:{upstream.port}: 550 5.7.1 sender not allowed: no route\n")


async def test_sender_refused_4xx_is_tempfail(upstream: Upstream) -> None:
    upstream.recorder.mail_reply["casemanager@business.com"] = "451 4.3.0 queue not writable"
    assert await _run(["alice@business.com"], MESSAGE, upstream.config) == sendmail.EX_TEMPFAIL


async def test_any_recipient_refused_sends_nothing(upstream: Upstream) -> None:
    upstream.recorder.rcpt_reply["bob@example.org"] = "550 5.1.1 no such user"
    rc = await _run(["alice@business.com", "bob@example.org"], MESSAGE, upstream.config)
    assert rc == sendmail.EX_UNAVAILABLE
    assert upstream.recorder.messages == []
    upstream.recorder.rcpt_reply["bob@example.org"] = "452 4.5.3 too many recipients"
    rc = await _run(["alice@business.com", "bob@example.org"], MESSAGE, upstream.config)
    assert rc == sendmail.EX_TEMPFAIL
    assert upstream.recorder.messages == []


async def test_data_refused(upstream: Upstream) -> None:
    upstream.recorder.data_reply = "554 5.6.0 message refused"
    assert await _run(["alice@business.com"], MESSAGE, upstream.config) == \
        sendmail.EX_UNAVAILABLE
    upstream.recorder.data_reply = "451 4.3.0 try later"
    assert await _run(["alice@business.com"], MESSAGE, upstream.config) == sendmail.EX_TEMPFAIL


async def test_too_large(upstream: Upstream) -> None:
    big = MESSAGE + b"x" * 1_000_001 + b"\n"
    assert await _run(["alice@business.com"], big, upstream.config) == sendmail.EX_DATAERR
    assert await _run(["-i", "alice@business.com"], big, upstream.config) == sendmail.EX_DATAERR
    assert upstream.recorder.messages == []


@pytest.mark.parametrize(("argv", "code"), [
    ([], sendmail.EX_USAGE),                                   # no recipients
    (["-x", "alice@business.com"], sendmail.EX_USAGE),         # unknown option
    (["-f"], sendmail.EX_USAGE),                               # missing value
    (["-bp"], sendmail.EX_USAGE),                              # mailq mode
    (["-q"], sendmail.EX_USAGE),
    (["alice@business.com\r\nRCPT TO:<x@y>"], sendmail.EX_USAGE),  # injection attempt
])
async def test_usage_errors(upstream: Upstream, argv: list[str], code: int,
                            capsys: pytest.CaptureFixture[str]) -> None:
    assert await _run(argv, MESSAGE, upstream.config) == code
    assert capsys.readouterr().err.count("\n") == 1
    assert upstream.recorder.messages == []


async def test_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert await _run(["a@b.c"], MESSAGE, tmp_path / "missing.toml") == sendmail.EX_CONFIG
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nlisten = ["nowhere"]\n')
    assert await _run(["a@b.c"], MESSAGE, bad) == sendmail.EX_CONFIG
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert "file not found" in err[0]
    assert "server.listen[0]" in err[1]


async def test_config_secrets_not_needed(tmp_path: Path, upstream: Upstream) -> None:
    """sendmail runs as any user: a route secret it cannot read does not stop it."""
    config = _write_config(tmp_path, f"127.0.0.1:{upstream.port}")
    config.write_text(config.read_text() + """
[routes.system]
senders = ["casemanager@business.com"]
upstream = "smtp"
host = "smtp.example.org"
username = "casemanager@business.com"
password_file = "/nonexistent/secret"
""")
    assert await _run(["alice@business.com"], MESSAGE, config) == 0


async def test_module_entry_point(upstream: Upstream) -> None:
    env = {**os.environ, "RELAYD_CONFIG": str(upstream.config),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # A thread, not asyncio's subprocesses, which Windows' selector loop lacks.
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "relayd.sendmail",
                                                    "-t", "-oi"], input=MESSAGE,
                                   capture_output=True, env=env, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    [msg] = upstream.recorder.messages
    assert msg.recipients == ["alice@business.com"]



def test_sendmail_help_prints_usage_and_exits_0() -> None:
    """`relayd --help` points at `relayd sendmail -h`: it and --help print the usage (exit 0,
    nothing read from stdin, nothing submitted); `-h N` stays sendmail's ignored hop count."""
    import subprocess

    from conftest import RELAYD, REPO

    for flag in ("-h", "--help"):
        done = subprocess.run([*RELAYD, "sendmail", flag], capture_output=True, text=True,
                              cwd=REPO, timeout=30, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("usage: relayd sendmail ") and "-t" in done.stdout
        assert done.stderr == ""
    top = subprocess.run([*RELAYD, "--help"], capture_output=True, text=True, cwd=REPO,
                         timeout=30)
    assert "relayd sendmail -h" in top.stdout
    assert sendmail.parse_args(["-h", "5", "bob@example.com"]).recipients == ["bob@example.com"]
