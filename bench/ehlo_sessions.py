"""relayd's cost for sessions that start with EHLO, as most clients' do (smtp-source, which the
other benches use, sends HELO): CPU seconds and system calls a session.

    .venv/bin/python bench/ehlo_sessions.py                          # 2,000 sessions
    .venv/bin/python bench/ehlo_sessions.py --pythonpath /tmp/old    # an export of another tree
    .venv/bin/python bench/ehlo_sessions.py --strace                 # system calls a session

Starts `relayd serve` (one process, one `*` route to a port nobody listens on: the messages
stay queued, the delivery side idle) and runs --sessions sessions of Python's smtplib from
--clients threads: EHLO, MAIL, RCPT, DATA with a 4 KiB message, QUIT. Prints relayd's user and
system CPU a session (from /proc; noisy on a shared VM: run the trees in turn, several times)
or, with --strace, the system calls a session by name (strace -f -c: exact, but strace slows
relayd down, so the CPU figure is not printed then). Standard library only. Every wait is
bounded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MESSAGE = (b"From: bench@example.com\r\nTo: sink@example.net\r\nSubject: bench\r\n\r\n"
           + b"x" * 76 + b"\r\n") * 52


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    hz = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / hz, int(fields[12]) / hz


def session(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("bench@example.com", ["sink@example.net"], MESSAGE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--pythonpath", default="", help="run relayd/ from here instead")
    ap.add_argument("--workdir", default="/var/tmp", help="where the spool goes (a disk)")
    ap.add_argument("--strace", action="store_true", help="count system calls instead")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="relayd-ehlo-", dir=args.workdir))
    port = free_port()
    (base / "relayd.toml").write_text(f"""[server]
listen = ["127.0.0.1:{port}"]
hostname = "bench.local"
workers = 1
allowed_clients = ["127.0.0.0/8"]
max_sessions_per_client = 100
[queue]
path = "{base / "queue"}"
[routes.all]
senders = ["*"]
upstream = "smtp"
host = "127.0.0.1"
port = {free_port()}
tls = "none"
""")
    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    log = open(base / "relayd.log", "wb")
    relayd = subprocess.Popen([sys.executable, "-m", "relayd", "serve", "-c",
                               str(base / "relayd.toml")], cwd=base, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    tracer = None
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or relayd.poll() is not None:
                    raise SystemExit("relayd did not start; see " + str(base / "relayd.log"))
                time.sleep(0.05)
        time.sleep(0.5)
        if args.strace:
            tracer = subprocess.Popen(["strace", "-f", "-c", "-o", str(base / "strace.txt"),
                                       "-p", str(relayd.pid)], stderr=subprocess.DEVNULL)
            time.sleep(1)
        before = cpu(relayd.pid)
        started = time.monotonic()
        with ThreadPoolExecutor(args.clients) as pool:
            for future in [pool.submit(session, port) for _ in range(args.sessions)]:
                future.result(timeout=120)
        wall = time.monotonic() - started
        after = cpu(relayd.pid)
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(30)
            print((base / "strace.txt").read_text())
            lines = (base / "strace.txt").read_text().splitlines()
            for line in lines:
                parts = line.split()
                if len(parts) >= 5 and parts[-1] in ("write", "writev", "sendmsg", "sendto",
                                                      "recvfrom", "read", "epoll_wait"):
                    print(f"{parts[-1]}: {int(parts[3]) / args.sessions:.2f} a session")
        else:
            user, system = after[0] - before[0], after[1] - before[1]
            print(f"{args.sessions} sessions in {wall:.1f} s: relayd user "
                  f"{user / args.sessions * 1e6:.0f} us + system "
                  f"{system / args.sessions * 1e6:.0f} us = "
                  f"{(user + system) / args.sessions * 1e6:.0f} us a session")
    finally:
        if tracer is not None and tracer.poll() is None:
            tracer.kill()
        relayd.terminate()
        try:
            relayd.wait(30)
        except subprocess.TimeoutExpired:
            relayd.kill()
        log.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
