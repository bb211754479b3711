"""The delivery journal and `relayd log`: what each event records, how it is found again, and
that a journal that cannot be written never stops mail."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Upstream,
    arelayd_cli,
    free_port,
    message,
    run_service,
    send,
    service_port,
    smtp_route,
    wait_for,
    write_config,
)

from relayd.config import JournalConfig
from relayd.journal import Journal, Query, day_of, prune, read
from relayd.metrics import Metrics

ALICE, BOB, NOBODY = "alice@business.com", "Bob@Example.com", "nobody@example.com"


def events(path: Path, **query: Any) -> list[dict[str, Any]]:
    return list(read(path, Query(**query)))


async def test_each_event_of_a_message_is_recorded_and_found_again(
        tmp_path: Path, upstream: Upstream) -> None:
    """1. a message to bob (250) and nobody (550) 2. a second one deferred once (451), then
    delivered 3. a third deleted by the admin while deferred 4. each event is in the journal
    with its reply, and `relayd log` finds them by queue id, Message-ID, sender, recipient."""
    upstream.handler.rcpt_replies[NOBODY] = "550 5.1.1 no such user"
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       queue='retry_min = "1s"\nretry_max = "1s"')
    journal_dir = tmp_path / "journal"
    first = message(subject="first")
    async with run_service(cfg) as svc:
        await send(service_port(svc), ALICE, [BOB, NOBODY], first)
        await wait_for(lambda: len(upstream.messages) == 2 and not svc.qmgr.view.count(),
                       what="delivered and bounced")
        upstream.handler.data_reply = "451 4.3.0 try later"
        await send(service_port(svc), ALICE, ["carol@example.com"], message(subject="second"))
        await wait_for(lambda: any(q.attempts for q in svc.qmgr.view.messages()),
                       what="deferred once")
        upstream.handler.data_reply = None
        await wait_for(lambda: not svc.qmgr.view.count(), what="delivered on the next try")
        upstream.handler.data_reply = "451 4.3.0 try later"
        await send(service_port(svc), ALICE, ["dave@example.com"], message(subject="third"))
        await wait_for(lambda: any(q.attempts for q in svc.qmgr.view.messages()),
                       what="the third deferred")
        [third_id] = svc.qmgr.view.ids()
        done = await arelayd_cli("queue", "delete", third_id, "-c", str(cfg))
        assert done.returncode == 0
        await wait_for(lambda: not svc.qmgr.view.count(), what="deleted")
    mid = first.split(b"Message-ID: ")[1].split(b"\r\n")[0].decode()
    mine = events(journal_dir, message_id=mid)
    kinds = [e["event"] for e in mine]
    assert kinds[0] == "accepted" and {"delivered", "failed", "bounced"} <= set(kinds)
    accepted = mine[0]
    assert accepted["from"] == ALICE and accepted["to"] == [BOB, NOBODY]
    assert accepted["subject"] == "first" and accepted["client"] == "127.0.0.1"
    assert accepted["route"] == "staff" and accepted["size"] == len(first)
    [delivered] = [e for e in mine if e["event"] == "delivered"]
    assert delivered["to"] == [BOB] and delivered["reply"].startswith("250")
    assert delivered["upstream"] == f"smtp:127.0.0.1:{upstream.port}"
    assert delivered["attempt"] == 1 and delivered["latency_s"] >= 0
    [failed] = [e for e in mine if e["event"] == "failed"]
    assert failed["to"] == [NOBODY] and failed["reply"] == "550 5.1.1 no such user"
    [bounced] = [e for e in mine if e["event"] == "bounced"]
    qid = accepted["id"]
    # the bounce's own events are found with the original's queue id
    by_id = events(journal_dir, queue_id=qid)
    assert any(e.get("bounce_for") == qid and e["event"] == "delivered" for e in by_id)
    assert bounced["bounce"] in {e["id"] for e in by_id}
    second = events(journal_dir, recipient="CAROL@example.com")
    assert [e["event"] for e in second] == ["accepted", "deferred", "delivered"]
    assert second[1]["reply"] == "451 4.3.0 try later" and second[1]["next_try"] > 0
    third = events(journal_dir, queue_id=third_id)
    assert [e["event"] for e in third][-1] == "deleted"

    out = await arelayd_cli("log", "--message-id", mid.strip("<>"), "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == len(mine) and "accepted" in lines[0] and qid in lines[0]
    assert any("550 5.1.1 no such user" in line for line in lines)
    out = await arelayd_cli("log", "--to", "bob@EXAMPLE.com", "--json", "-c", str(cfg))
    got = [json.loads(line) for line in out.stdout.splitlines()]
    assert {e["event"] for e in got} == {"accepted", "delivered"}
    out = await arelayd_cli("log", "--from", ALICE.upper(), "--since", "1h", "-c", str(cfg))
    assert out.returncode == 0 and len(out.stdout.splitlines()) >= 9
    out = await arelayd_cli("log", "--id", "NOSUCHID00000000", "-c", str(cfg))
    assert out.returncode == 1 and "no matching events" in out.stderr
    # --from "" (or "<>") selects the null sender's events: the bounce's, and nothing else
    for null in ("", "<>"):
        out = await arelayd_cli("log", "--from", null, "--json", "-c", str(cfg))
        assert out.returncode == 0, out.stderr
        got = [json.loads(line) for line in out.stdout.splitlines()]
        assert got and all("from" not in e for e in got)
        assert {e["id"] for e in got} == {bounced["bounce"]}
        assert "delivered" in {e["event"] for e in got}


def test_a_torn_last_line_is_skipped_and_old_files_go(tmp_path: Path) -> None:
    journal = Journal(JournalConfig(tmp_path, keep_s=2 * 86400))
    journal.record("accepted", "Q1", message_id="<a@b>", to=["x@y"])
    journal.record("delivered", "Q1", message_id="<a@b>", to=["x@y"], reply="250 ok")
    journal.close()
    [today] = list(tmp_path.iterdir())
    assert today.name == f"{day_of(time.time())}.jsonl"
    if sys.platform != "win32":  # Windows: the folder's access list, not mode bits
        assert today.stat().st_mode & 0o777 == 0o640
    with open(today, "ab") as f:
        f.write(b'{"time": 1, "event": "deliv')  # a crash in the middle of a write
    assert [e["event"] for e in events(tmp_path, message_id="a@b")] == ["accepted",
                                                                       "delivered"]
    old = tmp_path / "2020-01-01.jsonl"
    old.write_text('{"time": 1577836800, "event": "accepted", "id": "OLD"}\n')
    recent = tmp_path / f"{day_of(time.time() - 86400)}.jsonl"
    recent.write_text("")
    assert prune(tmp_path, 2 * 86400, time.time()) == [old]
    assert recent.exists() and today.exists()


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs (root ignores file modes, so the mount is what makes it read-only)."""
    if sys.platform == "win32" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (on Linux)")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_a_journal_that_cannot_be_written_does_not_stop_mail(
        tmp_path: Path, upstream: Upstream, read_only_dir: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       extra=f'[journal]\npath = "{read_only_dir / "journal"}"\n'
                             f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    async with run_service(cfg, observer=Metrics()) as svc:
        await send(service_port(svc), ALICE, [BOB], message())
        await wait_for(lambda: len(upstream.messages) == 1, what="delivered all the same")
        await wait_for(lambda: not svc.journal.healthy, what="the journal found unwritable")

        def healthz() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/healthz",
                                            timeout=5) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        status, body = await asyncio.to_thread(healthz)
        assert status == 503 and "journal" in body


