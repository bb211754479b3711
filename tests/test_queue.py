"""The spool on disk and `relayd queue`: recovery, corrupt entries, commands while running."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    Upstream,
    arelayd_cli,
    daemon,
    free_port,
    message,
    relayd_cli,
    run_service,
    send,
    service_port,
    smtp_route,
    wait_for,
    write_config,
)

import relayd.queue.commit
import relayd.queue.spares
from relayd.journal import Query, read
from relayd.queue import Spool


def test_accept_recover_and_state_round_trip(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "q")
    spool.create()
    entry = spool.store_sync("a@b.com", ["x@y.com", "z@y.com", "x@y.com"],
                              b"Subject: s\r\n\r\nhi\r\n", ["BODY=8BITMIME"],
                              client="127.0.0.1")
    assert entry.recipients == ["x@y.com", "z@y.com"]  # duplicates collapse
    entry.rcpt["x@y.com"].status = "delivered"
    entry.attempts = 2
    entry.last_error = "451 busy"
    spool.save_state(entry)
    [again] = list(spool.recover())
    assert again.id == entry.id and again.pending() == ["z@y.com"]
    assert again.attempts == 2 and again.mail_options == ["BODY=8BITMIME"]
    assert spool.read_data(again) == b"Subject: s\r\n\r\nhi\r\n"
    if sys.platform != "win32":  # Windows: the folder's access list, not mode bits
        assert os.stat(spool.msg_dir / entry.id).st_mode & 0o077 == 0


def test_corrupt_entries_are_moved_aside_not_fatal(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "q")
    spool.create()
    good = spool.store_sync("a@b.com", ["x@y.com"], b"hi\r\n")
    (spool.msg_dir / "0AAAAAAAAAAAAAAA").write_bytes(b"{not json\nbody")
    bad_state = spool.store_sync("a@b.com", ["x@y.com"], b"hi\r\n")
    (spool.state_dir / bad_state.id).write_text('{"rcpt": {"x@y.com": {"status": 7}}}')
    (spool.msg_dir / "stray-file").write_text("ignored: not a queue id")
    recovered = [e.id for e in spool.recover()]
    assert recovered == [good.id]
    corrupt = sorted(os.listdir(spool.corrupt_dir))
    assert "0AAAAAAAAAAAAAAA.msg" in corrupt and "0AAAAAAAAAAAAAAA.why" in corrupt
    assert f"{bad_state.id}.state" in corrupt


async def test_corrupt_entry_at_startup_does_not_stop_delivery(tmp_path: Path,
                                                               upstream: Upstream) -> None:
    cfg = write_config(tmp_path, smtp_route("staff", '["*"]', upstream.port))
    spool = Spool(tmp_path / "queue")
    spool.create()
    spool.store_sync("a@business.com", ["x@example.com"], message())
    (spool.msg_dir / "0BBBBBBBBBBBBBBB").write_bytes(b"\x00\xff garbage")
    async with run_service(cfg):
        await wait_for(lambda: len(upstream.messages) == 1)
    assert "0BBBBBBBBBBBBBBB.why" in os.listdir(spool.corrupt_dir)


async def test_queue_commands_while_the_daemon_runs(tmp_path: Path, upstream: Upstream) -> None:
    """1. upstream refuses with 4xx 2. two messages queued 3. list/show see them
    4. delete one 5. upstream fixed, retry --all 6. the other is delivered now."""
    upstream.handler.rcpt_replies["x@example.com"] = "451 4.3.0 Not now"
    cfg = write_config(tmp_path, smtp_route("staff", '["*"]', upstream.port),
                       queue='retry_min = "1h"\nretry_max = "2h"')
    async with run_service(cfg) as svc:
        for subject in ("keep", "drop"):
            await send(service_port(svc), "a@business.com", ["x@example.com"],
                       message(subject=subject))
        await wait_for(lambda: svc.qmgr.view.count() == 2 and all(
            e.attempts == 1 and not e.active for e in svc.qmgr.view.messages()))
        listing = await arelayd_cli("queue", "list", "-c", str(cfg))
        assert listing.returncode == 0
        assert "2 message(s) in the queue" in listing.stdout
        assert "451 4.3.0 Not now" in listing.stdout
        entries = json.loads((await arelayd_cli("queue", "list", "--json", "-c", str(cfg))).stdout)
        by_subject = {}
        for e in entries:
            shown = await arelayd_cli("queue", "show", e["id"], "--body", "-c", str(cfg))
            assert shown.returncode == 0 and e["id"] in shown.stdout
            by_subject["keep" if "Subject: keep" in shown.stdout else "drop"] = e["id"]
        deleted = await arelayd_cli("queue", "delete", by_subject["drop"], "-c", str(cfg))
        assert deleted.returncode == 0 and "running daemon" in deleted.stdout
        assert not svc.qmgr.view.has(by_subject["drop"])
        upstream.handler.rcpt_replies.clear()
        retried = await arelayd_cli("queue", "retry", "--all", "-c", str(cfg))
        assert retried.returncode == 0, retried.stderr
        await wait_for(lambda: len(upstream.messages) == 1, what="delivery after retry")
        missing = await arelayd_cli("queue", "show", "0ZZZZZZZZZZZZZZZ", "-c", str(cfg))
        assert missing.returncode == 1
    assert b"Subject: keep" in upstream.messages[0].data
    assert os.listdir(tmp_path / "queue" / "msg") == []


def test_queue_commands_without_a_daemon(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, smtp_route("staff", '["*"]', 1))
    spool = Spool(tmp_path / "queue")
    spool.create()
    entry = spool.store_sync("a@business.com", ["x@example.com"], message())
    entry.next_attempt = 9e9
    spool.save_state(entry)
    assert relayd_cli("queue", "retry", entry.id, "-c", str(cfg)).returncode == 0
    assert spool.load(entry.id).next_attempt == 0
    deleted = relayd_cli("queue", "delete", entry.id, "-c", str(cfg))
    assert deleted.returncode == 0
    assert f"{entry.id}: removed from the queue: deleted by the admin" in deleted.stdout
    assert spool.ids() == []
    [record] = list(read(tmp_path / "journal", Query(queue_id=entry.id)))
    assert record["event"] == "deleted" and record["to"] == ["x@example.com"]
    bad = relayd_cli("queue", "delete", "../../etc/passwd", "-c", str(cfg))
    assert bad.returncode == 1 and "not a queue id" in bad.stderr


def test_queue_show_is_readable_and_json_on_request(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', 2525))
    spool = Spool(tmp_path / "queue")
    spool.create()
    entry = spool.store_sync("alice@business.com", ["bob@example.com"], message(),
                              client="10.0.0.7", message_id="<m1@test>")
    shown = relayd_cli("queue", "show", entry.id, "-c", str(cfg))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == f"queue id:   {entry.id}"
    assert "route:      staff" in lines
    assert "sender:     <alice@business.com>" in lines
    assert "message-id: <m1@test>" in lines
    assert "  <bob@example.com>  pending" in lines
    assert lines[1].startswith("received:   ") and "from 10.0.0.7" in lines[1]
    assert "{" not in shown.stdout and "null" not in shown.stdout
    raw = json.loads(relayd_cli("queue", "show", entry.id, "--json", "-c", str(cfg)).stdout)
    assert raw["route"] == "staff" and raw["route_pinned"] is False
    assert raw["sender"] == "alice@business.com" and raw["id"] == entry.id


async def test_a_removed_tmp_directory_is_made_again(tmp_path: Path, upstream: Upstream) -> None:
    """1. relayd runs 2. someone removes queue/tmp/ 3. the next message is still accepted
    (not 451 until someone runs mkdir) and delivered."""
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    async with run_service(cfg) as svc:
        (tmp_path / "queue" / "tmp").rmdir()
        assert await send(service_port(svc), "a@business.com", ["x@example.com"],
                          message()) == {}
        await wait_for(lambda: len(upstream.messages) == 1)
    assert (tmp_path / "queue" / "tmp").is_dir()


def test_envelopes_of_any_length_are_read_with_the_right_size(tmp_path: Path) -> None:
    """The envelope line is read with positional reads of 8 KiB: one that spans several of
    them, a message larger than the first read, and one that fits in it all load with their
    exact size and bytes; the state file found by a listing of state/ is read."""
    spool = Spool(tmp_path / "q")
    spool.create()
    many = [f"user{i:05d}@example.com" for i in range(800)]  # an envelope of ~20 KiB
    cases = [(["x@y.com"], b"small\r\n"), (["x@y.com"], b"x" * 20000 + b"\r\n"),
             (many, b"many recipients\r\n"), (many, b"y" * 9000)]
    entries = [spool.store_sync("a@b.com", rcpts, data) for rcpts, data in cases]
    entries[2].attempts = 3
    spool.save_state(entries[2])
    assert spool.state_ids() == {entries[2].id}
    recovered = list(spool.recover())
    assert [e.id for e in recovered] == [e.id for e in entries]
    for again, (rcpts, data) in zip(recovered, cases, strict=True):
        assert again.recipients == rcpts and again.size == len(data)
        assert spool.read_data(again) == data
    assert [e.attempts for e in recovered] == [0, 0, 3, 0]
    assert [e.has_state for e in recovered] == [False, False, True, False]
    assert spool.load(entries[2].id).attempts == 3  # without a listing, it looks


def test_an_envelope_without_its_line_end_is_corrupt(tmp_path: Path) -> None:
    """A message file cut short inside its envelope line (a hand-copied file) is moved to
    corrupt/ at recovery, whatever its length, never loaded as an empty message."""
    spool = Spool(tmp_path / "q")
    spool.create()
    entry = spool.store_sync("a@b.com", ["x@y.com"], b"hi\r\n")
    path = tmp_path / "q" / "msg" / entry.id
    path.write_bytes(path.read_bytes()[:entry.data_offset - 1])
    long = spool.store_sync("a@b.com", [f"u{i}@example.com" for i in range(900)], b"x")
    lpath = tmp_path / "q" / "msg" / long.id
    lpath.write_bytes(lpath.read_bytes()[:long.data_offset - 1])
    assert list(spool.recover()) == []
    assert sorted(os.listdir(tmp_path / "q" / "corrupt")) == sorted(
        f"{i}.{ext}" for i in (entry.id, long.id) for ext in ("msg", "why"))


def test_recovery_removes_state_files_whose_message_is_gone(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "q")
    spool.create()
    kept = spool.store_sync("a@b.com", ["x@y.com"], b"hi\r\n")
    gone = spool.store_sync("a@b.com", ["x@y.com"], b"hi\r\n")
    spool.save_state(kept)
    spool.save_state(gone)
    os.unlink(tmp_path / "q" / "msg" / gone.id)
    assert [e.id for e in spool.recover()] == [kept.id]
    assert os.listdir(tmp_path / "q" / "state") == [kept.id]


# -- spent message files kept for reuse (relayd.queue.spares) ----------------------------------


def _spares(queue: Path) -> dict[int, os.stat_result]:
    """The spares in tmp/, by inode."""
    found = {}
    for p in (queue / "tmp").iterdir():
        if p.name.startswith("spare."):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue  # taken, or claimed to be emptied, meanwhile
            found[st.st_ino] = st
    return found


def _numbered(i: int) -> bytes:
    return message(subject=f"n{i}", body=f"message {i}\r\n" + ("x" * 68 + "\r\n") * (i * 10))


async def _queue_empty(queue: Path) -> None:
    await wait_for(lambda: not any((queue / "msg").iterdir()), what="an empty msg/")


async def _deliver_into_spares(port: int, upstream: Upstream, queue: Path,
                               messages: list[bytes]) -> dict[int, os.stat_result]:
    """Queue `messages` with the upstream down, bring it up, and wait until all are delivered
    and their files are spares; those spares."""
    await upstream.stop()
    for data in messages:
        assert await send(port, "a@business.com", ["x@example.com"], data) == {}
    await upstream.start()
    await wait_for(lambda: len(upstream.messages) == len(messages))
    await _queue_empty(queue)
    await wait_for(lambda: len(_spares(queue)) == len(messages), what="a spare each")
    return _spares(queue)


def _emptied(queue: Path) -> bool:
    return all(st.st_size == 0 for st in _spares(queue).values())


async def test_spent_message_files_are_reused_not_recreated(
        tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    """1. ten messages of growing size queued while the upstream is down, then delivered:
    their files wait in tmp/ as spares, 0600, and are emptied within SPARE_SCRUB_S (nothing
    of a delivered message stays readable longer) 2. five more, the shortest first, one
    after the other: each is stored in one of those files and gives it back (the same ten
    inodes afterwards, none new), and all arrive byte-identical."""
    monkeypatch.setattr(relayd.queue.spares, "SPARE_SCRUB_S", 0.5)
    queue = tmp_path / "queue"
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    sent = [_numbered(i) for i in range(10)] + [_numbered(i) for i in range(5)]
    async with run_service(cfg) as svc:
        port = service_port(svc)
        first = await _deliver_into_spares(port, upstream, queue, sent[:10])
        assert sys.platform == "win32" or all(st.st_mode & 0o777 == 0o600
                                              for st in first.values())
        # The same files, emptied in place.
        await wait_for(lambda: _emptied(queue) and set(_spares(queue)) == set(first),
                       timeout=5, what="the spares emptied")
        for data in sent[10:]:
            assert await send(port, "a@business.com", ["x@example.com"], data) == {}
        await wait_for(lambda: len(upstream.messages) == 15)
        await _queue_empty(queue)
        await wait_for(lambda: len(_spares(queue)) == 10, what="the five back as spares")
        assert set(_spares(queue)) == set(first)
    assert sorted(m.data for m in upstream.messages[:10]) == sorted(sent[:10])
    # Each stored after the one before was acknowledged, but delivered concurrently: the
    # order of arrival is not the point (under Wine n3 once overtook n2), the bytes are.
    assert sorted(m.data for m in upstream.messages[10:]) == sorted(sent[10:])


async def test_a_spare_reused_before_it_is_emptied_keeps_nothing_of_its_last_message(
        tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    """Spares not yet scrubbed still hold the bytes of the messages delivered from them: 1.
    ten messages of growing size delivered, their ten spares still full 2. five shorter
    ones queued with the upstream down are stored in those files (their state files take the
    other five), each file exactly its envelope and its message, no byte of the longer
    message after them 3. delivered from there, they arrive byte-identical, and their files
    are spares again, still full 4. when relayd stops, every spare is emptied."""
    monkeypatch.setattr(relayd.queue.spares, "SPARE_SCRUB_S", 600.0)
    queue = tmp_path / "queue"
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    longer = [_numbered(i) for i in range(10, 20)]
    shorter = [_numbered(i) for i in range(5)]
    async with run_service(cfg) as svc:
        port = service_port(svc)
        first = await _deliver_into_spares(port, upstream, queue, longer)
        assert all(st.st_size > len(shorter[-1]) + 1000 for st in first.values())
        await upstream.stop()
        for data in shorter:
            assert await send(port, "a@business.com", ["x@example.com"], data) == {}
        stored = {p.stat().st_ino: p.read_bytes() for p in (queue / "msg").iterdir()}
        assert len(stored) == 5 and set(stored) <= set(first)
        await upstream.start()
        await wait_for(lambda: len(upstream.messages) == 15)
        await _queue_empty(queue)
        await wait_for(lambda: set(stored) <= set(_spares(queue)), what="the five as spares")
        assert not _emptied(queue)
    delivered = [m.data for m in upstream.messages[10:]]
    assert sorted(delivered) == sorted(shorter)
    assert sorted(raw.split(b"\n", 1)[1] for raw in stored.values()) == sorted(delivered)
    assert _emptied(queue), "spares left with a delivered message's bytes after the stop"


def test_delivered_files_are_removed_in_batches_and_none_is_left_at_close(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's spool gathers removals (one wake of its writer thread for many): 1. with
    REMOVE_DELAY_S long, 31 removals wait 2. the 32nd (REMOVE_BATCH) sends all of them
    3. three more wait, and close() removes them before it returns (a file left in msg/
    would be delivered again after the restart) 4. a lone removal goes once its delay is
    up."""
    monkeypatch.setattr(relayd.queue.commit, "REMOVE_DELAY_S", 30.0)
    spool = Spool(tmp_path / "q", keep_spares=True)
    spool.create()
    ids = [spool.store_sync("a@b.com", ["x@y.com"], message(subject=str(i))).id
           for i in range(35)]
    msg = spool.msg_dir
    for queue_id in ids[:31]:
        spool.remove(queue_id, has_state=False)
    time.sleep(0.3)
    assert len(list(msg.iterdir())) == 35  # gathered, not yet due
    spool.remove(ids[31], has_state=False)
    deadline = time.monotonic() + 10
    while len(list(msg.iterdir())) > 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(p.name for p in msg.iterdir()) == sorted(ids[32:])
    for queue_id in ids[32:]:
        spool.remove(queue_id, has_state=False)
    spool.close()
    assert list(msg.iterdir()) == []
    monkeypatch.setattr(relayd.queue.commit, "REMOVE_DELAY_S", 0.05)
    again = Spool(tmp_path / "q", keep_spares=True)
    lone = again.store_sync("a@b.com", ["x@y.com"], message(subject="lone")).id
    again.remove(lone, has_state=False)
    deadline = time.monotonic() + 10
    while (msg / lone).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not (msg / lone).exists()
    again.close()


