"""The listener's policy on bad input: the right reply, and the daemon keeps serving."""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import socket
import struct
import subprocess
import sys
from pathlib import Path

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


async def raw_session(port: int, lines: list[bytes], *, read_banner: bool = True,
                      timeout: float = 10) -> list[bytes]:
    """Send raw bytes line by line and collect one reply per line (multi-line replies joined)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies = []
    try:
        if read_banner:
            replies.append(await _reply(reader, timeout))
        for line in lines:
            writer.write(line)
            await writer.drain()
            if line.endswith(b"\r\n") and not line.startswith(b"\x00"):
                replies.append(await _reply(reader, timeout))
    finally:
        writer.close()
    return replies


async def _reply(reader: asyncio.StreamReader, timeout: float) -> bytes:
    out = b""
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        out += line
        if len(line) < 4 or line[3:4] != b"-":
            return out


@pytest.fixture
def cfg(tmp_path: Path, upstream: Upstream) -> Path:
    return write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                        server='max_message_size = "10KB"')


async def still_serving(port: int, upstream: Upstream, n: int) -> None:
    await send(port, "ok@business.com", ["x@example.com"], message(sender="ok@business.com"))
    await wait_for(lambda: len(upstream.messages) >= n, what="a normal message after bad input")


async def test_ehlo_advertises_size_8bitmime_smtputf8_pipelining(cfg: Path) -> None:
    async with run_service(cfg) as svc:
        replies = await raw_session(service_port(svc), [b"EHLO client.test\r\n"])
    ehlo = replies[1].decode()
    for ext in ("SIZE 10000", "8BITMIME", "SMTPUTF8", "PIPELINING", "ENHANCEDSTATUSCODES"):
        assert ext in ehlo


def data_segments_in(sock: socket.socket) -> int:
    """TCP segments with data this socket has received (Linux's tcp_info.tcpi_data_segs_in)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int(struct.unpack_from("I", info, 152)[0])


@pytest.mark.skipif(sys.platform == "win32", reason="reads Linux's TCP_INFO")
async def test_the_ehlo_reply_comes_in_one_segment(cfg: Path) -> None:
    """aiosmtpd writes each EHLO line on its own: a segment and a client wake-up a line."""
    async with run_service(cfg) as svc:
        def session() -> tuple[int, bytes]:
            with socket.create_connection(("127.0.0.1", service_port(svc)), timeout=10) as s:
                reply = s.makefile("rb")
                assert reply.readline().startswith(b"220 ")
                before = data_segments_in(s)
                s.sendall(b"EHLO client.test\r\n")
                lines = [reply.readline()]
                while lines[-1][3:4] == b"-":
                    lines.append(reply.readline())
                return data_segments_in(s) - before, b"".join(lines)

        segments, ehlo = await asyncio.to_thread(session)
    assert ehlo.count(b"\r\n") >= 6 and ehlo.endswith(b"250 HELP\r\n")
    assert segments == 1, f"the EHLO reply came in {segments} segments"


async def test_unknown_sender_refused_at_mail_from(cfg: Path, upstream: Upstream) -> None:
    async with run_service(cfg) as svc:
        port = service_port(svc)
        replies = await raw_session(port, [b"EHLO c\r\n", b"MAIL FROM:<eve@elsewhere.org>\r\n",
                                           b"MAIL FROM:<>\r\n", b"QUIT\r\n"])
        assert replies[2].startswith(b"550 5.7.1 ")
        assert replies[3].startswith(b"550 5.7.1 ")
        with pytest.raises(smtplib.SMTPSenderRefused):
            await send(port, "eve@elsewhere.org", ["x@example.com"], message())
        await still_serving(port, upstream, 1)
    assert [m.mail_from for m in upstream.messages] == ["ok@business.com"]


async def test_oversize_message_refused_with_552(cfg: Path, upstream: Upstream) -> None:
    async with run_service(cfg) as svc:
        port = service_port(svc)
        # SIZE declared too large: refused at MAIL FROM.
        replies = await raw_session(port, [b"EHLO c\r\n",
                                           b"MAIL FROM:<a@business.com> SIZE=20000\r\n"])
        assert replies[2].startswith(b"552")
        # smtplib declares SIZE itself, so it is refused at MAIL FROM too.
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            await send(port, "a@business.com", ["x@example.com"],
                       message(body="x" * 70 + "\r\n") * 200)
        assert e.value.smtp_code == 552
        # No SIZE declared, too much data: refused after DATA.
        replies = await raw_session(port, [
            b"EHLO c\r\n", b"MAIL FROM:<a@business.com>\r\n", b"RCPT TO:<x@example.com>\r\n",
            b"DATA\r\n", message(body="x" * 70 + "\r\n" * 200) * 20 + b".\r\n"])
        assert replies[5].startswith(b"552")
        await still_serving(port, upstream, 1)
        # The delivered one leaves the spool moments after the upstream's 250 (on the spool's
        # writer thread); the refused ones were never in it.
        await wait_for(lambda: svc.spool.ids() == [], what="an empty spool")
    assert len(upstream.messages) == 1


async def test_bare_lf_cannot_smuggle_a_second_message(cfg: Path, upstream: Upstream) -> None:
    """A bare-LF '.' line followed by a new transaction must stay content of one message."""
    smuggled = (b"From: a@business.com\r\nTo: x@example.com\r\nSubject: one\r\n\r\nbody\n.\n"
                b"MAIL FROM:<a@business.com>\nRCPT TO:<victim@example.com>\nDATA\n"
                b"Subject: smuggled\n\nevil\n.\n"
                b"\r\n.\r\n")  # the only real end of data
    async with run_service(cfg) as svc:
        port = service_port(svc)
        replies = await raw_session(port, [
            b"EHLO c\r\n", b"MAIL FROM:<a@business.com>\r\n", b"RCPT TO:<x@example.com>\r\n",
            b"DATA\r\n", smuggled, b"QUIT\r\n"])
        assert replies[4].startswith(b"354")
        assert replies[5].startswith(b"250 2.0.0 Ok: queued as ")
        await wait_for(lambda: len(upstream.messages) == 1)
        await asyncio.sleep(0.3)
        await still_serving(port, upstream, 2)
    first = upstream.messages[0]
    assert first.rcpt_tos == ["x@example.com"]
    assert all(m.rcpt_tos != ["victim@example.com"] for m in upstream.messages)
    # Bare line ends became CRLF, and the lone dot travelled as content.
    assert b"body\r\n.\r\nMAIL FROM:<a@business.com>\r\n" in first.data
    assert b"\n" not in first.data.replace(b"\r\n", b"")


async def test_bare_cr_is_normalized(cfg: Path, upstream: Upstream) -> None:
    async with run_service(cfg) as svc:
        await send(service_port(svc), "a@business.com", ["x@example.com"],
                   b"Subject: cr\r\n\r\none\rtwo\r\n")
        await wait_for(lambda: len(upstream.messages) == 1)
    assert upstream.messages[0].data == b"Subject: cr\r\n\r\none\r\ntwo\r\n"


async def test_client_outside_allowed_clients_refused_at_connect(tmp_path: Path,
                                                                upstream: Upstream) -> None:
    cfg = write_config(tmp_path, smtp_route("staff", '["*"]', upstream.port),
                       server='allowed_clients = ["192.0.2.0/24"]')
    async with run_service(cfg) as svc:
        replies = await raw_session(service_port(svc), [])
        assert replies[0].startswith(b"554 5.7.1 ")
        with pytest.raises(smtplib.SMTPConnectError):
            await send(service_port(svc), "a@business.com", ["x@example.com"], message())
        assert svc.spool.ids() == []


async def test_garbage_commands_get_errors_and_session_goes_on(cfg: Path,
                                                               upstream: Upstream) -> None:
    async with run_service(cfg) as svc:
        port = service_port(svc)
        replies = await raw_session(port, [
            b"HELLO\r\n", b"\xff\xfe\xfd\r\n", b"MAIL FROM:<a@business.com>\r\n",
            b"EHLO c\r\n", b"RCPT TO:<x@example.com>\r\n", b"MAIL FROM:<not an address>\r\n",
            b"MAIL FROM:<a@business.com>\r\n", b"RCPT TO:<bad address@example.com>\r\n",
            b"RCPT TO:<@>\r\n", b"DATA\r\n", b"MAIL FROM:" + b"x" * 2000 + b"\r\n",
            b"NOOP\r\n", b"QUIT\r\n"])
        codes = [r[:3] for r in replies]
        assert codes[1] == b"500"  # unknown command
        assert codes[2] == b"500"  # not ASCII
        assert codes[3] == b"503"  # MAIL before EHLO
        assert codes[4] == b"250"
        assert codes[5] == b"503"  # RCPT before MAIL
        assert codes[6] in (b"501", b"553")  # malformed address
        assert codes[7] == b"250"
        assert codes[8] in (b"501", b"553")
        assert codes[9] in (b"501", b"553")
        assert codes[10] == b"503"  # DATA without recipients
        assert codes[11] == b"500"  # line too long
        assert codes[12] == b"250"
        assert codes[13] == b"221"
        assert not any(b"Error: (" in r for r in replies)  # no exception names leak
        await still_serving(port, upstream, 1)


async def test_250_only_after_message_is_on_disk(cfg: Path, upstream: Upstream,
                                                 tmp_path: Path) -> None:
    await upstream.stop()  # nothing gets delivered, so the spool keeps the file
    async with run_service(cfg) as svc:
        replies = await raw_session(service_port(svc), [
            b"EHLO c\r\n", b"MAIL FROM:<a@business.com>\r\n", b"RCPT TO:<x@example.com>\r\n",
            b"DATA\r\n", message() + b".\r\n"])
        queue_id = replies[5].decode().split()[-1]
        # Read straight from the spool directory the moment 250 arrived.
        blob = (tmp_path / "queue" / "msg" / queue_id).read_bytes()
        assert blob.endswith(message()[-20:])


async def test_storage_failure_answers_451_and_keeps_serving(cfg: Path, upstream: Upstream,
                                                             tmp_path: Path) -> None:
    async with run_service(cfg) as svc:
        port = service_port(svc)
        msg_dir = tmp_path / "queue" / "msg"
        shutil.move(msg_dir, tmp_path / "moved")
        msg_dir.write_text("not a directory")  # every write into msg/ now fails
        with pytest.raises(smtplib.SMTPDataError) as e:
            await send(port, "a@business.com", ["x@example.com"], message())
        assert e.value.smtp_code == 451 and b"4.3.0" in e.value.smtp_error
        msg_dir.unlink()
        shutil.move(tmp_path / "moved", msg_dir)
        await still_serving(port, upstream, 1)


@pytest.mark.skipif(shutil.which("swaks") is None,
                    reason="swaks not installed (.ci/run installs it)")
async def test_swaks_sends_through_relayd(cfg: Path, upstream: Upstream) -> None:
    async with run_service(cfg) as svc:
        proc = await asyncio.create_subprocess_exec(
            "swaks", "--server", "127.0.0.1", "--port", str(service_port(svc)),
            "--from", "swaks@business.com", "--to", "x@example.com", "--header",
            "Subject: via swaks", "--pipeline",
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, out.decode()
        await wait_for(lambda: len(upstream.messages) == 1)
    assert upstream.messages[0].mail_from == "swaks@business.com"
    assert b"Subject: via swaks" in upstream.messages[0].data
