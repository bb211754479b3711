"""Reply reads on asyncio's own event loop: a plain Protocol against a BufferedProtocol, over
a socketpair, N round trips of a 65-byte reply; CPU time (process_time) a read, 3 rounds.

    .venv/bin/python bench/reply_reads.py 20000

What issue 24 measured the upstream client's BufferedProtocol half with (bench/README.md):
uvloop never asks a protocol that is an asyncio.Protocol for a buffer, so this is the whole of
what it saved, and only on asyncio's selector loop. Standard library only; seconds to run.
"""

import asyncio
import socket
import sys
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
REPLY = b"250 2.0.0 Ok: queued as 4Xyz1234567890 <some-id@upstream.test>\r\n"[:65]



class Plain(asyncio.Protocol):
    def __init__(self):
        self.fut = None

    def data_received(self, data):
        self.fut.set_result(data)


class Buffered(asyncio.BufferedProtocol):
    def __init__(self):
        self.fut = None
        self.buf = memoryview(bytearray(16384))

    def get_buffer(self, n):
        return self.buf

    def buffer_updated(self, n):
        self.fut.set_result(bytes(self.buf[:n]))


async def run(cls):
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    tr, pr = await loop.create_connection(cls, sock=a)
    b.setblocking(False)
    t0 = time.process_time()
    for _ in range(N):
        pr.fut = loop.create_future()
        b.send(REPLY)
        await pr.fut
    dt = time.process_time() - t0
    tr.close()
    b.close()
    return dt


async def main():
    for _ in range(3):
        for cls in (Plain, Buffered):
            dt = await run(cls)
            print(f"{cls.__name__:9} {1e6 * dt / N:6.1f} us a read")


asyncio.run(main())
