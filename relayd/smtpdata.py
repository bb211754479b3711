"""Reading DATA in chunks: where a message ends, and what is stored of it.

The policy:
- Only CRLF.CRLF ends DATA (RFC 5321 4.1.1.4), as in aiosmtpd >= 1.4.6: a bare LF or bare CR
  before or after the dot is content. The smuggling look-alikes (`\\n.\\n`, `\\n.\\r\\n`,
  `\\r.\\r`, ...) therefore stay inside the message, and since the stored bytes get CRLF line
  endings and the SMTP client dot-stuffs them upstream, none of them can end the message there.
- A line that starts with a dot loses that dot (dot-unstuffing, RFC 5321 4.5.2), only at the
  start of a CRLF line, as aiosmtpd does.
- Then a bare CR or bare LF becomes CRLF, as Postfix stores lines.
- The size limit counts the bytes as received (stuffed dots included, the final `.CRLF` not), as
  aiosmtpd does; past it the rest is read and dropped, and DATA is answered 552.
- There is no line length limit: nothing here holds a line, so a long one costs nothing.

The mechanism: `read_chunks` finds the end with `StreamReader.readuntil(b"\\r\\n.\\r\\n")`. Where
the separator is not in the first `limit` bytes, readuntil raises LimitOverrunError with the
number of bytes that cannot begin one, keeping the last four in its buffer, so a separator
split across reads is found on the next one. The only place it cannot see is the very start,
where the CRLF before the dot was the DATA command's own: there the first bytes are read one at
a time until they cannot be part of an end-of-data line.

Rejected: aiosmtpd's own DATA, which reads line by line (a Python step per line, most of a
large message's CPU) and joins the whole message in memory (a 34 MB message took relayd's RSS to
224 MB); and reading fixed-size blocks, which over-reads into the commands a client pipelines
after the dot, with no public way to hand them back to the reader.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

END_OF_DATA = b"\r\n.\r\n"
_BARE_EOL_RE = re.compile(rb"\r\n|\r|\n")


def normalize_line_endings(data: bytes) -> bytes:
    """Bare CR or LF becomes CRLF, as Postfix stores lines."""
    crlf = data.count(b"\r\n")
    if data.count(b"\n") == crlf and data.count(b"\r") == crlf:
        return data
    return _BARE_EOL_RE.sub(b"\r\n", data)


def _advance(matched: int, byte: int) -> int:
    """How much of END_OF_DATA the stream ends with after one more byte (no prefix of it
    repeats except its CR, so a mismatch falls back to 1 on CR and to 0 otherwise)."""
    if byte == END_OF_DATA[matched]:
        return matched + 1
    return 1 if byte == 0x0D else 0


async def read_chunks(reader: asyncio.StreamReader,
                      chunk_size: int = 1024 * 1024) -> AsyncIterator[bytes]:
    """The DATA content as received (dots still stuffed), in chunks of at most `chunk_size`
    bytes but the last (which is at most the reader's limit), ending with the CRLF before the
    final dot; the final `.CRLF` is consumed and not yielded. Raises
    asyncio.IncompleteReadError when the client goes away first."""
    head = bytearray()
    matched = 2  # the DATA command's CRLF, already read
    while 0 < matched < len(END_OF_DATA):
        head += await reader.readexactly(1)
        matched = _advance(matched, head[-1])
    if matched == len(END_OF_DATA):
        yield bytes(head[:-3])
        return
    yield bytes(head)
    while True:
        try:
            chunk = await reader.readuntil(END_OF_DATA)
        except asyncio.LimitOverrunError as e:
            # No end of data begins in the first e.consumed bytes, so any part of them is safe.
            yield await reader.readexactly(min(e.consumed, chunk_size))
            continue
        yield chunk[:-3]
        return


class Decoder:
    """Received chunks -> the bytes to store: dot-unstuffed, then line endings made CRLF.

    A trailing CR or CRLF is held back until the next chunk, so a dot or LF that arrives with
    the next read is seen with it."""

    def __init__(self) -> None:
        self._carry = b"\r\n"  # the message starts at the start of a line
        self._at_start = True  # _carry's CRLF is the virtual one before the first line

    def feed(self, raw: bytes) -> bytes:
        data = self._carry + raw
        keep = 2 if data.endswith(b"\r\n") else 1 if data.endswith(b"\r") else 0
        body = data[:len(data) - keep]
        self._carry = data[len(data) - keep:]
        if not body:
            return b""
        body = body.replace(b"\r\n.", b"\r\n")
        if self._at_start:
            body, self._at_start = body[2:], False
        return normalize_line_endings(body)

    def finish(self) -> bytes:
        """What is held back, once the end of data is reached."""
        carry, self._carry = self._carry, b""
        if self._at_start:
            return b""
        return normalize_line_endings(carry)


def decode(raw: bytes) -> bytes:
    """One whole DATA content (as received, without the final dot line) as stored."""
    decoder = Decoder()
    return decoder.feed(raw) + decoder.finish()
