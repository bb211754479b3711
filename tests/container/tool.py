"""Host-side helpers for tests/container/run.sh: a recording upstream, a client, and waits.

  tool.py upstream PORT DIR USER PASSWORD  an aiosmtpd server that requires that login and
                                           writes each message to DIR/<n>.eml; runs until SIGTERM
  tool.py banner PORT TIMEOUT_S            wait for relayd's 220 banner; print the seconds taken
  tool.py send PORT USER PASSWORD SUBJECT  send one message with smtplib after AUTH; print the
                                           reply to DATA
  tool.py wait DIR SUBJECT TIMEOUT_S       wait until a message with that Subject is in DIR
  tool.py count DIR SUBJECT                how many messages with that Subject are in DIR
  tool.py free-port                        a free TCP port on 127.0.0.1
  tool.py hash PASSWORD                    an scrypt hash for [server.users]

Each command exits non-zero, saying why, when its condition is not met in time.
"""

from __future__ import annotations

import email
import signal
import smtplib
import socket
import sys
import time
from pathlib import Path
from typing import Any

POLL_S = 0.05


def upstream(port: int, out: Path, user: str, password: str) -> int:
    import logging
    import warnings

    # aiosmtpd warns that AUTH without TLS is unsafe: it is on loopback, and relayd's route
    # with tls = "none" is allowed for 127.0.0.1 only.
    warnings.simplefilter("ignore")
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    out.mkdir(parents=True, exist_ok=True)

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                      data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and data.login.decode() == user \
            and data.password.decode() == password
        return AuthResult(success=ok, handled=False)

    class Recorder:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            n = len(list(out.glob("*.eml"))) + 1
            tmp = out / f".{n}.tmp"
            tmp.write_bytes(envelope.original_content or envelope.content)
            tmp.rename(out / f"{n}.eml")
            print(f"upstream: message {n} from {envelope.mail_from} to {envelope.rcpt_tos}",
                  flush=True)
            return "250 2.0.0 recorded"

    controller = Controller(Recorder(), hostname="127.0.0.1", port=port,
                            authenticator=authenticator, auth_required=True,
                            auth_require_tls=False)
    controller.start()
    print(f"upstream: listening on 127.0.0.1:{port}", flush=True)
    stop = False

    def on_term(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    while not stop:
        time.sleep(POLL_S)
    controller.stop()
    print("upstream: stopped", flush=True)
    return 0


def banner(port: int, timeout_s: float) -> int:
    start = time.monotonic()
    deadline = start + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                line = s.makefile("rb").readline()
                if line.startswith(b"220"):
                    print(f"{time.monotonic() - start:.2f}")
                    return 0
        except OSError:
            pass
        time.sleep(POLL_S)
    print(f"no 220 banner on 127.0.0.1:{port} within {timeout_s}s", file=sys.stderr)
    return 1


def send(port: int, user: str, password: str, subject: str) -> int:
    msg = (f"From: app@business.test\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
           f"Message-ID: <{time.time_ns()}@container.test>\r\n\r\nSent into the container.\r\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("client.test")
        client.login(user, password)
        client.mail("app@business.test")
        client.rcpt("bob@example.test")
        code, reply = client.data(msg.encode())
    print(f"{code} {reply.decode()}")
    return 0 if code == 250 else 1


def _subjects(out: Path) -> list[str]:
    found = []
    for path in sorted(out.glob("*.eml")):
        found.append(str(email.message_from_bytes(path.read_bytes())["Subject"]))
    return found


def wait(out: Path, subject: str, timeout_s: float) -> int:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if subject in _subjects(out):
            print(f"{subject!r} arrived upstream after {time.monotonic() - start:.2f}s")
            return 0
        time.sleep(POLL_S)
    print(f"{subject!r} did not arrive upstream within {timeout_s}s (have: {_subjects(out)})",
          file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    cmd, args = argv[0], argv[1:]
    if cmd == "upstream":
        return upstream(int(args[0]), Path(args[1]), args[2], args[3])
    if cmd == "banner":
        return banner(int(args[0]), float(args[1]))
    if cmd == "send":
        return send(int(args[0]), args[1], args[2], args[3])
    if cmd == "wait":
        return wait(Path(args[0]), args[1], float(args[2]))
    if cmd == "count":
        print(_subjects(Path(args[0])).count(args[1]))
        return 0
    if cmd == "free-port":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            print(s.getsockname()[1])
        return 0
    if cmd == "hash":
        from relayd.auth.passwords import hash_password

        print(hash_password(args[0]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
