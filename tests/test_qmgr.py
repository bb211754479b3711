"""The queue manager against real servers: no message leaves the spool without its reason, the
provider replies that lie about their class, `queue retry` after an outage, kill -9 at each step."""

from __future__ import annotations

import asyncio
import email
import logging
import os
import signal
import smtplib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session
from conftest import (
    Received,
    Upstream,
    arelayd_cli,
    daemon,
    fill,
    free_port,
    message,
    run_service,
    send,
    service_port,
    smtp_route,
    wait_for,
    write_config,
)

from relayd.queue import Spool

ALICE, BOB, NOBODY = "alice@business.com", "bob@example.com", "nobody@example.com"
UNKNOWN_USER = "550 5.1.1 <nobody@example.com>: no such user"


def bounces(up: Upstream) -> list[Received]:
    return [m for m in up.messages if m.mail_from == ""]


def deliveries_to(up: Upstream, rcpt: str) -> list[Received]:
    return [m for m in up.messages if m.mail_from and rcpt in m.rcpt_tos]


def dsn_fields(bounce: Received) -> dict[str, str]:
    """The per-recipient fields of a DSN's message/delivery-status part."""
    msg = email.message_from_bytes(bounce.data)
    for part in msg.walk():
        if part.get_content_type() == "message/delivery-status":
            blocks = part.get_payload()
            assert isinstance(blocks, list)
            return {k: str(v) for k, v in blocks[1].items()}
    raise AssertionError("no message/delivery-status part")


def removals(caplog: pytest.LogCaptureFixture, qid: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.getMessage().startswith(f"{qid}: ") and "removed from the queue" in
            r.getMessage()]


# -- a spool on a small filesystem that can be filled --------------------------------------------




