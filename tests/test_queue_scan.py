"""The queue manager's scan of msg/: a message stored by a listener worker whose report never
reached the queue manager is still delivered, without a restart, and only once."""

from __future__ import annotations

import asyncio
import os
import resource
import smtplib
from pathlib import Path

import pytest
from conftest import Upstream, daemon, free_port, message, send, smtp_route, wait_for, write_config
from test_workers import worker_pids

from relayd.qmgr.manager import SCAN_INTERVAL_S, SCAN_MIN_AGE_S

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
        await asyncio.sleep(SCAN_INTERVAL_S + 1)  # another scan: a duplicate would show now
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
