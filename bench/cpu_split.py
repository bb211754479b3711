"""Where relayd's CPU goes: user and system seconds per process and thread for one load.

    .venv/bin/python bench/cpu_split.py                         # workers = 1, 5,000 messages
    .venv/bin/python bench/cpu_split.py --workers 2 --messages 2000
    .venv/bin/python bench/cpu_split.py --pythonpath /tmp/old   # an export of another revision

Starts smtp-sink (as nobody, output discarded: a pipe nobody reads fills and stalls it) and
`relayd serve` (one `*` route to the sink, spool under --workdir), runs smtp-source (20 sessions,
4 KiB messages), waits until msg/ is empty, and prints each thread's utime/stime delta from
/proc (threads under 0.02 s are left out) and the totals per message, with the context
switches of all relayd's threads per message (steadier from run to run than CPU time on a
shared VM: a proxy for hand-overs between threads and processes). Standard library only;
needs Postfix's smtp-source and smtp-sink (bench/run.sh installs them). Every wait is bounded.
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--pythonpath", default="", help="run relayd/ from here instead")
    ap.add_argument("--workdir", default="/var/tmp", help="where the spool goes (a disk)")
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()
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
""")
    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    log = open(base / "relayd.log", "wb")
    relayd = subprocess.Popen([sys.executable, "-m", "relayd", "serve", "-c",
                               str(base / "relayd.toml")], cwd=base, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
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
        before = tree_times(relayd.pid)
        switched = switches(tree(relayd.pid))
        started = time.monotonic()
        subprocess.run(["smtp-source", "-s", "20", "-m", str(args.messages), "-l", "4096",
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
            relayd.wait(30)
        except subprocess.TimeoutExpired:
            relayd.kill()
        sink.terminate()
        log.close()
    hz = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    for key, (u, s) in sorted(after.items()):
        u0, s0 = before.get(key, (0, 0))
        du, ds = (u - u0) / hz, (s - s0) / hz
        user, system = user + du, system + ds
        if du + ds > 0.02:
            print(f"  pid {key[0]} {key[2]:16} user {du:5.2f} s  sys {ds:5.2f} s")
    n = args.messages
    print(f"workers={args.workers}: accepted {n / accepted_s:.0f} msg/s, delivered "
          f"{n / delivered_s:.0f} msg/s; CPU {1e6 * (user + system) / n:.0f} us/msg "
          f"(user {1e6 * user / n:.0f}, sys {1e6 * system / n:.0f}); "
          f"{switched / n:.1f} context switches/msg")
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