async def test_a_bounce_that_cannot_be_stored_keeps_the_message(
        small_fs: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    """1. upstream down, a message to bob (250) and nobody (550 5.1.1) accepted 2. the disk
    fills 3. upstream back: bob is delivered, the bounce cannot be stored 4. the message stays
    in the spool, tried again each retry_min 5. space freed: exactly one bounce reaches alice
    and the message leaves the spool with one log line."""
    caplog.set_level(logging.INFO)
    upstream.handler.rcpt_replies[NOBODY] = UNKNOWN_USER
    await upstream.stop()
    cfg = write_config(small_fs, smtp_route("staff", '["*@business.com"]', upstream.port))
    async with run_service(cfg) as svc:
        await send(service_port(svc), ALICE, [BOB, NOBODY], message())
        [qid] = svc.spool.ids()
        await wait_for(lambda: svc.qmgr.view.message(qid).attempts >= 1, what="a first try")
        filler = fill(small_fs)
        await upstream.start()
        await wait_for(lambda: deliveries_to(upstream, BOB), what="bob delivered")
        await wait_for(lambda: sum("cannot store the bounce" in r.getMessage()
                                   for r in caplog.records) >= 2, what="two bounce attempts")
        assert svc.spool.ids() == [qid]  # still there, with its reason to exist
        assert bounces(upstream) == []
        assert len(deliveries_to(upstream, BOB)) == 1  # not delivered again meanwhile
        assert not deliveries_to(upstream, NOBODY)
        filler.unlink()
        await wait_for(lambda: bounces(upstream) and not svc.spool.ids(),
                       what="the bounce delivered and the spool empty")
        await asyncio.sleep(1.5)  # a further retry would have happened by now
    [bounce] = bounces(upstream)
    assert bounce.rcpt_tos == [ALICE]
    fields = dsn_fields(bounce)
    assert fields["Final-Recipient"] == f"rfc822; {NOBODY}"
    assert fields["Action"] == "failed" and fields["Status"] == "5.1.1"
    assert "no such user" in fields["Diagnostic-Code"]
    assert len(deliveries_to(upstream, BOB)) == 1
    [line] = removals(caplog, qid)
    assert "1 delivered, 1 failed" in line
    # bob's delivery was logged once, when it happened, though the bounce waited for space
    assert sum(r.getMessage().startswith(f"{qid}: delivered to <{BOB}>")
               for r in caplog.records) == 1


async def test_a_bounce_that_cannot_be_built_moves_the_message_to_corrupt(
        tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    """1. a spool entry whose sender cannot be a bounce's To (a line feed in it: an older or
    hand-edited file; the listener never writes one) 2. the upstream refuses its recipient for
    good 3. the message ends in corrupt/ with a .why, an ERROR line, never deleted."""
    upstream.handler.rcpt_replies[NOBODY] = UNKNOWN_USER
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    spool = Spool(tmp_path / "queue")
    spool.create()
    entry = spool.store_sync("alice\n@business.com", [NOBODY], message())
    async with run_service(cfg) as svc:
        await wait_for(lambda: not svc.qmgr.view.count(), what="the message settled")
    corrupt = tmp_path / "queue" / "corrupt"
    assert (corrupt / f"{entry.id}.msg").exists()
    why = (corrupt / f"{entry.id}.why").read_text()
    assert "cannot build a bounce" in why
    assert any(r.levelno == logging.ERROR and entry.id in r.getMessage()
               for r in caplog.records)
    assert not spool.ids() and bounces(upstream) == []


async def test_an_address_that_cannot_be_encoded_fails_alone(
        tmp_path: Path, upstream: Upstream) -> None:
    """1. a spool entry with a recipient that is not valid UTF-8 (what an older relayd let in)
    and a valid one 2. the valid one is delivered, the other bounces with 5.1.3."""
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    spool = Spool(tmp_path / "queue")
    spool.create()
    spool.store_sync(ALICE, ["\udcff\udcfe@example.com", BOB], message())
    async with run_service(cfg) as svc:
        await wait_for(lambda: bounces(upstream) and not svc.qmgr.view.count(),
                       what="delivered and bounced")
    assert [m.rcpt_tos for m in deliveries_to(upstream, BOB)] == [[BOB]]
    assert dsn_fields(bounces(upstream)[0])["Status"] == "5.1.3"


async def test_queue_retry_right_after_an_outage_connects_at_once(
        tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    """1. retry_min 1h, upstream down: the first try finds it unreachable and holds the route
    2. upstream back 3. `relayd queue retry --all` 4. delivered within seconds, the try that
    found it down the only one counted before."""
    caplog.set_level(logging.INFO)
    await upstream.stop()
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       queue='retry_min = "1h"\nretry_max = "2h"')
    async with run_service(cfg) as svc:
        await send(service_port(svc), ALICE, [BOB], message(subject="first"))
        await wait_for(lambda: any(q.attempts for q in svc.qmgr.view.messages()),
                       what="the failed try")
        await send(service_port(svc), ALICE, [BOB], message(subject="second"))  # held
        await asyncio.sleep(0.3)
        await upstream.start()
        done = await arelayd_cli("queue", "retry", "--all", "-c", str(cfg))
        assert done.returncode == 0, done.stderr
        await wait_for(lambda: len(upstream.messages) == 2 and not svc.qmgr.view.count(),
                       timeout=5, what="both delivered after the retry")
    assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1


# -- provider replies that do not mean what their class says (relayd.reply) ----------------------


@pytest.mark.parametrize(("where", "reply", "at_least_s"), [
    ("data", "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; "
     "Failed to process message due to a permanent exception", 86000),
    ("data", "550 5.4.5 Daily user sending limit exceeded. For more information visit", 86000),
    ("mail", "550 5.7.30 Basic authentication is not supported for Client Submission.", 3500),
])
async def test_provider_quota_and_policy_replies_defer(
        tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture, where: str,
        reply: str, at_least_s: float) -> None:
    caplog.set_level(logging.INFO)
    setattr(upstream.handler, f"{where}_reply", reply)
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    async with run_service(cfg) as svc:
        await send(service_port(svc), ALICE, [BOB], message())
        await wait_for(lambda: any(q.attempts and q.state == "deferred"
                                   for q in svc.qmgr.view.messages()), what="deferred")
        [queued] = svc.qmgr.view.messages()
        assert queued.entry.next_attempt - svc.qmgr.clock() >= at_least_s
        assert queued.entry.pending() == [BOB]
        await asyncio.sleep(0.5)
    assert upstream.messages == []  # no bounce either
    assert any("deferred for 1 recipient" in r.getMessage() for r in caplog.records)


@pytest.fixture
async def smtp_auth_off_upstream() -> AsyncIterator[Upstream]:
    """Exchange Online with SMTP AUTH disabled for the tenant: every login gets 535 5.7.139."""
    def refuse(server: SMTP, session: Session, envelope: Envelope, mechanism: str,
               auth_data: Any) -> AuthResult:
        return AuthResult(success=False, handled=False,
                          message="535 5.7.139 Authentication unsuccessful, "
                                  "SmtpClientAuthentication is disabled for the Tenant.")

    up = Upstream(auth_require_tls=False, authenticator=refuse)
    await up.start()
    yield up
    await up.stop()


async def test_basic_smtp_auth_turned_off_defers_with_a_hint(
        tmp_path: Path, smtp_auth_off_upstream: Upstream,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    secret = tmp_path / "pw"
    secret.write_text("pw\n")
    secret.chmod(0o600)
    route = smtp_route("staff", '["*@business.com"]', smtp_auth_off_upstream.port,
                       f'username = "{ALICE}"\npassword_file = "{secret}"')
    cfg = write_config(tmp_path, route)
    async with run_service(cfg) as svc:
        await send(service_port(svc), ALICE, [BOB], message())
        await wait_for(lambda: any(q.attempts and q.state == "deferred"
                                   for q in svc.qmgr.view.messages()), what="deferred")
        [queued] = svc.qmgr.view.messages()
        assert queued.entry.next_attempt - svc.qmgr.clock() >= 3500
    lines = [r.getMessage() for r in caplog.records if "deferred for" in r.getMessage()]
    assert lines and "5.7.139" in lines[0] and 'auth = "xoauth2"' in lines[0]
    assert smtp_auth_off_upstream.messages == []


# -- kill -9 at each step ------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["accepted", "reported", "bounce-stored", "before-removal"])
async def test_kill_9_at_each_step_loses_nothing_and_bounces_once(
        tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    """1. a message to bob (250) and nobody (550) 2. relayd kills itself with SIGKILL at STEP
    3. restart 4. bob has it (twice at most: the message in flight), alice has exactly one
    bounce, the spool is empty."""
    upstream.handler.rcpt_replies[NOBODY] = UNKNOWN_USER
    port = free_port()
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       listen=f"127.0.0.1:{port}")
    log = tmp_path / "relayd.log"
    monkeypatch.setenv("RELAYD_CRASH_AT", step)
    async with daemon(cfg, port, log) as proc:
        try:
            await send(port, ALICE, [BOB, NOBODY], message())
        except (smtplib.SMTPException, OSError):
            assert step == "accepted"  # killed before its 250: stored all the same
        await asyncio.to_thread(proc.wait, 15)
        assert proc.returncode == -signal.SIGKILL
    assert len(os.listdir(tmp_path / "queue" / "msg")) >= 1
    monkeypatch.delenv("RELAYD_CRASH_AT")
    async with daemon(cfg, port, log):
        await wait_for(lambda: bounces(upstream) and not os.listdir(tmp_path / "queue" / "msg"),
                       what="delivered, bounced and the spool empty")
        await asyncio.sleep(1.5)  # time for a duplicate to show
    assert 1 <= len(deliveries_to(upstream, BOB)) <= 2
    assert len(bounces(upstream)) == 1
    assert dsn_fields(bounces(upstream)[0])["Final-Recipient"] == f"rfc822; {NOBODY}"


# -- a large queue: attempts bounded per route, held routes cost no disk write -------------------


def _spool_messages(cfg: Path, count: int, subject: str = "queued") -> list[str]:
    from relayd.config import load_config

    spool = Spool(load_config(cfg).queue.path)
    spool.create()
    return [spool.store_sync(ALICE, [BOB], message(subject=f"{subject} {i}")).id
            for i in range(count)]


async def test_recovery_starts_no_more_attempts_than_the_route_has_sessions(
        tmp_path: Path, upstream: Upstream) -> None:
    """1. 40 messages in the spool, route max_connections = 2, an upstream that takes 50 ms per
    DATA 2. start: never more than 2 messages active at once (not one task per message, each
    with its bytes read) 3. all 40 arrive upstream, once each."""
    slow = upstream.handler
    plain_data = slow.handle_DATA

    async def handle_data(server: SMTP, session: Session, envelope: Envelope) -> str:
        await asyncio.sleep(0.05)
        return await plain_data(server, session, envelope)

    slow.handle_DATA = handle_data  # type: ignore[method-assign]
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port,
                                            "max_connections = 2"))
    ids = _spool_messages(cfg, 40)
    most = 0
    async with run_service(cfg) as svc:
        while len(upstream.messages) < 40:
            active = sum(1 for q in svc.qmgr.view.messages() if q.active)
            most = max(most, active)
            await asyncio.sleep(0.005)
        await wait_for(lambda: not svc.qmgr.view.count(), what="an empty queue")
    assert 1 <= most <= 2
    assert upstream.handler.open_max <= 2
    subjects = sorted(email.message_from_bytes(m.data)["Subject"] for m in upstream.messages)
    assert subjects == sorted(f"queued {i}" for i in range(40)) and len(ids) == 40


async def test_a_held_route_writes_no_state_for_messages_it_never_tried(
        tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    """1. upstream down, retry_min 1h, max_connections 2 2. 30 messages in the spool, relayd
    starts: the first tries find the upstream unreachable, the route is held 3. on disk, only
    the messages actually tried have a state file (a held report changes nothing on disk) and
    none holds its bytes in memory 4. upstream back, `relayd queue retry --all`: one log line,
    and all 30 delivered once."""
    caplog.set_level(logging.INFO)
    await upstream.stop()
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port,
                                            "max_connections = 2"),
                       queue='retry_min = "1h"\nretry_max = "2h"')
    _spool_messages(cfg, 30)
    state_dir = tmp_path / "queue" / "state"
    async with run_service(cfg) as svc:
        await svc.recovered.wait()
        await wait_for(lambda: svc.qmgr.view.count() == 30 and all(
            q.state == "deferred" for q in svc.qmgr.view.messages()), what="all deferred")
        tried = [q.id for q in svc.qmgr.view.messages() if q.attempts]
        assert 1 <= len(tried) <= 2
        await asyncio.sleep(0.3)  # state writes go through a thread: let any stray one land
        assert sorted(os.listdir(state_dir)) == sorted(tried)
        assert not any(q.in_memory for q in svc.qmgr.view.messages())
        assert svc.qmgr.view.held_bytes() == 0
        await upstream.start()
        done = await arelayd_cli("queue", "retry", "--all", "-c", str(cfg))
        assert done.returncode == 0, done.stderr
        await wait_for(lambda: len(upstream.messages) == 30 and not svc.qmgr.view.count(),
                       timeout=10, what="all delivered after the retry")
    said = [r.getMessage() for r in caplog.records if "retry requested" in r.getMessage()]
    assert said == ["queue: retry requested for all 30 message(s)"]
    subjects = sorted(email.message_from_bytes(m.data)["Subject"] for m in upstream.messages)
    assert subjects == sorted(f"queued {i}" for i in range(30))
    assert os.listdir(state_dir) == []


