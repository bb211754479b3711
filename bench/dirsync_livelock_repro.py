"""relayd.queue._DirSync livelock (relayd at c509c07 and before): a sync() that starts after the
fsync future is done but before the leader task has resumed spins forever in
`await asyncio.shield(done_future)`, which never yields, so the event loop stops.

Run: .venv/bin/python bench/dirsync_livelock_repro.py   (hangs at "0 window open" when the bug
is there: kill it, e.g. with `timeout -s KILL 15 ...`; prints "ok" when fixed)."""

import asyncio
import tempfile
from pathlib import Path

from relayd.queue import _DirSync  # type: ignore[attr-defined]


async def main() -> None:
    d = _DirSync(Path(tempfile.mkdtemp()))
    for i in range(1000):
        leader = asyncio.ensure_future(d.sync())  # starts an fsync in the executor
        await asyncio.sleep(0)
        while d._running is not None and not d._running.done():
            await asyncio.sleep(0)
        print(i, "leader resumed" if d._running is None else "window open", flush=True)
        await d.sync()  # a DATA handler arriving in that window
        await leader
    print("ok")


asyncio.run(main())
