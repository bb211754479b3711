"""sd_notify over a real AF_UNIX datagram socket, path and abstract namespace."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayd import sdnotify as notify


def _recv(sock: socket.socket) -> str:
    sock.settimeout(5)
    return sock.recv(4096).decode()


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"relayd-test-{os.getpid()}-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


def test_ready_with_status(path_socket: socket.socket) -> None:
    assert notify.ready("listening on 127.0.0.1:2525")
    assert _recv(path_socket) == "READY=1\nSTATUS=listening on 127.0.0.1:2525"


def test_each_message(path_socket: socket.socket) -> None:
    assert notify.stopping()
    assert _recv(path_socket) == "STOPPING=1"
    assert notify.watchdog()
    assert _recv(path_socket) == "WATCHDOG=1"
    assert notify.reloading()
    assert _recv(path_socket) == "RELOADING=1"
    assert notify.status("3 queued\n1 deferred")
    assert _recv(path_socket) == "STATUS=3 queued 1 deferred"


def test_abstract_namespace(abstract_socket: socket.socket) -> None:
    assert notify.ready()
    assert _recv(abstract_socket) == "READY=1"


def test_noop_without_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready() is False
    assert notify.watchdog() is False


def test_unreachable_socket_does_not_raise(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert notify.ready() is False


def test_rejects_malformed_assignment(path_socket: socket.socket) -> None:
    with pytest.raises(ValueError):
        notify.notify("READY=1\nMAINPID=1")


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert notify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert notify.watchdog_timeout() == 30.0
    assert notify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert notify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    for bad in ("0", "-5", "soon"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert notify.watchdog_interval() is None


async def test_watchdog_loop_pings(path_socket: socket.socket,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")   # 0.1 s: pings every 0.05 s
    task = asyncio.create_task(notify.watchdog_loop())
    try:
        path_socket.setblocking(False)
        loop = asyncio.get_running_loop()
        pings = [await asyncio.wait_for(loop.sock_recv(path_socket, 64), 5) for _ in range(3)]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert pings == [b"WATCHDOG=1"] * 3


async def test_watchdog_loop_returns_when_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    await asyncio.wait_for(notify.watchdog_loop(), 1)
