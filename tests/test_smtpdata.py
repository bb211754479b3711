"""relayd.smtpdata: chunked DATA reading gives exactly what aiosmtpd's line-by-line reading
gave (end only at CRLF.CRLF, dot-unstuffing at CRLF line starts, then CRLF line endings), for
every way the bytes can arrive, and leaves what the client pipelined after the dot unread."""

from __future__ import annotations

import asyncio
import random

import pytest

from relayd.smtpdata import END_OF_DATA, Decoder, normalize_line_endings, read_chunks

AFTER = b"MAIL FROM:<next@business.com>\r\n"


def reference(stream: bytes) -> tuple[bytes, bytes]:
    """aiosmtpd 1.4.6's DATA loop (lines end at CRLF only; a line of '.' ends; a leading dot
    goes), then relayd's line-ending normalisation: (stored bytes, what is left unread)."""
    lines: list[bytes] = []
    pos = 0
    while True:
        end = stream.index(b"\r\n", pos) + 2
        line = stream[pos:end]
        pos = end
        if line == b".\r\n":
            break
        lines.append(line[1:] if line.startswith(b".") else line)
    return normalize_line_endings(b"".join(lines)), stream[pos:]


async def chunked(stream: bytes, cuts: list[int], limit: int,
                  chunk_size: int = 1024) -> tuple[bytes, bytes]:
    reader = asyncio.StreamReader(limit=limit)
    previous = 0
    for cut in [*cuts, len(stream)]:
        reader.feed_data(stream[previous:cut])
        previous = cut
    reader.feed_eof()
    decoder = Decoder()
    out = b""
    async for raw in read_chunks(reader, chunk_size):
        out += decoder.feed(raw)
    out += decoder.finish()
    return out, await reader.read()


CASES = [
    b"", b"\r\n", b"\r\n\r\n", b"..\r\n", b"...\r\n", b".x\r\n", b"x\r\n",
    b"\r", b"\n", b"\r\r\n", b"\n.\n", b"a\n.\nb\r\n", b"a\r.\rb\r\n", b"a\r\n..\r\nb\r\n",
    b"Subject: s\r\n\r\n.leading dot\r\n.\r\r\n", b"\r\n\x00.\r\n", b"x" * 100 + b"\r\n",
    b"a\rb\nc\r\n", b"tail without eol", b".\r.\n.\r\n", b"\r\n.\r\r\n.\n.\r\r\n",
]


@pytest.mark.parametrize("content", CASES, ids=[repr(c)[2:-1][:30] for c in CASES])
async def test_every_split_gives_what_aiosmtpd_gave(content: bytes) -> None:
    # The content as a client sends it: ending with CRLF (a bare CR or LF there is content:
    # it gets its CRLF), then the end of data and a pipelined command.
    body = content if content.endswith(b"\r\n") or not content else content + b"\r\n"
    stream = body + b".\r\n" + AFTER
    expected = reference(stream)
    assert expected[1] == AFTER
    for limit, chunk_size in ((5, 5), (6, 1), (7, 3), (64, 1024)):
        for cut in range(len(stream) + 1):
            assert await chunked(stream, [cut], limit, chunk_size) == expected, (limit, cut)


async def test_random_messages_in_random_pieces() -> None:
    rng = random.Random(20261201)
    alphabet = [b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n.", b"\r\n.."]
    for _ in range(400):
        parts = [rng.choice(alphabet) for _ in range(rng.randrange(0, 40))]
        body = b"".join(parts).replace(END_OF_DATA, b"\r\n..\r\n")
        if body.startswith(b".\r\n"):
            body = b"." + body
        body = body + b"\r\n"
        stream = body + b".\r\n" + AFTER
        expected = reference(stream)
        cuts = sorted(rng.sample(range(len(stream) + 1), k=min(3, len(stream))))
        limit = rng.choice((5, 8, 16, 1024))
        assert await chunked(stream, cuts, limit, rng.choice((1, 2, 7, limit))) == expected, stream


async def test_large_message_comes_in_chunks_near_the_limit() -> None:
    line = b"." + b"x" * 75 + b"\r\n"  # every line dot-stuffed
    stream = line * 20_000 + b".\r\n" + AFTER
    reader = asyncio.StreamReader(limit=64 * 1024)
    reader.feed_data(stream)
    reader.feed_eof()
    sizes = [len(raw) async for raw in read_chunks(reader, 64 * 1024)]
    assert max(sizes) <= 64 * 1024 and len(sizes) > 10
    assert await chunked(stream, [777, 300_000], 64 * 1024, 64 * 1024) == reference(stream)


async def test_client_gone_before_the_end() -> None:
    reader = asyncio.StreamReader(limit=64)
    reader.feed_data(b"Subject: x\r\n\r\nno end")
    reader.feed_eof()
    with pytest.raises(asyncio.IncompleteReadError):
        async for _ in read_chunks(reader):
            pass
