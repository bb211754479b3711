#!/usr/bin/env python3
"""SMTP in -> Graph sendMail out: relayd against smtp-oauth-relay and SMTP2Graph, on one fake.

Standard library only (the fake, bench/graph/fake_graph.py, runs in the project venv). Every
wait has a timeout, the whole run has one (--time-limit), and every process started here is
stopped on exit, on error and on SIGINT/SIGTERM, by its process group.

Targets (--targets, comma-separated):
  relayd            relayd from the work tree (the venv's editable install)
  relayd@REV        relayd/ as committed at REV (git archive into the temp dir)
  relayd@REV+graph  the same with the work tree's relayd/delivery/graph*.py over it (the
                    Graph modules' change measured alone, while others edit the rest of the tree)
  ...:mcN           either of them with the route's max_connections = N (default: relayd's)
  sor               smtp-oauth-relay (--sor-dir: its src/ patched by sor-fake-urls.patch)
  smtp2graph        SMTP2Graph (--smtp2graph-dir: npm ci and webpack build done)
Scenarios, each a load of one-message SMTP sessions (like smtp-source), unique Message-IDs:
  throughput  --messages from one mailbox, no added latency, --runs interleaved rounds
  latency     --latency-messages from one mailbox with --latency-ms added to every sendMail:
              does the client's 250 wait for Graph?
  mailboxes   for each N in --mailboxes: N senders' mailboxes, --per-mailbox messages each,
              with the added latency; the fake answers 429 beyond --mailbox-limit concurrent
              sendMail per mailbox (Graph's 4), in every scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VENV_PY = ROOT / ".venv" / "bin" / "python"
CLK_TCK = os.sysconf("SC_CLK_TCK")
DOMAIN = "bench.example"


class BenchError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[graph-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- process hygiene

_started: list[subprocess.Popen[bytes]] = []


def spawn(cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    kw.setdefault("stdin", subprocess.DEVNULL)
    p = subprocess.Popen(cmd, start_new_session=True, **kw)
    _started.append(p)
    return p


def stop(p: subprocess.Popen[bytes], wait: float = 10.0) -> int | None:
    """SIGTERM the process group, then SIGKILL; the exit code."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(wait)
        except subprocess.TimeoutExpired:
            log(f"pid {p.pid} ignored SIGTERM for {wait}s; SIGKILL")
    try:
        os.killpg(p.pid, signal.SIGKILL)  # the leader may be gone and its group not
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        pass
    if p in _started:
        _started.remove(p)
    return p.returncode


