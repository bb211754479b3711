"""Per sending mailbox pacing (relayd.qmgr.pacing) against upstreams that enforce per-mailbox
limits as the providers do (fakes.limits): a fake Graph and an aiosmtpd upstream, on loopback,
with a real relayd and real clients. Rates and windows are small so each test takes seconds."""

from __future__ import annotations

import asyncio
import calendar
import email
import email.policy
import re
import smtplib
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Upstream,
    arelayd_cli,
    run_service,
    send,
    service_port,
    smtp_route,
    wait_for,
    write_config,
)
from fakes.graph import GraphState, start_graph
from fakes.idp import CLIENT_ID, CLIENT_SECRET, TENANT, start_idp
from fakes.limits import LimitingHandler, MailboxLimits

from relayd import app, notify
from relayd.config import load_config, parse_config
from relayd.metrics import Metrics
from relayd.qmgr import pacing
from relayd.queue import USAGE_FILE

BUSY, QUIET, MERGE = "busy@business.com", "quiet@business.com", "merge@business.com"
ADMIN, SENDER = "it@business.com", "relayd@business.com"
RATE = 25  # messages a second for the busy mailbox: 200 take 8 s
BURST = 10  # the fake's bucket: arrivals up to 0.4 s closer than the rate (loopback jitter)
WAIT_RE = re.compile(r"waiting for mailbox merge@business\.com's budget \(frees at "
                     r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC\)")


def numbered(sender: str, i: int, to: str = "alice@example.net") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: n{i}\r\n"
            f"Message-ID: <{sender.split('@')[0]}.{i}.{time.time_ns()}@test>\r\n\r\nhi\r\n"
            ).encode()


async def send_many(port: int, sender: str, count: int, start: int = 0,
                    to: str = "alice@example.net") -> None:
    """`count` messages over one SMTP connection (smtplib, in a thread)."""

    def go() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            for i in range(start, start + count):
                client.sendmail(sender, [to], numbered(sender, i, to))

    await asyncio.to_thread(go)


@pytest.fixture
async def limited() -> AsyncIterator[Upstream]:
    """An aiosmtpd upstream that enforces per-MAIL FROM limits (set on handler.limits)."""
    up = Upstream()
    up.handler = LimitingHandler()
    await up.start()
    yield up
    await up.stop()


@pytest.fixture
def graph(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any]]:
    monkeypatch.setenv("GRAPH_SECRET", CLIENT_SECRET)
    idp_server = start_idp()
    graph_state = GraphState(
        token_ok=lambda token: idp_server.state.check_bearer(token) is not None)
    graph_server = start_graph(graph_state)
    yield idp_server, graph_server
    graph_server.stop()
    idp_server.stop()


