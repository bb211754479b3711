"""The floor under relayd's listener: a bare aiosmtpd server that stores nothing and answers
250 to every message, under the load of bench/run.sh (smtp-source, 20 sessions, 4 KiB).

    .venv/bin/python bench/bare_aiosmtpd.py                 # 3 rounds of 5,000 messages
    .venv/bin/python bench/bare_aiosmtpd.py --rounds 1 --messages 2000

Prints its CPU (utime + stime from /proc) per message and its rate. The server runs under
SCHED_BATCH, as relayd does by default (server.cpu_scheduling), so the two compare alike:
set against `bench/cpu_split.py --workers 2`, whose listener workers do the same sessions and
also store every message durably (fsync) and report it. Standard library and aiosmtpd only;
needs Postfix's smtp-source (bench/run.sh installs it). Every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

SERVER = """
import asyncio, os, sys
from aiosmtpd.smtp import SMTP

class Handler:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"

async def main():
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: SMTP(Handler(), hostname="bare", ident="bare"),
                             "127.0.0.1", int(sys.argv[1]))
    await asyncio.sleep(3600)

os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def one_round(messages: int, timeout: float) -> tuple[float, float]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the bare server did not start") from None
                time.sleep(0.05)
        time.sleep(0.5)
        before = cpu_ticks(server.pid)
        started = time.monotonic()
        subprocess.run(["smtp-source", "-s", "20", "-m", str(messages), "-l", "4096",
                        "-f", "bench@example.com", "-t", "sink@example.net",
                        f"127.0.0.1:{port}"], check=True, timeout=timeout)
        elapsed = time.monotonic() - started
        used = (cpu_ticks(server.pid) - before) / os.sysconf("SC_CLK_TCK")
    finally:
        server.kill()
        server.wait(10)
    return used / messages * 1e6, messages / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--timeout", type=float, default=120)
    args = ap.parse_args()
    results = []
    for i in range(args.rounds):
        cpu, rate = one_round(args.messages, args.timeout)
        results.append((cpu, rate))
        print(f"round {i + 1}: {cpu:,.0f} us CPU/msg, {rate:,.0f} msg/s", flush=True)
    print(f"bare aiosmtpd: median {statistics.median(r[0] for r in results):,.0f} us CPU/msg, "
          f"{statistics.median(r[1] for r in results):,.0f} msg/s ({args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
