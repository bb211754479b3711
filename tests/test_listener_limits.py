"""Session limits: server.max_sessions, server.max_sessions_per_client (421 4.7.0 and close, as
Postfix does) and server.session_timeout; the server keys they come from."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Upstream,
    message,
    read_reply,
    run_service,
    send,
    service_port,
    smtp_route,
    wait_for,
    write_config,
)

from relayd.config import (
    DEFAULT_MAX_SESSIONS,
    DEFAULT_MAX_SESSIONS_PER_CLIENT,
    DEFAULT_SESSION_TIMEOUT_S,
    ConfigError,
    ServerConfig,
    load_config,
)
from relayd.limits import (
    IDLE_GIVE_WAY_S,
    REPLY_TOO_MANY_FROM_YOU,
    REPLY_TOO_MANY_SESSIONS,
    SessionLimits,
)

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def connections() -> AsyncIterator[list[Conn]]:
    """Open connections, all closed at the end."""
    opened: list[Conn] = []
    try:
        yield opened
    finally:
        for _, writer in opened:
            writer.close()


async def connect(port: int, opened: list[Conn], local_host: str = "127.0.0.1") -> bytes:
    """Connect, return the greeting (or the 421 refusal)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                   local_addr=(local_host, 0))
    opened.append((reader, writer))
    return await read_reply(reader, timeout=10)


def limits_config(tmp_path: Path, upstream: Upstream, server: str) -> Path:
    return write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                        server=server)


