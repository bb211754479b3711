#!/usr/bin/env python3
"""relayd vs Postfix: messages/second accepted and delivered end to end, on this machine.

Load: Postfix's smtp-source, SESSIONS concurrent sessions, one message of SIZE bytes per session
(smtp-source's default: EHLO, MAIL, RCPT, DATA, ., QUIT per message), MESSAGES messages.
Targets, each in front of its own smtp-sink on 127.0.0.1:
  baseline      smtp-source -> smtp-sink (the raw ceiling of the tools themselves)
  relayd        smtp-source -> relayd serve (fsync before 250) -> smtp-sink
  relayd-w2     the same with server.workers = 2 (a listener process and the delivering one;
                relayd's default on 2 CPUs); relayd-w3: two listener processes sharing the port
  postfix-8     smtp-source -> throwaway Postfix relay (destination concurrency 8) -> smtp-sink
  postfix-def   the same with Postfix's default concurrency (20)
Every target runs RUNS times, interleaved round by round; the report gives median and range.

accepted  = MESSAGES / (smtp-source's wall time: start to exit; every message got its 250)
delivered = MESSAGES / (smtp-source start to the moment the sink counted the last message)

Standard library only. Must run as root (installs postfix, starts a Postfix instance); every
process it starts is stopped on exit, on error, on SIGINT/SIGTERM and on its own time limit.
Run it through bench/run.sh (one command), or directly with any Python >= 3.11.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TOOLS_VENV = Path("/var/tmp/relayd-bench-tools")  # py-spy lives here, outside the project venv
SENDER = "bench@example.com"
RECIPIENT = "sink@example.net"


class BenchError(Exception):
    pass


class Deadline(BaseException):
    """Raised by SIGALRM / SIGTERM / SIGINT so that `finally` blocks clean up."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- process hygiene

_started: list[subprocess.Popen[bytes]] = []


def spawn(cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    """Start a child in its own process group and remember it for cleanup."""
    kw.setdefault("stdin", subprocess.DEVNULL)
    p = subprocess.Popen(cmd, start_new_session=True, **kw)
    _started.append(p)
    return p


def stop(p: subprocess.Popen[bytes], sig: int = signal.SIGTERM, wait: float = 10.0) -> int | None:
    """Signal a child's process group, escalate to SIGKILL; return its exit code."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(wait)
        except subprocess.TimeoutExpired:
            log(f"pid {p.pid} ignored signal {sig} for {wait}s; SIGKILL")
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(5)
    else:
        # the leader is gone, but its group may not be
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return p.returncode


def stop_all() -> None:
    while _started:
        p = _started.pop()
        try:
            stop(p, wait=5)
        except Exception as e:  # keep cleaning
            log(f"cleanup of pid {p.pid}: {e}")


def run(
    cmd: list[str], timeout: float, check: bool = True, **kw: Any
) -> subprocess.CompletedProcess[str]:
    kw.setdefault("stdin", subprocess.DEVNULL)
    try:
        r = subprocess.run(cmd, timeout=timeout, text=True, capture_output=True, **kw)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"timed out after {timeout}s: {' '.join(cmd)}") from e
    if check and r.returncode != 0:
        raise BenchError(f"exit {r.returncode}: {' '.join(cmd)}\n{r.stdout}{r.stderr}")
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_banner(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something on 127.0.0.1:port answers with an SMTP 220 greeting."""
    end = time.monotonic() + timeout
    last = ""
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(5)
                data = s.recv(512)
                if data.startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
                last = data.decode(errors="replace")
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise BenchError(f"no SMTP greeting on 127.0.0.1:{port} within {timeout}s ({last})")


# --------------------------------------------------------------------------- tools


def ensure_postfix_tools() -> None:
    if shutil.which("smtp-source") and shutil.which("smtp-sink") and shutil.which("postfix"):
        return
    log("installing postfix (debconf 'No configuration', --no-install-recommends)")
    run(
        [
            "sh",
            "-c",
            "echo 'postfix postfix/main_mailer_type select No configuration'"
            " | debconf-set-selections",
        ],
        timeout=60,
    )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-q"], timeout=600, env=env)
    run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postfix"],
        timeout=900,
        env=env,
    )
    for tool in ("smtp-source", "smtp-sink", "postfix"):
        if not shutil.which(tool):
            raise BenchError(f"{tool} still missing after installing postfix")


def ensure_py_spy() -> str | None:
    exe = shutil.which("py-spy") or (
        str(TOOLS_VENV / "bin/py-spy") if (TOOLS_VENV / "bin/py-spy").exists() else None
    )
    if exe:
        return exe
    log(f"installing py-spy into {TOOLS_VENV} (separate from the project venv)")
    try:
        run([sys.executable, "-m", "venv", str(TOOLS_VENV)], timeout=120)
        run([str(TOOLS_VENV / "bin/pip"), "install", "-q", "py-spy"], timeout=600)
    except BenchError as e:
        log(f"py-spy unavailable, profiling skipped: {e}")
        return None
    return str(TOOLS_VENV / "bin/py-spy")