def test_removals_handed_over_while_others_are_done_are_done_before_close_returns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer thread is removing a batch; three more removals come, then close(). Those
    three must be done before close() returns too (seen in the suite: the thread stopped
    after its batch, and three delivered messages stayed in msg/, to be delivered again after
    the restart). The first removal is held until the rest have been handed over."""
    monkeypatch.setattr(relayd.queue.commit, "REMOVE_DELAY_S", 0.0)
    spool = Spool(tmp_path / "q", keep_spares=True)
    spool.create()
    ids = [spool.store_sync("a@b.com", ["x@y.com"], message(subject=str(i))).id
           for i in range(4)]
    assert spool.spares is not None
    keep = spool.spares.keep
    busy, go = threading.Event(), threading.Event()

    def slow_keep(path: str, size: int | None = None) -> bool:
        busy.set()
        go.wait(10)
        return keep(path, size)

    monkeypatch.setattr(spool.spares, "keep", slow_keep)
    spool.remove(ids[0], has_state=False)
    assert busy.wait(10)  # the writer thread is in its batch
    for queue_id in ids[1:]:
        spool.remove(queue_id, has_state=False)
    closer = threading.Thread(target=spool.close)
    closer.start()
    time.sleep(0.1)  # close() is waiting for the thread
    go.set()
    closer.join(30)
    assert not closer.is_alive()
    assert list(spool.msg_dir.iterdir()) == []


async def test_spares_are_bounded(tmp_path: Path, upstream: Upstream,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Past SPARES_MAX spares, spent files are unlinked as before: tmp/ does not grow with
    the traffic."""
    monkeypatch.setattr(relayd.queue.spares, "SPARES_MAX", 3)
    monkeypatch.setattr(relayd.queue.spares, "SPARES_COUNT_EVERY", 1)
    queue = tmp_path / "queue"
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    async with run_service(cfg) as svc:
        port = service_port(svc)
        await asyncio.gather(*(send(port, "a@business.com", ["x@example.com"], _numbered(i))
                               for i in range(12)))
        await wait_for(lambda: len(upstream.messages) == 12)
        await _queue_empty(queue)
        await asyncio.sleep(0.2)
        assert 1 <= len(_spares(queue)) <= 3
        assert sorted(p.name for p in (queue / "tmp").iterdir()
                      if not p.name.startswith("spare.")) == []


