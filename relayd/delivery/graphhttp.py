"""HTTPS for Microsoft Graph's calls: one interface, `HttpClient`, and its two clients.

`HttpClient.request(method, url, headers, content)` returns an `Answer` (status, headers with
lower-case names, the whole body) or raises one of httpx's exception types, so that
relayd.delivery.graph maps failures to delivery errors once, whichever client served the call:

- `H11Pool`: HTTP/1.1 keep-alive connections on asyncio streams, spoken by h11
  (python-hyper's HTTP/1.1 state machine, the one httpcore itself uses: no HTTP parsing of our
  own). httpx spent about 1.0 ms of CPU per sendMail here (its client layers, httpcore's pool,
  anyio's TLS stream), this pool a fraction of that, the same bytes on the wire (bench/graph/,
  issue 13). It serves every https URL that goes straight to its server.
- `HttpxClient`: httpx, for what the pool does not do: a proxy from the environment
  (HTTPS_PROXY, used when the route has no `ca_file`) and any non-https URL.

The pool's decisions:
- A lost answer after the whole request was handed to the connection leaves a send in doubt
  (relayd.delivery.doubt), before that it does not: Write* and LocalProtocolError before,
  Read* and RemoteProtocolError after.
- Every wait (a free connection, connecting, the exchange) is bounded by the route's timeout
  with `asyncio.timeout()`, which behaves the same on Python 3.11 to 3.13.
- A connection goes back to the pool only when both sides finished their message (h11's DONE);
  an idle one is closed after `KEEPALIVE_S`; anything else is aborted.

Private-API touch points: none (h11's and asyncio's public interfaces only).
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import socket
import ssl
import time
import urllib.parse
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import h11
import httpx

# An idle keep-alive connection is closed after this long (httpx's default too); Graph's front
# ends close idle connections after a few minutes.
KEEPALIVE_S = 5.0
# A response head larger than this is a protocol error (asyncio's stream limit).
MAX_RESPONSE_HEAD_BYTES = 64 * 1024
READ_BYTES = 65536
USER_AGENT = "relayd"


@dataclass
class Answer:
    """Graph's answer to one request: what the code below reads of it, from either client."""

    status_code: int
    headers: Mapping[str, str]  # names in lower case
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    @property
    def reason_phrase(self) -> str:
        try:
            return http.HTTPStatus(self.status_code).phrase
        except ValueError:
            return ""


class HttpClient(Protocol):
    """One HTTP request at a time per caller; failures as httpx's exception types."""

    async def request(self, method: str, url: str, headers: Mapping[str, str],
                      content: bytes | None) -> Answer: ...

    async def aclose(self) -> None: ...


