"""End to end with relayd on the real Windows CPython under Wine, driven from Linux.

Run by tests/windows/run.sh with the Linux test venv's python (it has aiosmtpd):
    python e2e.py foreground|service|kill PYTHON_EXE C_ROOT
PYTHON_EXE is the Linux path of the Windows python.exe; C_ROOT a Linux folder under the
prefix's drive_c (C:\\NAME), where the config, queue, journal and outbox go.

- foreground: smtplib on Linux -> `relayd serve` on Windows -> aiosmtpd upstreams on Linux.
  1. a message to bob and to nobody (550 upstream): bob's copy byte-identical, a bounce for
     nobody to the sender 2. an outbox route writes the .eml 3. `relayd queue list` while the
     daemon runs 4. `relayd reload` after the route moved to upstream 2: new mail goes there
     5. `relayd reload` of a broken config: exit 2, the old one kept 6. Ctrl+C (SIGINT to
     the Wine process) drains and exits, if Wine delivers it (said either way).
- service: `relayd service install`, `sc start`, one message delivered, `relayd reload`
  applies a new route, `sc stop` drains, `relayd service uninstall`; the service's log file
  has its start, reload and drain lines.
- kill: 1. a sender thread sends messages one per connection 2. `taskkill /F` of relayd
  while it sends 3. relayd started again 4. every message that got 250 arrives upstream.
Each step prints one line; any failure raises (exit 1) with relayd's log.
"""

from __future__ import annotations

import contextlib
import os
import re
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

WAIT_S = 60.0
KILL_MESSAGES_MAX = 400  # the sender under load stops here at most


class Recorder:
    """An upstream: records every message; RCPT to nobody@ gets 550."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        if address.startswith("nobody@"):
            return "550 5.1.1 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.original_content, bytes)
        self.messages.append((envelope.mail_from or "", list(envelope.rcpt_tos),
                              envelope.original_content))
        return "250 OK"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def upstream() -> Iterator[tuple[Recorder, int]]:
    rec, port = Recorder(), free_port()
    ctl = Controller(rec, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        yield rec, port
    finally:
        ctl.stop()


def wait(predicate, what: str, timeout: float = WAIT_S) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Box:
    """The Windows side: python.exe, the files under C:\\NAME, relayd processes."""

    def __init__(self, python_exe: str, root: Path) -> None:
        self.python = python_exe
        self.root = root
        self.win = "C:\\" + root.name
        self.log = root / "relayd.log"
        self.procs: list[subprocess.Popen[bytes]] = []

    def config(self, listen: int, up: int, *, extra: str = "") -> str:
        text = f"""\ufeff# written as Notepad would: a byte order mark, Windows paths
[server]
listen = ["127.0.0.1:{listen}"]
hostname = "relay.test"
workers = "auto"

[queue]
path = '{self.win}\\queue'
retry_min = "1s"
retry_max = "2s"

[journal]
path = "{self.win.replace(chr(92), '/')}/journal"

[routes.staff]
senders = ["*@business.com"]
upstream = "smtp"
host = "127.0.0.1"
port = {up}
tls = "none"

