"""Relaying to a real SMTP upstream: envelope and bytes, routes, per-recipient results,
deferral, retry and bounces."""

from __future__ import annotations

import asyncio
import email
import email.policy
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from conftest import (
    Upstream,
    dead_port,
    message,
    run_service,
    send,
    service_port,
    smtp_route,
    wait_for,
    write_config,
)

from relayd.delivery import agent as agent_module


async def test_message_arrives_with_envelope_and_bytes_intact(tmp_path: Path,
                                                              upstream: Upstream) -> None:
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    data = message(body="Line one.\r\n.Leading dot stays.\r\n\r\nUTF-8 stays: \xe9\r\n")
    data = data.replace(b"\xc3\xa9", b"\xc3\xa9")
    async with run_service(cfg) as svc:
        refused = await send(service_port(svc), "alice@business.com",
                             ["bob@example.com", "carol@example.net"], data)
        assert refused == {}
        await wait_for(lambda: len(upstream.messages) == 1, what="delivery")
    got = upstream.messages[0]
    assert got.mail_from == "alice@business.com"
    assert got.rcpt_tos == ["bob@example.com", "carol@example.net"]
    assert got.data == data


async def test_two_routes_receive_only_their_own_senders(tmp_path: Path, upstream: Upstream,
                                                         upstream2: Upstream) -> None:
    cfg = write_config(tmp_path, smtp_route("system", '["casemanager@business.com"]',
                                            upstream.port)
                       + smtp_route("staff", '["*@business.com"]', upstream2.port))
    async with run_service(cfg) as svc:
        port = service_port(svc)
        await send(port, "casemanager@business.com", ["u1@example.com"], message("cm"))
        await send(port, "alice@business.com", ["u2@example.com"], message("alice"))
        await send(port, "bob@business.com", ["u3@example.com"], message("bob"))
        await wait_for(lambda: len(upstream.messages) + len(upstream2.messages) == 3)
    assert [m.mail_from for m in upstream.messages] == ["casemanager@business.com"]
    assert sorted(m.mail_from for m in upstream2.messages) == ["alice@business.com",
                                                               "bob@business.com"]


async def test_consecutive_messages_reuse_one_upstream_connection(tmp_path: Path,
                                                                  upstream: Upstream) -> None:
    cfg = write_config(tmp_path, smtp_route("staff", '["*"]', upstream.port,
                                            "max_connections = 1"))
    async with run_service(cfg) as svc:
        for i in range(5):
            await send(service_port(svc), "a@business.com", ["b@example.com"],
                       message(body=f"{i}\r\n"))
        await wait_for(lambda: len(upstream.messages) == 5)
    assert upstream.handler.connections == 1


async def test_upstream_down_then_back_delivers_queued_mail(tmp_path: Path,
                                                            upstream: Upstream) -> None:
    """1. upstream down 2. three messages accepted 3. upstream back 4. all three delivered."""
    await upstream.stop()
    cfg = write_config(tmp_path, smtp_route("staff", '["*"]', upstream.port))
    async with run_service(cfg) as svc:
        for i in range(3):
            await send(service_port(svc), "a@business.com", ["b@example.com"],
                       message(subject=f"m{i}"))
        await wait_for(lambda: all(e.attempts >= 1 for e in svc.qmgr.view.messages())
                       and svc.qmgr.view.count() == 3, what="first failed attempts")
        assert upstream.messages == []
        await upstream.start()
        await wait_for(lambda: len(upstream.messages) == 3, what="delivery after recovery")
        await wait_for(lambda: not svc.qmgr.view.count(), what="queue to empty")
    assert sorted(m.data.split(b"Subject: ")[1][:2] for m in upstream.messages) == [
        b"m0", b"m1", b"m2"]


async def test_4xx_defers_and_retries(tmp_path: Path, upstream: Upstream) -> None:
    upstream.handler.rcpt_replies["bob@example.com"] = "451 4.7.1 Try again later"
    cfg = write_config(tmp_path, smtp_route("staff", '["*"]', upstream.port))
    async with run_service(cfg) as svc:
        await send(service_port(svc), "a@business.com", ["bob@example.com"], message())
        await wait_for(lambda: any(e.attempts >= 1 for e in svc.qmgr.view.messages()))
        entry = next(iter(svc.qmgr.view.messages())).entry
        assert entry.rcpt["bob@example.com"].code == 451
        assert upstream.messages == []
        upstream.handler.rcpt_replies.clear()
        await wait_for(lambda: len(upstream.messages) == 1, what="retry")
    assert upstream.messages[0].rcpt_tos == ["bob@example.com"]


