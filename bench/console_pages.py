"""How long the web console's pages take with 100,000 messages queued and a year of journal.

Starts relayd in this process (its real web server on 127.0.0.1), hands its queue manager
N deferred messages (default 100,000, two routes, their upstream down so nothing is tried),
writes a year of journal (bench/journal_lookup.py's shape, default 200,000 events), then times
whole HTTP requests for the console's pages several times each and prints min / median / max.

    .venv/bin/python bench/console_pages.py [--messages 100000] [--events 200000] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from journal_lookup import write_journal  # noqa: E402

from relayd.app import MainProcess  # noqa: E402
from relayd.config import load_config  # noqa: E402
from relayd.queue import Entry, RecipientState, new_id  # noqa: E402

CONFIG = """
[server]
listen = ["127.0.0.1:0"]
hostname = "relay.bench"
workers = 1
[queue]
path = "{tmp}/queue"
retry_min = "1h"
retry_max = "2h"
[journal]
path = "{tmp}/journal"
[web]
listen = "127.0.0.1:0"
[routes.staff]
senders = ["*@business.com"]
upstream = "smtp"
host = "127.0.0.1"
port = 9
tls = "none"
[routes.other]
senders = ["*@other.test"]
upstream = "smtp"
host = "127.0.0.1"
port = 9
tls = "none"
"""


def fetch(url: str) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as r:
        r.read()
    return time.perf_counter() - start


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "journal").mkdir()
        sample = write_journal(Path(tmp) / "journal", args.events)
        cfg = Path(tmp) / "relayd.toml"
        cfg.write_text(CONFIG.format(tmp=tmp))
        service = MainProcess(load_config(cfg))
        await service.start()
        try:
            now = time.time()
            for i in range(args.messages):
                sender = "alice@business.com" if i % 10 else "x@other.test"
                rcpt = f"user{i}@example.com"
                entry = Entry(new_id(), sender, [rcpt], now - i, size=4096, attempts=1,
                              next_attempt=now + 3600, last_error="451 4.4.1 upstream down",
                              rcpt={rcpt: RecipientState()})
                service.qmgr.submit(entry)
            base = f"http://127.0.0.1:{service.web_port}"
            pages = ["/queue", "/queue?route=other", "/queue?recipient=user99999%40",
                     "/queue?offset=99950", "/api/queue", "/", "/log",
                     f"/log?to={sample['to']}", "/log?route=staff&since=2d"]
            def count() -> dict[str, int]:
                with urllib.request.urlopen(base + "/api/queue?route=other", timeout=60) as r:
                    return dict(json.loads(r.read()))

            seen = await asyncio.to_thread(count)
            print(f"the console sees {seen['queued']} queued, {seen['matching']} of route other")
            print(f"{args.messages} queued, {args.events} journal events over 365 days; "
                  f"seconds per request over {args.runs} runs")
            for page in pages:
                times = [await asyncio.to_thread(fetch, base + page) for _ in range(args.runs)]
                print(f"{page:<40} min {min(times):.3f}  median "
                      f"{statistics.median(times):.3f}  max {max(times):.3f}")
        finally:
            await service.stop(timeout=5)


if __name__ == "__main__":
    asyncio.run(main())