def stop_all() -> None:
    while _started:
        p = _started[-1]
        try:
            stop(p, wait=5)
        except Exception as e:  # keep cleaning
            log(f"cleanup of pid {p.pid}: {e}")
            _started.remove(p)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def wait_banner(port: int, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"exited {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(5)
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError(f"no SMTP banner on port {port} within {timeout}s")


def proc_cpu(pid: int) -> float:
    """utime + stime of a process and its waited-for children, seconds; threads included."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK_TCK


def tree(pid: int) -> list[int]:
    """pid and its descendants."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu(pid: int) -> float:
    return sum(proc_cpu(p) for p in tree(pid))


def tree_hwm_kib(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def machine_busy() -> tuple[int, int]:
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    vals = [int(v) for v in parts]
    idle = vals[3] + vals[4]
    return sum(vals) - idle, sum(vals)


# --------------------------------------------------------------------------- the fake


class Fake:
    def __init__(self, workdir: Path) -> None:
        self.state_file = workdir / "fake.json"
        self.logf = open(workdir / "fake.log", "wb")
        self.proc = spawn([str(VENV_PY), str(HERE / "fake_graph.py"),
                           "--state-file", str(self.state_file)],
                          stdout=self.logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self.state_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError("fake Graph did not start: "
                                 + (workdir / "fake.log").read_text()[-2000:])
            time.sleep(0.05)
        self.info: dict[str, Any] = json.loads(self.state_file.read_text())
        self.base_url: str = self.info["base_url"]
        self.ca_file: str = self.info["ca_file"]
        self.ctx = ssl.create_default_context(cafile=self.ca_file)

    def call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data,
                                     method="POST" if data is not None else "GET")
        with urllib.request.urlopen(req, timeout=30, context=self.ctx) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    def reset(self, delay_s: float, mailbox_limit: int | None) -> None:
        self.call("/_bench/reset", {"delay_s": delay_s, "mailbox_limit": mailbox_limit})

    def stats(self) -> dict[str, Any]:
        return self.call("/_bench/stats")

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid)


# --------------------------------------------------------------------------- the relays


class Target:
    name = ""
    port = 0
    auth: tuple[str, str] | None = None  # SMTP AUTH PLAIN user, password

    def __init__(self, workdir: Path, fake: Fake, args: argparse.Namespace) -> None:
        self.workdir, self.fake, self.args = workdir, fake, args
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = workdir

    def prepare(self) -> None:
        """Once per bench: builds, exports."""

    def command(self) -> tuple[list[str], dict[str, str], Path]:
        raise NotImplementedError

    def start(self, run_id: str) -> None:
        self.dir = self.workdir / run_id
        self.dir.mkdir(parents=True)
        cmd, env, cwd = self.command()
        self.logpath = self.dir / "relay.log"
        self.logf = open(self.logpath, "wb")
        self.proc = spawn(cmd, env={**os.environ, **env}, cwd=cwd, stdout=self.logf,
                          stderr=subprocess.STDOUT)
        wait_banner(self.port, self.args.run_timeout / 4, self.proc)

    def queue_empty(self) -> bool:
        return True

    def stop(self) -> int | None:
        rc = stop(self.proc) if self.proc is not None else None
        self.logf.close()
        return rc

    def log_tail(self) -> str:
        try:
            return self.logpath.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


class Relayd(Target):
    def __init__(self, spec: str, *a: Any) -> None:
        super().__init__(*a)
        self.name = spec
        base, _, mc = spec.partition(":mc")
        self.max_connections = int(mc) if mc else None
        rev = base.partition("@")[2]
        self.rev, plus, overlay = rev.partition("+")
        self.overlay = overlay if plus else None
        self.pythonpath: str | None = None

    def prepare(self) -> None:
        if not self.rev:
            return
        dest = self.workdir / f"relayd-src-{self.rev}{'+' + self.overlay if self.overlay else ''}"
        if not dest.exists():
            dest.mkdir(parents=True)
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", self.rev, "relayd"],
                                     capture_output=True, timeout=60, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, timeout=60,
                           check=True)
            if self.overlay == "graph":
                # graph.py and the modules it was split into (graphhttp, graphmime), and the
                # interface module they import where REV predates it.
                for src in sorted((ROOT / "relayd" / "delivery").glob("graph*.py")):
                    (dest / src.relative_to(ROOT)).write_bytes(src.read_bytes())
                base = Path("relayd/delivery/base.py")
                if not (dest / base).exists():
                    (dest / base).write_bytes((ROOT / base).read_bytes())
            elif self.overlay:
                raise SystemExit(f"unknown overlay {self.overlay!r} (only +graph)")
        self.pythonpath = str(dest)

    def command(self) -> tuple[list[str], dict[str, str], Path]:
        self.port = free_port()
        fk = self.fake.info
        secret = self.dir / "client-secret"
        secret.write_text(fk["client_secret"])
        secret.chmod(0o600)
        mc = f"max_connections = {self.max_connections}\n" if self.max_connections else ""
        cfg = self.dir / "relayd.toml"
        cfg.write_text(f"""# written by bench/graph/graph_bench.py
[server]
listen = ["127.0.0.1:{self.port}"]
hostname = "bench.local"
allowed_clients = ["127.0.0.0/8"]

[queue]
path = "{self.dir / 'queue'}"
retry_min = "1s"
retry_max = "5s"

[auth]
path = "{self.dir / 'tokens'}"

[routes.m365]
senders = ["*@{DOMAIN}"]
upstream = "graph"
endpoint = "{self.fake.base_url}"
authority = "{self.fake.base_url}"
tenant_id = "{fk['tenant']}"
client_id = "{fk['client_id']}"
client_secret_file = "{secret}"
flow = "app"
mailbox = "sender"
ca_file = "{self.fake.ca_file}"
{mc}""")
        env = {"PYTHONPATH": self.pythonpath} if self.pythonpath else {}
        # Not cwd=ROOT: `python -m` puts the cwd first on sys.path, and the work tree's
        # relayd/ would shadow the export on PYTHONPATH.
        return ([str(VENV_PY), "-m", "relayd", "serve", "-c", str(cfg)], env, self.dir)

    def queue_empty(self) -> bool:
        msg = self.dir / "queue" / "msg"
        return not msg.exists() or not any(msg.iterdir())


