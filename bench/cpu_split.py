"""Where relayd's CPU goes: user and system seconds per process and thread for one load.

    .venv/bin/python bench/cpu_split.py                         # workers = 1, 5,000 messages
    .venv/bin/python bench/cpu_split.py --workers 2 --messages 2000
    .venv/bin/python bench/cpu_split.py --pythonpath /tmp/old   # an export of another revision
    .venv/bin/python bench/cpu_split.py --route 'mailbox_daily_recipients = 1000000'
                                                    # extra keys for the route (TOML lines)

Starts smtp-sink (as nobody, output discarded: a pipe nobody reads fills and stalls it) and
`relayd serve` (one `*` route to the sink, spool under --workdir), runs smtp-source (20 sessions,
4 KiB messages), waits until msg/ is empty, and prints each thread's utime/stime delta from
/proc (threads under 0.02 s are left out) and the totals per message, with the context
switches of all relayd's threads per message (steadier from run to run than CPU time on a
shared VM: a proxy for hand-overs between threads and processes). Standard library only;
needs Postfix's smtp-source and smtp-sink (bench/run.sh installs them). Every wait is bounded.

    .venv/bin/python bench/cpu_split.py --workers 2 --callgrind    # instructions a message

With --callgrind, relayd runs under valgrind's callgrind (Debian's valgrind), twice: with a fifth
of --messages (at least 200) and with all of them. The difference of the instruction counts,
divided by the difference of the message counts, is what one more message costs, start-up left
out, per process kind (the main process; the listener workers together). Counted, not timed:
the same tree gives the same figure within about 0.5 % whatever else the machine does, where
CPU seconds on this VM move by 10-25 % from run to run. It counts user-space instructions only
(not the kernel's work in system calls) and runs about 50 times slower; --messages 1300 takes
about two minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def thread_times(pid: int) -> dict[tuple[int, str, str], tuple[int, int]]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[(pid, tid, name)] = (int(fields[11]), int(fields[12]))
    return out


def switches(pids: list[int]) -> int:
    """Context switches (voluntary and not) of every thread of `pids` so far: each is a
    thread going to sleep or being put aside, the cost a hand-over between threads adds."""
    total = 0
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            except OSError:
                continue
            total += sum(int(line.split()[1]) for line in status.splitlines()
                         if line.split(":")[0].endswith("ctxt_switches"))
    return total


def tree(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True,
                              check=False).stdout.split()
    return [pid, *map(int, children)]


def tree_times(pid: int) -> dict[tuple[int, str, str], tuple[int, int]]:
    out = {}
    for p in tree(pid):
        out.update(thread_times(p))
    return out


def instructions(outdir: Path) -> dict[str, int]:
    """Instructions counted by callgrind, summed per process kind ("main", "workers")."""
    kinds = {"main": 0, "workers": 0}
    for path in outdir.glob("callgrind.*"):
        text = path.read_text(errors="replace")
        total = next(int(line.split()[1]) for line in text.splitlines()
                     if line.startswith("summary:"))
        kinds["workers" if " _worker " in text[:2000] else "main"] += total
    return kinds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--pythonpath", default="", help="run relayd/ from here instead")
    ap.add_argument("--workdir", default="/var/tmp", help="where the spool goes (a disk)")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--route", action="append", default=[],
                    help="a TOML line added to the route (repeatable)")
    ap.add_argument("--callgrind", action="store_true",
                    help="count instructions a message under valgrind instead (see above)")
    args = ap.parse_args()
    if not args.callgrind:
        return measure(args, args.messages, None)
    small = max(200, args.messages // 5)
    if args.messages <= small:
        raise SystemExit("--callgrind needs --messages above 1000")
    args.timeout = max(args.timeout, 900.0)
    counted = []
    for n in (small, args.messages):
        outdir = Path(tempfile.mkdtemp(prefix="relayd-callgrind-", dir=args.workdir))
        measure(args, n, outdir)
        counted.append(instructions(outdir))
        shutil.rmtree(outdir, ignore_errors=True)
    per = {k: (counted[1][k] - counted[0][k]) / (args.messages - small) for k in counted[0]}
    print(f"workers={args.workers}: {sum(per.values()):,.0f} instructions/msg "
          f"(main process {per['main']:,.0f}, listener workers {per['workers']:,.0f}); "
          f"{small} and {args.messages} messages under callgrind")
    return 0


def measure(args: argparse.Namespace, messages: int, callgrind: Path | None) -> int:
    """One load of `messages`; with `callgrind`, relayd runs under it, its files there."""
    base = Path(tempfile.mkdtemp(prefix="relayd-cpu-", dir=args.workdir))
    sink_port, port = free_port(), free_port()
    sink = subprocess.Popen(["smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{sink_port}", "256"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (base / "relayd.toml").write_text(f"""[server]
listen = ["127.0.0.1:{port}"]
hostname = "bench.local"
workers = {args.workers}
allowed_clients = ["127.0.0.0/8"]
max_sessions_per_client = 100
[queue]
path = "{base / "queue"}"
[routes.all]
senders = ["*"]
upstream = "smtp"
host = "127.0.0.1"
port = {sink_port}
tls = "none"
max_connections = 8
""" + "".join(line + "\n" for line in args.route))
    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    log = open(base / "relayd.log", "wb")
    wrap = [] if callgrind is None else [
        "valgrind", "--tool=callgrind", "--trace-children=yes",
        f"--callgrind-out-file={callgrind}/callgrind.%p"]
    relayd = subprocess.Popen([*wrap, sys.executable, "-m", "relayd", "serve", "-c",
                               str(base / "relayd.toml")], cwd=base, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + (30 if callgrind is None else 300)
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or relayd.poll() is not None:
                    raise SystemExit("relayd did not start; see " + str(base / "relayd.log"))
                time.sleep(0.05)
        time.sleep(0.5)
        before = tree_times(relayd.pid)
        switched = switches(tree(relayd.pid))
        started = time.monotonic()
        subprocess.run(["smtp-source", "-s", "20", "-m", str(messages), "-l", "4096",
                        "-f", "bench@example.com", "-t", "sink@example.net",
                        f"127.0.0.1:{port}"], check=True, timeout=args.timeout)
        accepted_s = time.monotonic() - started
        msg = base / "queue" / "msg"
        while any(msg.iterdir()):
            if time.monotonic() - started > args.timeout:
                raise SystemExit("the spool did not drain in time")
            time.sleep(0.01)
        delivered_s = time.monotonic() - started
        after = tree_times(relayd.pid)
        switched = switches(tree(relayd.pid)) - switched
    finally:
        relayd.terminate()
        try:
            relayd.wait(30 if callgrind is None else 300)  # callgrind writes its files
        except subprocess.TimeoutExpired:
            relayd.kill()
        sink.terminate()
        log.close()
    shutil.rmtree(base, ignore_errors=True)
    if callgrind is not None:
        return 0
    hz = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    for key, (u, s) in sorted(after.items()):
        u0, s0 = before.get(key, (0, 0))
        du, ds = (u - u0) / hz, (s - s0) / hz
        user, system = user + du, system + ds
        if du + ds > 0.02:
            print(f"  pid {key[0]} {key[2]:16} user {du:5.2f} s  sys {ds:5.2f} s")
    n = messages
    print(f"workers={args.workers}: accepted {n / accepted_s:.0f} msg/s, delivered "
          f"{n / delivered_s:.0f} msg/s; CPU {1e6 * (user + system) / n:.0f} us/msg "
          f"(user {1e6 * user / n:.0f}, sys {1e6 * system / n:.0f}); "
          f"{switched / n:.1f} context switches/msg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