async def test_5xx_for_one_recipient_fails_only_that_one_and_bounces(tmp_path: Path,
                                                                     upstream: Upstream) -> None:
    upstream.handler.rcpt_replies["nobody@example.com"] = "550 5.1.1 No such user here"
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    async with run_service(cfg) as svc:
        await send(service_port(svc), "alice@business.com",
                   ["bob@example.com", "nobody@example.com"], message())
        await wait_for(lambda: len(upstream.messages) == 2, what="message and bounce")
        await wait_for(lambda: not svc.qmgr.view.count())
    original, bounce = upstream.messages
    assert original.rcpt_tos == ["bob@example.com"]
    # The bounce goes to the sender, with a null sender, through the same route.
    assert bounce.mail_from == ""
    assert bounce.rcpt_tos == ["alice@business.com"]
    dsn = email.message_from_bytes(bounce.data, policy=email.policy.default)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    text = bounce.data.decode()
    assert "nobody@example.com" in text and "550 5.1.1 No such user here" in text
    assert "Status: 5.1.1" in text
    assert "bob@example.com" not in text.split("delivery-status")[1].split("rfc822-headers")[0]


async def test_a_bounce_is_never_bounced(tmp_path: Path, upstream: Upstream) -> None:
    """1. recipient refused 5xx 2. bounce to the sender refused 5xx too 3. no third message."""
    upstream.handler.rcpt_replies["nobody@example.com"] = "550 5.1.1 No such user"
    upstream.handler.rcpt_replies["alice@business.com"] = "550 5.1.1 Sender gone too"
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    async with run_service(cfg) as svc:
        await send(service_port(svc), "alice@business.com", ["nobody@example.com"], message())
        await wait_for(lambda: not svc.qmgr.view.count() and len(svc.spool.ids()) == 0,
                       what="the message and its bounce to finish")
    assert upstream.messages == []
    assert upstream.handler.connections <= 2


async def test_data_5xx_fails_all_recipients(tmp_path: Path, upstream: Upstream) -> None:
    upstream.handler.data_reply = "554 5.6.0 Message rejected"
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    async with run_service(cfg) as svc:
        await send(service_port(svc), "alice@business.com", ["b@example.com"], message())
        await wait_for(lambda: not svc.qmgr.view.count())
    # The DSN itself was refused by the same DATA reply and is not bounced again: the queue
    # is empty and nothing was delivered.
    assert upstream.messages == []


async def test_connection_refused_defers(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, smtp_route("staff", '["*"]', dead_port()))
    async with run_service(cfg) as svc:
        await send(service_port(svc), "a@business.com", ["b@example.com"], message())
        await wait_for(lambda: any(e.attempts >= 2 for e in svc.qmgr.view.messages()),
                       what="two deferred attempts")
        entry = next(iter(svc.qmgr.view.messages())).entry
        assert "cannot connect" in entry.last_error
        assert len(svc.spool.ids()) == 1


async def test_max_age_fails_with_a_bounce(tmp_path: Path, upstream: Upstream) -> None:
    """Mail that cannot be delivered within queue.max_age is bounced through its route."""
    upstream.handler.rcpt_replies["slow@example.com"] = "450 4.2.1 Mailbox busy"
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       queue='max_age = "2s"')
    async with run_service(cfg) as svc:
        await send(service_port(svc), "alice@business.com", ["slow@example.com"], message())
        await wait_for(lambda: len(upstream.messages) == 1, what="expiry bounce")
    bounce = upstream.messages[0]
    assert bounce.mail_from == "" and bounce.rcpt_tos == ["alice@business.com"]
    dsn = email.message_from_bytes(bounce.data, policy=email.policy.default)
    text_part, status_part, _headers = dsn.iter_parts()
    explanation = " ".join(text_part.get_content().split())
    assert "expired" in explanation and "450 4.2.1 Mailbox busy" in explanation
    assert "Status: 4.4.7" in status_part.as_string()


