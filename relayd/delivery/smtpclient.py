"""aiosmtplib's client with two things Postfix's smtp client does: the envelope and DATA sent
in one write where the server offers PIPELINING (RFC 2920), and the message written in chunks
(from the spool file, so a large message is never whole in memory).

The policy:
- With PIPELINING: MAIL, every RCPT and DATA go in one write; the replies are read in order.
  The message follows only after DATA's 354. When MAIL or every RCPT was refused and the server
  still said 354 (RFC 2920 3.1 says it must not), a lone "." ends the empty message, and the
  transaction counts as refused.
- Without PIPELINING: one command, one reply, and no RCPT after a refused MAIL, no DATA after
  every RCPT was refused (what aiosmtplib's mail/rcpt/data do).
- Each reply must come within the route's timeout of relayd starting to wait for it, as with
  aiosmtplib's own timeout. One timer a reply fails the protocol's waiter when it is late
  (_reply): no task is cancelled, so nothing rests on how asyncio.wait_for or
  asyncio.timeout treat cancellation (which changed in Python 3.12, python/cpython#96764).
  A reply that came before the timer, in the same loop pass too, is kept.
- The reply to the end of data is kept when the attempt is cancelled (the agent's deadline,
  a stop) in the same loop pass as it comes (_final_reply): the server took the message, and
  reporting it as not sent would send it again. Any other cancellation is honoured at once.
- The message bytes are stored with CRLF line endings already (relayd.smtpdata), so they are
  only dot-stuffed, in one C-level replace per chunk; aiosmtplib's data() normalises line
  endings again and dot-stuffs with a regular expression, a second pass over every byte.

aiosmtplib reads one reply per write and drops what arrives while a parsed reply waits to be
picked up; the replies to a pipelined group often arrive just so, one segment each. So its
protocol here keeps such data in its buffer, to be read after the reply it parsed.

Private-API touch points (aiosmtplib's internals; guarded by `aiosmtplib>=5.1.3,<5.2` in
pyproject.toml; 5 names and 2 behaviours, before issue 24: 7 names and 3 behaviours):

| aiosmtplib internal                        | what relayd does with it (where)                  |
|--------------------------------------------|---------------------------------------------------|
| `SMTPProtocol._response_waiter`            | awaited; failed by the reply timer (_reply)       |
| `SMTPProtocol._response_pending`           | tells the protocol a reply is due                 |
| `SMTPProtocol._buffer`                     | keeps a pipelined group's later replies           |
| `SMTPProtocol._read_response_from_buffer`  | reads a kept reply (_reply, _came_anyway)         |
| `FlowControlMixin._drain_helper`           | waits for the socket while writing (_write_body)  |
| behaviour: `read_response(None)` awaits the waiter, its TimeoutError made SMTPReadTimeoutError |
| behaviour: a live SMTPProtocol's `__class__` can be swapped (no `__slots__`)                   |

Removed in issue 24: the transport told again of the swapped class (`set_protocol`, for the
BufferedProtocol half, which uvloop never used); the override of `SMTP._create_connection`
(the class is swapped after the public `connect()` now); `SMTPProtocol._command_lock`, held
around a transaction to keep aiosmtplib's own commands out of it, which nothing sends
meanwhile (one caller at a time: PipeliningSMTP's docstring).
Rejected: a client of our own (TLS, AUTH, EHLO parsing are aiosmtplib's, and well kept); and
sending commands without PIPELINING in one write, which servers may answer by dropping what
they did not expect.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib
from aiosmtplib.protocol import MAX_RESPONSE_LENGTH, SMTPProtocol
from aiosmtplib.response import SMTPResponse


class UnansweredEndOfData(aiosmtplib.SMTPException):
    """The message and its final "." were written and no reply came (a timeout, or the
    connection lost): RFC 1047's window, in which the server may have taken the message
    (relayd.delivery.doubt)."""


@dataclass
class Replies:
    """What the server said to one transaction. `data` is the reply to DATA (None when DATA
    was not sent); `final` the reply after the message (None when it was not sent)."""

    mail: SMTPResponse
    rcpts: list[SMTPResponse] = field(default_factory=list)
    data: SMTPResponse | None = None
    final: SMTPResponse | None = None

    @property
    def sent(self) -> bool:
        """The message went out and the server answered it."""
        return self.final is not None


def dot_stuff(chunk: bytes, line_start: bool) -> bytes:
    """A leading dot on every line gets another (RFC 5321 4.5.2). `line_start`: the chunk
    begins a line. CRLF line endings assumed (the spool stores nothing else)."""
    stuffed = chunk.replace(b"\n.", b"\n..")
    if line_start and chunk.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed


class _PipeliningProtocol(SMTPProtocol):
    """aiosmtplib's protocol, keeping the replies of a pipelined group (data_received)."""

    def data_received(self, data: bytes) -> None:
        waiter = self._response_waiter
        if waiter is not None and waiter.done() and self._response_pending:
            # The next reply of a pipelined group, before the last one was picked up: keep
            # it for PipeliningSMTP._reply (aiosmtplib would drop it).
            if len(self._buffer) + len(data) > MAX_RESPONSE_LENGTH and self.transport:
                self.transport.close()  # a server that floods: the attempt fails
                return
            self._buffer.extend(data)
            return
        super().data_received(data)