[routes.drafts]
senders = ["drafts@example.org"]
upstream = "outbox"
path = '{self.win}\\outbox'
{extra}
"""
        (self.root / "relayd.toml").write_bytes(text.encode("utf-8"))
        return f"{self.win}\\relayd.toml"

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A relayd command on Windows (stdout through a pipe: Wine needs one)."""
        return subprocess.run(["wine", self.python, "-m", "relayd", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)

    def wine(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["wine", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)

    def serve(self, config: str, port: int) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["wine", self.python, "-m", "relayd", "serve", "-c", config],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        out = proc.stdout
        assert out is not None

        def copy() -> None:
            with open(self.log, "ab") as f:
                for line in out:
                    f.write(line)
                    f.flush()

        # Its own start line, not only an open port: under Wine a killed relayd's listening
        # socket can outlive the process (see kill()), and then the port answers for nobody.
        starts = self.logtext().count("relayd started with")
        threading.Thread(target=copy, daemon=True).start()
        wait(lambda: (port_open(port) and self.logtext().count("relayd started with") > starts)
             or proc.poll() is not None, "relayd to listen")
        if proc.poll() is not None:
            raise AssertionError(f"relayd exited with {proc.returncode}")
        return proc

    def logtext(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(20)


def message(subject: str, to: str = "bob@example.com",
            sender: str = "alice@business.com") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{time.time_ns()}.{subject}@e2e>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
            "\r\n"
            f"Grüße from {subject}.\r\n.leading dot\r\n\r\ntrailing lines\r\n").encode()


def send(port: int, sender: str, rcpts: list[str], data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        refused = c.sendmail(sender, rcpts, data)
    assert refused == {}, refused


def step(text: str) -> None:
    print(f"[windows e2e] {text}", flush=True)


# -- scenarios ----------------------------------------------------------------------------------


def foreground(box: Box) -> None:
    with upstream() as (up1, p1), upstream() as (up2, p2):
        port = free_port()
        cfg = box.config(port, p1)
        checked = box.run("check", "-c", cfg)
        assert checked.returncode == 0, checked.stdout
        box.serve(cfg, port)
        step("relayd serve on Windows CPython listens on 127.0.0.1")
        first = message("first")
        send(port, "alice@business.com", ["bob@example.com", "nobody@example.com"], first)
        wait(lambda: len(up1.messages) >= 2, "delivery to bob and the bounce for nobody")
        [delivered] = [m for m in up1.messages if m[0] == "alice@business.com"]
        assert delivered[1] == ["bob@example.com"] and delivered[2] == first, delivered
        [bounce] = [m for m in up1.messages if m[0] in ("", "<>")]
        assert bounce[1] == ["alice@business.com"] and b"nobody@example.com" in bounce[2] \
            and b"550" in bounce[2], bounce
        step("delivered byte-identical to bob; bounce for nobody (550) to the sender")
        draft = message("draft", sender="drafts@example.org")
        send(port, "drafts@example.org", ["x@example.org"], draft)
        wait(lambda: any(p.suffix == ".eml" for p in (box.root / "outbox").glob("*")),
             "the outbox file")
        [eml] = list((box.root / "outbox").glob("*.eml"))
        assert draft.replace(b"\r\n", b"\n") in eml.read_bytes().replace(b"\r\n", b"\n")
        step("outbox route wrote the .eml")
        listed = box.run("queue", "list", "-c", cfg)
        assert listed.returncode == 0 and "message(s) in the queue" in listed.stdout, \
            listed.stdout
        step("relayd queue list works while the daemon runs")
        box.config(port, p2)
        reloaded = box.run("reload", "-c", cfg)
        assert reloaded.returncode == 0, reloaded.stdout
        wait(lambda: "reload: config applied" in box.logtext(), "the reload")
        send(port, "alice@business.com", ["bob@example.com"], message("second"))
        wait(lambda: len(up2.messages) == 1, "delivery on the reloaded route")
        step("relayd reload (control/) applied the new route")
        broken = box.config(port, p2, extra="[routes.broken]\nupstream = 42\n")
        refused = box.run("reload", "-c", broken)
        assert refused.returncode == 2 and "routes.broken.upstream" in refused.stdout, \
            refused.stdout
        box.config(port, p2)
        step("relayd reload of a broken config: exit 2 naming the key")
        proc = box.procs[-1]
        proc.send_signal(2)  # SIGINT: Wine may hand it to the process as Ctrl+C
        try:
            proc.wait(30)
            drained = "draining and stopping" in box.logtext()
            step("SIGINT to the Wine process: " + ("Ctrl+C drained and stopped relayd"
                 if drained else f"relayd ended ({proc.returncode}) without draining"))
        except subprocess.TimeoutExpired:
            step("SIGINT to the Wine process: not delivered as Ctrl+C by Wine; killed")
            proc.kill()
            proc.wait(20)


def service(box: Box, keepalive: str) -> None:
    """`keepalive`: run.sh holds a sleeping python.exe in the prefix meanwhile."""
    name = "relayd-e2e"
    for old in service_logs(box.root.parent):
        old.unlink()
    with upstream() as (up1, p1), upstream() as (up2, p2):
        port = free_port()
        cfg = box.config(port, p1)
        done = box.run("service", "install", "-c", cfg, "--name", name, "--start", "manual")
        assert done.returncode == 0, done.stdout
        step(f"relayd service install: {done.stdout.strip().splitlines()[-1]}")
        try:
            started = box.wine("sc", "start", name)
            assert started.returncode == 0, started.stdout
            wait(lambda: port_open(port), "the service to listen")
            query = box.wine("sc", "query", name)
            assert "RUNNING" in query.stdout, query.stdout
            step("sc start: RUNNING, listening")
            send(port, "alice@business.com", ["bob@example.com"], message("svc-one"))
            wait(lambda: len(up1.messages) == 1, "delivery by the service")
            box.config(port, p2)
            assert box.run("reload", "-c", cfg).returncode == 0
            send(port, "alice@business.com", ["bob@example.com"], message("svc-two"))
            wait(lambda: len(up2.messages) == 1, "delivery on the reloaded route")
            step("message delivered; relayd reload applied a new route in the service")
            stopped = box.wine("sc", "stop", name)
            assert stopped.returncode == 0, stopped.stdout
            wait(lambda: "STOPPED" in box.wine("sc", "query", name).stdout, "STOPPED")
            step("sc stop: STOPPED")
        finally:
            gone = box.run("service", "uninstall", "--name", name)
            print(gone.stdout.strip())
        assert gone.returncode == 0
        assert box.wine("sc", "query", name).returncode != 0
        step("relayd service uninstall: removed")
        # %ProgramData%\relayd\log: Wine's %ProgramData% is C:\ProgramData or
        # C:\users\Public, depending on the process.
        [log] = service_logs(box.root.parent)
        text = log.read_text(errors="replace")
        for line in ("relayd started with", "reload: config applied", "service stop: draining",
                     "relayd stopped"):
            assert line in text, f"{line!r} not in the service log:\n{text[-3000:]}"
        step(f"service log {log.name} has start, reload, drain and stop lines")
        # Wine keeps no Event Log: ReportEventW writes its trace channel, which run.sh sends
        # from the prefix's services (WINEDEBUG=+eventlog) to this file.
        trace = os.environ.get("RELAYD_EVENTLOG_TRACE")
        if trace:
            events = Path(trace).read_text(errors="replace")
            for line in ("relayd started: listening on 127.0.0.1:", f"{name}: stopped (exit 0)"):
                assert line in events, f"{line!r} not in the Event Log trace:\n{events[-2000:]}"
            step("Event Log: the start and stop lines (Wine's eventlog trace)")


def service_logs(drive_c: Path) -> list[Path]:
    return [*drive_c.glob("*/relayd/log/relayd.log"),
            *drive_c.glob("users/*/relayd/log/relayd.log")]


def kill(box: Box) -> None:
    """1. load 2. taskkill /F 3. restart 4. 0 acknowledged messages lost."""
    with upstream() as (up1, p1):
        port = free_port()
        cfg = box.config(port, p1)
        proc = box.serve(cfg, port)
        wait(lambda: "relayd started with" in box.logtext(), "the start line")
        m = re.search(r"relayd started with .*, pid (\d+)", box.logtext())
        assert m, box.logtext()
        winpid = m.group(1)
        acked: list[bytes] = []
        stop = threading.Event()

        def sender() -> None:
            for i in range(KILL_MESSAGES_MAX):
                if stop.is_set():
                    return
                data = message(f"load-{i:04d}")
                try:
                    send(port, "alice@business.com", ["bob@example.com"], data)
                except (OSError, smtplib.SMTPException):
                    return  # relayd is gone: this one was not acknowledged
                acked.append(data)

        t = threading.Thread(target=sender)
        t.start()
        wait(lambda: len(acked) >= 20, "20 messages acknowledged under load")
        killed = box.wine("taskkill", "/F", "/PID", winpid)
        stop.set()
        t.join(60)
        proc.wait(30)
        step(f"taskkill /F under load: {killed.stdout.strip() or killed.returncode}; "
             f"{len(acked)} acknowledged before it")
        # The restart listens on a new port. Under Wine the killed process's listening socket
        # can outlive it: wineserver frees it after the Linux process is gone, and a restart on
        # the same port right away found it still open and failed with WSAEADDRINUSE (0x2740).
        # The claim here is the queue's (nothing acknowledged is lost), not the port's.
        port = free_port()
        cfg = box.config(port, p1)
        box.serve(cfg, port)
        want = set(acked)
        wait(lambda: want <= {d for _, _, d in up1.messages}, "every acknowledged message")
        lost = want - {d for _, _, d in up1.messages}
        assert not lost
        step(f"restarted: 0 of {len(acked)} acknowledged messages lost")


def main() -> int:
    scenario, python_exe, root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    root.mkdir(parents=True, exist_ok=True)
    box = Box(python_exe, root)
    try:
        if scenario == "foreground":
            foreground(box)
        elif scenario == "service":
            service(box, os.environ.get("WINE_KEEPALIVE_PID", ""))
        elif scenario == "kill":
            kill(box)
        else:
            raise SystemExit(f"unknown scenario {scenario}")
    except BaseException:
        sys.stdout.write("---- relayd's log ----\n" + box.logtext()[-6000:])
        raise
    finally:
        box.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
