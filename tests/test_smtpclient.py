"""relayd.delivery.smtpclient through SmtpSession against a real aiosmtpd upstream, with and
without PIPELINING: what arrives upstream, per-recipient results, the connection staying in
step after refusals, and a large message sent from its spool file in chunks."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Upstream, message, smtp_route, write_config

from relayd.config import load_config
from relayd.delivery import OutboundMessage, SpooledBody, Status
from relayd.delivery.smtp import SmtpSession, SmtpUpstream
from relayd.delivery.smtpclient import PipeliningSMTP, _PipeliningProtocol, dot_stuff
from relayd.errors import PermanentDeliveryError, TransientDeliveryError


@pytest.fixture(params=[True, False], ids=["pipelining", "one-by-one"])
async def session(request: pytest.FixtureRequest, tmp_path: Path,
                  upstream: Upstream) -> AsyncIterator[SmtpSession]:
    upstream.handler.pipelining = request.param
    cfg = load_config(write_config(tmp_path, smtp_route("staff", '["*"]', upstream.port,
                                                        "max_connections = 1")))
    s = SmtpSession(SmtpUpstream(cfg.routes["staff"], cfg))
    yield s
    await s.close()


def out(qid: str, recipients: list[str], data: bytes) -> OutboundMessage:
    return OutboundMessage(qid, "alice@business.com", recipients, data)


@pytest.fixture
async def wire() -> AsyncIterator[tuple[_PipeliningProtocol, socket.socket]]:
    """relayd's client protocol on one end of a real socket pair, and the other end (not
    blocking) for the test to play the server on."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    transport, protocol = await loop.create_connection(
        lambda: _PipeliningProtocol(loop=loop), sock=ours)
    theirs.setblocking(False)
    yield protocol, theirs
    transport.close()
    theirs.close()


async def test_envelope_goes_in_one_write_only_where_pipelining_is_offered(
        session: SmtpSession, upstream: Upstream) -> None:
    data = message(body=".dot\r\n")
    results = await session.deliver(out("Q1", ["b@example.com", "c@example.com"], data))
    assert {r.status for r in results.values()} == {Status.DELIVERED}
    assert upstream.messages[0].data == data
    assert upstream.messages[0].rcpt_tos == ["b@example.com", "c@example.com"]
    together = [s for s in upstream.handler.segments if s.startswith(b"MAIL FROM:")]
    group = b"MAIL FROM:<alice@business.com>"
    if upstream.handler.pipelining:
        assert together[0].startswith(group) and together[0].endswith(
            b"RCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n")
    else:
        assert b"RCPT" not in together[0]


async def test_replies_that_arrive_before_the_last_is_picked_up_are_kept(
        wire: tuple[_PipeliningProtocol, socket.socket]) -> None:
    """The replies to a pipelined group can arrive one segment each, the second before the
    first is picked up (seen under load: relayd then waited for a reply it had dropped, until
    the timeout). aiosmtplib's protocol drops such data; relayd's keeps it. Driven here in
    that order on a real socket."""
    protocol, _ = wire
    client = PipeliningSMTP()
    protocol._response_pending = True
    protocol.data_received(b"250 2.1.0 sender ok\r\n")
    protocol.data_received(b"250 2.1.5 rcpt ok\r\n354 go ahead\r\n")
    said = [await client._reply(protocol, 5) for _ in range(3)]
    assert [(r.code, r.message) for r in said] == [
        (250, "2.1.0 sender ok"), (250, "2.1.5 rcpt ok"), (354, "go ahead")]
    client.close()