class SmtpOauthRelay(Target):
    name = "sor"
    port = 8025  # fixed in its main.py

    def command(self) -> tuple[list[str], dict[str, str], Path]:
        src = Path(self.args.sor_dir) / "src"
        if not (src / "main.py").exists():
            raise BenchError(f"smtp-oauth-relay not found at {src}")
        if not port_free(self.port):
            raise BenchError("port 8025 (smtp-oauth-relay's, fixed in its code) is in use")
        fk = self.fake.info
        # user name: tenant_id@client_id; password: the client secret (its README)
        self.auth = (f"{fk['tenant']}@{fk['client_id']}", fk["client_secret"])
        env = {"TLS_SOURCE": "off", "REQUIRE_TLS": "false", "LOG_LEVEL": "WARNING",
               "BENCH_LOGIN_URL": self.fake.base_url, "BENCH_GRAPH_URL": self.fake.base_url,
               "REQUESTS_CA_BUNDLE": self.fake.ca_file, "CURL_CA_BUNDLE": self.fake.ca_file}
        return ([str(self.args.sor_python), "main.py"], env, src)


class Smtp2Graph(Target):
    name = "smtp2graph"

    def command(self) -> tuple[list[str], dict[str, str], Path]:
        app = Path(self.args.smtp2graph_dir)
        server = app / "dist" / "server.js"
        if not server.exists():
            raise BenchError(f"SMTP2Graph build not found at {server}")
        self.port = free_port()
        fk = self.fake.info
        port = self.fake.base_url.rsplit(":", 1)[1]
        (self.dir / "config.yml").write_text(f"""# written by bench/graph/graph_bench.py
mode: full
send:
  appReg:
    tenant: {fk['tenant']}
    id: {fk['client_id']}
    secret: {fk['client_secret']}
  retryLimit: 3
  retryInterval: 1
receive:
  port: {self.port}
  listenAddress: 127.0.0.1
  maxSize: 35m
httpProxy:
  host: 127.0.0.1
  port: {port}
  protocol: https
""")
        env = {"NODE_EXTRA_CA_CERTS": self.fake.ca_file}
        return (["node", str(server), f"--baseDir={self.dir}"], env, self.dir)

    def queue_empty(self) -> bool:
        q = self.dir / "mailroot" / "queue"
        return not q.exists() or not any(q.iterdir())


# --------------------------------------------------------------------------- the load


@dataclass
class LoadResult:
    started: float
    finished: float
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    data_latency_s: list[float] = field(default_factory=list)  # end of DATA -> 250