async def test_beyond_max_sessions_new_connections_get_421(
        tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    """1. max_sessions = 5 2. eight idle connections at once: five greeted, three get
    421 4.7.0 and are closed 3. one idle session ends 4. a normal client is served."""
    cfg = limits_config(tmp_path, upstream, "max_sessions = 5")
    async with run_service(cfg) as svc, connections() as opened:
        port = service_port(svc)
        greetings = await asyncio.gather(*(connect(port, opened) for _ in range(8)))
        assert sorted(g[:4] for g in greetings) == [b"220 "] * 5 + [b"421 "] * 3
        assert all(g.startswith(b"421 4.7.0 Too many connections;") for g in greetings
                   if g.startswith(b"421"))
        # The refused ones are closed by relayd; the greeted ones stay open.
        ends = await asyncio.gather(*(asyncio.wait_for(r.read(), 0.5) for r, _ in opened),
                                    return_exceptions=True)
        assert sum(1 for end in ends if end == b"") == 3
        assert sum(1 for end in ends if isinstance(end, asyncio.TimeoutError)) == 5
        assert len(svc.sessions) == 5
        idle = next(w for (_, w), end in zip(opened, ends, strict=True) if end != b"")
        idle.close()
        await wait_for(lambda: len(svc.sessions) == 4, timeout=5, what="the session to end")
        started = time.monotonic()
        await send(port, "ok@business.com", ["x@example.com"], message())
        assert time.monotonic() - started < 1.0
        await wait_for(lambda: len(upstream.messages) == 1)
    limit_lines = [r for r in caplog.records if "server.max_sessions" in r.getMessage()]
    assert len(limit_lines) == 1 and limit_lines[0].levelno == logging.WARNING


class _Standing:
    """A session as SessionLimits sees it: its client, and how long it has been idle."""

    def __init__(self, client: str, idle_s: float = 0.0) -> None:
        self.client = client
        self.active_at = -idle_s
        self.closed = False

    def idle_for(self) -> float:
        return -self.active_at

    def give_way(self) -> None:
        self.closed = True


def test_per_client_limit_counts_other_addresses_and_exempts_loopback() -> None:
    """The decision alone (tests run on loopback, which the limit exempts): three sessions per
    client, five in all. 192.0.2.7's fourth is refused; 198.51.100.9 may have two more; a
    loopback client is never refused for its own count, only at max_sessions."""
    limits = SessionLimits(ServerConfig(max_sessions=5, max_sessions_per_client=3))
    sessions: set[Any] = {_Standing("192.0.2.7") for _ in range(3)}
    assert limits.refusal(sessions, "192.0.2.7") == REPLY_TOO_MANY_FROM_YOU
    assert limits.refusal(sessions, "198.51.100.9") is None
    loopback: set[Any] = {_Standing("127.0.0.1") for _ in range(4)}
    assert limits.refusal(loopback, "127.0.0.1") is None
    assert limits.refusal(loopback, "::1") is None
    loopback.add(_Standing("127.0.0.1"))
    assert limits.refusal(loopback, "127.0.0.1") == REPLY_TOO_MANY_SESSIONS


def test_at_max_sessions_the_idlest_free_session_gives_way() -> None:
    """Five in all: sessions idle 30 s, 20 s and 5 s and two busy ones. A newcomer closes the
    30 s one; the next closes the 20 s one; the next is refused (nobody idle 10 s)."""
    limits = SessionLimits(ServerConfig(max_sessions=5))
    idle30, idle20, idle5 = _Standing("192.0.2.1", 30), _Standing("192.0.2.2", 20), \
        _Standing("192.0.2.3", 5)
    sessions: set[Any] = {idle30, idle20, idle5, _Standing("192.0.2.4"), _Standing("192.0.2.5")}
    assert limits.refusal(sessions, "192.0.2.9") is None
    assert idle30.closed and idle30 not in sessions and not idle20.closed
    sessions.add(_Standing("192.0.2.9"))
    assert limits.refusal(sessions, "192.0.2.9") is None
    assert idle20.closed and not idle5.closed
    sessions.add(_Standing("192.0.2.9"))
    assert limits.refusal(sessions, "192.0.2.9") == REPLY_TOO_MANY_SESSIONS


async def test_25_idle_loopback_connections_then_a_loopback_client_is_served_at_once(
        tmp_path: Path, upstream: Upstream) -> None:
    """1. default limits (20 sessions per client) 2. 25 idle connections from 127.0.0.1: all
    greeted (loopback is exempt from the per-client limit) 3. a normal client on 127.0.0.1
    is served at once, with the 25 still open."""
    cfg = limits_config(tmp_path, upstream, "")
    async with run_service(cfg) as svc, connections() as opened:
        port = service_port(svc)
        greetings = await asyncio.gather(*(connect(port, opened) for _ in range(25)))
        assert all(g.startswith(b"220 ") for g in greetings), greetings
        refused = await asyncio.wait_for(
            send(port, "ok@business.com", ["x@example.com"], message()), 2)
        assert refused == {}
        await wait_for(lambda: len(upstream.messages) == 1)
        assert len(svc.sessions) == 25


async def test_at_max_sessions_the_idlest_session_gives_way_to_a_new_client(
        tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    """1. max_sessions = 5; five sessions from 127.0.0.2: one mid-transaction (MAIL FROM
    given), then the rest idle 2. after IDLE_GIVE_WAY_S, two of them speak again 3. a normal
    client on 127.0.0.1: served within 2 s; the session idle longest without a transaction
    gets 421 4.7.0 and is closed; the one mid-transaction and the others stay 4. one log
    line."""
    caplog.set_level(logging.INFO)
    cfg = limits_config(tmp_path, upstream, "max_sessions = 5")
    async with run_service(cfg) as svc, connections() as opened:
        port = service_port(svc)
        for _ in range(5):
            assert (await connect(port, opened, "127.0.0.2")).startswith(b"220 ")
        busy, idlest, idle, talk1, talk2 = opened
        for reader, writer in opened:
            writer.write(b"EHLO idle.test\r\n")
            await read_reply(reader)
        busy[1].write(b"MAIL FROM:<ok@business.com>\r\n")
        assert (await read_reply(busy[0])).startswith(b"250")
        await asyncio.sleep(0.05)  # `idle` speaks last: `idlest` is idle longest
        idle[1].write(b"NOOP\r\n")
        await read_reply(idle[0])
        await asyncio.sleep(IDLE_GIVE_WAY_S + 0.5)
        for reader, writer in (talk1, talk2):
            writer.write(b"NOOP\r\n")
            await read_reply(reader)
        refused = await asyncio.wait_for(
            send(port, "ok@business.com", ["x@example.com"], message()), 2)
        assert refused == {}
        said = await asyncio.wait_for(idlest[0].read(), 5)
        assert said.startswith(b"421 4.7.0 "), said
        for reader, writer in (busy, idle, talk1, talk2):
            writer.write(b"NOOP\r\n")
            assert (await read_reply(reader)).startswith(b"250")
        await wait_for(lambda: len(upstream.messages) == 1)
    lines = [r for r in caplog.records if "idle session" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING


async def test_idle_session_closed_after_session_timeout(tmp_path: Path,
                                                         upstream: Upstream) -> None:
    cfg = limits_config(tmp_path, upstream, 'session_timeout = "1s"')
    async with run_service(cfg) as svc, connections() as opened:
        port = service_port(svc)
        started = time.monotonic()
        assert (await connect(port, opened)).startswith(b"220 ")
        reader, writer = opened[0]
        writer.write(b"EHLO client\r\n")
        await read_reply(reader)
        assert (await read_reply(reader, timeout=5)).startswith(b"421 4.4.2 ")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.9 <= time.monotonic() - started < 4
        await send(port, "ok@business.com", ["x@example.com"], message())
        await wait_for(lambda: len(upstream.messages) == 1)


async def test_a_client_that_ends_its_side_is_closed_not_kept(tmp_path: Path,
                                                             upstream: Upstream) -> None:
    """1. a client connects and at once shuts down its sending side (EOF), before or after
    the banner 2. relayd closes the connection too, at once, rather than keeping it half
    open with nobody reading it (aiosmtpd ends the session on EOF but keeps the transport:
    each such client held a descriptor and a session slot until relayd stopped) 3. the
    session count is back to none."""
    import socket

    cfg = limits_config(tmp_path, upstream, "max_sessions = 2")
    loop = asyncio.get_running_loop()
    async with run_service(cfg) as svc:
        port = service_port(svc)
        for eof_first in (True, False, True, False):
            # Connected and shut down without yielding to the loop: the connection waits in
            # the listen backlog with its EOF already there when relayd accepts it.
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setblocking(False)
            if not eof_first:
                assert (await asyncio.wait_for(loop.sock_recv(sock, 512), 5)).startswith(b"220")
            sock.shutdown(socket.SHUT_WR)
            with sock:
                while await asyncio.wait_for(loop.sock_recv(sock, 512), 5):
                    pass  # the banner, then relayd's FIN (a TimeoutError if relayd keeps it)
        await wait_for(lambda: not svc.sessions, what="no sessions left")
        await send(port, "ok@business.com", ["x@example.com"], message())
        await wait_for(lambda: len(upstream.messages) == 1)


def test_server_limit_keys_default_and_validate(tmp_path: Path, upstream: Upstream) -> None:
    assert (ServerConfig().max_sessions, ServerConfig().max_sessions_per_client,
            ServerConfig().session_timeout_s) == (DEFAULT_MAX_SESSIONS,
                                                  DEFAULT_MAX_SESSIONS_PER_CLIENT,
                                                  DEFAULT_SESSION_TIMEOUT_S)
    assert (DEFAULT_MAX_SESSIONS, DEFAULT_MAX_SESSIONS_PER_CLIENT,
            DEFAULT_SESSION_TIMEOUT_S) == (100, 20, 300)
    server = load_config(limits_config(
        tmp_path, upstream, 'max_sessions = 7\nmax_sessions_per_client = 2\n'
        'session_timeout = "90s"\nnull_sender_route = "staff"')).server
    assert (server.max_sessions, server.max_sessions_per_client, server.session_timeout_s,
            server.null_sender_route) == (7, 2, 90.0, "staff")
    with pytest.raises(ConfigError) as e:
        load_config(limits_config(
            tmp_path, upstream, 'max_sessions = 0\nmax_sessions_per_client = "x"\n'
            'session_timeout = "soon"\nnull_sender_route = "nosuch"'))
    problems = "\n".join(e.value.problems)
    assert "server.max_sessions: must be 1-100000" in problems
    assert "server.max_sessions_per_client: must be an integer" in problems
    assert "server.session_timeout: must be a duration" in problems
    assert "server.null_sender_route: no route named 'nosuch'" in problems


def test_unit_gives_room_for_max_sessions() -> None:
    """systemd's default soft limit is 1024 descriptors; the unit raises it well above what
    max_sessions (one descriptor each) and the upstream connections need."""
    from conftest import REPO

    unit = (REPO / "systemd" / "relayd.service").read_text()
    values = [line.split("=", 1)[1] for line in unit.splitlines()
              if line.startswith("LimitNOFILE=")]
    assert len(values) == 1 and int(values[0]) >= 8 * DEFAULT_MAX_SESSIONS


async def test_1100_idle_connections_under_1024_descriptors(tmp_path: Path,
                                                             upstream: Upstream) -> None:
    """The flood from the issue: 1. relayd serve under RLIMIT_NOFILE 1024 (systemd's default)
    2. 1,100 idle connections from 127.0.0.2 3. a hundred (max_sessions; loopback is exempt
    from the per-client limit) are greeted, the rest get 421 4.7.0 4. once they have been
    idle IDLE_GIVE_WAY_S, a normal client on 127.0.0.1 is served within a second (the idlest
    gives way) 5. the log stays short."""
    import resource
    import subprocess
    import sys

    from conftest import REPO, _port_open, free_port

    port = free_port()
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       listen=f"127.0.0.1:{port}")
    log_path = tmp_path / "relayd.log"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "relayd", "serve", "-c", str(cfg)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                preexec_fn=limit)
    try:
        await wait_for(lambda: _port_open(port) or proc.poll() is not None, what="relayd")
        assert proc.poll() is None, log_path.read_text()
        gate = asyncio.Semaphore(200)  # connects in flight at once, within the listen backlog

        async def idle(opened: list[Conn]) -> bytes:
            async with gate:
                return await connect(port, opened, "127.0.0.2")

        async with connections() as opened:
            greetings = await asyncio.wait_for(
                asyncio.gather(*(idle(opened) for _ in range(1100))), 60)
            assert sum(1 for g in greetings if g.startswith(b"220 ")) == 100
            assert sum(1 for g in greetings if g.startswith(
                b"421 4.7.0 Too many connections;")) == 1000
            await asyncio.sleep(IDLE_GIVE_WAY_S)
            started = time.monotonic()
            await send(port, "ok@business.com", ["x@example.com"], message())
            assert time.monotonic() - started < 1.0
            await wait_for(lambda: len(upstream.messages) == 1)
        await asyncio.sleep(0.1)  # let this loop close the idle connections
    finally:
        await stop(proc)
    lines = log_path.read_text().splitlines()
    assert len(lines) < 100, lines[:20]
    assert sum(1 for line in lines if "over server.max_sessions" in line) == 1
    assert sum(1 for line in lines if "closed 1 idle session" in line) == 1
    assert not any("Traceback" in line or "out of system resource" in line for line in lines)


@contextlib.asynccontextmanager
async def out_of_descriptors(tmp_path: Path, upstream: Upstream, server: str = ""
                             ) -> AsyncIterator[tuple[Any, int, Path, list[asyncio.StreamWriter]]]:
    """relayd serve under RLIMIT_NOFILE 64, with session limits set above it, and 120 idle
    connections to it, so that accept() fails with EMFILE: (the process, its port, its log,
    the connections). The process is stopped on the way out if the test has not stopped it."""
    import resource
    import subprocess
    import sys

    from conftest import REPO, _port_open, free_port

    port = free_port()
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       listen=f"127.0.0.1:{port}",
                       server="max_sessions = 1000\nmax_sessions_per_client = 1000\n" + server)
    log_path = tmp_path / "relayd.log"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "relayd", "serve", "-c", str(cfg)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                preexec_fn=limit)
    writers: list[asyncio.StreamWriter] = []
    try:
        await wait_for(lambda: _port_open(port) or proc.poll() is not None, what="relayd")
        assert proc.poll() is None, log_path.read_text()
        for _ in range(120):
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            writers.append(writer)
        yield proc, port, log_path, writers
    finally:
        for writer in writers:
            writer.close()
        if proc.poll() is None:
            await stop(proc)