async def test_expiry_is_recorded_with_the_last_reply(tmp_path: Path, upstream: Upstream) -> None:
    """1. the upstream defers every try 2. max_age passes 3. the journal says expired, with
    the last reply, and bounced."""
    upstream.handler.rcpt_replies["late@example.com"] = "451 4.2.0 mailbox busy"
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       queue='max_age = "2s"\nretry_min = "1s"\nretry_max = "1s"')
    async with run_service(cfg) as svc:
        await send(service_port(svc), ALICE, ["late@example.com"], message())
        await wait_for(lambda: not svc.qmgr.view.count() and len(upstream.messages) == 1,
                       what="expired and bounced")
    got = events(tmp_path / "journal", recipient="late@example.com")
    kinds = [e["event"] for e in got]
    assert kinds[0] == "accepted" and "deferred" in kinds and kinds[-2:] == ["expired",
                                                                              "bounced"]
    assert "last error: 451 4.2.0 mailbox busy" in got[-2]["reply"]
    assert upstream.messages[0].mail_from == ""  # the bounce


@pytest.mark.skipif(sys.platform == "win32", reason="listener workers are POSIX only")
async def test_the_journal_is_in_time_order_with_listener_workers(
        tmp_path: Path, upstream: Upstream) -> None:
    """1. `relayd serve` in the default layout of a two-CPU machine (workers = 2: a listener
    process and the main process that delivers) 2. 200 messages, every third also to a
    recipient the upstream defers 3. SIGTERM (the journal is flushed) 4. `relayd log`: each
    message's events are in time order with `accepted` first, and `--since` lists every event
    in time order."""
    from conftest import daemon

    later = "later@example.com"
    upstream.handler.rcpt_replies[later] = "451 4.2.0 mailbox busy"
    port = free_port()
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       listen=f"127.0.0.1:{port}", server="workers = 2")
    count = 200
    gate = asyncio.Semaphore(8)

    async def one(i: int) -> None:
        rcpts = [f"r{i}@example.com"] + ([later] if i % 3 == 0 else [])
        async with gate:
            await asyncio.wait_for(send(port, ALICE, rcpts, message(subject=f"m{i}")), 30)

    async with daemon(cfg, port, tmp_path / "relayd.log") as proc:
        await asyncio.gather(*(one(i) for i in range(count)))
        await wait_for(lambda: len(upstream.messages) == count, timeout=60,
                       what="every message delivered to its first recipient")
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)
        assert proc.returncode == 0, (tmp_path / "relayd.log").read_text()[-3000:]

    out = await arelayd_cli("log", "--json", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    got = [json.loads(line) for line in out.stdout.splitlines()]
    by_id: dict[str, list[dict[str, Any]]] = {}
    for e in got:
        by_id.setdefault(e["id"], []).append(e)
    assert len(by_id) == count
    deferred = 0
    for qid, evs in by_id.items():
        assert evs[0]["event"] == "accepted", (qid, [e["event"] for e in evs])
        times = [e["time"] for e in evs]
        assert times == sorted(times), (qid, evs)
        deferred += any(e["event"] == "deferred" for e in evs)
    assert deferred == len(range(0, count, 3))  # the mix: some deferred, all delivered once
    out = await arelayd_cli("log", "--since", "1h", "--json", "-c", str(cfg))
    times = [json.loads(line)["time"] for line in out.stdout.splitlines()]
    assert len(times) == len(got) and times == sorted(times)


def test_read_back_pages_newest_first_across_day_files(tmp_path: Path) -> None:
    """The web console's journal pages: newest first, `limit` at a time, each page going on
    from the cursor the last one gave, through three day files; `since` stops at its day."""
    import calendar

    from relayd.journal import Query, read_back

    days = {"2026-11-01": 3, "2026-11-02": 0, "2026-11-03": 4}
    for day, count in days.items():
        start = calendar.timegm(time.strptime(day + " 12", "%Y-%m-%d %H"))
        lines = [json.dumps({"time": start + i, "event": "delivered", "id": f"{day}-{i}",
                             "to": ["dave@example.com" if i % 2 == 0 else "x@example.com"]})
                 for i in range(count)]
        (tmp_path / f"{day}.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""))
    (tmp_path / "notes.txt").write_text("not a day file\n")

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        events, cursor = read_back(tmp_path, Query(), cursor, 3)
        seen += [e["id"] for e in events]
        pages += 1
        if cursor is None:
            break
    assert seen == ["2026-11-03-3", "2026-11-03-2", "2026-11-03-1", "2026-11-03-0",
                    "2026-11-01-2", "2026-11-01-1", "2026-11-01-0"]
    assert pages == 3
    events, cursor = read_back(tmp_path, Query(recipient="dave@example.com"), None, 10)
    assert [e["id"] for e in events] == ["2026-11-03-2", "2026-11-03-0", "2026-11-01-2",
                                         "2026-11-01-0"] and cursor is None
    since = calendar.timegm(time.strptime("2026-11-02", "%Y-%m-%d"))
    events, _ = read_back(tmp_path, Query(since=since), None, 10)
    assert [e["id"][:10] for e in events] == ["2026-11-03"] * 4
    assert read_back(tmp_path, Query(), "garbage", 2)[0][0]["id"] == "2026-11-03-3"
    assert read_back(tmp_path / "missing", Query(), None, 5) == ([], None)
