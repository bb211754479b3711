#!/usr/bin/env python3
"""relayd with a large queue: N messages queued while the upstream is down (issue 13, "Scale").

Steps, each wait bounded by --timeout:
  1. a spool with N messages of SIZE bytes for one `*` route whose upstream (127.0.0.1, a free
     port) is down: filled through relayd's SMTP port (`--fill smtp`: smtp-source -d, or many
     smtplib sessions when Postfix's tools are absent; several messages per session), or written
     as spool files in relayd/queue.py's format (`--fill files`, seconds instead of minutes; the
     first start then loads them and the script checks that every one was recovered)
  2. relayd's RSS (VmRSS, VmHWM from /proc) once it is idle after the fill
  3. `relayd queue list` (and `--json`) wall time, with the daemon running and stopped
  4. SIGTERM, then restart: process start to the SMTP banner answered on the port; RSS at the
     banner and once idle again (the recovery's work after the banner counts in VmHWM)
  5. the upstream comes up (smtp-sink), `relayd queue retry --all` (the admin's "it is back";
     `--drain-trigger wait` waits for the route's hold and the backoff instead): msg/s until the
     sink has all N, overall and between 10 % and 90 %
  6. steady state for comparison: the same relayd, queue now empty, smtp-source -> relayd ->
     sink with --steady-count messages: delivered msg/s end to end
Every process is started in its own process group and stopped on exit, error, SIGINT/SIGTERM
and the --time-limit. Standard library only; relayd runs as `.venv/bin/python -m relayd`.

  bench/scale.py --small                         # 2,000 messages, a quick look (~1 min)
  bench/scale.py --count 100000 --fill files     # the issue's figure
  bench/scale.py --count 20000 --profile         # py-spy of the restart and of queue list
  bench/scale.py --relayd-head ...               # HEAD's relayd/, not the work tree
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
PY_SPY_CANDIDATES = (Path("/var/tmp/scale-tools/bin/py-spy"),
                     Path("/var/tmp/relayd-bench-tools/bin/py-spy"))
SENDER = "bench@example.com"
RECIPIENT = "sink@example.net"
IDLE_CPU_SHARE = 0.03  # relayd is "idle" when it uses less than this share of a core
IDLE_WINDOW_S = 2.0


class BenchError(Exception):
    pass


class Deadline(BaseException):
    """Raised by SIGALRM / SIGTERM / SIGINT so that `finally` blocks clean up."""


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- process hygiene

_started: list[subprocess.Popen[bytes]] = []


RELAYD_ENV: dict[str, str] = {}  # PYTHONPATH of an exported relayd/ (--relayd-head)


def spawn(cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    """Start a child in its own process group and remember it for cleanup."""
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("env", {**os.environ, **RELAYD_ENV})
    kw.setdefault("cwd", "/")  # not the repo: `python -m` would import ./relayd first
    p = subprocess.Popen(cmd, start_new_session=True, **kw)
    _started.append(p)
    return p


def stop(p: subprocess.Popen[bytes], sig: int = signal.SIGTERM, wait: float = 30.0) -> float:
    """Signal a child's process group, escalate to SIGKILL; return the seconds it took."""
    t0 = time.monotonic()
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, sig)
        try:
            p.wait(wait)
        except subprocess.TimeoutExpired:
            log(f"pid {p.pid} ignored signal {sig} for {wait}s; SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)  # the leader is gone; its group may not be
    if p in _started:
        _started.remove(p)
    return time.monotonic() - t0


def stop_all() -> None:
    while _started:
        p = _started[-1]
        try:
            stop(p, wait=5)
        except Exception as e:  # noqa: BLE001 - keep cleaning
            log(f"cleanup of pid {p.pid}: {e}")
            with contextlib.suppress(ValueError):
                _started.remove(p)


def run_timed(cmd: list[str], timeout: float, out: Path | None = None) -> tuple[float, int]:
    """Wall time and exit code of a command, its stdout to `out` (or discarded)."""
    sink = open(out, "wb") if out else subprocess.DEVNULL
    try:
        t0 = time.monotonic()
        p = spawn(cmd, stdout=sink, stderr=subprocess.PIPE)
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(p, wait=2)
            raise BenchError(f"timed out after {timeout}s: {' '.join(cmd)}") from None
        wall = time.monotonic() - t0
        _started.remove(p)
    finally:
        if out:
            sink.close()  # type: ignore[union-attr]
    if p.returncode != 0:
        raise BenchError(f"exit {p.returncode}: {' '.join(cmd)}\n{err.decode(errors='replace')}")
    return wall, p.returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def banner_answered(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.settimeout(10)
            if s.recv(512).startswith(b"220"):
                s.sendall(b"QUIT\r\n")
                return True
    except OSError:
        pass
    return False


def wait_banner(port: int, timeout: float, proc: subprocess.Popen[bytes]) -> float:
    """Monotonic time at which 127.0.0.1:port first answered with a 220 greeting."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise BenchError(f"process exited with {proc.returncode} before listening on {port}")
        if banner_answered(port):
            return time.monotonic()
        time.sleep(0.02)
    raise BenchError(f"no SMTP greeting on 127.0.0.1:{port} within {timeout}s")


def status_mib(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def cpu_seconds(pid: int) -> float:
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def wait_idle(pid: int, timeout: float) -> float:
    """Seconds until the process uses under IDLE_CPU_SHARE of a core over IDLE_WINDOW_S."""
    t0 = time.monotonic()
    end = t0 + timeout
    while time.monotonic() < end:
        c0 = cpu_seconds(pid)
        time.sleep(IDLE_WINDOW_S)
        if cpu_seconds(pid) - c0 < IDLE_CPU_SHARE * IDLE_WINDOW_S:
            return time.monotonic() - t0 - IDLE_WINDOW_S
    raise BenchError(f"relayd (pid {pid}) still busy after {timeout}s")


# --------------------------------------------------------------------------- the parts


class Sink:
    """smtp-sink on a free port; its -c counter (`mesg=N`) is read live and time-stamped."""

    MESG = re.compile(rb"mesg=(\d+)")

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.count = 0
        self.history: list[tuple[float, int]] = []
        self.cond = threading.Condition()
        cmd = ["smtp-sink", "-c"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        cmd += [f"127.0.0.1:{port}", "1024"]
        self.errfile = open(workdir / "sink.err", "wb")
        self.proc = spawn(cmd, stdout=subprocess.PIPE, stderr=self.errfile)
        threading.Thread(target=self._read, daemon=True).start()
        wait_banner(port, 10, self.proc)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            now = time.monotonic()
            time.sleep(0.005)  # batch the wake-ups: the CPU belongs to relayd
            buf += chunk
            *lines, buf = re.split(rb"[\r\n]", buf)
            counts = [int(m.group(1)) for line in lines if (m := self.MESG.search(line))]
            if counts and counts[-1] != self.count:
                with self.cond:
                    self.count = counts[-1]
                    self.history.append((now, self.count))
                    self.cond.notify_all()

    def wait_count(self, target: int, timeout: float, watch: subprocess.Popen[bytes]) -> float:
        end = time.monotonic() + timeout
        with self.cond:
            while self.count < target:
                left = end - time.monotonic()
                if left <= 0:
                    raise BenchError(f"the sink has {self.count} of {target} after {timeout}s")
                if watch.poll() is not None:
                    raise BenchError(f"relayd exited with {watch.returncode}")
                self.cond.wait(min(left, 0.5))
            return self.first_at(target)

    def first_at(self, target: int) -> float:
        return next(t for t, n in self.history if n >= target)

    def close(self) -> None:
        stop(self.proc, wait=5)
        self.errfile.close()


class Relayd:
    def __init__(self, workdir: Path, port: int, upstream_port: int, retry_min: str,
                 connections: int) -> None:
        self.dir = workdir
        self.port = port
        self.queue = workdir / "queue"
        self.cfg = workdir / "relayd.toml"
        self.cfg.write_text(f"""# written by bench/scale.py
[server]
listen = ["127.0.0.1:{port}"]
hostname = "scale.local"
allowed_clients = ["127.0.0.0/8"]
max_message_size = "35MB"

[queue]
path = "{self.queue}"
retry_min = "{retry_min}"
retry_max = "1h"
max_age = "5d"

[journal]
path = "{workdir / 'journal'}"

[routes.all]
senders = ["*"]
upstream = "smtp"
host = "127.0.0.1"
port = {upstream_port}
tls = "none"
max_connections = {connections}
""")
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.logpath = workdir / "relayd-0.log"

    def cli(self, *args: str) -> list[str]:
        return [str(PYTHON), "-m", "relayd", *args, "-c", str(self.cfg)]

    def start(self, timeout: float, wrap: list[str] | None = None) -> float:
        """Start relayd; seconds from the process start to its banner being answered."""
        self.runs += 1
        self.logpath = self.dir / f"relayd-{self.runs}.log"
        self.logf = open(self.logpath, "wb")
        cmd = [*(wrap or []), *self.cli("serve")]
        t0 = time.monotonic()
        self.proc = spawn(cmd, stdout=self.logf, stderr=subprocess.STDOUT, cwd=self.dir)
        try:
            return wait_banner(self.port, timeout, self.proc) - t0
        except BenchError as e:
            raise BenchError(f"{e}\n--- {self.logpath} (tail) ---\n{self.log_tail()}") from e

    @property
    def pid(self) -> int:
        """relayd's own pid (under py-spy it is the wrapper's child)."""
        assert self.proc is not None
        kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        with contextlib.suppress(OSError, ValueError, IndexError):
            if "py-spy" in Path(f"/proc/{self.proc.pid}/cmdline").read_text():
                return int(kids.read_text().split()[0])
        return self.proc.pid

    def stop(self, timeout: float) -> float:
        assert self.proc is not None
        pid = self.pid
        t0 = time.monotonic()
        if pid != self.proc.pid:
            # under py-spy: stop relayd alone and let py-spy write its profile
            os.kill(pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        stop(self.proc, wait=timeout)
        self.logf.close()
        return time.monotonic() - t0

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.logpath.read_text(errors="replace").splitlines()[-n:])
        return ""

    def spool_count(self) -> int:
        return len([n for n in os.listdir(self.queue / "msg") if not n.startswith(".")])


def message(i: int, size: int) -> bytes:
    head = (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: scale {i}\r\n"
            f"Message-ID: <scale-{i}@scale.local>\r\nDate: "
            f"{time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


def fill_smtp(relayd: Relayd, count: int, size: int, sessions: int, timeout: float) -> float:
    """smtp-source -d (one connection per session, messages back to back), or smtplib threads.
    Returns the wall time."""
    t0 = time.monotonic()
    if shutil.which("smtp-source"):
        cmd = ["smtp-source", "-d", "-s", str(sessions), "-m", str(count), "-l", str(size),
               "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{relayd.port}"]
        log("fill: " + " ".join(cmd))
        run_timed(cmd, timeout)
        return time.monotonic() - t0
    per_session = 50
    log(f"fill: {sessions} smtplib sessions, {per_session} messages each")
    deadline = t0 + timeout

    def batch(start: int) -> None:
        with smtplib.SMTP("127.0.0.1", relayd.port, timeout=60) as s:
            for i in range(start, min(count, start + per_session)):
                if time.monotonic() > deadline:
                    raise BenchError("fill: timed out")
                s.sendmail(SENDER, [RECIPIENT], message(i, size))

    with ThreadPoolExecutor(sessions) as pool:
        list(pool.map(batch, range(0, count, per_session)))
    return time.monotonic() - t0


def _base36(n: int) -> str:
    digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out or "0"


def fill_files(queue: Path, count: int, size: int) -> float:
    """Spool files as relayd/queue.py writes them (msg/ID: one line of JSON envelope, a
    newline, the message), no state files (every recipient pending). One sync at the end
    instead of an fsync per file, which is what makes this fast; relayd's recovery cannot tell
    the difference."""
    t0 = time.monotonic()
    for sub in ("msg", "state", "corrupt", "control", "tmp"):
        (queue / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    micros = int(time.time() * 1_000_000)
    received = time.time()
    for i in range(count):
        qid = _base36(micros + i).rjust(11, "0") + "00000"
        env = {"v": 1, "id": qid, "sender": SENDER, "recipients": [RECIPIENT],
               "received": received, "mail_options": [], "client": "127.0.0.1",
               "route": None, "message_id": f"<scale-{i}@scale.local>"}
        blob = json.dumps(env, separators=(",", ":")).encode() + b"\n" + message(i, size)
        fd = os.open(queue / "msg" / qid, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, blob)
        finally:
            os.close(fd)
    os.sync()
    return time.monotonic() - t0


def time_queue_list(relayd: Relayd, workdir: Path, tag: str, timeout: float,
                    wrap: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for variant, extra in (("text", []), ("json", ["--json"])):
        path = workdir / f"queue-list-{tag}.{variant}"
        wall, _ = run_timed([*(wrap or []), *relayd.cli("queue", "list", *extra)], timeout, path)
        out[variant] = round(wall, 2)
        out[f"{variant}_bytes"] = path.stat().st_size
        if variant == "text":
            with open(path, "rb") as f:
                f.seek(max(0, out["text_bytes"] - 200))
                out["last_line"] = f.read().decode(errors="replace").strip().splitlines()[-1]
        path.unlink()
    return out


def py_spy() -> Path | None:
    return next((p for p in PY_SPY_CANDIDATES if p.exists()), None)


def spy_wrap(workdir: Path, name: str) -> list[str]:
    spy = py_spy()
    if spy is None:
        raise BenchError("--profile: py-spy not found (python3 -m venv /var/tmp/scale-tools && "
                         "/var/tmp/scale-tools/bin/pip install py-spy)")
    return [str(spy), "record", "--format", "raw", "--rate", "200", "--nonblocking",
            "--output", str(workdir / f"py-spy-{name}.txt"), "--"]


# --------------------------------------------------------------------------- the run


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"count": args.count, "size": args.size, "fill": args.fill,
                           "retry_min": args.retry_min, "connections": args.connections}
    upstream_port = free_port()
    relayd = Relayd(workdir, free_port(), upstream_port, args.retry_min, args.connections)
    t = args.timeout

    # 1. the spool, upstream down
    if args.fill == "files":
        res["fill_s"] = round(fill_files(relayd.queue, args.count, args.size), 1)
        log(f"fill: {args.count} spool files in {res['fill_s']} s")
        res["first_start_to_banner_s"] = round(relayd.start(t), 2)
    else:
        res["first_start_to_banner_s"] = round(relayd.start(t), 2)
        wall = fill_smtp(relayd, args.count, args.size, args.sessions, t)
        res["fill_s"] = round(wall, 1)
        res["fill_msg_s"] = round(args.count / wall)
        log(f"fill: {args.count} messages through SMTP in {wall:.1f} s "
            f"({res['fill_msg_s']} msg/s)")
        res["after_fill"] = status_mib(relayd.pid)
    res["idle_after_s"] = round(wait_idle(relayd.pid, t), 1)
    res["steady_after_fill"] = status_mib(relayd.pid)
    res["cpu_s_fill"] = round(cpu_seconds(relayd.pid), 1)
    log(f"relayd idle, {res['steady_after_fill']}")
    queued = relayd.spool_count()
    if queued != args.count:
        raise BenchError(f"{queued} files in the spool, expected {args.count}")

    # 3. queue list, daemon running
    res["queue_list_running"] = time_queue_list(relayd, workdir, "running", t)
    log(f"queue list (daemon running): {res['queue_list_running']}")
    expected = f"{args.count} message(s) in the queue"
    if res["queue_list_running"]["last_line"] != expected:
        raise BenchError(f"queue list ends with {res['queue_list_running']['last_line']!r}, "
                         f"expected {expected!r}")
    res["stop_s"] = round(relayd.stop(t), 2)
    res["queue_list_stopped"] = time_queue_list(relayd, workdir, "stopped", t)
    log(f"queue list (daemon stopped): {res['queue_list_stopped']}; SIGTERM took "
        f"{res['stop_s']} s")
    if args.profile:
        spy = spy_wrap(workdir, "queue-list")
        wall, _ = run_timed([*spy, *relayd.cli("queue", "list")], t)
        spy = spy_wrap(workdir, "queue-list-json")
        run_timed([*spy, *relayd.cli("queue", "list", "--json")], t)
        res["profile_queue_list_s"] = round(wall, 2)

    # 4. restart with N queued
    wrap = spy_wrap(workdir, "restart") if args.profile else None
    res["restart_to_banner_s"] = round(relayd.start(t, wrap), 2)
    res["at_banner"] = status_mib(relayd.pid)
    log(f"restart to banner: {res['restart_to_banner_s']} s, {res['at_banner']}")
    res["restart_idle_after_s"] = round(wait_idle(relayd.pid, t), 1)
    res["restart_steady"] = status_mib(relayd.pid)
    res["restart_cpu_s"] = round(cpu_seconds(relayd.pid), 1)
    text = relayd.logpath.read_text(errors="replace")
    recovered = re.search(r"recovered (\d+) message", text)
    res["recovered"] = int(recovered.group(1)) if recovered else 0
    res["log_lines_at_restart"] = text.count("\n")
    if res["recovered"] != args.count:
        raise BenchError(f"relayd recovered {res['recovered']} of {args.count} messages\n"
                         + relayd.log_tail())
    log(f"restart: idle {res['restart_idle_after_s']} s after the banner, "
        f"{res['restart_steady']}, {res['restart_cpu_s']} CPU s, "
        f"{res['log_lines_at_restart']} log lines")
    if args.profile:
        res["profiled_stop_s"] = round(relayd.stop(t), 2)
        relayd.start(t)

    # 5. the upstream comes back
    sink = Sink(upstream_port, workdir)
    try:
        cpu0 = cpu_seconds(relayd.pid)
        t0 = time.monotonic()
        if args.drain_trigger == "retry":
            run_timed(relayd.cli("queue", "retry", "--all"), t)
        done = sink.wait_count(args.count, t, relayd.proc)  # type: ignore[arg-type]
        wall = done - t0
        res["drain_s"] = round(wall, 1)
        res["drain_msg_s"] = round(args.count / wall)
        lo, hi = sink.first_at(args.count // 10), sink.first_at(args.count * 9 // 10)
        res["drain_msg_s_10_90"] = round((args.count * 8 // 10) / max(hi - lo, 1e-3))
        res["drain_first_s"] = round(sink.first_at(1) - t0, 2)
        res["drain_cpu_us_per_msg"] = round((cpu_seconds(relayd.pid) - cpu0) / args.count * 1e6)
        res["drain_peak"] = status_mib(relayd.pid)
        log(f"drain: {args.count} in {wall:.1f} s = {res['drain_msg_s']} msg/s "
            f"(10-90 %: {res['drain_msg_s_10_90']}), first after {res['drain_first_s']} s")
        wait_idle(relayd.pid, t)
        left = relayd.spool_count()
        if left:
            raise BenchError(f"{left} messages still in the spool after the drain")

        # 6. steady state, same relayd, empty queue
        base = sink.count
        k = args.steady_count
        t0 = time.monotonic()
        cmd = ["smtp-source", "-s", "20", "-m", str(k), "-l", str(args.size), "-f", SENDER,
               "-t", RECIPIENT, f"127.0.0.1:{relayd.port}"]
        if not shutil.which("smtp-source"):
            raise BenchError("steady state needs Postfix's smtp-source")
        src = spawn(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        done = sink.wait_count(base + k, t, relayd.proc)  # type: ignore[arg-type]
        src.wait(t)
        _started.remove(src)
        res["steady_msg_s"] = round(k / (done - t0))
        res["steady_count"] = k
        time.sleep(1)
        res["duplicates"] = sink.count - args.count - k
        res["final"] = status_mib(relayd.pid)
        log(f"steady state (empty queue, SMTP in -> out): {res['steady_msg_s']} msg/s; "
            f"duplicates {res['duplicates']}")
    finally:
        sink.close()
    relayd.stop(t)
    return res


def report(res: dict[str, Any]) -> str:
    def mib(d: dict[str, float] | None, key: str) -> str:
        return f"{d[key]:.0f}" if d and key in d else "-"

    rows = [
        ("messages queued", f"{res['count']:,} x {res['size']} B ({res['fill']})"),
        ("fill", f"{res['fill_s']} s" + (f" ({res['fill_msg_s']} msg/s)"
                                         if "fill_msg_s" in res else "")),
        ("RSS after fill, idle (VmRSS / VmHWM MiB)",
         f"{mib(res['steady_after_fill'], 'VmRSS')} / {mib(res['steady_after_fill'], 'VmHWM')}"),
        ("queue list, daemon running (text / --json)",
         f"{res['queue_list_running']['text']} s / {res['queue_list_running']['json']} s"),
        ("queue list, daemon stopped (text / --json)",
         f"{res['queue_list_stopped']['text']} s / {res['queue_list_stopped']['json']} s"),
        ("SIGTERM to exit", f"{res['stop_s']} s"),
        ("restart to banner", f"{res['restart_to_banner_s']} s"),
        ("RSS at banner (VmRSS MiB)", mib(res["at_banner"], "VmRSS")),
        ("after restart, idle (VmRSS / VmHWM MiB)",
         f"{mib(res['restart_steady'], 'VmRSS')} / {mib(res['restart_steady'], 'VmHWM')}"
         f" ({res['restart_idle_after_s']} s after the banner, {res['restart_cpu_s']} CPU s)"),
        ("drain once the upstream is back", f"{res['drain_msg_s']} msg/s overall, "
         f"{res['drain_msg_s_10_90']} msg/s 10-90 %, first after {res['drain_first_s']} s, "
         f"{res['drain_cpu_us_per_msg']} us CPU/msg"),
        ("VmHWM after the drain (MiB)", mib(res["drain_peak"], "VmHWM")),
        ("steady state, empty queue (SMTP in -> out)",
         f"{res['steady_msg_s']} msg/s ({res['steady_count']} messages)"),
        ("duplicates at the sink", str(res["duplicates"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, _frame: Any) -> None:
        raise Deadline(f"signal {signum} (time limit {seconds:.0f}s, SIGINT or SIGTERM)")

    old = {s: signal.signal(s, expire) for s in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT)}
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in old.items():
            signal.signal(s, h)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=100_000, help="messages queued (100000)")
    p.add_argument("--small", action="store_true", help="a quick look: --count 2000")
    p.add_argument("--size", type=int, default=4096, help="message size in bytes (4096)")
    p.add_argument("--fill", choices=["smtp", "files"], default="smtp",
                   help="through relayd's SMTP port (default), or spool files written directly")
    p.add_argument("--sessions", type=int, default=20, help="concurrent SMTP sessions (20)")
    p.add_argument("--connections", type=int, default=8, help="route max_connections (8)")
    p.add_argument("--retry-min", default="10m",
                   help="queue.retry_min, also the route's hold after the upstream is found "
                   "down (10m: no retry rounds while measuring; --drain-trigger wait needs less)")
    p.add_argument("--drain-trigger", choices=["retry", "wait"], default="retry",
                   help="once the upstream is up: `relayd queue retry --all` (default), or wait "
                   "for the hold and backoff to end")
    p.add_argument("--steady-count", type=int, default=5000)
    p.add_argument("--profile", action="store_true",
                   help="py-spy record (raw stacks in the work dir) of queue list and restart")
    p.add_argument("--timeout", type=float, default=900, help="each wait (900 s)")
    p.add_argument("--time-limit", type=float, default=3600, help="the whole run (3600 s)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (profiles, logs)")
    p.add_argument("--relayd-head", action="store_true",
                   help="relayd/ as committed at HEAD (git archive into the work dir), not the "
                   "work tree the venv's editable install points at")
    p.add_argument("--json-out", type=Path, help="write the figures here as JSON")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                   help="where the temp dir goes: on disk, not tmpfs (/var/tmp)")
    args = p.parse_args()
    if args.small:
        args.count = 2000
    if not PYTHON.exists():
        print(f"no venv at {PYTHON}: python3 -m venv .venv && .venv/bin/pip install -e .",
              file=sys.stderr)
        return 2
    if not shutil.which("smtp-sink"):
        print("needs Postfix's smtp-sink and smtp-source (apt-get install postfix; see "
              "bench/run.sh)", file=sys.stderr)
        return 2
    free = shutil.disk_usage(args.workdir).free
    need = args.count * (args.size + 1024) * 2
    if free < need:
        print(f"{args.workdir}: {free >> 20} MiB free, need about {need >> 20}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="relayd-scale-", dir=args.workdir))
    log(f"work dir {workdir}")
    if args.relayd_head:
        src = workdir / "src"
        src.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD", "relayd"],
                                 check=True, capture_output=True, timeout=60).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True, timeout=60)
        RELAYD_ENV["PYTHONPATH"] = str(src)
        log(f"relayd from HEAD ({ROOT}) exported to {src}")
    code = 0
    try:
        with time_limit(args.time_limit):
            res = measure(args, workdir)
        print(report(res))
        if args.json_out:
            args.json_out.write_text(json.dumps(res, indent=2) + "\n")
    except (BenchError, Deadline) as e:
        log(f"failed: {e}")
        code = 1
    finally:
        stop_all()
        if args.keep or args.profile:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