class PipeliningSMTP(aiosmtplib.SMTP):
    """aiosmtplib's client with one more command: a whole mail transaction, pipelined where
    the server offers PIPELINING. One caller at a time (relayd.delivery.smtp's session owns
    its client), so nothing else's commands can come between a transaction's."""

    async def connect(self, *args: Any, **kwargs: Any) -> SMTPResponse:
        response = await super().connect(*args, **kwargs)
        if self.protocol is not None:
            # The same object and state, with the reading above, from here on (aiosmtplib
            # read the greeting and did STARTTLS and AUTH with its own).
            self.protocol.__class__ = _PipeliningProtocol
        return response

    def _protocol(self) -> SMTPProtocol:
        if self.protocol is None or not self.is_connected:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        return self.protocol

    async def _reply(self, protocol: SMTPProtocol, timeout: float | None) -> SMTPResponse:
        """The next reply: the one the protocol parsed, else one still in its buffer, else
        from the network, within `timeout` seconds (a reply that came in the same pass as
        the timer is kept)."""
        waiter = protocol._response_waiter
        if waiter is None or not waiter.done():
            buffered = protocol._read_response_from_buffer()
            if buffered is not None:
                return buffered
        if waiter is None or timeout is None:
            return await protocol.read_response(timeout=timeout)
        loop = waiter.get_loop()  # get_running_loop() is a getpid() system call on 3.11
        timer = loop.call_at(loop.time() + timeout, _time_out, waiter)
        try:
            # read_response(None) is a plain await of the waiter; the timer's TimeoutError
            # becomes aiosmtplib's SMTPReadTimeoutError there, as with its own timeout.
            return await protocol.read_response(timeout=None)
        finally:
            timer.cancel()

    async def _final_reply(self, protocol: SMTPProtocol,
                           timeout: float | None) -> SMTPResponse:
        """The reply to the end of data. When the attempt is cancelled (the agent's deadline,
        a stop) in the same loop pass as this reply comes, the reply is kept and the
        cancellation ends there: the server took the message, and reporting it as not sent
        would send it again. The reply is on the waiter when it came first, in the buffer
        when the cancel came first (the cancelled waiter leaves it there:
        _PipeliningProtocol.data_received)."""
        waiter = protocol._response_waiter
        try:
            return await self._reply(protocol, timeout)
        except asyncio.CancelledError:
            reply = _came_anyway(protocol, waiter)
            if reply is None:
                raise
            # The request stays counted (Task.cancelling()): the agent's deadline takes it
            # back as its timeout ends; a stop ends the worker after this report.
            return reply

    async def _command(self, protocol: SMTPProtocol, line: bytes,
                       timeout: float | None) -> SMTPResponse:
        protocol._response_pending = True
        protocol.write(line)
        return await self._reply(protocol, timeout)

    async def transaction(self, mail: bytes, rcpts: Sequence[bytes],
                          body: bytes | AsyncIterable[bytes]) -> Replies:
        """One mail transaction: `mail` and `rcpts` are whole command lines (CRLF included),
        `body` the message as stored (CRLF line endings), whole or in chunks."""
        protocol = self._protocol()
        timeout = self.timeout
        try:
            if self.supports_extension("pipelining"):
                protocol._response_pending = True
                protocol.write(b"".join([mail, *rcpts, b"DATA\r\n"]))
                replies = Replies(await self._reply(protocol, timeout))
                for _ in rcpts:
                    replies.rcpts.append(await self._reply(protocol, timeout))
                replies.data = await self._reply(protocol, timeout)
            else:
                replies = Replies(await self._command(protocol, mail, timeout))
                if replies.mail.code != 250:
                    return replies
                for rcpt in rcpts:
                    replies.rcpts.append(await self._command(protocol, rcpt, timeout))
                if not _any_recipient_ok(replies.rcpts):
                    return replies
                replies.data = await self._command(protocol, b"DATA\r\n", timeout)
            if replies.data.code != 354:
                return replies
            if replies.mail.code != 250 or not _any_recipient_ok(replies.rcpts):
                await self._command(protocol, b".\r\n", timeout)  # nothing to send
                return replies
            await self._write_body(protocol, body)
            try:
                replies.final = await self._final_reply(protocol, timeout)
            except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as e:
                self.close()
                raise UnansweredEndOfData(str(e) or type(e).__name__) from e
            return replies
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
            self.close()
            raise

    async def _write_body(self, protocol: SMTPProtocol,
                          body: bytes | AsyncIterable[bytes]) -> None:
        if isinstance(body, bytes):  # with its end-of-data line: one write, one segment
            protocol._response_pending = True
            protocol.write(dot_stuff(body, True) + _end_of_data(body[-2:]))
            return
        line_start, tail = True, b""
        async for chunk in body:
            if not chunk:
                continue
            protocol.write(dot_stuff(chunk, line_start))
            line_start = chunk.endswith(b"\n")
            tail = (tail + chunk)[-2:]
            # Hold no more than the transport's buffer; a server that stops reading
            # times out like one that stops answering.
            try:
                async with asyncio.timeout(self.timeout):
                    await protocol._drain_helper()
            except TimeoutError as e:
                raise aiosmtplib.SMTPTimeoutError("Timed out sending the message") from e
        protocol._response_pending = True
        protocol.write(_end_of_data(tail))


def _time_out(waiter: asyncio.Future[SMTPResponse]) -> None:
    """The reply timer: a reply that came first (in an earlier callback of the same loop
    pass, too) is kept; else the wait ends with TimeoutError."""
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _came_anyway(protocol: SMTPProtocol,
                 waiter: asyncio.Future[SMTPResponse] | None) -> SMTPResponse | None:
    """The reply that came in the same loop pass as a cancellation of its wait: on the waiter
    when it came first, else in the protocol's buffer (the cancelled waiter leaves it
    there); None when none came."""
    if waiter is not None and waiter.done() and not waiter.cancelled() \
            and waiter.exception() is None:
        return waiter.result()
    return protocol._read_response_from_buffer()


def _end_of_data(tail: bytes) -> bytes:
    """The line that ends DATA after a message whose last two bytes are `tail`."""
    return b".\r\n" if tail in (b"\r\n", b"") else b"\r\n.\r\n"


def _any_recipient_ok(rcpts: Sequence[SMTPResponse]) -> bool:
    return any(r.code in (250, 251) for r in rcpts)
