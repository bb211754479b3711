#!/usr/bin/env python3
"""The cost of the queue manager's periodic scan of msg/ (relayd.qmgr.manager, issue 25) with
N messages queued: `Spool.unknown`, which the scan runs on a thread every SCAN_INTERVAL_S.

A spool with N empty message files (the scan reads names, and stats only the unknown ones),
all of them known to the queue manager but UNKNOWN of them; each figure is the median of
--runs scans, wall and CPU time of the thread.

  bench/scan.py                    # 100,000 queued, 10 unknown
  bench/scan.py --count 20000
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relayd.qmgr.manager import SCAN_INTERVAL_S, SCAN_MIN_AGE_S  # noqa: E402
from relayd.queue import Spool, new_id  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--unknown", type=int, default=10)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        spool = Spool(Path(tmp) / "queue")
        spool.create()
        ids = [new_id() for _ in range(args.count)]
        for qid in ids:
            os.close(os.open(spool.msg_dir / qid, os.O_CREAT | os.O_WRONLY, 0o600))
        old = time.time() - 3600
        for qid in ids[:args.unknown]:
            os.utime(spool.msg_dir / qid, (old, old))
        known = {qid: None for qid in ids[args.unknown:]}
        walls, cpus = [], []
        for _ in range(args.runs):
            w, c = time.perf_counter(), time.thread_time()
            found = spool.unknown(known, SCAN_MIN_AGE_S)
            cpus.append(time.thread_time() - c)
            walls.append(time.perf_counter() - w)
            assert len(found) == args.unknown, len(found)
        spool.close()
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    print(f"{args.count} queued, {args.unknown} unknown: scan {wall * 1000:.1f} ms wall, "
          f"{cpu * 1000:.1f} ms CPU (median of {args.runs}); every {SCAN_INTERVAL_S:.0f} s "
          f"that is {100 * cpu / SCAN_INTERVAL_S:.2f} % of one core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
