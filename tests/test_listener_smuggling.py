"""SMTP smuggling: no end-of-data look-alike ever starts a second message upstream.

The sequences are SEC Consult's nine (The-Login/SMTP-Smuggling-Tools) and hannob/smtpsmug's
tenth; each is followed by a smuggled transaction, the real end of data, and a pipelined
second transaction of the client's own."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import (
    Upstream,
    read_reply,
    run_service,
    service_port,
    smtp_route,
    wait_for,
    write_config,
)

LOOK_ALIKES = [b"\n.\n", b"\n.\r", b"\r.\n", b"\r.\r", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r\r\n",
               b"\r\r\n.\r\r\n", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"]

SMUGGLED = (b"MAIL FROM:<ceo@business.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nevil\r\n")


@pytest.mark.parametrize("look_alike", LOOK_ALIKES, ids=[repr(s)[2:-1] for s in LOOK_ALIKES])
async def test_end_of_data_look_alike_never_makes_a_second_message(
        tmp_path: Path, upstream: Upstream, look_alike: bytes) -> None:
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    async with run_service(cfg) as svc:
        reader, writer = await asyncio.open_connection("127.0.0.1", service_port(svc))
        try:
            await read_reply(reader)
            # All of it at once, as a pipelining client (or an attacker) sends it.
            writer.write(
                b"EHLO client\r\nMAIL FROM:<a@business.com>\r\nRCPT TO:<x@example.com>\r\n"
                b"DATA\r\n"
                b"From: a@business.com\r\nSubject: one\r\n\r\nbody" + look_alike + SMUGGLED
                + b"\r\n.\r\n"  # the only real end of data
                + b"MAIL FROM:<b@business.com>\r\nRCPT TO:<y@example.com>\r\nDATA\r\n"
                + b"Subject: two\r\n\r\nsecond\r\n.\r\nQUIT\r\n")
            await writer.drain()
            replies = [await read_reply(reader) for _ in range(9)]
        finally:
            writer.close()
        codes = [r[:3] for r in replies]
        assert codes == [b"250", b"250", b"250", b"354", b"250", b"250", b"250", b"354",
                         b"250"], replies
        await wait_for(lambda: len(upstream.messages) == 2, what="both messages upstream")
        await asyncio.sleep(0.3)  # anything smuggled would arrive by now
    assert len(upstream.messages) == 2
    first, second = sorted(upstream.messages, key=lambda m: m.mail_from)
    assert (first.mail_from, first.rcpt_tos) == ("a@business.com", ["x@example.com"])
    assert (second.mail_from, second.rcpt_tos) == ("b@business.com", ["y@example.com"])
    assert b"Subject: smuggled" in first.data  # the smuggled part travelled as content
    assert b"Subject: two" in second.data and b"smuggled" not in second.data
    assert all("victim@example.com" not in m.rcpt_tos for m in upstream.messages)
