"""Each process role of `relayd serve` (relayd.app) started on its own and stopped by SIGTERM
with nothing lost: the main process alone (server.workers = 1: it listens and delivers), and
the main process with one listener worker (server.workers = 2: the worker holds every SMTP
session, the main process delivers what it reports)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections import Counter
from pathlib import Path

import pytest
from conftest import Upstream, daemon, free_port, message, send, smtp_route, wait_for, write_config

pytestmark = pytest.mark.skipif(os.name == "nt", reason="SIGTERM to a child and listener "
                                "workers are POSIX (the Windows service's stop: tests/windows)")

SUBJECTS = [f"role-{i}" for i in range(5)]


def subjects(upstream: Upstream) -> Counter[str]:
    return Counter(m.data.split(b"Subject: ")[1].split(b"\r\n")[0].decode()
                   for m in upstream.messages)


@pytest.mark.parametrize("workers", [1, 2], ids=["main-process-alone", "one-listener-worker"])
async def test_a_role_stopped_by_sigterm_loses_nothing(tmp_path: Path, upstream: Upstream,
                                                       workers: int) -> None:
    """1. the role alone (workers = 1) or with one listener worker (workers = 2); the
    upstream holds its DATA replies 2. five messages, the last accepted just before SIGTERM
    3. the upstream answers; relayd drains and exits 0: each message delivered, or still in
    the spool 4. restart: every message delivered to the recording upstream exactly once,
    the spool empty."""
    port = free_port()
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       listen=f"127.0.0.1:{port}", server=f"workers = {workers}")
    log = tmp_path / "relayd.log"
    spool = tmp_path / "queue" / "msg"
    release = asyncio.Event()
    handler = upstream.handler
    original = handler.handle_DATA

    async def held_data(*args: object) -> str:
        await release.wait()
        return await original(*args)  # type: ignore[arg-type]

    handler.handle_DATA = held_data  # type: ignore[method-assign]
    async with daemon(cfg, port, log) as proc:
        if workers > 1:
            await wait_for(lambda: "worker 1 started" in log.read_text(), what="worker start")
        for s in SUBJECTS:
            refused = await send(port, "alice@business.com", ["bob@example.com"],
                                 message(subject=s))
            assert refused == {}
        proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: "draining" in log.read_text(), what="the drain to start")
        release.set()
        assert await asyncio.to_thread(proc.wait, 45) == 0, log.read_text()
    handler.handle_DATA = original  # type: ignore[method-assign]
    delivered = subjects(upstream)
    assert all(n == 1 for n in delivered.values()), delivered
    assert sum(delivered.values()) + len(os.listdir(spool)) == len(SUBJECTS), log.read_text()
    text = log.read_text()
    if workers > 1:
        [pid] = re.findall(r"worker 1 started \(pid (\d+)\)", text)
        assert not os.path.exists(f"/proc/{pid}")  # the worker stopped with it
    else:
        assert "worker 1 started" not in text  # one process: it listened itself
    async with daemon(cfg, port, log) as proc:
        await wait_for(lambda: sum(subjects(upstream).values()) >= len(SUBJECTS)
                       and not os.listdir(spool), timeout=30, what="everything delivered")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 45) == 0, log.read_text()
    assert subjects(upstream) == Counter(SUBJECTS)
