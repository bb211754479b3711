"""The web page's bounds (relayd.web.server._Server): a visitor that trickles bytes or never
starts its TLS handshake cannot stop the page, and the page cannot take the descriptors the
rest of relayd needs."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import resource
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import Upstream, message, run_service, send, service_port, smtp_route, wait_for
from conftest import write_config as base_config
from fakes.https import server_cert_files, shared_ca

from relayd.auth.passwords import hash_password
from relayd.config import WebConfig, load_config
from relayd.metrics import Metrics
from relayd.web.server import MAX_CONNECTIONS, REQUEST_DEADLINE_S

FLOOD = 1000
# The flood: FLOOD connections from 127.0.0.2, each sending a byte every TRICKLE_S, for at
# most LIFETIME_S; prints "ready" once every connection has been tried.
FLOOD_SCRIPT = """
import asyncio, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, count, lifetime = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])

async def trickle(writer):
    try:
        while True:
            writer.write(b"G")
            await writer.drain()
            await asyncio.sleep(1.0)
    except (OSError, asyncio.CancelledError):
        pass

async def main():
    gate = asyncio.Semaphore(100)
    tasks = []
    async def one():
        async with gate:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", port, local_addr=("127.0.0.2", 0)), 10)
            except (OSError, asyncio.TimeoutError):
                return
        tasks.append(asyncio.ensure_future(trickle(writer)))
    await asyncio.gather(*(one() for _ in range(count)))
    print("ready", len(tasks), flush=True)
    await asyncio.sleep(lifetime)

asyncio.run(asyncio.wait_for(main(), lifetime + 30))
"""


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_thousand_trickling_connections_and_a_silent_tls_one_stop_nothing(
        tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    """1. relayd (in this process) with the web page served as off loopback (HTTPS, admins)
    and metrics 2. one TCP connection to the page that never sends a TLS hello 3. 1,000
    connections from 127.0.0.2 each trickling a byte a second 4. /healthz, a normal message
    and the admin's status page are each answered within 2 s 5. this process holds far fewer
    descriptors than its limit: the page's are capped 6. one log line for the refusals
    7. the silent connection is closed by the page's deadline."""
    ca = shared_ca()
    cert, key = server_cert_files(tmp_path)
    server = (f'tls_cert = "{cert}"\ntls_key = "{key}"\n'
              f'[server.users.it]\npassword_hash = "{hash_password("admin-pw")}"\n'
              'senders = ["*@business.com"]\n')
    cfg = base_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                      server=server, extra='[web]\nlisten = "127.0.0.1:0"\nadmins = ["it"]\n'
                                           '[metrics]\nlisten = "127.0.0.1:0"\n')
    config = load_config(cfg)
    config = dataclasses.replace(config, web=WebConfig(config.web.listen, ("it",),
                                                       loopback=False))
    soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    async with run_service(config, observer=Metrics()) as svc:
        assert svc.web_port is not None and svc.metrics_port is not None
        before = open_fds()
        silent_reader, silent = await asyncio.open_connection("127.0.0.1", svc.web_port,
                                                  local_addr=("127.0.0.3", 0))
        flood = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FLOOD_SCRIPT, str(svc.web_port), str(FLOOD), "40",
            stdout=subprocess.PIPE)
        try:
            assert flood.stdout is not None
            line = await asyncio.wait_for(flood.stdout.readline(), 60)
            assert line.startswith(b"ready"), line
            during = open_fds()

            def healthz() -> int:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{svc.metrics_port}/healthz", timeout=2) as r:
                    return r.status

            def status_page() -> int:
                request = urllib.request.Request(f"https://127.0.0.1:{svc.web_port}/")
                request.add_header("Authorization",
                                   "Basic " + base64.b64encode(b"it:admin-pw").decode())
                with urllib.request.urlopen(request, timeout=2,
                                            context=ca.client_context()) as r:
                    return r.status

            assert await asyncio.wait_for(asyncio.to_thread(healthz), 2) == 200
            refused = await asyncio.wait_for(
                send(service_port(svc), "alice@business.com", ["bob@example.com"],
                     message(subject="during the flood")), 2)
            assert refused == {}
            assert await asyncio.wait_for(asyncio.to_thread(status_page), 2) == 200
            await wait_for(lambda: len(upstream.messages) == 1, what="the message delivered")
            # The page holds at most MAX_CONNECTIONS descriptors, whatever the flood does.
            assert during - before <= MAX_CONNECTIONS + 16, (before, during)
            assert during < soft_limit // 2, (during, soft_limit)
            # The silent connection ends at the page's deadline, not when the client wants.
            closed = await asyncio.wait_for(silent_reader.read(), REQUEST_DEADLINE_S + 10)
            assert closed == b""
        finally:
            silent.close()
            if flood.returncode is None:
                flood.kill()
            await flood.wait()
    refusals = [r for r in caplog.records if r.getMessage().startswith("web: refused")]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]