def make_message(i: int, sender: str, rcpt: str, size: int, run_id: str) -> bytes:
    head = (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: bench {i}\r\n"
            f"Message-ID: <{run_id}.{i}@{DOMAIN}>\r\n"
            f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n")
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\r\n"
    body = (line * (size // len(line) + 1))[:max(0, size - len(head))]
    return head.encode() + body.rstrip(b"\r\n") + b"\r\n"


async def _session(port: int, msg: bytes, sender: str, rcpt: str,
                   auth: tuple[str, str] | None, timeout: float) -> float:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)

    async def reply() -> bytes:
        while True:
            line = await asyncio.wait_for(reader.readline(), timeout)
            if not line:
                raise BenchError("connection closed")
            if line[3:4] != b"-":
                return line

    async def cmd(text: bytes, want: bytes) -> None:
        writer.write(text)
        r = await reply()
        if not r.startswith(want):
            raise BenchError(f"{text[:20]!r} -> {r.strip()[:120]!r}")

    try:
        if not (await reply()).startswith(b"220"):
            raise BenchError("no 220 banner")
        await cmd(b"EHLO bench.client\r\n", b"250")
        if auth is not None:
            token = base64.b64encode(f"\0{auth[0]}\0{auth[1]}".encode()).decode()
            await cmd(f"AUTH PLAIN {token}\r\n".encode(), b"235")
        await cmd(f"MAIL FROM:<{sender}>\r\n".encode(), b"250")
        await cmd(f"RCPT TO:<{rcpt}>\r\n".encode(), b"250")
        await cmd(b"DATA\r\n", b"354")
        writer.write(msg + b".\r\n")
        t0 = time.monotonic()
        r = await reply()
        took = time.monotonic() - t0
        if not r.startswith(b"250"):
            raise BenchError(f"end of DATA -> {r.strip()[:120]!r}")
        await cmd(b"QUIT\r\n", b"221")
        return took
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 5)
        except (OSError, TimeoutError):
            pass


async def _load(port: int, messages: list[tuple[str, bytes]], sessions: int,
                auth: tuple[str, str] | None, timeout: float, deadline: float) -> LoadResult:
    res = LoadResult(time.time(), 0.0)
    todo = list(reversed(messages))

    async def worker() -> None:
        while todo and time.monotonic() < deadline:
            sender, msg = todo.pop()
            try:
                res.data_latency_s.append(
                    await _session(port, msg, sender, "rcpt@example.net", auth, timeout))
                res.ok += 1
            except (BenchError, OSError, TimeoutError) as e:
                res.errors.append(f"{type(e).__name__}: {e}")
                if len(res.errors) > 20:
                    todo.clear()

    await asyncio.gather(*(worker() for _ in range(sessions)))
    res.finished = time.time()
    return res


def run_load(port: int, messages: list[tuple[str, bytes]], sessions: int,
             auth: tuple[str, str] | None, timeout: float) -> LoadResult:
    deadline = time.monotonic() + timeout
    return asyncio.run(_load(port, messages, sessions, auth, 30.0, deadline))


# --------------------------------------------------------------------------- one run


def one_run(target: Target, fake: Fake, args: argparse.Namespace, scenario: str,
            mailboxes: int, per_mailbox: int, delay_s: float, run_id: str) -> dict[str, Any]:
    total = mailboxes * per_mailbox
    senders = [f"sender{k + 1}@{DOMAIN}" for k in range(mailboxes)]
    messages = [(senders[i % mailboxes],
                 make_message(i, senders[i % mailboxes], "rcpt@example.net", args.size, run_id))
                for i in range(total)]
    out: dict[str, Any] = {"target": target.name, "scenario": scenario, "mailboxes": mailboxes,
                           "messages": total, "delay_ms": round(delay_s * 1000),
                           "run_id": run_id}
    fake.reset(delay_s, args.mailbox_limit)
    os.sync()
    quiet0 = machine_busy()
    time.sleep(1.0)
    quiet1 = machine_busy()
    # Other work on the machine skews a run: say how busy it was just before.
    out["busy_before_pct"] = 100 * (quiet1[0] - quiet0[0]) / max(1, quiet1[1] - quiet0[1])
    try:
        target.start(run_id)
    except BenchError as e:
        out["error"] = f"start: {e}"
        out["log_tail"] = target.log_tail()
        if target.proc is not None:
            target.stop()
        return out
    assert target.proc is not None
    pid = target.proc.pid
    cpu0, fake0, busy0 = tree_cpu(pid), fake.cpu(), machine_busy()
    log(f"{run_id}: {total} messages, {mailboxes} mailbox(es), +{out['delay_ms']} ms")
    spy = None
    if args.profile and isinstance(target, Relayd):
        spy = spawn([args.py_spy, "record", "--gil", "-r", "200", "-f", "raw", "-o",
                     str(target.dir / "py-spy.txt"), "--pid", str(pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
    own0 = sum(os.times()[:2])
    load = run_load(target.port, messages, args.sessions, target.auth, args.run_timeout)
    out["load_cpu_ms_per_msg"] = (sum(os.times()[:2]) - own0) * 1000 / max(1, load.ok)
    out["accepted"] = load.ok
    out["load_errors"] = load.errors[:5]
    out["accept_s"] = load.finished - load.started
    # Wait (bounded) until the fake has every accepted message, then a settle for duplicates.
    deadline = time.monotonic() + args.run_timeout
    stats = fake.stats()
    while stats["unique"] < load.ok and time.monotonic() < deadline:
        if target.proc.poll() is not None:
            out["error"] = f"relay exited {target.proc.returncode}"
            break
        time.sleep(0.2)
        stats = fake.stats()
    done_at = time.time()
    cpu1, fake1, busy1 = tree_cpu(pid), fake.cpu(), machine_busy()
    out["relay_hwm_kib"] = tree_hwm_kib(pid)
    if spy is not None:
        os.killpg(spy.pid, signal.SIGINT)  # py-spy writes its stacks on Ctrl-C
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            pass
        stop(spy)
        out["profile"] = str(target.dir / "py-spy.txt")
    time.sleep(args.settle)
    stats = fake.stats()
    out["delivered"] = stats["unique"]
    out["duplicates"] = stats["duplicates"]
    if stats["unique"] < load.ok and "error" not in out:
        out["error"] = (f"only {stats['unique']} of {load.ok} accepted messages reached the "
                        f"fake within {args.run_timeout}s")
    times = stats["sent_at"]
    if times:
        nth = times[min(len(times), load.ok) - 1] if load.ok else times[-1]
        out["deliver_s"] = nth - load.started
    out["accepted_per_s"] = load.ok / out["accept_s"] if out["accept_s"] > 0 else None
    out["delivered_per_s"] = (stats["unique"] / out["deliver_s"]
                              if out.get("deliver_s") else None)
    out["relay_cpu_s"] = cpu1 - cpu0
    out["relay_cpu_ms_per_msg"] = (cpu1 - cpu0) * 1000 / max(1, stats["unique"])
    out["fake_cpu_s"] = fake1 - fake0
    wall = max(1e-6, done_at - load.started)
    out["fake_cpu_pct_of_core"] = 100 * (fake1 - fake0) / wall
    out["machine_busy_pct"] = 100 * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])
    lat = sorted(load.data_latency_s)
    if lat:
        out["data_to_250_ms_median"] = 1000 * statistics.median(lat)
        out["data_to_250_ms_p90"] = 1000 * lat[int(0.9 * (len(lat) - 1))]
    out["per_mailbox"] = stats["per_mailbox"]
    out["max_in_flight"] = stats["max_in_flight"]
    out["throttled_429"] = sum(stats["throttled"].values())
    out["token_requests"] = stats["token_requests"]
    out["graph_connections"] = stats["client_ports"]
    t_end = time.monotonic() + 30
    while not target.queue_empty() and time.monotonic() < t_end:
        time.sleep(0.2)
    out["queue_empty_at_stop"] = target.queue_empty()
    out["exit_code"] = target.stop()
    if "error" in out or load.errors:
        out["log_tail"] = target.log_tail()
    log(f"{run_id}: accepted {fmt(out.get('accepted_per_s'))}/s delivered "
        f"{fmt(out.get('delivered_per_s'))}/s cpu {fmt(out['relay_cpu_ms_per_msg'], 2)} ms/msg"
        f" dup {out['duplicates']} 429 {out['throttled_429']} busy "
        f"{fmt(out['machine_busy_pct'])}% load cpu {fmt(out['load_cpu_ms_per_msg'], 2)} ms/msg "
        f"fake {fmt(out['fake_cpu_pct_of_core'])}% {out.get('error', '')}")
    return out


# --------------------------------------------------------------------------- report


def fmt(v: Any, nd: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def med(rows: list[dict[str, Any]], key: str, nd: int = 0) -> str:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return fmt(float(vals[0]), nd)
    return f"{fmt(float(statistics.median(vals)), nd)} ({fmt(float(min(vals)), nd)}–" \
           f"{fmt(float(max(vals)), nd)})"


def report(results: list[dict[str, Any]], targets: list[str], meta: dict[str, Any]) -> str:
    lines = [f"# Graph bench {meta['stamp']}", "", f"`{meta['command']}`", "",
             f"fake Graph: {meta['fake']}", ""]
    for scenario, title in (("throughput", "throughput: one mailbox, no added latency"),
                            ("latency", "latency: one mailbox, Graph answers after "
                                        f"{meta['latency_ms']} ms")):
        lines += [f"## {title}", "",
                  "| target | accepted msg/s | delivered msg/s | CPU ms/msg (relay) | peak RSS "
                  "MiB | DATA->250 ms median | duplicates | 429s | fake CPU % of a core | "
                  "token requests | runs |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in targets:
            rows = [r for r in results if r["target"] == t and r["scenario"] == scenario]
            if not rows:
                continue
            good = [r for r in rows if "error" not in r]
            errs = [r["error"] for r in rows if "error" in r]
            busy = [r for r in good if r.get("busy_before_pct", 0) > 15]
            if busy:
                errs.append(f"{len(busy)} run(s) started on a busy machine (>15 %)")
            for r in rows:
                if "relay_hwm_kib" in r:
                    r["relay_hwm_mib"] = r["relay_hwm_kib"] / 1024
            note = " — " + "; ".join(e[:80] for e in errs) if errs else ""
            lines.append(
                f"| {t} | {med(good, 'accepted_per_s')} | {med(good, 'delivered_per_s')} | "
                f"{med(good, 'relay_cpu_ms_per_msg', 2)} | {med(good, 'relay_hwm_mib', 1)} | "
                f"{med(good, 'data_to_250_ms_median')} | "
                f"{sum(r.get('duplicates', 0) for r in rows)} | "
                f"{sum(r.get('throttled_429', 0) for r in rows)} | "
                f"{med(good, 'fake_cpu_pct_of_core')} | {med(good, 'token_requests')} | "
                f"{len(good)}/{len(rows)}{note} |")
        lines.append("")
    multi = [r for r in results if r["scenario"] == "mailboxes"]
    if multi:
        counts = sorted({r["mailboxes"] for r in multi})
        lines += [f"## mailboxes in parallel: +{meta['latency_ms']} ms, the fake allows "
                  f"{meta['mailbox_limit']} concurrent sendMail per mailbox (delivered msg/s)",
                  "", "| target | " + " | ".join(f"{n} mailbox(es)" for n in counts)
                  + " | max in flight per mailbox | 429s |",
                  "|---|" + "---|" * (len(counts) + 2)]
        for t in targets:
            rows = [r for r in multi if r["target"] == t]
            if not rows:
                continue
            cells = []
            for n in counts:
                rr = [r for r in rows if r["mailboxes"] == n]
                cells.append(
                    "ERR" if rr and all("error" in r for r in rr) else med(rr, "delivered_per_s",
                                                                           1))
            mif = max((max(r.get("max_in_flight", {}).values(), default=0) for r in rows),
                      default=0)
            lines.append(f"| {t} | " + " | ".join(cells) +
                         f" | {mif} | {sum(r.get('throttled_429', 0) for r in rows)} |")
        lines.append("")
    errors = [r for r in results if "error" in r]
    if errors:
        lines += ["## errors", ""]
        for r in errors:
            lines += [f"- {r['run_id']}: {r['error']}", "", "```",
                      r.get("log_tail", "")[-1500:], "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def make_target(spec: str, workdir: Path, fake: Fake, args: argparse.Namespace) -> Target:
    if spec.startswith("relayd"):
        return Relayd(spec, workdir, fake, args)
    if spec == "sor":
        return SmtpOauthRelay(workdir, fake, args)
    if spec == "smtp2graph":
        return Smtp2Graph(workdir, fake, args)
    raise SystemExit(f"unknown target {spec!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--targets", default="relayd,sor,smtp2graph")
    ap.add_argument("--scenarios", default="throughput,latency,mailboxes")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--latency-ms", type=float, default=200)
    ap.add_argument("--latency-messages", type=int, default=200)
    ap.add_argument("--mailboxes", default="1,4,8")
    ap.add_argument("--per-mailbox", type=int, default=60)
    ap.add_argument("--mailboxes-runs", type=int, default=1)
    ap.add_argument("--mailbox-limit", type=int, default=4)
    ap.add_argument("--settle", type=float, default=1.0)
    ap.add_argument("--run-timeout", type=float, default=180)
    ap.add_argument("--time-limit", type=float, default=2400)
    ap.add_argument("--sor-dir", default="/var/tmp/graph-bench/sor")
    ap.add_argument("--sor-python", default="/var/tmp/relayd-bench-tools/sor-venv/bin/python")
    ap.add_argument("--smtp2graph-dir", default="/var/tmp/graph-bench/smtp2graph")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--profile", action="store_true",
                    help="run relayd targets under py-spy record --gil (figures then skewed)")
    ap.add_argument("--py-spy", default="/var/tmp/relayd-bench-tools/bin/py-spy")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, profiles)")
    args = ap.parse_args()

    def on_signal(signum: int, _frame: Any) -> None:
        stop_all()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGALRM, on_signal)
    signal.alarm(int(args.time_limit))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = Path(tempfile.mkdtemp(prefix="relayd-graph-bench-", dir="/var/tmp"))
    results: list[dict[str, Any]] = []
    specs = [s.strip() for s in args.targets.split(",") if s.strip()]
    scenarios = {s.strip() for s in args.scenarios.split(",")}
    try:
        fake = Fake(workdir)
        targets = [make_target(s, workdir, fake, args) for s in specs]
        for t in targets:
            t.prepare()
        plan: list[tuple[str, int, int, float, int]] = []
        for rnd in range(args.runs):
            if "throughput" in scenarios:
                plan.append(("throughput", 1, args.messages, 0.0, rnd))
            if "latency" in scenarios:
                plan.append(("latency", 1, args.latency_messages, args.latency_ms / 1000, rnd))
        if "mailboxes" in scenarios:
            for rnd in range(args.mailboxes_runs):
                for n in (int(x) for x in args.mailboxes.split(",")):
                    plan.append(("mailboxes", n, args.per_mailbox, args.latency_ms / 1000, rnd))
        for scenario, n, per, delay, rnd in plan:
            for t in targets:  # interleaved: every target once per step
                run_id = f"{t.name.replace('@', '-').replace(':', '-')}-{scenario}-{n}-{rnd}"
                try:
                    results.append(one_run(t, fake, args, scenario, n, per, delay, run_id))
                except BenchError as e:
                    log(f"{run_id}: {e}")
                    results.append({"target": t.name, "scenario": scenario, "mailboxes": n,
                                    "run_id": run_id, "error": str(e),
                                    "log_tail": t.log_tail()})
                    if t.proc is not None and t.proc.poll() is None:
                        t.stop()
        fake_info = (f"one process, `{VENV_PY.name} bench/graph/fake_graph.py` "
                     f"(ThreadingHTTPServer over TLS, IdP + Graph + proxy on one port)")
    finally:
        stop_all()
        if args.keep or args.profile:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    meta = {"stamp": stamp, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "fake": fake_info, "latency_ms": args.latency_ms,
            "mailbox_limit": args.mailbox_limit}
    text = report(results, specs, meta)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"graph-{stamp}.md").write_text(text)
    (out / f"graph-{stamp}.json").write_text(json.dumps({"meta": meta, "results": results},
                                                       indent=1))
    for name in ("graph-latest.md", "graph-latest.json"):
        link = out / name
        link.unlink(missing_ok=True)
        link.symlink_to(f"graph-{stamp}{Path(name).suffix}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
