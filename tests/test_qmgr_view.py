"""The queue manager's read side (relayd.qmgr.view): pages, filters, copies, no change."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import dead_port, smtp_route, write_config

from relayd.config import load_config
from relayd.delivery import make_upstream
from relayd.qmgr.manager import QueueManager
from relayd.qmgr.view import Filter
from relayd.queue import Entry, RecipientState, Spool


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
              qmgr.messages.values()}

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
            qmgr.messages.values()} == before
    assert qmgr.messages["ID00000013"].entry.recipients == ["r13@example.com"]
    assert qmgr.messages["ID00000013"].entry.rcpt["r13@example.com"].status == "pending"