def tool_version(cmd: list[str]) -> str:
    try:
        return run(cmd, timeout=30, check=False).stdout.strip().splitlines()[-1]
    except Exception:
        return "?"


# --------------------------------------------------------------------------- sink


class Sink:
    """smtp-sink on a free port; its -c counters are read live and time-stamped."""

    MESG = re.compile(rb"mesg=(\d+)")

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.count = 0
        self.history: list[tuple[float, int]] = [(time.monotonic(), 0)]
        self.cond = threading.Condition()
        cmd = ["smtp-sink", "-c"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        cmd += [f"127.0.0.1:{self.port}", "1024"]
        self.errfile = open(workdir / f"sink-{name}.err", "wb")
        self.proc = spawn(cmd, stdout=subprocess.PIPE, stderr=self.errfile)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        wait_banner(self.port, 10, self.proc)
        with self.cond:  # the banner probe is a session, not a message
            pass

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
            # batch the counter updates: waking up for each one would take CPU from the
            # programs being measured (2 cores); the timestamps stay within ~5 ms
            time.sleep(0.005)
            buf += chunk
            # counters are separated by "\r"; keep a possibly incomplete tail
            *lines, buf = re.split(rb"[\r\n]", buf)
            n = None
            for line in lines:
                m = self.MESG.search(line)
                if m:
                    n = int(m.group(1))
            if n is not None and n != self.count:
                with self.cond:
                    self.count = n
                    self.history.append((now, n))
                    self.cond.notify_all()

    def wait_count(self, target: int, timeout: float) -> float | None:
        """Monotonic time at which the count first reached target, or None on timeout."""
        end = time.monotonic() + timeout
        with self.cond:
            while self.count < target:
                left = end - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return None
                self.cond.wait(min(left, 0.5))
            for t, n in self.history:
                if n >= target:
                    return t
        return None

    def close(self) -> None:
        stop(self.proc, wait=5)
        self.errfile.close()


# --------------------------------------------------------------------------- targets


class Target:
    name = "?"
    description = ""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.port = 0
        self.notes: list[str] = []

    def start(self) -> None: ...

    def after_run(self) -> dict[str, Any]:
        return {}

    def wait_idle(self) -> None: ...

    def close(self) -> dict[str, Any]:
        return {}


class Baseline(Target):
    name = "baseline"
    description = "smtp-source -> smtp-sink"

    def start(self) -> None:
        self.port = self.sink.port


def proc_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children[ppid].append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    tck = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in pids:
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])  # utime, stime
        except (OSError, ValueError, IndexError):
            pass
    return total / tck


