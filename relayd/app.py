"""`relayd serve`: the process roles and how each is started and stopped.

- The main process (`serve`): the spool's lock, recovery, the queue manager, notify, metrics
  and the web pages; with server.workers > 1 also the listener workers (relayd.workers), which
  hold the SMTP sessions; with one process it listens itself (also under the Windows service
  manager, relayd.winservice).
- Stop and reload requests reach it through one scope, relayd.platform.proc.Requests
  (signals on POSIX, the service manager and control/ on Windows).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence

from relayd import loop as relayd_loop
from relayd import sdnotify
from relayd.config import Address, load_config
from relayd.errors import ConfigError
from relayd.metrics import Metrics
from relayd.platform import proc
from relayd.queue import Spool
from relayd.service import SESSION_DRAIN_S, Service, bind_listeners
from relayd.workers import WorkerPool

log = logging.getLogger(__name__)

RELOAD_POLL_S = 0.5  # control/ is looked at this often for `relayd reload` requests


def use_cpu_scheduling(choice: str) -> None:
    """server.cpu_scheduling, at start, before any thread or listener worker exists (both
    inherit it from here).

    The policy:
    - "batch" (the default): a relayd started with the normal policy (SCHED_OTHER) moves to
      SCHED_BATCH. Its priority (nice) stays; what changes is that a relayd thread that wakes
      up (a reply came, an fsync finished) no longer preempts the thread running on that CPU,
      but waits for that thread's turn to end or for a free CPU. A relay's work is a
      stream of short steps whose order nobody watches, and the three processes of the
      default layout kept preempting one another: 19 context switches a message, and 11
      with SCHED_BATCH, for 13 % less CPU a message (the median of seven paired
      bench/run.sh runs) and the same mail a second (bench/README.md).
    - Any other policy relayd was started with (systemd's CPUSchedulingPolicy=, chrt) is the
      admin's choice and is kept; so is the normal one with "inherit".
    - Where the call is refused (the shipped unit's system-call filter refuses it, and sets
      CPUSchedulingPolicy=batch itself), relayd says so in one line and runs on as it is.
    Rejected: nice +N, which would give relayd less CPU when the machine is busy, not fewer
    preemptions."""
    if choice != "batch" or not hasattr(os, "SCHED_BATCH"):
        return
    try:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            return
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as e:
        log.info("server.cpu_scheduling: SCHED_BATCH refused (%s); running with the normal "
                 "policy", e.strerror)


async def serve(path: str, *, ready: Callable[[Service], None] | None = None,
                log_options: Sequence[str] = ()) -> int:
    """`relayd serve`: run until SIGTERM/SIGINT; SIGHUP reloads. Returns the exit code."""
    config = load_config(path)
    for warning in config.warnings:
        log.warning("config: %s", warning)
    for route in config.routes.values():
        if route.upstream == "outbox":
            # the bundled conf/relayd.toml is one: say that nothing leaves, and where it goes
            where = str(route.path or ".")
            if not os.path.isabs(where):
                where += f" ({os.path.abspath(where)})"
            log.warning("route %s is a dry run: its mail (%s) is written as .eml files to %s "
                        "and delivered nowhere", route.name, ", ".join(route.senders), where)
    use_cpu_scheduling(config.server.cpu_scheduling)
    # With workers, the SMTP sessions are theirs and this process schedules and delivers.
    listeners = bind_listeners(config.server) if config.server.workers > 1 else None
    service = Service(config, observer=Metrics(), listeners=listeners,
                      accept=listeners is None)
    await service.start(wait_for_recovery=False)
    pool = None
    if listeners is not None:
        # server.workers counts this process too: it delivers, the other workers listen.
        pool = WorkerPool(service, path, listeners, config.server.workers - 1, log_options)
        await pool.start()
        for sock in listeners.plain + listeners.tls:
            host, port = sock.getsockname()[:2]
            service.addresses.append((host, port))
            log.info("listening on %s (%d listener processes)", Address(host, port),
                     pool.count)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_stop(signame: str) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("%s again: exiting now", signame)
            os._exit(1)
        log.info("%s: draining and stopping", signame)
        proc.stopping("draining")
        stop.set()

    def on_reload() -> None:
        proc.reloading()
        try:
            new = load_config(path)
        except ConfigError as e:
            log.error("reload refused, keeping the running config: %s", "; ".join(e.problems))
        else:
            service.reload(new)
            if pool is not None:
                pool.reload()
        proc.ready()

    requests = proc.Requests(loop, on_stop, on_reload)
    requests.install()
    log.info("relayd started with %s (event loop: %s), pid %d", path, relayd_loop.name(),
             os.getpid())
    proc.ready("listening on " + ", ".join(str(Address(h, p)) for h, p in service.addresses))
    watchdog = asyncio.create_task(sdnotify.watchdog_loop(), name="watchdog")
    reloads = asyncio.create_task(_reload_requests(service.spool, on_reload), name="reloads")
    if ready is not None:
        ready(service)
    try:
        await stop.wait()
    finally:
        reloads.cancel()
        if pool is not None:
            await pool.stop(SESSION_DRAIN_S + 5)  # their sessions drain; their ids come in
        await service.stop()
        watchdog.cancel()
        await asyncio.gather(watchdog, reloads, return_exceptions=True)
        requests.remove()
    log.info("relayd stopped")
    return 0


async def _reload_requests(spool: Spool, on_reload: Callable[[], None]) -> None:
    """`relayd reload`: its request in control/ reloads as SIGHUP does (the only way on
    Windows). Several waiting at once are one reload."""
    while True:
        await asyncio.sleep(RELOAD_POLL_S)
        try:
            taken = await asyncio.to_thread(spool.take_requests, ("reload",))
        except OSError as e:
            log.debug("cannot read reload requests: %s", e)
            continue
        if taken:
            log.info("reload requested (relayd reload)")
            on_reload()