async def test_smtputf8_and_8bitmime_are_passed_on(tmp_path: Path, upstream: Upstream) -> None:
    cfg = write_config(tmp_path, smtp_route("staff", '["*"]', upstream.port))
    data = "From: jörg@bücher.example\r\nTo: zoë@example.com\r\nSubject: 8-bit\r\n\r\nGrüße\r\n"
    async with run_service(cfg) as svc:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=service_port(svc)) as client:
            await client.sendmail("jörg@bücher.example", ["zoë@example.com"], data.encode(),
                                  mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        await wait_for(lambda: len(upstream.messages) == 1)
    got = upstream.messages[0]
    assert got.mail_from == "jörg@bücher.example"
    assert got.rcpt_tos == ["zoë@example.com"]
    assert got.data == data.encode()
    assert "SMTPUTF8" in got.mail_options and "BODY=8BITMIME" in got.mail_options


async def test_unreachable_upstream_holds_the_route_instead_of_trying_each_message(
        tmp_path: Path) -> None:
    """1. an upstream that accepts TCP and never answers 2. five messages queued
    3. the first attempts time out 4. the rest are deferred without a connection each."""
    accepted: list[asyncio.StreamWriter] = []

    async def black_hole(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(black_hole, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = write_config(tmp_path, smtp_route("staff", '["*"]', port,
                                            'timeout = "1s"\nmax_connections = 2'),
                       queue='retry_min = "30s"\nretry_max = "60s"')
    try:
        async with run_service(cfg) as svc:
            for i in range(5):
                await send(service_port(svc), "a@business.com", ["b@example.com"],
                           message(subject=f"{i}"))
            # Held messages are deferred without a try: it is not counted (issue 8, item 3).
            await wait_for(lambda: svc.qmgr.view.count() == 5 and all(
                e.state == "deferred" for e in svc.qmgr.view.messages()),
                what="every message deferred once")
            assert sum(e.attempts for e in svc.qmgr.view.messages()) <= 2
            assert len(accepted) <= 2  # one try per connection slot, not one per message
            assert all("timed out" in e.entry.last_error.lower()
                       for e in svc.qmgr.view.messages())
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_messages_that_come_as_an_idle_upstream_connection_times_out_are_all_sent(
        tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle upstream connection waits IDLE_SESSION_S for the route's next message, then
    closes. A message that arrives as that time runs out must still go, on that connection or
    a new one: the agent's job queue with asyncio.timeout once lost this race, and the
    message waited for ever (bench/scale.py). Messages here come one at a time, each a little
    before, at or after the idle time."""
    monkeypatch.setattr(agent_module, "IDLE_SESSION_S", 0.05)
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    count = 24
    async with run_service(cfg) as svc:
        port = service_port(svc)
        for i in range(count):
            refused = await send(port, "alice@business.com", [f"r{i}@example.com"], message())
            assert refused == {}
            await wait_for(lambda n=i + 1: len(upstream.messages) == n,
                           timeout=10, what=f"delivery of message {i + 1}")
            await asyncio.sleep(0.04 + 0.003 * (i % 7))  # 40 to 58 ms
    assert [m.rcpt_tos for m in upstream.messages] == [[f"r{i}@example.com"]
                                                       for i in range(count)]
    assert upstream.handler.connections > 1  # idle connections closed, new ones opened


async def test_a_reply_that_does_not_come_within_the_timeout_defers_and_the_retry_delivers(
        tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    """The upstream takes the message and then says nothing for longer than the route's
    timeout: the attempt ends as timed out (the client's read timeout on the reply), the
    connection is dropped, and the next attempt, answered at once, delivers it once."""
    caplog.set_level("INFO")
    record = upstream.handler.handle_DATA
    calls = 0

    async def slow_first(server: Any, session: Any, envelope: Any) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(2.5)  # past the 1 s timeout; relayd has gone by then
            return "451 4.3.0 too late"
        return await record(server, session, envelope)

    upstream.handler.handle_DATA = slow_first  # type: ignore[method-assign]
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port,
                                            'timeout = "1s"'),
                       queue='retry_min = "1s"\nretry_max = "2s"')
    data = message()
    async with run_service(cfg) as svc:
        started = asyncio.get_running_loop().time()
        assert await send(service_port(svc), "alice@business.com", ["bob@example.com"],
                          data) == {}
        await wait_for(lambda: len(upstream.messages) == 1, timeout=15, what="the retry")
        assert asyncio.get_running_loop().time() - started < 10
    assert calls == 2 and upstream.messages[0].data == data
    assert "timed out waiting for server response" in caplog.text.lower()


async def test_a_job_that_comes_as_the_only_idle_session_expires_is_still_sent(
        tmp_path: Path, upstream: Upstream) -> None:
    """The race itself, made to happen: a route with one connection, its session idle; the
    idle timer fires and, before that session runs again, a job comes. The job finds no idle
    session to take it and no room for a new one (the expiring one still counts), so the
    expiring session must take it before it stops. Each report must come, and both messages
    arrive."""
    from relayd.config import load_config
    from relayd.delivery import Status, make_upstream
    from relayd.delivery.agent import DeliveryAgent, Job

    cfg = load_config(write_config(tmp_path, smtp_route("staff", '["*@business.com"]',
                                                        upstream.port, "max_connections = 1")))
    route = cfg.routes["staff"]
    agent = DeliveryAgent(route, make_upstream(route, cfg), hold_s=30)
    try:
        first = await asyncio.wait_for(agent.deliver(Job("Q1", "alice@business.com",
                                                         ["bob@example.com"], message())), 10)
        await wait_for(lambda: len(agent._waiting) == 1, what="the session to go idle")
        # In one pass of the event loop: the job's delivery starts (it runs first), and the
        # idle timer fires (agent._stop_waiting is what it calls); the session runs after.
        second = asyncio.create_task(agent.deliver(Job("Q2", "alice@business.com",
                                                       ["carol@example.com"], message())))
        agent_module._stop_waiting(agent._waiting[0])
        report = await asyncio.wait_for(second, 10)
    finally:
        await agent.close(5)
    for got in (first, report):
        assert [r.status for r in got.results.values()] == [Status.DELIVERED]
    assert [m.rcpt_tos for m in upstream.messages] == [["bob@example.com"],
                                                       ["carol@example.com"]]