class HttpxClient:
    """httpx behind HttpClient: proxies from the environment, any URL scheme."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def request(self, method: str, url: str, headers: Mapping[str, str],
                      content: bytes | None) -> Answer:
        r = await self.client.request(method, url, content=content, headers=headers)
        return Answer(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content)

    async def aclose(self) -> None:
        await self.client.aclose()


@dataclass
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    http: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    idle_since: float = 0.0

    def usable(self, now: float) -> bool:
        return not (self.reader.at_eof() or self.writer.transport.is_closing()
                    or now - self.idle_since > KEEPALIVE_S)

    def abort(self) -> None:
        self.writer.transport.abort()


class H11Pool:
    """Keep-alive HTTPS connections per host, at most `max_connections` in use at once."""

    def __init__(self, context: ssl.SSLContext, timeout_s: float, max_connections: int) -> None:
        self.context = context
        self.timeout_s = timeout_s
        self._limit = asyncio.Semaphore(max_connections)
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._closed = False

    async def request(self, method: str, url: str, headers: Mapping[str, str],
                      content: bytes | None) -> Answer:
        content = content or b""
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname or "", parts.port or 443
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        fields = [("Host", parts.netloc), ("User-Agent", USER_AGENT), ("Accept", "*/*"),
                  *headers.items()]
        if content or method in ("POST", "PUT", "PATCH"):
            fields.append(("Content-Length", str(len(content))))
        try:
            request = h11.Request(method=method, target=target, headers=fields)
        except h11.LocalProtocolError as e:
            raise httpx.LocalProtocolError(str(e)) from None
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._limit.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no free connection in time") from None
        try:
            conn = await self._connection((host, port))
            reusable = False
            try:
                response = await self._exchange(conn, host, request, content)
                wire = conn.http
                reusable = wire.our_state is h11.DONE and wire.their_state is h11.DONE
                if reusable:
                    wire.start_next_cycle()
                return response
            finally:
                if reusable and not self._closed:
                    conn.idle_since = time.monotonic()
                    self._idle.setdefault((host, port), []).append(conn)
                else:
                    conn.abort()
        finally:
            self._limit.release()

    async def _exchange(self, conn: _Conn, host: str, request: h11.Request,
                        content: bytes) -> Answer:
        """Send the request and read its answer within the timeout; failures as httpx's
        types, Write* before the request was handed over whole, Read* after."""
        written = False
        try:
            async with asyncio.timeout(self.timeout_s):
                wire = conn.http
                conn.writer.write(wire.send(request) + (wire.send(h11.Data(data=content))
                                                        if content else b"")
                                  + wire.send(h11.EndOfMessage()))
                if len(content) >= 65536:
                    await conn.writer.drain()
                written = True
                return await self._response(conn)
        except TimeoutError:
            if not written:
                raise httpx.WriteTimeout(f"cannot send to {host} within "
                                         f"{self.timeout_s:g}s") from None
            raise httpx.ReadTimeout(f"no answer from {host} within {self.timeout_s:g}s"
                                    ) from None
        except asyncio.IncompleteReadError:
            raise httpx.RemoteProtocolError("server disconnected without sending a "
                                            "complete response") from None
        except (h11.ProtocolError, ValueError, zlib.error) as e:
            if not written:
                raise httpx.LocalProtocolError(f"cannot send the request: {e}") from None
            raise httpx.RemoteProtocolError(f"malformed response: {e}") from None
        except OSError as e:
            if not written:
                raise httpx.WriteError(f"{type(e).__name__}: {e}") from None
            raise httpx.ReadError(f"{type(e).__name__}: {e}") from None

    async def _connection(self, key: tuple[str, int]) -> _Conn:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.usable(now):
                return conn
            conn.abort()
        try:
            async with asyncio.timeout(self.timeout_s):
                reader, writer = await asyncio.open_connection(
                    key[0], key[1], ssl=self.context, limit=MAX_RESPONSE_HEAD_BYTES)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"cannot connect to {key[0]}:{key[1]} within "
                                       f"{self.timeout_s:g}s") from None
        except (OSError, ssl.SSLError) as e:
            raise httpx.ConnectError(f"{type(e).__name__}: {e}") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Conn(reader, writer)

    @staticmethod
    async def _response(conn: _Conn) -> Answer:
        """The next answer on the connection, as h11 reads it (1xx interim answers skipped;
        gzip or deflate content decoded)."""
        wire = conn.http
        response: h11.Response | None = None
        body: list[bytes] = []
        while True:
            event = wire.next_event()
            if event is h11.NEED_DATA:
                wire.receive_data(await conn.reader.read(READ_BYTES))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise asyncio.IncompleteReadError(b"", None)
        assert response is not None
        names = {k.decode("latin-1"): v.decode("latin-1") for k, v in response.headers}
        content = b"".join(body)
        encoding = names.get("content-encoding", "").lower()
        if encoding in ("gzip", "deflate"):
            content = zlib.decompress(content, 47 if encoding == "gzip" else 15)
        return Answer(response.status_code, names, content)

    async def aclose(self) -> None:
        self._closed = True
        conns = [c for idle in self._idle.values() for c in idle]
        self._idle.clear()
        for conn in conns:
            conn.writer.close()
        for conn in conns:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await conn.writer.wait_closed()
            conn.abort()