@pytest.mark.parametrize("upstream_kind", ["graph", "smtp"])
async def test_a_busy_mailbox_is_paced_and_does_not_hold_up_another(
        upstream_kind: str, tmp_path: Path, limited: Upstream,
        graph: tuple[Any, Any]) -> None:
    """1. The upstream refuses a mailbox's messages beyond RATE a second (a bucket of BURST)
    and Graph also a fifth concurrent request, as the providers throttle 2. a route with
    mailbox_rate_limit = RATE/s takes 200 messages from busy@, then 5 from quiet@ 3. quiet@'s
    5 are delivered at once, while busy@ still has most of its backlog (its waiting messages
    hold no session) 4. all 205 arrive once, and the upstream never had to throttle: busy@
    never went over its rate."""
    limits = MailboxLimits(rate=RATE, burst=BURST)
    if upstream_kind == "graph":
        idp_server, graph_server = graph
        state: GraphState = graph_server.state
        state.limits = limits
        state.max_concurrent_per_mailbox = 4
        route = {"senders": ["*@business.com"], "upstream": "graph",
                 "endpoint": graph_server.base_url, "tenant_id": TENANT,
                 "client_id": CLIENT_ID, "client_secret_env": "GRAPH_SECRET",
                 "authority": idp_server.base_url, "ca_file": str(graph_server.ca_file),
                 "mailbox_rate_limit": f"{RATE}/s"}

        def arrived(mailbox: str) -> int:
            return sum(1 for s in state.sent if s.mailbox == mailbox)
    else:
        assert isinstance(limited.handler, LimitingHandler)
        limited.handler.limits = limits
        route = {"senders": ["*@business.com"], "upstream": "smtp", "host": "127.0.0.1",
                 "port": limited.port, "tls": "none", "mailbox_rate_limit": f"{RATE}/s"}

        def arrived(mailbox: str) -> int:
            return sum(1 for m in limited.messages if m.mail_from == mailbox)

    config = parse_config({
        "server": {"listen": ["127.0.0.1:0"], "hostname": "relay.test", "workers": 1},
        "queue": {"path": str(tmp_path / "queue"), "retry_min": "1s", "retry_max": "2s"},
        "auth": {"path": str(tmp_path / "tokens")}, "routes": {"staff": route}})
    async with run_service(config) as svc:
        port = service_port(svc)
        await asyncio.gather(*(send_many(port, BUSY, 50, start=50 * k) for k in range(4)))
        busy_before = arrived(BUSY)
        await send_many(port, QUIET, 5)
        await wait_for(lambda: arrived(QUIET) == 5, timeout=30, what="quiet@'s five")
        busy_after = arrived(BUSY)
        # quiet@'s mail went out beside busy@'s backlog, not after it.
        assert busy_after < 200, busy_after
        # Within two seconds of busy@'s sending (quiet@'s own submission and delivery take
        # a fraction of one), where waiting behind the backlog would take its whole length.
        assert busy_after - busy_before <= 2 * RATE, (busy_before, busy_after)
        await wait_for(lambda: arrived(BUSY) == 200, timeout=60, what="busy@'s 200")
        await asyncio.sleep(0.2)
    assert limits.throttled == {} and limits.over_budget == {}
    assert len(limits.arrivals[BUSY]) == 200 and len(limits.arrivals[QUIET]) == 5
    if upstream_kind == "graph":
        assert graph[1].state.throttled == {}
        ids = {email.message_from_bytes(s.mime)["Message-ID"] for s in graph[1].state.sent}
    else:
        ids = {email.message_from_bytes(m.data)["Message-ID"] for m in limited.messages}
    assert len(ids) == 205


def _notices(up: Upstream) -> list[EmailMessage]:
    out = []
    for m in up.messages:
        if m.mail_from == SENDER:
            msg = email.message_from_bytes(m.data, policy=email.policy.default)
            assert isinstance(msg, EmailMessage)
            out.append(msg)
    return out


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return str(r.read().decode())