async def stop(proc: Any) -> None:
    """SIGTERM a relayd started by a test; SIGKILL if it has not stopped in 20 s."""
    import subprocess

    proc.terminate()
    try:
        await asyncio.to_thread(proc.wait, 20)
    except subprocess.TimeoutExpired:
        proc.kill()
        await asyncio.to_thread(proc.wait, 10)


async def test_stopped_while_out_of_descriptors_it_says_nothing_more(
        tmp_path: Path, upstream: Upstream) -> None:
    """1. relayd serve under RLIMIT_NOFILE 64 2. 120 idle connections: accept() fails with
    EMFILE, and asyncio schedules a retry of it a second later for each failure 3. SIGTERM
    while they are due: relayd stops cleanly, and the retries that come due after its server
    closed end quietly (asyncio's own handler logged a ValueError traceback for each)."""
    # The idle sessions time out and the drain ends by then.
    async with out_of_descriptors(tmp_path, upstream, 'session_timeout = "3s"\n') as (
            proc, _, log_path, _):
        await wait_for(lambda: "cannot accept connections" in log_path.read_text(),
                       what="accept() out of descriptors")
        await asyncio.sleep(0.3)
        proc.terminate()
        assert await asyncio.to_thread(proc.wait, 20) == 0, log_path.read_text()[-2000:]
    text = log_path.read_text()
    assert "relayd stopped" in text, text[-2000:]
    assert "Traceback" not in text and "ERROR" not in text, text[-3000:]


