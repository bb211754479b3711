"""server.workers = N > 1: N - 1 listener processes that share the port, and the main process
that delivers."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import signal
import time
from pathlib import Path

import pytest
from conftest import Upstream, daemon, free_port, message, send, smtp_route, wait_for, write_config


def worker_pids(log: Path, index: int = 1) -> list[int]:
    pattern = rf"worker {index} started \(pid (\d+)\)"
    return [int(p) for p in re.findall(pattern, log.read_text())]


def all_worker_pids(log: Path) -> list[int]:
    return [int(p) for p in re.findall(r"worker \d+ started \(pid (\d+)\)", log.read_text())]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is gone for our purposes
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def workers_config(tmp_path: Path, upstream: Upstream, workers: int) -> tuple[int, Path, Path]:
    """A port, a config with one route to `upstream` and `workers`, and where its log goes."""
    port = free_port()
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       listen=f"127.0.0.1:{port}", server=f"workers = {workers}")
    return port, cfg, tmp_path / "relayd.log"


async def send_while_stopped(pid: int, port: int, label: str, count: int = 5) -> None:
    """Send `count` messages (subjects "LABEL 0"...) while process `pid` is stopped."""
    os.kill(pid, signal.SIGSTOP)
    try:
        for i in range(count):
            await asyncio.wait_for(send(port, "a@business.com", ["x@example.com"],
                                        message(subject=f"{label} {i}")), 20)
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_workers_accept_on_their_own_and_the_main_process_delivers(
        tmp_path: Path, upstream: Upstream) -> None:
    """1. workers = 2 2. the main process is stopped (SIGSTOP): the worker alone accepts
    3. main process continues: it learns the queue ids and delivers everything."""
    port, cfg, log = workers_config(tmp_path, upstream, 2)
    async with daemon(cfg, port, log) as proc:
        await wait_for(lambda: len(worker_pids(log)) == 1, what="worker start")
        await send_while_stopped(proc.pid, port, "while stopped")
        for i in range(20):
            await send(port, "a@business.com", ["x@example.com"], message(subject=f"m{i}"))
        await wait_for(lambda: len(upstream.messages) == 25, what="all 25 delivered")
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert proc.returncode == 0, log.read_text()
    assert not alive(worker_pids(log)[0])
    subjects = sorted(m.data.split(b"Subject: ")[1].split(b"\r\n")[0] for m in upstream.messages)
    assert subjects.count(b"while stopped 0") == 1 and len(set(subjects)) == 25


async def test_a_killed_worker_is_started_again(tmp_path: Path, upstream: Upstream) -> None:
    port, cfg, log = workers_config(tmp_path, upstream, 2)
    async with daemon(cfg, port, log):
        await wait_for(lambda: len(worker_pids(log)) == 1, what="worker start")
        first = worker_pids(log)[0]
        os.kill(first, signal.SIGKILL)
        await wait_for(lambda: len(worker_pids(log)) == 2, what="worker restart")
        assert "exited with -9; starting it again" in log.read_text()
        for i in range(10):
            await send(port, "a@business.com", ["x@example.com"], message(subject=f"{i}"))
        await wait_for(lambda: len(upstream.messages) == 10)


async def test_workers_stop_when_the_main_process_dies_and_nothing_is_lost(
        tmp_path: Path, upstream: Upstream) -> None:
    """1. upstream down, workers = 3 (two listener processes) 2. twenty messages accepted
    3. kill -9 the main process: its workers stop by themselves 4. restart, upstream up: all
    twenty delivered."""
    await upstream.stop()
    port, cfg, log = workers_config(tmp_path, upstream, 3)
    async with daemon(cfg, port, log) as proc:
        await wait_for(lambda: len(all_worker_pids(log)) == 2, what="both workers start")
        for i in range(20):
            await send(port, "a@business.com", ["x@example.com"], message(subject=f"{i}"))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        await wait_for(lambda: not any(map(alive, all_worker_pids(log))),
                       what="the orphaned workers to stop")
    await upstream.start()
    async with daemon(cfg, port, log) as proc:
        await wait_for(lambda: len({m.data for m in upstream.messages}) == 20, timeout=30,
                       what="all 20 delivered after restart")
        await wait_for(lambda: len(all_worker_pids(log)) == 4, what="the new workers start")
        proc.send_signal(signal.SIGKILL)  # at once: workers may still be starting up
        proc.wait(10)
        await wait_for(lambda: not any(map(alive, all_worker_pids(log))),
                       what="every worker to stop, even one still starting")


async def test_default_is_a_process_per_usable_cpu(tmp_path: Path, upstream: Upstream) -> None:
    """No `workers` key: "auto", one process per CPU relayd may run on: on two (by taskset), one
    listener process and the main one, and mail goes through them; on one CPU, a single
    process."""
    import shutil

    if shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2:
        raise AssertionError("needs taskset (util-linux) and two CPUs")
    async def serve_on(cpus: str, workers: int) -> None:
        port = free_port()
        cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                           listen=f"127.0.0.1:{port}")
        cfg.write_text(cfg.read_text().replace("workers = 1\n", ""))
        log = tmp_path / f"relayd-{workers}.log"
        async with daemon(cfg, port, log, wrapper=["taskset", "-c", cpus]):
            await wait_for(lambda: len(all_worker_pids(log)) == workers, what="workers")
            await send(port, "a@business.com", ["x@example.com"], message(subject=cpus))
            # The whole line: "Subject: 0" is also the start of the first run's "Subject: 0,1".
            line = f"Subject: {cpus}\r\n".encode()
            await wait_for(lambda: any(line in m.data for m in upstream.messages))
            assert len(all_worker_pids(log)) == workers, log.read_text()

    await serve_on("0,1", 1)
    await serve_on("0", 0)  # one CPU: one process, no workers


def policies(pid: int) -> set[int]:
    """The scheduling policy of each thread of process `pid`."""
    return {os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


async def test_relayd_its_threads_and_its_workers_run_under_sched_batch_unless_told_to_inherit(
        tmp_path: Path, upstream: Upstream) -> None:
    """server.cpu_scheduling: "batch" by default: the main process, each of its threads and
    each worker (a restarted one too) run under SCHED_BATCH. "inherit" keeps the policy relayd
    was started with (this test's). Mail goes through either way."""
    ours = os.sched_getscheduler(0)
    port, cfg, log = workers_config(tmp_path, upstream, 3)
    async with daemon(cfg, port, log) as proc:
        await wait_for(lambda: len(all_worker_pids(log)) == 2, what="both workers start")
        await send(port, "a@business.com", ["x@example.com"], message(subject="batch"))
        await wait_for(lambda: len(upstream.messages) == 1)
        batch = os.SCHED_BATCH if ours == os.SCHED_OTHER else ours  # a policy set outside stays
        assert policies(proc.pid) == {batch}
        assert len(os.listdir(f"/proc/{proc.pid}/task")) > 1  # the spool's threads are in it
        for pid in all_worker_pids(log):
            assert policies(pid) == {batch}
        os.kill(worker_pids(log)[0], signal.SIGKILL)
        await wait_for(lambda: len(worker_pids(log)) == 2, what="worker restart")
        await wait_for(lambda: alive(worker_pids(log)[1]), what="the new worker")
        assert policies(worker_pids(log)[1]) == {batch}

    (tmp_path / "inherit").mkdir()
    port, cfg, log = workers_config(tmp_path / "inherit", upstream, 3)
    cfg.write_text(cfg.read_text().replace("workers = 3",
                                           'workers = 3\ncpu_scheduling = "inherit"'))
    async with daemon(cfg, port, log) as proc:
        await wait_for(lambda: len(all_worker_pids(log)) == 2, what="both workers start")
        await send(port, "a@business.com", ["x@example.com"], message(subject="inherit"))
        await wait_for(lambda: len(upstream.messages) == 2)
        assert policies(proc.pid) == {ours}
        for pid in all_worker_pids(log):
            assert policies(pid) == {ours}


async def test_a_scheduling_policy_set_from_outside_is_kept(tmp_path: Path,
                                                           upstream: Upstream) -> None:
    """Started under SCHED_IDLE (`chrt --idle`, as systemd's CPUSchedulingPolicy=idle would),
    relayd does not move to SCHED_BATCH: the admin chose."""
    import shutil

    if shutil.which("chrt") is None:
        raise AssertionError("needs chrt (util-linux)")
    port, cfg, log = workers_config(tmp_path, upstream, 1)
    async with daemon(cfg, port, log, wrapper=["chrt", "--idle", "0"]) as proc:
        await send(port, "a@business.com", ["x@example.com"], message(subject="idle"))
        await wait_for(lambda: len(upstream.messages) == 1)
        assert policies(proc.pid) == {os.SCHED_IDLE}


def test_a_refused_policy_change_is_one_line_and_relayd_goes_on(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Where sched_setscheduler is refused (the shipped unit's system-call filter answers
    EPERM), relayd says so once and runs on with the policy it has."""
    from relayd.app import use_cpu_scheduling

    if os.sched_getscheduler(0) != os.SCHED_OTHER:
        raise AssertionError("this test runs under the normal policy")

    def refuse(pid: int, policy: int, param: os.sched_param) -> None:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    with caplog.at_level(logging.INFO, logger="relayd.app"):
        use_cpu_scheduling("batch")
    assert [r.getMessage() for r in caplog.records] == [
        "server.cpu_scheduling: SCHED_BATCH refused (Operation not permitted); running with "
        "the normal policy"]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


async def test_reload_is_logged_once_and_a_dry_run_is_named_at_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """workers = 2, with the bundled config's outbox route and the System Email's basic SMTP
    AUTH to smtp.office365.com: 1. the start-up log says the route is a dry run and where its
    .eml files go, and names the December 2026 switch-off 2. SIGHUP: "reload: config applied"
    once, not once per process."""
    monkeypatch.setenv("WORKERS_TEST_SECRET", "s3cret")
    port = free_port()
    routes = ('[routes.dryrun]\nsenders = ["*"]\nupstream = "outbox"\n'
              f'path = "{tmp_path / "outbox"}"\n'
              '[routes.system]\nsenders = ["casemanager@business.com"]\nupstream = "smtp"\n'
              'host = "smtp.office365.com"\nusername = "casemanager@business.com"\n'
              'password_env = "WORKERS_TEST_SECRET"\n')
    cfg = write_config(tmp_path, routes, listen=f"127.0.0.1:{port}", server="workers = 2")
    log = tmp_path / "relayd.log"
    async with daemon(cfg, port, log) as proc:
        await wait_for(lambda: len(worker_pids(log)) == 1, what="worker start")
        text = log.read_text()
        assert (f"route dryrun is a dry run: its mail (*) is written as .eml files to "
                f"{tmp_path / 'outbox'} and delivered nowhere") in text
        [switch_off] = [line for line in text.splitlines() if "routes.system: basic" in line]
        assert "WARNING" in switch_off and "end of December 2026" in switch_off
        assert "m365-graph-app.toml" in switch_off and "s3cret" not in text
        proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: "reload: config applied" in log.read_text(), what="reload")
        await asyncio.sleep(1.0)  # the worker's reload, had it logged, is in by now
        assert log.read_text().count("reload: config applied") == 1
