"""`relayd serve` as a real process: kill -9 loses nothing, SIGTERM drains, SIGHUP reloads."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    REPO,
    Upstream,
    daemon,
    free_port,
    message,
    send,
    smtp_route,
    wait_for,
    write_config,
)


async def test_kill_9_loses_no_accepted_message(tmp_path: Path, upstream: Upstream) -> None:
    """1. upstream down 2. 50 messages accepted 3. kill -9 4. restart, upstream up
    5. all 50 delivered, none lost."""
    await upstream.stop()
    port = free_port()
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       listen=f"127.0.0.1:{port}")
    log = tmp_path / "relayd.log"
    subjects = [f"msg-{i:02d}" for i in range(50)]
    async with daemon(cfg, port, log) as proc:
        for s in subjects:
            refused = await send(port, "alice@business.com", ["bob@example.com"],
                                 message(subject=s))
            assert refused == {}
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert len(os.listdir(tmp_path / "queue" / "msg")) == 50
    await upstream.start()
    async with daemon(cfg, port, log):
        await wait_for(lambda: len({m.data for m in upstream.messages}) == 50, timeout=60,
                       what="all 50 delivered after restart")
        await wait_for(lambda: not os.listdir(tmp_path / "queue" / "msg"), what="empty spool")
    got = Counter(m.data.split(b"Subject: ")[1].split(b"\r\n")[0].decode()
                  for m in upstream.messages)
    assert set(got) == set(subjects)
    assert "recovered 50 message(s)" in log.read_text()


async def test_kill_9_during_delivery_delivers_at_least_once(tmp_path: Path,
                                                             upstream: Upstream) -> None:
    """1. upstream slow to answer DATA 2. messages queued and in flight 3. kill -9
    4. restart 5. every message arrives (the ones in flight may arrive twice)."""
    port = free_port()
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       listen=f"127.0.0.1:{port}")
    log = tmp_path / "relayd.log"
    release = asyncio.Event()
    handler = upstream.handler
    original = handler.handle_DATA

    async def slow_data(*args: object) -> str:
        await release.wait()
        return await original(*args)  # type: ignore[arg-type]

    handler.handle_DATA = slow_data  # type: ignore[method-assign]
    async with daemon(cfg, port, log) as proc:
        for i in range(10):
            await send(port, "alice@business.com", ["bob@example.com"],
                       message(subject=f"m{i}"))
        await asyncio.sleep(0.5)  # deliveries are now waiting on the upstream's DATA reply
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    release.set()
    handler.handle_DATA = original  # type: ignore[method-assign]
    async with daemon(cfg, port, log):
        await wait_for(lambda: not os.listdir(tmp_path / "queue" / "msg"), timeout=30,
                       what="empty spool")
    subjects = {m.data.split(b"Subject: ")[1][:2] for m in upstream.messages}
    assert subjects == {f"m{i}".encode() for i in range(10)}


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_serve_runs_on_uvloop_unless_told_asyncio(
        tmp_path: Path, upstream: Upstream, loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """1. `relayd serve` with a listener process and the main one (workers = 2), started
    plain and with RELAYD_EVENT_LOOP=asyncio 2. its start-up line names the loop 3. a
    message through it arrives byte-identical 4. SIGTERM: exit 0."""
    if loop == "asyncio":
        monkeypatch.setenv("RELAYD_EVENT_LOOP", "asyncio")
    else:
        monkeypatch.delenv("RELAYD_EVENT_LOOP", raising=False)
    port = free_port()
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       listen=f"127.0.0.1:{port}", server="workers = 2")
    log = tmp_path / "relayd.log"
    body = message(subject="loop")
    async with daemon(cfg, port, log) as proc:
        await send(port, "alice@business.com", ["bob@example.com"], body)
        await wait_for(lambda: len(upstream.messages) == 1)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0, log.read_text()
    assert f"(event loop: {loop})" in log.read_text()
    assert upstream.messages[0].data == body


async def test_sigterm_drains_and_exits_0(tmp_path: Path, upstream: Upstream) -> None:
    port = free_port()
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       listen=f"127.0.0.1:{port}")
    log = tmp_path / "relayd.log"
    async with daemon(cfg, port, log) as proc:
        for i in range(5):
            await send(port, "alice@business.com", ["bob@example.com"], message(subject=f"{i}"))
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        while proc.poll() is None and time.monotonic() - started < 30:
            await asyncio.sleep(0.05)
        assert proc.returncode == 0, log.read_text()
    assert len(upstream.messages) + len(os.listdir(tmp_path / "queue" / "msg")) >= 5
    assert "draining" in log.read_text()


async def test_sighup_reloads_routes_and_refuses_a_bad_config(tmp_path: Path,
                                                              upstream: Upstream,
                                                              upstream2: Upstream) -> None:
    """1. route to upstream 1 2. SIGHUP with the route moved to upstream 2: new mail goes there
    3. SIGHUP with a broken file: refused, logged, old config still in force."""
    port = free_port()
    listen = f"127.0.0.1:{port}"
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       listen=listen)
    log = tmp_path / "relayd.log"
    async with daemon(cfg, port, log) as proc:
        await send(port, "a@business.com", ["x@example.com"], message(subject="one"))
        await wait_for(lambda: len(upstream.messages) == 1)
        write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream2.port),
                     listen=listen)
        proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: "reload: config applied" in log.read_text(), what="reload")
        await send(port, "a@business.com", ["x@example.com"], message(subject="two"))
        await wait_for(lambda: len(upstream2.messages) == 1, what="delivery on the new route")
        cfg.write_text(cfg.read_text() + "\n[routes.broken]\nupstream = 42\n")
        proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: "reload refused" in log.read_text(), what="refused reload")
        await send(port, "a@business.com", ["x@example.com"], message(subject="three"))
        await wait_for(lambda: len(upstream2.messages) == 2, what="old config still works")
        assert proc.poll() is None
    assert "routes.broken.upstream" in log.read_text()


async def test_json_logs_carry_state_changes_and_never_a_secret(tmp_path: Path,
                                                                upstream: Upstream) -> None:
    """`--log-format json`: one JSON object per line; the route's password appears nowhere,
    not even when the upstream refuses it."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    secret = tmp_path / "pw"
    secret.write_text("Sup3r-Secret-Upstream-PW\n")
    secret.chmod(0o600)
    port = free_port()
    route = smtp_route("staff", '["*@business.com"]', upstream.port,
                       f'username = "relay@business.com"\npassword_file = "{secret}"')
    cfg = write_config(tmp_path, route, listen=f"127.0.0.1:{port}")
    log = tmp_path / "relayd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "relayd", "serve", "-c", str(cfg),
                                 "--log-format", "json"], stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO)
    try:
        await wait_for(lambda: "listening on" in log.read_text(), what="start")
        # The upstream offers no AUTH, so the login fails and the mail is deferred.
        await send(port, "a@business.com", ["x@example.com"], message())
        await wait_for(lambda: "deferred" in log.read_text(), what="a deferral")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    messages = [line["message"] for line in lines]
    assert any("queued from=<a@business.com>" in m for m in messages)
    assert any("deferred" in m for m in messages)
    assert "Sup3r-Secret-Upstream-PW" not in log.read_text()
    check = subprocess.run([sys.executable, "-m", "relayd", "check", "-c", str(cfg)],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
    assert check.returncode == 0
    assert "Sup3r-Secret" not in check.stdout + check.stderr


def test_port_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = write_config(tmp_path, smtp_route("staff", '["*"]', 2525),
                           listen=f"127.0.0.1:{port}")
        out = subprocess.run([sys.executable, "-m", "relayd", "serve", "-c", str(cfg)],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) <= 3


async def test_the_listener_answers_while_the_spool_is_recovered(
        tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    """1. in the spool: 30 messages, and a message to two recipients with a stored bounce for
    one of them (a crash came before that failure was recorded) 2. reading an entry waits until
    the test has sent its new message, then takes 20 ms 3. relayd starts as `relayd serve`
    does: its banner answers and a new message is accepted while the recovery is under way
    4. all delivered once each: the 30, the new one, the two-recipient message to its other
    recipient only (the bounce found in the recovery says the first one failed), the bounce."""
    from relayd.app import MainProcess
    from relayd.config import load_config
    from relayd.queue import Spool

    alice, bob, carol = "alice@business.com", "bob@example.com", "carol@example.com"
    cfg = load_config(write_config(tmp_path, smtp_route("staff", '["*@business.com"]',
                                                        upstream.port)))
    spool = Spool(cfg.queue.path)
    spool.create()
    for i in range(30):
        spool.store_sync(alice, [bob], message(subject=f"old {i}"))
    both = spool.store_sync(alice, [bob, carol], message(subject="both"))
    await spool.store("", [alice], message(sender="", subject="bounce"), client="relayd",
                       route="staff",
                       bounce_for=(both.id, [carol]))
    spool.close()
    real_load = Spool.load
    sent = threading.Event()

    def slow_load(self: Spool, queue_id: str, **kwargs: Any) -> Any:
        sent.wait(10)  # the recovery cannot end before the new message is in
        time.sleep(0.02)
        return real_load(self, queue_id, **kwargs)

    monkeypatch.setattr(Spool, "load", slow_load)
    service = MainProcess(cfg)
    await service.start(wait_for_recovery=False)
    try:
        await send(service.addresses[0][1], alice, [bob], message(subject="new"))
        assert not service.recovered.is_set()  # accepted while the spool was still read
        sent.set()
        await wait_for(lambda: len(upstream.messages) == 33 and not service.qmgr.view.count(),
                       what="all delivered")
    finally:
        await service.stop(timeout=5)
    got = Counter((m.mail_from, tuple(m.rcpt_tos),
                   m.data.split(b"Subject: ")[1].split(b"\r\n")[0].decode())
                  for m in upstream.messages)
    expected = Counter({(alice, (bob,), f"old {i}"): 1 for i in range(30)})
    expected.update({(alice, (bob,), "new"): 1, (alice, (bob,), "both"): 1,
                     ("", (alice,), "bounce"): 1})
    assert got == expected
    assert spool.ids() == []
