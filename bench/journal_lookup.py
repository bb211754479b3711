"""How long `relayd log` takes on a year of a small firm's mail.

Writes N events (default 200,000) over 365 day files into a temporary journal, in the shape
relayd writes them (accepted, delivered, the odd deferral and failure), then times
`relayd log --message-id`, `--id`, `--to` and `--since 2d` as whole processes (Python start-up
included), each several times, and prints min / median / max. Standard library only.

    .venv/bin/python bench/journal_lookup.py [--events 200000] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DAY_S = 86400


def write_journal(path: Path, events: int, seed: int = 7) -> dict[str, str]:
    """N events over 365 days; returns a sample message's queue id, Message-ID and recipient."""
    rng = random.Random(seed)
    now = time.time()
    per_day = events // 365
    sample: dict[str, str] = {}
    n = 0
    for day in range(365, 0, -1):
        start = now - day * DAY_S
        stamp = time.strftime("%Y-%m-%d", time.gmtime(start))
        lines = []
        while len(lines) < per_day:
            n += 1
            qid = f"{n:016X}"
            mid = f"<{n}.{rng.randrange(10**9)}@casemanager.business.com>"
            rcpt = f"client{rng.randrange(5000)}@example.com"
            t = start + len(lines) * (DAY_S / per_day)
            base = {"id": qid, "message_id": mid, "from": "casemanager@business.com",
                    "route": "staff"}
            lines.append({"time": t, "event": "accepted", **base, "to": [rcpt],
                          "client": "127.0.0.1", "size": 23456, "subject": f"Case {n}"})
            if rng.random() < 0.03:
                lines.append({"time": t + 1, "event": "deferred", **base, "to": [rcpt],
                              "reply": "451 4.7.0 Try again later", "attempt": 1})
            lines.append({"time": t + 2, "event": "delivered", **base, "to": [rcpt],
                          "upstream": "graph:https://graph.microsoft.com", "attempt": 1,
                          "latency_s": 0.21, "reply": "250 2.0.0 accepted by Graph sendMail"})
            if day == 200 and not sample:
                sample = {"id": qid, "message_id": mid, "to": rcpt}
        (path / f"{stamp}.jsonl").write_text(
            "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in lines[:per_day]))
    return sample


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        journal = Path(tmp) / "journal"
        journal.mkdir()
        t = time.monotonic()
        sample = write_journal(journal, args.events)
        size = sum(f.stat().st_size for f in journal.iterdir())
        print(f"{args.events} events in 365 files, {size / 2**20:.1f} MiB, written in "
              f"{time.monotonic() - t:.1f}s")
        cfg = Path(tmp) / "relayd.toml"
        cfg.write_text(f'[queue]\npath = "{tmp}/queue"\n[journal]\npath = "{journal}"\n'
                       '[routes.staff]\nsenders = ["*"]\nupstream = "outbox"\n'
                       f'path = "{tmp}/outbox"\n')
        cases = {"--message-id": ["--message-id", sample["message_id"]],
                 "--id": ["--id", sample["id"]],
                 "--to": ["--to", sample["to"]],
                 "--since 2d": ["--since", "2d"]}
        print(f"{'query':<14} {'min':>7} {'median':>7} {'max':>7}  events")
        for name, argv in cases.items():
            times = []
            found = 0
            for _ in range(args.runs):
                t = time.monotonic()
                out = subprocess.run([sys.executable, "-m", "relayd", "log", "-c", str(cfg),
                                      *argv], capture_output=True, text=True, cwd=ROOT,
                                     env={**os.environ}, timeout=120)
                times.append(time.monotonic() - t)
                found = len(out.stdout.splitlines())
            print(f"{name:<14} {min(times):7.3f} {statistics.median(times):7.3f} "
                  f"{max(times):7.3f}  {found}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