async def test_daily_budget_defers_the_rest_keeps_counts_over_a_restart_and_shows_the_wait(
        tmp_path: Path, limited: Upstream, upstream2: Upstream,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """1. The upstream refuses (554 5.2.0 SubmissionQuotaExceeded, as Exchange Online does)
    any recipient past 50 per mailbox in a rolling window, set to 12 seconds here as
    relayd's own window is (pacing.WINDOW_S: a test setting for 24 hours) 2. a route with
    mailbox_daily_recipients = 50 takes 60 messages of one recipient from merge@ 3. 50 are
    delivered, 10 deferred with the reason, none bounced; `relayd queue list` and `show`, the
    status page and the metrics say merge@ waits for its budget and until when, and [notify]
    tells the admin it spent 80 % 4. relayd restarts: the counts are kept (the upstream would
    refuse otherwise) 5. once the window has passed, the 10 are delivered; the upstream never
    refused one."""
    window = 12.0  # relayd's first phase takes about a second; more under load
    monkeypatch.setattr(pacing, "WINDOW_S", window)
    monkeypatch.setattr(app, "QUEUE_GAUGE_INTERVAL_S", 0.1)
    monkeypatch.setattr(notify, "NOTIFY_CHECK_S", 0.1)
    handler = limited.handler
    assert isinstance(handler, LimitingHandler)
    handler.limits = MailboxLimits(budget=50, window_s=window)
    cfg = write_config(
        tmp_path,
        smtp_route("staff", '["*@business.com"]', limited.port,
                   "mailbox_daily_recipients = 50")
        + smtp_route("system", f'["{SENDER}"]', upstream2.port),
        extra=f'[notify]\nto = ["{ADMIN}"]\nsender = "{SENDER}"\n'
              '[metrics]\nlisten = "127.0.0.1:0"\n[web]\nlisten = "127.0.0.1:0"\n')
    metrics = Metrics()
    async with run_service(load_config(cfg), observer=metrics) as svc:
        port = service_port(svc)
        await asyncio.gather(*(send(port, MERGE, [f"r{i}@example.net"],
                                    numbered(MERGE, i, f"r{i}@example.net"))
                               for i in range(60)))

        def waiting() -> list[str]:
            return [q.entry.last_error for q in svc.qmgr.view.messages()
                    if q.state == "deferred" and WAIT_RE.search(q.entry.last_error)]

        await wait_for(lambda: len(handler.messages) == 50 and len(waiting()) == 10,
                       what="50 delivered and 10 waiting for the budget")
        listing = await arelayd_cli("queue", "list", "-c", str(cfg))
        lines = [line for line in listing.stdout.splitlines() if WAIT_RE.search(line)]
        assert len(lines) == 10, listing.stdout
        assert "(routes.staff.mailbox_daily_recipients)" in lines[0]
        assert "50 of 50 recipients" in lines[0]
        qid = lines[0].split()[0]
        shown = await arelayd_cli("queue", "show", qid, "-c", str(cfg))
        assert WAIT_RE.search(shown.stdout), shown.stdout
        frees_at = min(calendar.timegm(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
                       for m in map(WAIT_RE.search, lines) if m)
        page = await asyncio.to_thread(_get, f"http://127.0.0.1:{svc.web_port}/")
        assert "Sending mailboxes" in page and "50 of 50" in page
        assert "10 waiting for mailbox merge@business.com" in page

        def gauge(name: str) -> float | None:
            text = metrics.render().decode()
            m = re.search(rf'^{name}{{mailbox="merge@business.com",route="staff"}} (\S+)$',
                          text, re.M)
            return float(m.group(1)) if m else None

        await wait_for(lambda: gauge("relayd_mailbox_waiting_messages") == 10,
                       what="the waiting gauge")
        text = await asyncio.to_thread(_get, f"http://127.0.0.1:{svc.metrics_port}/metrics")
        assert 'relayd_mailbox_recipients_used{mailbox="merge@business.com",route="staff"} 50.0' \
            in text
        assert 'relayd_mailbox_recipients_budget{mailbox="merge@business.com",route="staff"}' \
            ' 50.0' in text
        await wait_for(lambda: any(n["X-Relayd-Notice"] == f"budget:staff:{MERGE}"
                                   for n in _notices(upstream2)), what="the 80 % notice")
        [notice] = [n for n in _notices(upstream2)
                    if n["X-Relayd-Notice"] == f"budget:staff:{MERGE}"]
        spent = re.search(r"has spent (\d+) % of its daily budget", str(notice["Subject"]))
        assert spent is not None and 80 <= int(spent.group(1)) <= 100, notice["Subject"]
        assert "routes.staff.mailbox_daily_recipients" in notice.get_content()
        before_restart = len(handler.messages)
    assert before_restart == 50
    assert (tmp_path / "queue" / "state" / USAGE_FILE).exists()

    async with run_service(cfg) as svc:
        [use] = [u for u in svc.qmgr.view.mailboxes() if u.mailbox == MERGE] or [None]
        # Counted before the restart: still 50, unless the window has passed meanwhile.
        assert (use is not None and use.used == 50) or time.time() >= frees_at
        await wait_for(lambda: len(handler.messages) == 60, timeout=window + 20,
                       what="the other 10 once the budget frees")
        await wait_for(lambda: not svc.qmgr.view.count(), what="an empty queue")
    assert handler.limits.over_budget == {}
    assert sorted(m.rcpt_tos[0] for m in handler.messages) == sorted(
        f"r{i}@example.net" for i in range(60))
    assert all(m.mail_from == MERGE for m in handler.messages)  # no bounce
    assert not [n for n in _notices(upstream2) if "bounce" in str(n["X-Relayd-Notice"])]


async def test_more_recipients_than_the_whole_budget_is_one_clear_failure(
        tmp_path: Path, upstream: Upstream) -> None:
    """1. A route with mailbox_daily_recipients = 5 2. a message to 6 recipients 3. it is not
    sent: one bounce to the sender names 5.5.3 and the limit; nothing else arrives."""
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port,
                                            "mailbox_daily_recipients = 5"))
    rcpts = [f"r{i}@example.net" for i in range(6)]
    async with run_service(cfg) as svc:
        await send(service_port(svc), MERGE, rcpts, numbered(MERGE, 0, rcpts[0]))
        await wait_for(lambda: len(upstream.messages) == 1 and not svc.qmgr.view.count(),
                       what="the bounce")
    [bounce] = upstream.messages
    assert bounce.mail_from == "" and bounce.rcpt_tos == [MERGE]
    text = bounce.data.decode()
    assert "Status: 5.5.3" in text
    assert "routes.staff.mailbox_daily_recipients" in text and "6 recipients" in text


