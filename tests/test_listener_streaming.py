"""DATA streamed into the spool as it arrives (issue #9 item 10): a large message arrives
upstream byte-identical; the size limit, a full disk, a client that goes away and kill -9 in
the middle of a large DATA each leave nothing behind, and the daemon goes on."""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
from pathlib import Path

from conftest import (
    Upstream,
    daemon,
    fill,
    free_port,
    message,
    read_reply,
    run_service,
    send,
    service_port,
    smtp_route,
    tmp_leftovers,
    wait_for,
    write_config,
)

ALICE, BOB = "alice@business.com", "bob@example.com"


def big(size: int, subject: str = "big") -> bytes:
    """Lines of 76 characters, every seventh starting with a dot, so dot-stuffing meets the
    chunk boundaries of the reader (1 MiB) and of the spool (256 KiB)."""
    lines = [(b"." if i % 7 == 0 else b"") + b"%075d\r\n" % i for i in range(size // 77)]
    return message(subject=subject) + b"".join(lines)


def big_then_small(port: int) -> tuple[int, dict[str, tuple[int, bytes]]]:
    """A 3 MiB message without announcing its SIZE, then a small one in the same session:
    DATA's reply to the large one, and what the small one's sendmail refused."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo()
        assert c.mail(ALICE)[0] == 250 and c.rcpt(BOB)[0] == 250
        code, _ = c.data(big(3 * 1024 * 1024))
        return code, c.sendmail(ALICE, [BOB], message(subject="small"))


def files(spool: Path, sub: str) -> list[str]:
    return sorted(p for p in os.listdir(spool / sub) if not p.startswith("."))


async def test_large_message_is_streamed_and_arrives_byte_identical(
        tmp_path: Path, upstream: Upstream) -> None:
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    data = big(3 * 1024 * 1024)
    async with run_service(cfg) as svc:
        assert await send(service_port(svc), ALICE, [BOB], data) == {}
        await wait_for(lambda: len(upstream.messages) == 1, what="delivery")
    assert upstream.messages[0].data == data
    assert tmp_leftovers(tmp_path / "queue") == []


async def test_over_the_size_limit_while_streaming_552_and_the_session_goes_on(
        tmp_path: Path, upstream: Upstream) -> None:
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       server='max_message_size = "1MB"')
    async with run_service(cfg) as svc:
        code, refused = await asyncio.to_thread(big_then_small, service_port(svc))
        assert code == 552 and refused == {}
        await wait_for(lambda: len(upstream.messages) == 1, what="the small message")
    assert b"Subject: small" in upstream.messages[0].data
    assert tmp_leftovers(tmp_path / "queue") == []


async def test_disk_full_in_the_middle_of_a_large_message_451_then_recovers(
        upstream: Upstream, small_fs: Path) -> None:
    """1. the spool's filesystem (4 MiB) has 1 MiB left 2. a 3 MiB message: 451, its part
    file removed 3. a small one in the same session: 250 and delivered."""
    cfg = write_config(small_fs, smtp_route("staff", '["*@business.com"]', upstream.port))
    async with run_service(cfg) as svc:
        filler = fill(small_fs)
        os.truncate(filler, os.path.getsize(filler) - 1024 * 1024)

        code, refused = await asyncio.to_thread(big_then_small, service_port(svc))
        assert code == 451 and refused == {}
        assert tmp_leftovers(small_fs / "queue") == []
        await wait_for(lambda: len(upstream.messages) == 1, what="the small message")
    assert b"Subject: small" in upstream.messages[0].data


async def test_client_gone_in_the_middle_of_a_large_message_leaves_nothing(
        tmp_path: Path, upstream: Upstream) -> None:
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    async with run_service(cfg) as svc:
        reader, writer = await asyncio.open_connection("127.0.0.1", service_port(svc))
        await read_reply(reader)
        writer.write(f"EHLO c\r\nMAIL FROM:<{ALICE}>\r\nRCPT TO:<{BOB}>\r\nDATA\r\n".encode())
        for _ in range(4):
            await read_reply(reader)
        writer.write(big(2 * 1024 * 1024))  # no end of data
        await writer.drain()
        await wait_for(lambda: tmp_leftovers(tmp_path / "queue") != [], what="a part file")
        writer.close()
        await wait_for(lambda: tmp_leftovers(tmp_path / "queue") == [],
                       what="the part file removed")
        assert await send(service_port(svc), ALICE, [BOB], message(subject="next")) == {}
        await wait_for(lambda: len(upstream.messages) == 1, what="the next message")
    assert files(tmp_path / "queue", "msg") == []


async def test_kill_9_in_the_middle_of_a_large_message_nothing_is_queued(
        tmp_path: Path, upstream: Upstream) -> None:
    port = free_port()
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       listen=f"127.0.0.1:{port}")
    log = tmp_path / "relayd.log"
    async with daemon(cfg, port, log) as proc:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await read_reply(reader)
        writer.write(f"EHLO c\r\nMAIL FROM:<{ALICE}>\r\nRCPT TO:<{BOB}>\r\nDATA\r\n".encode())
        for _ in range(4):
            await read_reply(reader)
        writer.write(big(2 * 1024 * 1024))
        await writer.drain()
        await wait_for(lambda: tmp_leftovers(tmp_path / "queue") != [], what="a part file")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        writer.close()
    async with daemon(cfg, port, log):
        assert tmp_leftovers(tmp_path / "queue") == []
        assert files(tmp_path / "queue", "msg") == []
        assert await send(port, ALICE, [BOB], message(subject="after")) == {}
        await wait_for(lambda: len(upstream.messages) == 1, what="delivery after restart")
    assert b"Subject: after" in upstream.messages[0].data


async def test_large_message_that_bounces_quotes_only_its_headers(
        tmp_path: Path, upstream: Upstream) -> None:
    """A 3 MiB message refused upstream (550): the bounce returns with the message's header
    section, read from the spool without reading the rest."""
    upstream.handler.rcpt_replies = {BOB: "550 5.1.1 No such user"}
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    async with run_service(cfg) as svc:
        assert await send(service_port(svc), ALICE, [BOB], big(3 * 1024 * 1024, "tall")) == {}
        await wait_for(lambda: any(m.mail_from == "" for m in upstream.messages),
                       what="the bounce")
    bounce = next(m for m in upstream.messages if m.mail_from == "")
    assert bounce.rcpt_tos == [ALICE]
    assert b"Subject: tall" in bounce.data and b"5.1.1" in bounce.data
    assert len(bounce.data) < 64 * 1024


async def test_large_message_to_an_outbox_route_is_copied_whole(tmp_path: Path) -> None:
    """The outbox writes a large message from its spool file in chunks: the .eml file is the
    envelope lines, then the message's bytes exactly."""
    outbox = tmp_path / "outbox"
    cfg = write_config(tmp_path, f"""
[routes.drafts]
senders = ["*"]
upstream = "outbox"
path = "{outbox}"
""")
    data = big(3 * 1024 * 1024)
    async with run_service(cfg) as svc:
        assert await send(service_port(svc), ALICE, [BOB], data) == {}
        await wait_for(lambda: outbox.exists() and any(outbox.glob("*.eml")),
                       what="the .eml file")
    written = next(outbox.glob("*.eml")).read_bytes()
    assert written == (f"Return-Path: <{ALICE}>\r\nX-Relayd-Recipient: <{BOB}>\r\n".encode()
                       + data)