async def test_held_messages_accepted_while_down_are_delivered_once_after_a_restart(
        tmp_path: Path, upstream: Upstream) -> None:
    """1. upstream down, retry_min 1h 2. five messages accepted over SMTP: the first try holds
    the route, the rest wait for the hold in memory only 3. relayd stops 4. upstream back,
    relayd starts again 5. the held ones, never tried, are due at once (nothing on disk says
    otherwise) and delivered; the one tried waits for its next try as saved, until `relayd
    queue retry` 6. all five delivered, once each."""
    await upstream.stop()
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       queue='retry_min = "1h"\nretry_max = "2h"')
    async with run_service(cfg) as svc:
        for i in range(5):
            await send(service_port(svc), ALICE, [BOB], message(subject=f"down {i}"))
        await wait_for(lambda: svc.qmgr.view.count() == 5 and all(
            q.state == "deferred" for q in svc.qmgr.view.messages()), what="all deferred")
        [tried] = [q.id for q in svc.qmgr.view.messages() if q.attempts]
    await upstream.start()
    async with run_service(cfg) as svc:
        await wait_for(lambda: len(upstream.messages) == 4 and svc.qmgr.view.ids() ==
                       [tried], what="the four held ones delivered after the restart")
        done = await arelayd_cli("queue", "retry", tried, "-c", str(cfg))
        assert done.returncode == 0, done.stderr
        await wait_for(lambda: len(upstream.messages) == 5 and not svc.qmgr.view.count(),
                       what="the tried one delivered on request")
    subjects = sorted(email.message_from_bytes(m.data)["Subject"] for m in upstream.messages)
    assert subjects == [f"down {i}" for i in range(5)]