async def test_a_blocked_mailbox_is_named_deferred_and_reported(
        tmp_path: Path, upstream: Upstream, upstream2: Upstream,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """1. The upstream answers 550 5.1.8 Access denied, bad outbound sender (a mailbox on
    Exchange Online's Restricted entities list) 2. the message is deferred, not bounced, and
    its reason names the block and the admin action 3. [notify] tells the admin, with
    Remove-BlockedSenderAddress."""
    monkeypatch.setattr(notify, "NOTIFY_CHECK_S", 0.1)
    upstream.handler.data_reply = "550 5.1.8 Access denied, bad outbound sender AS(42004)"
    cfg = write_config(
        tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port)
        + smtp_route("system", f'["{SENDER}"]', upstream2.port),
        extra=f'[notify]\nto = ["{ADMIN}"]\nsender = "{SENDER}"\n')
    async with run_service(cfg) as svc:
        await send(service_port(svc), MERGE, ["bob@example.net"], numbered(MERGE, 0))
        await wait_for(lambda: any(n["X-Relayd-Notice"] == f"blocked:{MERGE}"
                                   for n in _notices(upstream2)), what="the blocked notice")
        # The notice is itself queued mail: it reaches upstream2 before relayd reads upstream2's
        # 250 and drops it from the queue, so wait until only the blocked message is left.
        await wait_for(lambda: len(svc.qmgr.view.messages()) == 1, what="the notice's 250 read")
        [queued] = svc.qmgr.view.messages()
        assert queued.state == "deferred"
        listing = await arelayd_cli("queue", "list", "-c", str(cfg))
        assert "blocked this mailbox for sending" in listing.stdout
        assert "Remove-BlockedSenderAddress" in listing.stdout
    [notice] = [n for n in _notices(upstream2) if n["X-Relayd-Notice"] == f"blocked:{MERGE}"]
    assert "blocked for sending" in str(notice["Subject"])
    content = notice.get_content()
    assert "Remove-BlockedSenderAddress -SenderAddress merge@business.com" in content
    assert "Restricted entities" in content
    assert not [m for m in upstream.messages if m.mail_from == ""]  # not bounced


async def test_graph_restricted_sender_is_named_as_blocked(
        tmp_path: Path, graph: tuple[Any, Any]) -> None:
    """1. Graph answers sendMail 403 ErrorAccessDenied with the restricted-sender words 2. the
    message is deferred, not bounced, its reason names the block and the way to release it, and
    the mailbox is kept for the [notify] notice."""
    idp_server, graph_server = graph
    state: GraphState = graph_server.state
    state.fail_next(403, "ErrorAccessDenied",
                    "Access is denied. The user account is restricted from sending mail.",
                    times=100)
    config = parse_config({
        "server": {"listen": ["127.0.0.1:0"], "hostname": "relay.test", "workers": 1},
        "queue": {"path": str(tmp_path / "queue"), "retry_min": "1s", "retry_max": "2s"},
        "auth": {"path": str(tmp_path / "tokens")},
        "routes": {"m365": {"senders": ["*@business.com"], "upstream": "graph",
                            "endpoint": graph_server.base_url, "tenant_id": TENANT,
                            "client_id": CLIENT_ID, "client_secret_env": "GRAPH_SECRET",
                            "authority": idp_server.base_url,
                            "ca_file": str(graph_server.ca_file)}}})
    async with run_service(config) as svc:
        await send(service_port(svc), MERGE, ["bob@example.net"], numbered(MERGE, 0))
        await wait_for(lambda: MERGE in svc.qmgr.view.blocked(), what="the blocked mailbox")
        [queued] = svc.qmgr.view.messages()
        assert queued.state == "deferred" and queued.entry.attempts == 1
        assert "ErrorAccessDenied" in queued.entry.last_error
        assert "blocked this mailbox for sending" in queued.entry.last_error
        assert "Remove-BlockedSenderAddress" in queued.entry.last_error
    assert state.sent == []