def status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class Relayd(Target):
    name = "relayd"
    description = "smtp-source -> relayd (fsync before 250, 8 upstream connections) -> smtp-sink"

    def __init__(
        self,
        sink: Sink,
        workdir: Path,
        relayd_cmd: list[str],
        upstream_conns: int,
        workers: int = 1,
    ) -> None:
        super().__init__(sink)
        self.workers = workers
        if workers != 1:
            self.name = f"relayd-w{workers}"
            self.description = self.description.replace(
                "relayd (", f"relayd with server.workers = {workers} ("
            )
        self.dir = workdir / self.name
        self.cmd = relayd_cmd
        self.conns = upstream_conns
        self.proc: subprocess.Popen[bytes] | None = None
        self.cpu_before = 0.0

    def config_text(self) -> str:
        return f"""# written by bench/relay_vs_postfix.py
[server]
listen = ["127.0.0.1:{self.port}"]
hostname = "bench.local"
workers = {self.workers}
allowed_clients = ["127.0.0.0/8"]
max_message_size = "35MB"

[queue]
path = "{self.dir / "queue"}"
retry_min = "1s"
retry_max = "5s"

[routes.all]
senders = ["*"]
upstream = "smtp"
host = "127.0.0.1"
port = {self.sink.port}
tls = "none"
max_connections = {self.conns}
"""

    def start(self) -> None:
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.cfg = self.dir / "relayd.toml"
        self.cfg.write_text(self.config_text())
        self.logpath = self.dir / "relayd.log"
        self.logf = open(self.logpath, "wb")
        cmd = self.cmd + ["serve", "-c", str(self.cfg)]
        log(f"starting {' '.join(cmd)}")
        self.proc = spawn(cmd, stdout=self.logf, stderr=subprocess.STDOUT, cwd=self.dir)
        try:
            wait_banner(self.port, 30, self.proc)
        except BenchError as e:
            raise BenchError(f"{e}\n--- {self.logpath} (tail) ---\n{self.log_tail()}") from e
        self.cpu_before = cpu_seconds(proc_tree(self.proc.pid))

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.logpath.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(
                f"relayd exited with {self.proc.returncode} during the run\n"
                f"--- {self.logpath} (tail) ---\n{self.log_tail()}"
            )

    def queue_files(self) -> int:
        return len(self.queue_file_names())

    def queue_file_names(self) -> list[str]:
        root = self.dir / "queue"
        return [str(Path(d, f).relative_to(root)) for d, _, files in os.walk(root) for f in files]

    def after_run(self) -> dict[str, Any]:
        self.check_alive()
        assert self.proc is not None
        pids = proc_tree(self.proc.pid)
        cpu = cpu_seconds(pids)
        used, self.cpu_before = cpu - self.cpu_before, cpu
        return {
            "cpu_s": round(used, 2),
            "processes": len(pids),
            "vmhwm_kib": max(filter(None, (status_kib(p, "VmHWM") for p in pids)), default=None),
            "vmrss_kib": sum(filter(None, (status_kib(p, "VmRSS") for p in pids))),
        }

    def wait_idle(self) -> None:
        end = time.monotonic() + 15
        while time.monotonic() < end and any(n.startswith("msg/") for n in self.queue_file_names()):
            time.sleep(0.2)

    def stack_dump(self) -> str:
        py_spy = ensure_py_spy()
        if not py_spy or self.proc is None or self.proc.poll() is not None:
            return "(not available)"
        try:
            r = run([py_spy, "dump", "--pid", str(self.proc.pid)], timeout=60, check=False)
            return (r.stdout + r.stderr).strip()
        except BenchError as e:
            return str(e)

    def close(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if self.proc is not None:
            info["cpu_percent_idle_1s"] = self.idle_cpu()
            info["queue_files_left"] = self.queue_file_names()[:20]
            t = time.monotonic()
            rc = stop(self.proc, signal.SIGTERM, wait=30)
            info["sigterm_exit"] = rc
            info["sigterm_seconds"] = round(time.monotonic() - t, 2)
            if rc != 0:
                self.notes.append(f"relayd exited {rc} on SIGTERM (design says 0)")
            self.logf.close()
            errs = [
                line
                for line in self.logpath.read_text(errors="replace").splitlines()
                if re.search(r"Traceback|ERROR|CRITICAL|Exception", line)
            ]
            info["log_error_lines"] = len(errs)
            if errs:
                info["log_error_sample"] = errs[:10]
            self.proc = None
        return info

    def idle_cpu(self) -> float | None:
        """CPU use over one second with no load: a spinning event loop shows here."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        a = cpu_seconds([self.proc.pid])
        time.sleep(1)
        return round(100 * (cpu_seconds([self.proc.pid]) - a), 1)


class Postfix(Target):
    """A throwaway Postfix instance (postfix -c DIR) whose spool lives in the temp dir."""

    def __init__(self, sink: Sink, workdir: Path, concurrency: int | None) -> None:
        super().__init__(sink)
        self.conc = concurrency
        tag = str(concurrency) if concurrency else "def"
        self.name = f"postfix-{tag}"
        how = f"destination concurrency {concurrency}" if concurrency else "default concurrency 20"
        self.description = f"smtp-source -> Postfix relay ({how}) -> smtp-sink"
        self.base = workdir / self.name
        self.etc = self.base / "etc"
        self.maillog = Path(f"/var/log/relayd-bench-{os.getpid()}-{self.name}.log")
        self.started = False

    def postfix(
        self, *args: str, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        # `postfix start` leaves master holding inherited descriptors: never wait for EOF on a pipe
        with tempfile.TemporaryFile("w+") as out:
            try:
                r = subprocess.run(
                    ["postfix", "-c", str(self.etc), *args],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    text=True,
                )
            except subprocess.TimeoutExpired as e:
                raise BenchError(f"postfix {' '.join(args)} timed out after {timeout}s") from e
            out.seek(0)
            text = out.read()
        if check and r.returncode != 0:
            raise BenchError(
                f"postfix -c {self.etc} {' '.join(args)}: exit {r.returncode}\n{text}\n"
                f"--- {self.maillog} (tail) ---\n{self.log_tail()}"
            )
        return subprocess.CompletedProcess(r.args, r.returncode, text, "")

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.maillog.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def start(self) -> None:
        self.port = free_port()
        conc = (
            f"default_destination_concurrency_limit = {self.conc}\n"
            f"smtp_destination_concurrency_limit = {self.conc}"
            if self.conc
            else "# (Postfix defaults: default_destination_concurrency_limit = 20)"
        )
        subst = {
            "@BASE@": str(self.base),
            "@MAILLOG@": str(self.maillog),
            "@SINKPORT@": str(self.sink.port),
            "@PORT@": str(self.port),
            "@CONCURRENCY@": conc,
        }

        def fill(name: str) -> str:
            text = (BENCH / "postfix" / name).read_text()
            for k, v in subst.items():
                text = text.replace(k, v)
            return text

        self.etc.mkdir(parents=True)
        for d in (self.base, self.etc):
            d.chmod(0o755)
        (self.etc / "main.cf").write_text(fill("main.cf.in"))
        (self.etc / "master.cf").write_text(fill("master.cf.in"))
        (self.base / "spool").mkdir(mode=0o755)
        data = self.base / "data"
        data.mkdir(mode=0o700)
        shutil.chown(data, "postfix")
        self.maillog.touch()
        self.postfix("check")  # also creates the spool's subdirectories with Postfix's modes
        log(f"starting Postfix instance {self.etc} on 127.0.0.1:{self.port}")
        self.started = True
        self.postfix("start")
        wait_banner(self.port, 30)

    def master_pid(self) -> int | None:
        try:
            return int((self.base / "spool/pid/master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def instance_pids(self) -> list[int]:
        """Processes of this instance only: they carry MAIL_CONFIG=<our etc dir>."""
        needle = f"MAIL_CONFIG={self.etc}".encode()
        pids = []
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) != os.getpid():
                try:
                    env = Path(f"/proc/{d}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if needle in env:
                    pids.append(int(d))
        return pids

    def after_run(self) -> dict[str, Any]:
        pids = self.instance_pids()
        return {"processes": len(pids)}

    def queue_files(self) -> int:
        n = 0
        for q in ("incoming", "active", "deferred", "maildrop", "hold"):
            n += sum(len(f) for _, _, f in os.walk(self.base / "spool" / q))
        return n

    def wait_idle(self) -> None:
        end = time.monotonic() + 15
        while time.monotonic() < end and self.queue_files():
            time.sleep(0.2)

    def close(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if self.started:
            info["queue_files_left"] = self.queue_files()
            master = self.master_pid()
            try:
                self.postfix("stop", timeout=60, check=False)
            except BenchError as e:
                log(str(e))
            end = time.monotonic() + 15
            while time.monotonic() < end and self.instance_pids():
                time.sleep(0.2)
            left = self.instance_pids()
            if master and master not in left:
                try:
                    os.kill(master, 0)
                    left.append(master)
                except ProcessLookupError:
                    pass
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for p in left:
                    try:
                        os.kill(p, sig)
                    except ProcessLookupError:
                        pass
                time.sleep(0.5)
                left = self.instance_pids()
            try:
                text = self.maillog.read_text(errors="replace")
                info["log_status"] = dict(collections.Counter(re.findall(r"status=(\w+)", text)))
                info["log_warnings"] = len(re.findall(r"(warning|fatal|panic):", text))
            except OSError:
                pass
        try:
            self.maillog.unlink()
        except FileNotFoundError:
            pass
        return info


# --------------------------------------------------------------------------- one measurement


def patched_relayd(diff: Path | None, workdir: Path) -> str:
    """relayd/ as committed at HEAD, plus diff; return the command that runs that copy."""
    src = workdir / "relayd-patched"
    src.mkdir()
    run(["sh", "-c", f"git -C '{ROOT}' archive HEAD relayd | tar -x -C '{src}'"], timeout=60)
    if diff is None:
        return f"env PYTHONPATH={src} {ROOT / '.venv/bin/python'} -m relayd"
    with open(diff, "rb") as f:
        r = subprocess.run(
            ["patch", "-p1", "--forward", "--batch"],
            cwd=src,
            stdin=f,
            capture_output=True,
            timeout=60,
        )
    if r.returncode != 0:
        raise BenchError(
            f"{diff} does not apply to relayd/ at HEAD: {r.stdout.decode()}{r.stderr.decode()}"
        )
    python = ROOT / ".venv/bin/python"
    return f"env PYTHONPATH={src} {python} -m relayd"


def machine_cpu() -> tuple[int, int]:
    """(idle + iowait, total) jiffies of all CPUs, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return f[3] + f[4], sum(f[:8])


def background_busy(seconds: float = 2.0) -> float:
    """Share of the machine's CPU in use while the bench itself is idle (other people's work)."""
    a = machine_cpu()
    time.sleep(seconds)
    b = machine_cpu()
    return round(100 * (1 - (b[0] - a[0]) / max(1, b[1] - a[1])), 1)


def wait_quiet(limit_pct: float, wait_s: float) -> float:
    """Wait (up to wait_s) until something else's CPU use drops below limit_pct; return the last."""
    end = time.monotonic() + wait_s
    busy = background_busy()
    while busy > limit_pct and time.monotonic() < end:
        log(f"machine {busy:.0f}% busy with other work; waiting for it to calm down")
        time.sleep(3)
        busy = background_busy()
    return busy


def measure(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    sink = target.sink
    base = sink.count
    want = base + args.messages
    os.sync()
    time.sleep(args.pause)
    quiet = wait_quiet(args.quiet_pct, args.quiet_wait)
    cmd = [
        "smtp-source",
        "-s",
        str(args.sessions),
        "-m",
        str(args.messages),
        "-l",
        str(args.size),
        "-f",
        SENDER,
        "-t",
        RECIPIENT,
        "-M",
        "bench-client.local",
        f"127.0.0.1:{target.port}",
    ]
    cpu0 = machine_cpu()
    t0 = time.monotonic()
    src = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = src.communicate(timeout=args.run_timeout)
    except subprocess.TimeoutExpired:
        stop(src, wait=2)
        raise BenchError(  # noqa: B904 (the timeout itself says nothing more)
            f"smtp-source did not finish within {args.run_timeout}s "
            f"(sink count {sink.count - base}/{args.messages}): {' '.join(cmd)}"
        )
    finally:
        if src in _started:
            _started.remove(src)
    t1 = time.monotonic()
    if src.returncode != 0:
        raise BenchError(
            f"smtp-source exit {src.returncode} after {t1 - t0:.2f}s "
            f"(sink count {sink.count - base}/{args.messages}): {' '.join(cmd)}\n"
            f"{out.decode(errors='replace')}"
        )
    t2 = sink.wait_count(want, args.run_timeout)
    if t2 is None:
        raise BenchError(
            f"sink got only {sink.count - base}/{args.messages} messages within "
            f"{args.run_timeout}s after smtp-source finished"
        )
    cpu1 = machine_cpu()
    time.sleep(args.settle)  # duplicates or stragglers would show here
    extra = sink.count - want
    target.wait_idle()
    r = {
        "accepted_s": round(t1 - t0, 3),
        "delivered_s": round(t2 - t0, 3),
        "accepted_mps": round(args.messages / (t1 - t0), 1),
        "delivered_mps": round(args.messages / (t2 - t0), 1),
        "extra_at_sink": extra,
        "busy_before_pct": quiet,
        "machine_busy_pct": round(100 * (1 - (cpu1[0] - cpu0[0]) / max(1, cpu1[1] - cpu0[1])), 1),
    }
    r.update(target.after_run())
    return r


def profile_relayd(target: Relayd, args: argparse.Namespace, results: Path) -> dict[str, Any]:
    """One extra relayd run under py-spy (not counted in the figures); top functions."""
    py_spy = ensure_py_spy()
    if not py_spy or target.proc is None:
        return {"skipped": "py-spy unavailable"}
    raw = results / f"relayd-py-spy-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    # --gil: only samples of the thread holding the GIL, i.e. the Python CPU that serializes
    # the event loop (threads blocked in fsync are not counted)
    spy = spawn(
        [
            py_spy,
            "record",
            "--pid",
            str(target.proc.pid),
            "--rate",
            "200",
            "--format",
            "raw",
            "--gil",
            "--output",
            str(raw),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    if spy.poll() is not None:
        return {"skipped": f"py-spy exited {spy.returncode} (ptrace not permitted?)"}
    try:
        r = measure(target, args)
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            stop(spy)
        if spy in _started:
            _started.remove(spy)
    if not raw.exists():
        return {"skipped": "py-spy wrote no output", "run": r}
    prof = summarize_collapsed(raw.read_text(errors="replace"), args.top)
    prof["run_under_profiler"] = r
    prof["raw"] = str(raw)
    return prof


def summarize_collapsed(text: str, top: int) -> dict[str, Any]:
    """py-spy raw (collapsed) stacks: 'frame;frame;... count' -> self and inclusive shares."""
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    files: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [
            f
            for f in stack.split(";")
            if f and not f.startswith("process ") and not f.startswith("thread ")
        ]
        if not frames:
            continue
        total += count
        self_c[_short(frames[-1], line=True)] += count
        for f in set(_short(f) for f in frames):
            incl[f] += count
        # which package's code the leaf is in
        m = re.search(r"\((.*?):\d+\)$", frames[-1])
        files[_pkg(m.group(1) if m else "?")] += count

    def pct(c: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in c.most_common(top)]

    # frames on (nearly) every stack -- main, run_forever, Handle._run -- say nothing
    incl = collections.Counter({k: v for k, v in incl.items() if not _ROOT_FRAME.search(k)})
    return {
        "samples": total,
        "self_top": pct(self_c),
        "inclusive_top": pct(incl),
        "self_by_package": pct(files),
    }


_ROOT_FRAME = re.compile(
    r"runpy|threading\.py|asyncio/runners|run_forever|run_until_complete|_run_once|Handle\._run"
    r"|^<module>|^main \(|^cmd_serve|^_worker|_WorkItem\.run"
)


def _short(frame: str, line: bool = False) -> str:
    # "handle_DATA (/x/relayd/listener.py:123)" -> "handle_DATA (relayd/listener.py[:123])"
    m = re.match(r"(.*?) \((.*?)(:\d+)?\)$", frame)
    if not m:
        return frame
    func, path, lineno = m.groups()
    return f"{func} ({_trim(path)}{(lineno or '') if line else ''})"


def _trim(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3", "/relayd/"):
        i = path.find(marker)
        if i >= 0:
            rest = path[i + len(marker) :]
            if marker == "/lib/python3":
                rest = "stdlib/" + rest.split("/", 1)[-1]
            if marker == "/relayd/":
                rest = "relayd/" + rest
            return rest
    return path


def _pkg(path: str) -> str:
    t = _trim(path)
    if t.startswith("stdlib/"):
        parts = t.split("/")
        return "stdlib:" + (parts[1] if len(parts) > 1 else "?")
    return t.split("/")[0]


# --------------------------------------------------------------------------- report


def machine_info(workdir: Path) -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    fs = run(["df", "-T", str(workdir)], timeout=10, check=False).stdout.splitlines()[-1].split()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_mib": mem,
        "kernel": platform.release(),
        "spool_fs": f"{fs[1]} on {fs[0]}" if len(fs) > 2 else "?",
        "python": platform.python_version(),
        "postfix": tool_version(["postconf", "-d", "-h", "mail_version"]),
        "relayd_git": tool_version(
            ["git", "-C", str(ROOT), "log", "-1", "--format=%h %s", "--", "relayd"]
        ),
        "relayd_tree_dirty": bool(
            run(
                ["git", "-C", str(ROOT), "status", "--porcelain", "--", "relayd"],
                timeout=30,
                check=False,
            ).stdout
        ),
    }


def summary(runs: list[dict[str, Any]], key: str) -> dict[str, float] | None:
    vals = [r[key] for r in runs if key in r]
    if not vals:
        return None
    return {"median": round(statistics.median(vals), 1), "min": min(vals), "max": max(vals)}


def fmt(s: dict[str, float] | None) -> str:
    if not s:
        return "—"
    return f"{s['median']:,.0f} ({s['min']:,.0f}–{s['max']:,.0f})"


def table(report: dict[str, Any]) -> str:
    rows = [
        "| target | accepted msg/s | delivered msg/s | machine CPU busy | runs |",
        "|---|---|---|---|---|",
    ]
    for name, t in report["targets"].items():
        if t.get("error") and not t["runs"]:
            rows.append(f"| {name} | FAILED | FAILED | — | 0 |")
            continue
        busy = [r["machine_busy_pct"] for r in t["runs"] if "machine_busy_pct" in r]
        busy_s = f"{statistics.median(busy):.0f}%" if busy else "—"
        rows.append(
            f"| {name} | {fmt(t['accepted'])} | {fmt(t['delivered'])} | {busy_s}"
            f" | {len(t['runs'])} |"
        )
    out = "\n".join(rows)
    ratios = report.get("ratios", {})
    if ratios:
        out += "\n\n| ratio (medians) | accepted | delivered |\n|---|---|---|\n"
        out += "\n".join(
            f"| {k} | {v['accepted']:.2f} | {v['delivered']:.2f} |" for k, v in ratios.items()
        )
    extra = [r for t in report["targets"].values() for r in t["runs"] if r.get("extra_at_sink")]
    lines = []
    for name, rel in report["targets"].items():
        if not name.startswith("relayd") or not rel.get("runs"):
            continue
        hwm = max(r.get("vmhwm_kib") or 0 for r in rel["runs"])
        rss = max(r.get("vmrss_kib") or 0 for r in rel["runs"])
        procs = max(r.get("processes") or 1 for r in rel["runs"])
        cpu = [r["cpu_s"] for r in rel["runs"] if "cpu_s" in r]
        lines.append(
            f"{name}: peak RSS (VmHWM, largest process) {hwm / 1024:.1f} MiB"
            + (f", {procs} processes, {rss / 1024:.1f} MiB RSS in all" if procs > 1 else "")
            + "; CPU per run (all processes): "
            + ", ".join(f"{c:.2f}s" for c in cpu)
            + f" (= {1e6 * statistics.median(cpu) / report['params']['messages']:.0f} µs/message)"
        )
    if extra:
        lines.append(
            f"WARNING: {len(extra)} run(s) delivered more than {report['params']['messages']} "
            "messages to the sink (duplicates)"
        )
    noisy = [
        r for t in report["targets"].values() for r in t["runs"] if r.get("busy_before_pct", 0) > 15
    ]
    if noisy:
        lines.append(
            f"WARNING: {len(noisy)} run(s) started while other work kept the machine >15% busy "
            "(see busy_before_pct in the JSON): those figures are low"
        )
    for name, t in report["targets"].items():
        if t.get("error"):
            lines.append(f"{name} ERROR: {t['error'].splitlines()[0]}")
    if lines:
        out += "\n\n" + "\n".join(lines)
    return out


def profile_text(prof: dict[str, Any] | None) -> str:
    if not prof or "self_top" not in prof:
        return f"profile: {prof.get('skipped') if prof else 'not run'}"
    lines = [
        f"relayd profile (py-spy --gil: Python code holding the GIL; {prof['samples']} samples"
        " at 200 Hz in an extra, uncounted run):",
        "  self time by package: " + ", ".join(f"{k} {v}%" for k, v in prof["self_by_package"][:8]),
        "  top self:",
    ]
    lines += [f"    {v:5.1f}%  {k}" for k, v in prof["self_top"]]
    lines.append("  top inclusive:")
    lines += [f"    {v:5.1f}%  {k}" for k, v in prof["inclusive_top"]]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=4096, help="message payload bytes (smtp-source -l)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--targets",
        default="baseline,relayd,relayd-w2,postfix-8,postfix-def",
        help="comma list of baseline, relayd, relayd-wN (server.workers = N), postfix-8, "
        "postfix-def",
    )
    ap.add_argument(
        "--relayd",
        default=str(ROOT / ".venv/bin/relayd"),
        help="relayd command (shell words), e.g. "
        "'env PYTHONPATH=/tmp/x .venv/bin/python -m relayd'",
    )
    ap.add_argument(
        "--relayd-head",
        action="store_true",
        help="measure relayd/ as committed at HEAD (exported to the temp dir), not the work tree",
    )
    ap.add_argument(
        "--relayd-patch",
        metavar="DIFF",
        help="measure a patched copy: relayd/ as committed at HEAD, exported to the temp dir, DIFF "
        "applied with patch -p1, run with the project venv's Python (nothing in the tree changes)",
    )
    ap.add_argument(
        "--upstream-connections", type=int, default=8, help="relayd route max_connections"
    )
    ap.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="skip the extra relayd run under py-spy",
    )
    ap.add_argument("--top", type=int, default=15, help="functions listed in the profile")
    ap.add_argument("--run-timeout", type=float, default=120, help="seconds for each wait of a run")
    ap.add_argument(
        "--time-limit", type=float, default=1800, help="seconds for the whole benchmark"
    )
    ap.add_argument("--pause", type=float, default=1.0, help="seconds of quiet before each run")
    ap.add_argument(
        "--settle", type=float, default=1.0, help="seconds to watch for duplicates after each run"
    )
    ap.add_argument(
        "--quiet-pct",
        type=float,
        default=15,
        help="before each run, wait while other work keeps the machine busier than this",
    )
    ap.add_argument(
        "--quiet-wait", type=float, default=120, help="seconds to wait for quiet at most"
    )
    ap.add_argument(
        "--workdir", default="/var/tmp", help="where the temp spools go (disk, not tmpfs)"
    )
    ap.add_argument("--results", default=str(BENCH / "results"))
    args = ap.parse_args()

    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = {n for n in names if n not in ("baseline", "relayd", "postfix-8", "postfix-def")} - {
        n for n in names if re.fullmatch(r"relayd-w\d+", n)
    }
    if unknown:
        ap.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if os.geteuid() != 0:
        print(
            "bench: run as root (it installs postfix and starts a Postfix instance)",
            file=sys.stderr,
        )
        return 2

    def on_signal(signum: int, _frame: Any) -> None:
        raise Deadline(f"signal {signum}")

    signal.signal(signal.SIGALRM, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.alarm(int(args.time_limit))

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = Path(tempfile.mkdtemp(prefix="relayd-bench-", dir=args.workdir))
    workdir.chmod(0o755)  # Postfix's daemons must traverse it
    report: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "params": {
            "messages": args.messages,
            "sessions": args.sessions,
            "size": args.size,
            "runs": args.runs,
            "relayd_upstream_connections": args.upstream_connections,
            "smtp_source": "one message per session (no -d)",
        },
        "targets": {},
    }
    targets: dict[str, Target] = {}
    sinks: list[Sink] = []
    rc = 0
    try:
        ensure_postfix_tools()
        report["machine"] = machine_info(workdir)
        if args.relayd_patch or args.relayd_head:
            diff = Path(args.relayd_patch).resolve() if args.relayd_patch else None
            args.relayd = patched_relayd(diff, workdir)
        relayd_cmd = shlex.split(args.relayd)
        if not shutil.which(relayd_cmd[0]):
            for n in [n for n in names if n.startswith("relayd")]:
                report["targets"][n] = {
                    "runs": [],
                    "error": f"relayd executable not found: {args.relayd}",
                }
                names.remove(n)
        report["params"]["relayd_command"] = args.relayd
        report["params"]["relayd_patch"] = args.relayd_patch
        report["params"]["relayd_source"] = (
            "HEAD" if args.relayd_patch or args.relayd_head else "work tree (editable install)"
        )
        for name in names:
            sink = Sink(name, workdir)
            sinks.append(sink)
            if name == "baseline":
                t: Target = Baseline(sink)
            elif name.startswith("relayd"):
                workers = int(name[len("relayd-w") :]) if name != "relayd" else 1
                t = Relayd(sink, workdir, relayd_cmd, args.upstream_connections, workers)
            else:
                t = Postfix(sink, workdir, 8 if name == "postfix-8" else None)
            report["targets"][name] = {
                "description": t.description,
                "runs": [],
                "sink_port": sink.port,
            }
            try:
                t.start()
                report["targets"][name]["port"] = t.port
                targets[name] = t
            except BenchError as e:
                log(f"{name}: could not start: {e}")
                report["targets"][name]["error"] = f"start: {e}"
                targets[name] = t  # still closed in finally
        for i in range(args.runs):
            for name, t in targets.items():
                entry = report["targets"][name]
                if entry.get("error"):
                    continue
                log(f"round {i + 1}/{args.runs}: {name}")
                try:
                    r = measure(t, args)
                    entry["runs"].append(r)
                    log(
                        f"  {name}: accepted {r['accepted_mps']:.0f}/s,"
                        f" delivered {r['delivered_mps']:.0f}/s"
                        + (f", extra {r['extra_at_sink']}" if r["extra_at_sink"] else "")
                    )
                except BenchError as e:
                    log(f"  {name} FAILED: {e}")
                    entry["error"] = f"run {i + 1}: {e}"
                    if isinstance(t, Relayd):
                        entry["error"] += f"\n--- relayd log (tail) ---\n{t.log_tail()}"
                        entry["error"] += f"\n--- py-spy dump of relayd ---\n{t.stack_dump()}"
                        # a stuck relayd (e.g. spinning) must not skew the other targets' runs
                        entry["shutdown"] = t.close()
        if (
            args.profile
            and isinstance(targets.get("relayd"), Relayd)
            and not report["targets"]["relayd"].get("error")
        ):
            log("extra relayd run under py-spy (not counted)")
            try:
                report["relayd_profile"] = profile_relayd(targets["relayd"], args, results)  # type: ignore[arg-type]
            except BenchError as e:
                report["relayd_profile"] = {"skipped": f"profiled run failed: {e}"}
    except (BenchError, Deadline) as e:
        log(f"aborted: {e}")
        report["aborted"] = str(e)
        rc = 1
    finally:
        signal.alarm(0)
        for name, t in targets.items():
            try:
                info = t.close()
                if info:
                    report["targets"][name]["shutdown"] = info
                if t.notes:
                    report["targets"][name]["notes"] = t.notes
            except Exception as e:
                log(f"closing {name}: {e}")
        for s in sinks:
            s.close()
        stop_all()
        shutil.rmtree(workdir, ignore_errors=True)

    for t in report["targets"].values():
        t["accepted"] = summary(t["runs"], "accepted_mps")
        t["delivered"] = summary(t["runs"], "delivered_mps")
    report["ratios"] = {}
    for rname, rel in report["targets"].items():
        for pf in ("postfix-8", "postfix-def"):
            p = report["targets"].get(pf, {})
            if rname.startswith("relayd") and rel.get("accepted") and p.get("accepted"):
                report["ratios"][f"{rname} / {pf}"] = {
                    "accepted": rel["accepted"]["median"] / p["accepted"]["median"],
                    "delivered": rel["delivered"]["median"] / p["delivered"]["median"],
                }
    if any(t.get("error") for t in report["targets"].values()):
        rc = 1
    machine = report.get("machine", {})
    text = (
        f"relayd bench {report['date']} on {machine.get('host', '?')} "
        f"({machine.get('cores', '?')} cores, {machine.get('cpu', '?')}); "
        f"{args.messages} messages x {args.size} B, {args.sessions} sessions, {args.runs} runs; "
        "median (min–max)\n\n" + table(report)
    )
    if "relayd_profile" in report:
        text += "\n\n" + profile_text(report["relayd_profile"])
    (results / f"{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / f"{stamp}.md").write_text(text + "\n")
    for ext in ("json", "md"):
        latest = results / f"latest.{ext}"
        latest.unlink(missing_ok=True)
        latest.symlink_to(f"{stamp}.{ext}")
    print(text)
    print(f"\n(results: {results / stamp}.json / .md)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
