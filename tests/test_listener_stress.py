"""Clients that vanish at every stage of a session, in OpenSMTPD's manner (regress
smtp_tester.py): afterwards relayd serves, tmp/ is empty and the spool holds exactly the
messages that got 250."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import (
    Upstream,
    message,
    run_service,
    send,
    service_port,
    smtp_route,
    tmp_leftovers,
    wait_for,
    write_config,
)

from relayd.config import load_config

THREADS = 8
ROUNDS = 3
STAGES = ["banner", "ehlo", "mail", "rcpt", "data", "mid-data", "end-of-data", "quit"]


def read_reply(sock: socket.socket) -> bytes:
    out = b""
    while True:
        line = b""
        while not line.endswith(b"\n"):
            chunk = sock.recv(1)
            if not chunk:
                return out + line
            line += chunk
        out += line
        if len(line) < 4 or line[3:4] != b"-":
            return out


def session(port: int, stage: str, n: int) -> bool:
    """One session that stops after `stage` with a reset (RST, no QUIT unless that is the
    stage); True when its message got 250."""
    steps = [b"EHLO stress\r\n", f"MAIL FROM:<s{n}@business.com>\r\n".encode(),
             b"RCPT TO:<x@example.com>\r\n", b"DATA\r\n"]
    body = message(sender=f"s{n}@business.com", body="x" * 70 + "\r\n") * 3
    queued = False
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        read_reply(sock)
        if stage == "banner":
            return False
        for step, name in zip(steps, ["ehlo", "mail", "rcpt", "data"], strict=True):
            sock.sendall(step)
            read_reply(sock)
            if stage == name:
                return False
        sock.sendall(body[: len(body) // 2])
        if stage == "mid-data":
            return False
        sock.sendall(body[len(body) // 2:] + b".\r\n")
        queued = read_reply(sock).startswith(b"250 ")
        if stage == "quit":
            sock.sendall(b"QUIT\r\n")
            read_reply(sock)
        return queued
    finally:
        # SO_LINGER 0: the close is a reset, the rudest way to go.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


async def test_disconnects_at_every_stage_leave_exactly_the_accepted_messages(
        tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    """1. upstream down, so the spool keeps what was accepted 2. 8 threads x 8 stages x 3
    rounds of sessions that reset at their stage 3. relayd still serves 4. tmp/ is empty
    5. the spool holds exactly the messages that got 250 6. not one traceback was logged (a
    reset once left "Future exception was never retrieved" for the garbage collector)."""
    await upstream.stop()
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       queue='retry_min = "1h"\nretry_max = "1h"')
    async with run_service(load_config(cfg)) as svc:
        port = service_port(svc)
        jobs = [(stage, i * len(STAGES) + s) for i in range(THREADS * ROUNDS)
                for s, stage in enumerate(STAGES)]
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(THREADS) as pool:
            results = await asyncio.wait_for(asyncio.gather(*(
                loop.run_in_executor(pool, session, port, stage, n) for stage, n in jobs)), 60)
        accepted = sum(results)
        assert accepted == THREADS * ROUNDS * 2  # "end-of-data" and "quit" sessions
        await send(port, "after@business.com", ["x@example.com"], message())
        assert len(svc.spool.ids()) == accepted + 1
        assert tmp_leftovers(tmp_path / "queue") == []
        await wait_for(lambda: not svc.sessions, timeout=5, what="every reset noticed")
    gc.collect()  # where a never-retrieved exception would be logged
    await asyncio.sleep(0)
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR
           or "never retrieved" in r.getMessage()]
    assert bad == [], [r.getMessage() for r in bad]