async def test_each_reply_gets_the_whole_timeout_and_a_late_one_times_out(
        tmp_path: Path, upstream: Upstream) -> None:
    """One timer serves a connection's reply timeout, its deadline moved on for each reply.
    Three messages whose last reply takes 0.7 s of a 1 s timeout (2.1 s in all on one
    connection) are each delivered; the fourth, answered after 2.5 s, times out about 1 s
    after relayd began to wait for that reply."""
    slow = [0.7, 0.7, 0.7, 2.5]
    record = upstream.handler.handle_DATA

    async def answer_late(server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(slow.pop(0))
        return await record(server, session, envelope)

    upstream.handler.handle_DATA = answer_late  # type: ignore[method-assign]
    cfg = load_config(write_config(tmp_path, smtp_route("staff", '["*"]', upstream.port,
                                                        'max_connections = 1\ntimeout = "1s"')))
    s = SmtpSession(SmtpUpstream(cfg.routes["staff"], cfg))
    loop = asyncio.get_running_loop()
    try:
        for i in range(3):
            results = await s.deliver(out(f"Q{i}", ["b@example.com"], message()))
            assert results["b@example.com"].status is Status.DELIVERED
        started = loop.time()
        with pytest.raises(TransientDeliveryError, match="(?i)timed out waiting for server"):
            await s.deliver(out("Q3", ["b@example.com"], message()))
        assert 0.9 <= loop.time() - started < 2.0
    finally:
        await s.close()
    assert len(upstream.messages) == 3 and upstream.handler.connections == 1


async def test_a_shorter_timeout_than_the_armed_one_is_kept(
        wire: tuple[_PipeliningProtocol, socket.socket]) -> None:
    """The one timer is armed for the first reply's deadline; a later reply with a shorter
    timeout must not wait for it. On a real socket: a reply within 5 s, then one within
    0.2 s that never comes."""
    protocol, _ = wire
    loop = asyncio.get_running_loop()
    client = PipeliningSMTP()
    try:
        protocol._response_pending = True
        protocol.data_received(b"250 2.1.0 ok\r\n")
        assert (await client._reply(protocol, 5)).code == 250
        protocol._response_pending = True
        started = loop.time()
        with pytest.raises(TimeoutError, match="(?i)timed out waiting for server"):
            await asyncio.wait_for(client._reply(protocol, 0.2), 3)
        assert loop.time() - started < 1
    finally:
        client.close()


@pytest.mark.parametrize("order", ["reply-then-cancel", "cancel-then-reply"])
async def test_a_reply_in_the_same_pass_as_the_cancellation_is_kept(
        order: str, wire: tuple[_PipeliningProtocol, socket.socket]) -> None:
    """The attempt's deadline (or a stop) cancels the transaction just as the server's
    final reply comes in: the reply is kept and the transaction ends as sent (on every
    Python, not only where 3.11's wait_for kept it), so a message the server took is not sent
    again. Driven on a real socket: the reply and the cancellation in one callback, in either
    order (the agent's asyncio.timeout cancels in its timer's callback, which may run before
    or after that pass's socket reads)."""
    protocol, theirs = wire
    loop = asyncio.get_running_loop()
    client = PipeliningSMTP(timeout=5)
    client.protocol = protocol
    client.esmtp_extensions = {"pipelining": ""}
    task = asyncio.create_task(client.transaction(
        b"MAIL FROM:<a@business.com>\r\n", [b"RCPT TO:<b@example.com>\r\n"],
        b"Subject: x\r\n\r\nbody\r\n"))
    protocol.data_received(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n")
    sent = b""
    while b"body" not in sent:
        sent += await asyncio.wait_for(loop.sock_recv(theirs, 65536), 5)
    for _ in range(5):
        await asyncio.sleep(0)  # the task is now waiting for the final reply

    def reply_and_cancel() -> None:
        if order == "reply-then-cancel":
            protocol.data_received(b"250 2.0.0 queued as X\r\n")
            task.cancel()
        else:
            task.cancel()
            protocol.data_received(b"250 2.0.0 queued as X\r\n")

    loop.call_soon(reply_and_cancel)
    replies = await asyncio.wait_for(task, 5)
    assert replies.final is not None and replies.final.code == 250


async def test_refused_recipients_fail_alone_and_the_rest_arrive(
        session: SmtpSession, upstream: Upstream) -> None:
    upstream.handler.rcpt_replies = {"gone@example.com": "550 5.1.1 No such user",
                                     "full@example.com": "452 4.2.2 Mailbox full"}
    results = await session.deliver(out("Q1", ["gone@example.com", "ok@example.com",
                                                "full@example.com"], message()))
    assert results["gone@example.com"].status is Status.FAILED
    assert results["gone@example.com"].reply.smtp_code == 550
    assert results["full@example.com"].status is Status.DEFERRED
    assert results["ok@example.com"].status is Status.DELIVERED
    assert [m.rcpt_tos for m in upstream.messages] == [["ok@example.com"]]


async def test_after_every_refusal_the_connection_stays_in_step(
        session: SmtpSession, upstream: Upstream) -> None:
    """MAIL refused, then every RCPT refused, then DATA refused: each on the one connection,
    and the next message after them arrives whole."""
    handler = upstream.handler
    handler.mail_reply = "550 5.7.1 Sender refused"
    with pytest.raises(PermanentDeliveryError):
        await session.deliver(out("Q1", ["b@example.com"], message()))
    handler.mail_reply = None
    handler.rcpt_replies = {"b@example.com": "550 5.1.1 No such user"}
    results = await session.deliver(out("Q2", ["b@example.com"], message()))
    assert results["b@example.com"].status is Status.FAILED
    handler.rcpt_replies = {}
    handler.data_reply = "554 5.6.0 Content rejected"
    results = await session.deliver(out("Q3", ["b@example.com"], message()))
    assert results["b@example.com"].reply.smtp_code == 554
    handler.data_reply = None
    last = message(subject="after the refusals")
    results = await session.deliver(out("Q4", ["b@example.com"], last))
    assert results["b@example.com"].status is Status.DELIVERED
    assert [m.data for m in upstream.messages] == [last]
    assert handler.connections == 1


async def test_spooled_message_is_sent_in_chunks_byte_identical(
        session: SmtpSession, upstream: Upstream, tmp_path: Path) -> None:
    # Lines of dots land on both sides of every 1 MiB chunk boundary.
    line = b".." + b"x" * 60 + b"\r\n"
    data = message(body="start\r\n") + line * 40_000 + b".\r\n" + b"end\r\n"
    path = tmp_path / "spooled"
    path.write_bytes(b'{"envelope":1}\n' + data)
    body = SpooledBody(path, len(b'{"envelope":1}\n'), len(data))
    results = await session.deliver(OutboundMessage("Q1", "alice@business.com",
                                                    ["b@example.com"], b"", spooled=body))
    assert results["b@example.com"].status is Status.DELIVERED
    assert upstream.messages[0].data == data


def test_dot_stuffing() -> None:
    assert dot_stuff(b".a\r\n.b\r\nc.\r\n", True) == b"..a\r\n..b\r\nc.\r\n"
    assert dot_stuff(b".a\r\n", False) == b".a\r\n"  # the chunk continues a line
    assert dot_stuff(b"", True) == b""
