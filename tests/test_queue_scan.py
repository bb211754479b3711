"""The queue manager's scan of msg/: a message stored by a listener worker whose report never
reached the queue manager is still delivered, without a restart, and only once."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import smtplib
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Upstream,
    arelayd_cli,
    daemon,
    free_port,
    message,
    run_service,
    send,
    service_port,
    smtp_route,
    wait_for,
    write_config,
)
from test_workers import worker_pids

from relayd.qmgr.control import SCAN_INTERVAL_S, SCAN_MIN_AGE_S
from relayd.queue import Spool

# The bound: scheduled within 60 s of the starvation ending.
WITHIN_S = 60.0
assert SCAN_INTERVAL_S + SCAN_MIN_AGE_S < WITHIN_S / 2


def arrived(upstream: Upstream, subject: str) -> int:
    return sum(1 for m in upstream.messages if f"Subject: {subject}".encode() in m.data)


def config(tmp_path: Path, upstream: Upstream, server: str = "") -> tuple[int, Path, Path]:
    port = free_port()
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       listen=f"127.0.0.1:{port}", server="workers = 2\n" + server)
    return port, cfg, tmp_path / "relayd.log"


async def test_a_worker_killed_between_its_fsync_and_its_report_loses_nothing(
        tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    """1. workers = 2, the listener worker kills itself (SIGKILL) right after the message is
    on disk and before its report 2. the client sees the connection drop 3. no restart of the
    main process: the message is delivered within 60 s, once, and one log line says so."""
    port, cfg, log = config(tmp_path, upstream)
    monkeypatch.setenv("RELAYD_CRASH_AT", "accepted")  # reached only in a listener worker
    async with daemon(cfg, port, log) as proc:
        await wait_for(lambda: len(worker_pids(log)) == 1, what="the worker starts")
        with pytest.raises((smtplib.SMTPException, OSError)):
            await send(port, "alice@business.com", ["bob@example.com"],
                       message(subject="orphan"))
        assert os.listdir(tmp_path / "queue" / "msg"), "stored before the kill"
        await wait_for(lambda: arrived(upstream, "orphan") > 0, timeout=WITHIN_S,
                       what="the orphaned message delivered")
        await asyncio.sleep(2)  # time for a duplicate to show (repeated scans: the test below)
        assert proc.poll() is None
        text = log.read_text()
    assert arrived(upstream, "orphan") == 1
    assert text.count("were not scheduled") == 1, text
    assert "relayd started" in text and text.count("relayd started") == 1
    assert not os.listdir(tmp_path / "queue" / "msg")


async def test_a_report_that_arrives_while_the_main_process_is_out_of_descriptors(
        tmp_path: Path, upstream: Upstream) -> None:
    """1. workers = 2; the main process's descriptor limit is lowered and its metrics port
    held open until accept() fails 2. a message through the worker: 250, and its report comes
    in while the main process cannot open the message file 3. the connections go: the message
    is delivered within 60 s, once, without a restart."""
    metrics_port = free_port()
    port, cfg, log = config(tmp_path, upstream)
    cfg.write_text(cfg.read_text() + f'\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n')
    async with daemon(cfg, port, log) as proc:
        await wait_for(lambda: len(worker_pids(log)) == 1, what="the worker starts")
        fds = f"/proc/{proc.pid}/fd"
        hard = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)[1]
        # Room for a few more than it holds now (the worker's pipe, the listeners) and no more.
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE,
                         (max(int(n) for n in os.listdir(fds)) + 8, hard))
        writers: list[asyncio.StreamWriter] = []
        try:
            for _ in range(40):  # bounded: far more than the 8 spare descriptors
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", metrics_port), 5)
                writers.append(writer)
            await wait_for(lambda: "out of system resource" in log.read_text()
                           or "Too many open files" in log.read_text(),
                           what="the main process out of descriptors")
            refused = await send(port, "alice@business.com", ["bob@example.com"],
                                 message(subject="starved"))
            assert refused == {}
            await wait_for(lambda: "cannot be read yet" in log.read_text(),
                           what="the report that could not be read")
            assert arrived(upstream, "starved") == 0
        finally:
            for writer in writers:
                writer.close()
        await wait_for(lambda: arrived(upstream, "starved") > 0, timeout=WITHIN_S,
                       what="the message delivered once descriptors are back")
        await asyncio.sleep(2)  # time for a duplicate to show
        assert proc.poll() is None
        text = log.read_text()
    assert arrived(upstream, "starved") == 1
    assert text.count("relayd started") == 1
    assert not os.listdir(tmp_path / "queue" / "msg")


def orphan(tmp_path: Path, subject: str) -> str:
    """A message stored as a listener worker stores it, whose report never came: written to
    msg/ by a Spool of its own, last written a minute ago. Its queue id."""
    spool = Spool(tmp_path / "queue")
    entry = spool.store_sync("alice@business.com", ["carol@example.com"],
                              message(subject=subject), client="127.0.0.1")
    old = time.time() - 60
    os.utime(spool.msg_dir / entry.id, (old, old))
    return entry.id


async def test_the_scan_takes_an_unknown_entry_and_never_one_that_is_active(
        tmp_path: Path, upstream: Upstream) -> None:
    """1. upstream holds every DATA 2. message A accepted: active, its attempt waiting
    3. message B written to msg/ with no report 4. a scan takes B and not A; a second scan
    takes nothing 5. the upstream answers: A and B each delivered once."""
    gate = asyncio.Event()
    handle_data = upstream.handler.handle_DATA

    async def held(*args: Any) -> str:
        await gate.wait()
        return await handle_data(*args)

    upstream.handler.handle_DATA = held  # type: ignore[method-assign]
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    async with run_service(cfg) as svc:
        await send(service_port(svc), "alice@business.com", ["bob@example.com"],
                   message(subject="active"))
        await wait_for(lambda: any(q.active for q in svc.qmgr.view.messages()),
                       what="A's attempt under way")
        b = orphan(tmp_path, "orphan")
        assert await svc.qmgr.scan() == 1
        assert svc.qmgr.view.has(b) and svc.qmgr.view.count() == 2
        assert await svc.qmgr.scan() == 0
        gate.set()
        await wait_for(lambda: len(upstream.messages) == 2 and not svc.qmgr.view.count(),
                       what="both delivered")
        assert await svc.qmgr.scan() == 0
        await asyncio.sleep(0.5)
    assert arrived(upstream, "active") == 1 and arrived(upstream, "orphan") == 1


async def test_queue_retry_all_reaches_an_entry_nobody_scheduled(
        tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    """1. relayd running, a message in msg/ whose report was lost 2. `relayd queue retry
    --all`: the retry counts it (the scan ran first) and it is delivered, once."""
    caplog.set_level(logging.INFO)
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    async with run_service(cfg) as svc:
        orphan(tmp_path, "retried")
        out = await arelayd_cli("queue", "retry", "--all", "-c", str(cfg))
        assert out.returncode == 0, out.stderr
        await wait_for(lambda: arrived(upstream, "retried") == 1 and not svc.qmgr.view.count(),
                       what="delivered")
    said = [r.getMessage() for r in caplog.records]
    assert "queue: retry requested for all 1 message(s)" in said, said
    assert sum(1 for m in said if "were not scheduled" in m) == 1
    assert arrived(upstream, "retried") == 1