@pytest.mark.skipif(sys.platform == "win32", reason="listener workers are POSIX only")
async def test_listener_workers_take_the_main_process_spares(tmp_path: Path,
                                                            upstream: Upstream) -> None:
    """workers = 3: the main process delivers and keeps the spent files; the two listener
    workers, other processes, claim them (a rename only one can win) for the next messages:
    the second round makes no new file, and every message arrives once, byte-identical."""
    queue = tmp_path / "queue"
    port = free_port()
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       listen=f"127.0.0.1:{port}", server="workers = 3")
    sent = [_numbered(i) for i in range(8)] + [_numbered(i) for i in range(8)]
    async with daemon(cfg, port, tmp_path / "relayd.log"):
        first = set(await _deliver_into_spares(port, upstream, queue, sent[:8]))
        for data in sent[8:]:
            await asyncio.sleep(relayd.queue.spares.SPARES_SCAN_S)  # a worker looks again
            assert await send(port, "a@business.com", ["x@example.com"], data) == {}
        await wait_for(lambda: len(upstream.messages) == 16)
        await _queue_empty(queue)
        await wait_for(lambda: len(_spares(queue)) == 8, what="the eight back as spares")
        assert set(_spares(queue)) == first
    assert sorted(m.data for m in upstream.messages) == sorted(sent)