async def test_out_of_descriptors_is_one_line_a_minute_and_relayd_recovers(
        tmp_path: Path, upstream: Upstream) -> None:
    """1. relayd serve under RLIMIT_NOFILE 64, with session limits set above it 2. 120 idle
    connections: accept() fails with EMFILE 3. the log says so in one line, without a
    traceback (asyncio's own would repeat every moment); an admin's `relayd queue retry --all`
    meanwhile waits in the control directory, and the queue manager's poll of it says at most
    once, as a warning and not an ERROR, that it cannot read it yet (a poll that falls in a
    moment when a descriptor is free reads it at once) 4. the connections go away: the
    request has been served and a normal client is served."""
    from conftest import arelayd_cli

    async with out_of_descriptors(tmp_path, upstream) as (proc, port, log_path, writers):
        cfg = str(tmp_path / "relayd.toml")
        retried = asyncio.ensure_future(arelayd_cli("queue", "retry", "--all", "-c", cfg))
        await asyncio.sleep(2.5)  # accept() is retried every 1 s meanwhile
        for writer in writers:
            writer.close()
        writers.clear()
        done = await retried
        assert done.returncode == 0, done.stderr
        await asyncio.sleep(0.5)
        await asyncio.wait_for(send(port, "ok@business.com", ["x@example.com"], message()), 20)
        await wait_for(lambda: len(upstream.messages) == 1)
        assert proc.poll() is None
    text = log_path.read_text()
    assert text.count("cannot accept connections") == 1, text[-2000:]
    assert text.count("queue: cannot read control requests yet") <= 1, text[-2000:]
    assert "queue: retry requested for all 0 message(s)" in text, text[-2000:]
    assert "Traceback" not in text and "out of system resource" not in text
    assert "ERROR" not in text, text[-2000:]
