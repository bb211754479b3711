"""Peak memory of relayd for large messages: N clients at once each send one message of SIZE
bytes through relayd (SMTP in, spool, SMTP out) to an upstream in this process, which checks
that each arrives byte-identical. Prints relayd's peak RSS (VmHWM) and its RSS before and
after.

    .venv/bin/python bench/big_messages.py --size-mb 34 --clients 1
    .venv/bin/python bench/big_messages.py --size-mb 34 --clients 4
    .venv/bin/python bench/big_messages.py --relayd "env PYTHONPATH=/tmp/old .venv/bin/python -m relayd"

Standard library plus aiosmtpd (the venv). Every wait has a timeout; relayd is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shlex
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from aiosmtpd.controller import Controller

ROOT = Path(__file__).resolve().parent.parent


def message(index: int, size: int) -> bytes:
    """A message of about `size` bytes: headers, then base64-looking 76-column lines, some
    starting with a dot (so dot-stuffing is exercised both ways)."""
    head = (f"From: a@business.com\r\nTo: b@example.com\r\nSubject: big {index}\r\n"
            f"Message-ID: <big{index}@bench>\r\n\r\n").encode()
    line = hashlib.sha256(str(index).encode()).hexdigest().encode() * 2
    lines = [(b"." if i % 97 == 0 else b"") + line[:74] + b"\r\n" for i in range(64)]
    block = b"".join(lines)
    return head + block * max(1, (size - len(head)) // len(block))


class Sink:
    def __init__(self) -> None:
        self.digests: list[str] = []
        self.done = threading.Event()
        self.expected = 0

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        data = envelope.original_content  # type: ignore[attr-defined]
        self.digests.append(hashlib.sha256(data).hexdigest())
        if len(self.digests) >= self.expected:
            self.done.set()
        return "250 OK"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) // 1024  # MiB
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=34)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--relayd", default=f"{ROOT}/.venv/bin/python -m relayd",
                    help="how to run relayd (default: this Python's)")
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()
    size = int(args.size_mb * 1024 * 1024)
    sink = Sink()
    sink.expected = args.clients
    up_port = free_port()
    upstream = Controller(sink, hostname="127.0.0.1", port=up_port,
                          server_kwargs={"data_size_limit": 0})
    upstream.start()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="relayd-big-", dir="/var/tmp") as tmp:
        cfg = Path(tmp) / "relayd.toml"
        cfg.write_text(f"""
[server]
listen = ["127.0.0.1:{port}"]
hostname = "relay.test"
max_message_size = "100MB"

[queue]
path = "{tmp}/queue"

[routes.all]
senders = ["*"]
upstream = "smtp"
host = "127.0.0.1"
port = {up_port}
tls = "none"
max_connections = {args.clients}
""")
        proc = subprocess.Popen([*shlex.split(args.relayd), "serve", "-c", str(cfg)],
                                cwd=tmp, stdout=subprocess.DEVNULL,
                                stderr=open(Path(tmp) / "log", "wb"), start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), 1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        print((Path(tmp) / "log").read_text(), file=sys.stderr)
                        return 1
                    time.sleep(0.1)
            time.sleep(0.5)
            rss_before = status(proc.pid, "VmRSS")
            messages = [message(i, size) for i in range(args.clients)]
            expected = sorted(hashlib.sha256(m).hexdigest() for m in messages)

            def send(data: bytes) -> None:
                with smtplib.SMTP("127.0.0.1", port, timeout=args.timeout) as c:
                    c.sendmail("a@business.com", ["b@example.com"], data)

            started = time.monotonic()
            threads = [threading.Thread(target=send, args=(m,)) for m in messages]
            for t in threads:
                t.start()
            for t in threads:
                t.join(args.timeout)
            accepted = time.monotonic() - started
            del messages, threads
            if not sink.done.wait(args.timeout):
                print(f"only {len(sink.digests)} of {args.clients} arrived", file=sys.stderr)
                return 1
            delivered = time.monotonic() - started
            time.sleep(0.5)
            identical = sorted(sink.digests) == expected
            print(f"clients={args.clients} size={args.size_mb} MB: relayd peak RSS "
                  f"{status(proc.pid, 'VmHWM')} MiB (at start {rss_before} MiB, after "
                  f"{status(proc.pid, 'VmRSS')} MiB); accepted in {accepted:.1f} s, delivered "
                  f"in {delivered:.1f} s; byte-identical: {identical}")
            return 0 if identical else 1
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            upstream.stop()


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    sys.exit(main())