def test_a_large_spare_is_emptied_at_once_a_small_one_when_its_time_comes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1. a file of SPARE_FULL_MAX bytes kept as a spare keeps them (the next message
    overwrites them) 2. one a byte larger, or of a size not given, is emptied as it is kept
    (spares never hold more than SPARES_MAX small files' worth of disk) 3. a scrub pass that
    is due empties the small one."""
    monkeypatch.setattr(relayd.queue.spares, "SPARE_SCRUB_S", 0.0)
    tmp, msg = tmp_path / "tmp", tmp_path / "msg"
    tmp.mkdir()
    msg.mkdir()
    spares = relayd.queue.spares.Spares(tmp)
    full_max = relayd.queue.spares.SPARE_FULL_MAX
    sizes = {"small": full_max, "large": full_max + 1, "unknown": 10}
    inodes = {}
    for name, size in sizes.items():
        (msg / name).write_bytes(b"x" * size)
        inodes[(msg / name).stat().st_ino] = name
        assert spares.keep(str(msg / name), None if name == "unknown" else size)

    def kept() -> dict[str, int]:
        return {inodes[p.stat().st_ino]: p.stat().st_size for p in tmp.iterdir()}

    assert kept() == {"small": sizes["small"], "large": 0, "unknown": 0}
    spares.scrub(time.monotonic() + relayd.queue.spares.SCRUB_EVERY_S, None)
    assert kept() == {"small": 0, "large": 0, "unknown": 0}
    assert all(p.name.startswith("spare.") for p in tmp.iterdir())


def test_spares_another_process_took_are_listed_again_not_replaced(tmp_path: Path) -> None:
    """Listener workers each keep the list of spares they last saw in tmp/. 1. the delivering
    process keeps three spent files 2. worker A lists them and claims one 3. worker B claims the
    other two, still on A's list 4. a fourth is kept under a new name 5. A's next claim fails
    on both stale names, lists tmp/ again at once and takes the fourth, rather than creating a
    new file (each new file is the inode allocation spares exist to avoid)."""
    tmp, msg = tmp_path / "tmp", tmp_path / "msg"
    tmp.mkdir()
    msg.mkdir()
    keeper, a, b = (relayd.queue.spares.Spares(tmp) for _ in range(3))
    for i in range(3):
        (msg / f"M{i}").write_bytes(b"delivered\r\n" * 10)
        assert keeper.keep(str(msg / f"M{i}"))
    for spares, name in ((a, "A1"), (b, "B1"), (b, "B2")):
        taken = spares.take(name)
        assert taken is not None
        os.close(taken[0])
    (msg / "M3").write_bytes(b"delivered too\r\n")
    assert keeper.keep(str(msg / "M3"))
    fourth = {p.stat().st_ino for p in tmp.iterdir() if p.name.startswith("spare.")}
    assert len(fourth) == 1
    taken = a.take("A2")
    assert taken is not None
    os.close(taken[0])
    assert os.stat(taken[1]).st_ino in fourth and os.stat(taken[1]).st_size == 0
    assert not any(p.name.startswith("spare.") for p in tmp.iterdir())
