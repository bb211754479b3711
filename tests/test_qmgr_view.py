"""The queue manager's read side (relayd.qmgr.view): pages, filters, copies, no change."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

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

from relayd.config import Config, RouteConfig, load_config
from relayd.delivery import Upstream as DeliveryUpstream
from relayd.delivery import make_upstream
from relayd.qmgr.manager import QueueManager
from relayd.qmgr.view import Filter
from relayd.queue import Entry, RecipientState, Spool
from relayd.web.pages import status_page


async def test_pages_filters_and_copies(tmp_path: Path) -> None:
    """1. 250 deferred messages on two routes, ages 0..249 min 2. pages of 100 cover each once,
    in queue order 3. the filters select by route, sender, recipient, age, state 4. what a
    reader is given is a copy: changing it changes nothing in the manager."""
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', dead_port())
                       + smtp_route("other", '["*@other.test"]', dead_port()))
    config = load_config(cfg)
    spool = Spool(config.queue.path)
    spool.create()
    qmgr = QueueManager(config, spool, make_upstream)
    now = time.time()
    ids = []
    for i in range(250):
        sender = "x@other.test" if i % 5 == 0 else f"u{i}@business.com"
        rcpt = f"r{i}@example.com"
        entry = Entry(f"ID{i:08d}", sender, [rcpt], now - 60 * i, attempts=1,
                      next_attempt=now + 3600, last_error="451 later",
                      rcpt={rcpt: RecipientState()})
        qmgr.submit(entry)
        ids.append(entry.id)
    view = qmgr.view
    before = {q.id: (q.state, q.entry.attempts, dict(q.entry.rcpt)) for q in
              qmgr.view.messages()}

    seen = []
    for offset in (0, 100, 200):
        page = view.page(Filter(), offset, 100)
        assert page.queued == page.matching == 250
        seen += [r.id for r in page.rows]
    assert seen == ids
    assert view.page(Filter(route="other")).matching == 50
    assert view.page(Filter(sender="U7@business")).matching == 1
    assert [r.id for r in view.page(Filter(recipient="r13@")).rows] == ["ID00000013"]
    assert view.page(Filter(min_age_s=60 * 200 - 30)).matching == 50
    assert view.page(Filter(state="deferred")).matching == 250
    assert view.page(Filter(state="active")).matching == 0
    counts = view.route_counts()
    assert (counts["staff"].queued, counts["other"].queued) == (200, 50)
    assert counts["other"].oldest_deferred == now - 60 * 245
    rows, total = view.deferred(3)
    assert total == 250 and [r.id for r in rows] == ["ID00000249", "ID00000248", "ID00000247"]

    row = view.message("ID00000013")
    assert row is not None and row.entry is not None and row.route == "staff"
    assert row.summary["route"] == "staff" and row.summary["rcpt"]["r13@example.com"][
        "status"] == "pending"
    row.summary["rcpt"]["r13@example.com"]["status"] = "delivered"  # type: ignore[index]
    row.entry.rcpt["r13@example.com"].status = "delivered"
    row.entry.recipients.append("someone@else")
    assert view.message("nope") is None
    assert {q.id: (q.state, q.entry.attempts, dict(q.entry.rcpt)) for q in
            qmgr.view.messages()} == before
    assert qmgr.view.message("ID00000013").entry.recipients == ["r13@example.com"]
    assert qmgr.view.message("ID00000013").entry.rcpt["r13@example.com"].status == "pending"


async def test_status_snapshot_of_active_deferred_and_held_builds_no_upstream_client(
        tmp_path: Path, upstream: Upstream, upstream2: Upstream) -> None:
    """1. four routes: "slow" (its upstream holds DATA: the message stays active), "later"
    (451 to the recipient: deferred after one try), "down" (unreachable: the first message is
    tried, the second waits for the route's hold) and "idle" (nothing sent) 2. the upstream
    clients are counted where they are built (the service's upstream factory) and the
    connections where they arrive (the recording upstreams) 3. the status page's snapshot,
    its HTML, [notify]'s conditions (none due yet) and the read side's answers show each
    state 4. taking them
    built no upstream client (the idle route has none) and opened no connection."""
    gate = asyncio.Event()
    record_data = upstream.handler.handle_DATA

    async def handle_data(server: Any, session: Any, envelope: Any) -> str:
        await gate.wait()
        return await record_data(server, session, envelope)

    upstream.handler.handle_DATA = handle_data  # type: ignore[method-assign]
    upstream2.handler.rcpt_replies["later@example.com"] = "451 4.3.0 try again later"
    idle = Upstream()
    await idle.start()
    cfg = write_config(tmp_path, smtp_route("slow", '["*@slow.test"]', upstream.port)
                       + smtp_route("later", '["*@later.test"]', upstream2.port)
                       + smtp_route("down", '["*@down.test"]', dead_port())
                       + smtp_route("idle", '["*@idle.test"]', idle.port),
                       queue='retry_min = "1h"\nretry_max = "2h"',
                       extra='[notify]\nto = ["admin@idle.test"]\nsender = "relayd@idle.test"\n')
    built: list[str] = []

    def counting_factory(route: RouteConfig, config: Config) -> DeliveryUpstream:
        built.append(route.name)
        return make_upstream(route, config)

    try:
        async with run_service(cfg, upstream_factory=counting_factory) as svc:
            port = service_port(svc)
            view = svc.qmgr.view
            await send(port, "a@slow.test", ["x@example.com"], message("a@slow.test"))
            await send(port, "b@later.test", ["later@example.com"], message("b@later.test"))
            await send(port, "c@down.test", ["y@example.com"], message("c@down.test"))
            await wait_for(lambda: any(r.attempts for r in view.messages()
                                       if r.route == "down"), what="the first try on down")
            await send(port, "d@down.test", ["z@example.com"], message("d@down.test"))
            await wait_for(lambda: view.count() == 4 and upstream.handler.connections == 1
                           and sum(r.attempts for r in view.messages()) == 2
                           and sum(r.state == "deferred" for r in view.messages()) == 3,
                           what="one active, one deferred, two on the held route")
            clients, connections = list(built), (upstream.handler.connections,
                                                 upstream2.handler.connections,
                                                 idle.handler.connections)
            assert sorted(clients) == ["down", "later", "slow"]

            snapshot = await svc.web_snapshot()
            page = status_page(snapshot).decode()
            assert svc.notifier is not None  # [notify]'s reads: token health, routes, queue
            conditions = svc.notifier.conditions(time.time(), svc.notifier.token_health())
            by_sender = {r.summary["sender"]: r for r in view.messages()}
            stats = view.route_stats()
            counts = view.route_counts()

            assert built == clients, "a status read built an upstream client"
            assert (upstream.handler.connections, upstream2.handler.connections,
                    idle.handler.connections) == connections
            assert idle.handler.connections == 0 and "idle" not in stats
            assert conditions == []  # nothing has waited long enough to be reported
            assert by_sender["a@slow.test"].active
            later = by_sender["b@later.test"]
            assert later.state == "deferred" and later.attempts == 1
            assert "451" in later.last_reply["later@example.com"]
            held = by_sender["d@down.test"]
            assert held.state == "deferred" and held.attempts == 0
            assert held.summary["last_error"].startswith("route held")
            assert by_sender["c@down.test"].attempts == 1
            assert stats["down"].failing_kind == "unreachable"
            assert (counts["slow"].queued, counts["later"].deferred,
                    counts["down"].queued, counts["down"].deferred) == (1, 1, 2, 1)
            rows = {r.name: r for r in snapshot.routes}
            assert (rows["idle"].queued, rows["idle"].last_success) == (0, None)
            assert (rows["later"].queued, rows["later"].deferred) == (1, 1)
            assert rows["down"].failing_kind == "unreachable"
            assert snapshot.queued == 4 and snapshot.deferred_total == 2
            assert "idle" in page and "later@example.com" in page
            gate.set()
            await wait_for(lambda: len(upstream.messages) == 1 and not view.has(
                by_sender["a@slow.test"].id), what="the active message delivered")
    finally:
        gate.set()
        await idle.stop()
