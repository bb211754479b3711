"""Shared test parts: a recording aiosmtpd upstream on port 0, config files, a running relayd."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import smtplib
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from relayd.app import MainProcess
from relayd.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent
RELAYD = [sys.executable, "-m", "relayd"]
WAIT_S = 15.0


def pytest_asyncio_loop_factories(config: Any, item: Any) -> Any:
    """The tests run relayd in-process on the loop `relayd serve` picks (relayd.loop):
    uvloop, or asyncio's own with RELAYD_EVENT_LOOP=asyncio; a test marked stdlib_loop on
    asyncio's own."""
    from relayd.loop import loop_factory

    factory = loop_factory()
    if sys.platform == "win32":  # relayd's loop there is asyncio's SelectorEventLoop
        return {"selector": asyncio.SelectorEventLoop}
    if factory is None or item.get_closest_marker("stdlib_loop") is not None:
        return {"asyncio": asyncio.new_event_loop}
    return {"uvloop": factory}


if sys.platform == "win32":
    class _SlashPath(type(Path())):  # type: ignore[misc]
        """A Windows path whose text has forward slashes: the tests put paths into TOML basic
        strings, where a backslash starts an escape ("Invalid hex value"); Windows takes
        either slash. (relayd's own handling of backslashes: TOML literal strings,
        tests/test_platform.py.)"""

        def __str__(self) -> str:
            return super().__str__().replace("\\", "/")

        def chmod(self, mode: int, *, follow_symlinks: bool = True) -> None:
            """The tests' chmod 600 / 644 of secret files (700 / 755 of a spool folder), as
            access lists (os.chmod on Windows only sets the read-only flag)."""
            from relayd.platform import fs

            if self.exists() and mode & 0o077 == 0:
                if _UNDER_WINE:
                    _wine_private(self)
                else:
                    fs.make_private(self)
            elif self.exists() and mode & 0o044:
                fs.make_world_readable(self)
            else:
                super().chmod(mode, follow_symlinks=follow_symlinks)

    def _under_wine() -> bool:
        import ctypes

        return hasattr(ctypes.WinDLL("ntdll"), "wine_get_version")

    _UNDER_WINE = _under_wine()

    def _wine_private(path: Path) -> None:
        """fs.make_private's access list with a last entry denying Everyone: Wine keeps a
        file's access list as its Unix mode, and leaves the others' bits as they were unless
        an entry names Everyone."""
        import ntsecuritycon
        import win32api
        import win32security

        token = win32security.OpenProcessToken(win32api.GetCurrentProcess(),
                                               win32security.TOKEN_QUERY)
        me = win32security.GetTokenInformation(token, win32security.TokenUser)[0]
        dacl = win32security.ACL()
        dacl.AddAccessAllowedAce(win32security.ACL_REVISION, ntsecuritycon.FILE_ALL_ACCESS, me)
        dacl.AddAccessDeniedAce(win32security.ACL_REVISION, ntsecuritycon.FILE_GENERIC_READ,
                                win32security.ConvertStringSidToSid("S-1-1-0"))
        win32security.SetNamedSecurityInfo(
            str(path), win32security.SE_FILE_OBJECT,
            win32security.DACL_SECURITY_INFORMATION
            | win32security.PROTECTED_DACL_SECURITY_INFORMATION, None, None, dacl, None)

    @pytest.fixture
    def tmp_path(tmp_path: Path) -> Path:
        return _SlashPath(tmp_path)


@pytest.fixture(autouse=True)
def _ntfs_open_files() -> Iterator[None]:
    """With RELAYD_CHECK_OPEN_FILES=1: no test may rename or remove a file relayd still holds
    open (NTFS refuses; relayd.platform.fs), on any thread."""
    from relayd.platform import fs

    seen = len(fs.violations)
    yield
    assert fs.violations[seen:] == [], "renamed or removed while open (NTFS refuses)"


# -- a recording upstream ----------------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]


@dataclass
class RecordingHandler:
    """Accepts mail and records it. Replies can be scripted per recipient and for DATA."""

    messages: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    mail_reply: str | None = None
    data_reply: str | None = None
    connections: int = 0
    open_now: int = 0  # connections open at this moment, and the most at once
    open_max: int = 0
    logins: list[str] = field(default_factory=list)
    pipelining: bool = True  # advertised, as Postfix, Exchange and Gmail do
    segments: list[bytes] = field(default_factory=list)  # each read's first 512 bytes

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        if not self.pipelining:
            return responses
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.open_now -= 1
        return "221 Bye"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        reply = self.rcpt_replies.get(address)
        if reply and not reply.startswith("2"):
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_reply:
            return self.data_reply
        assert isinstance(envelope.original_content, bytes)
        # aiosmtpd spells the null reverse-path "<>"; record it as the empty address it is.
        sender = "" if envelope.mail_from in (None, "<>") else envelope.mail_from
        self.messages.append(Received(sender, list(envelope.rcpt_tos),
                                      envelope.original_content, list(envelope.mail_options)))
        return "250 2.0.0 OK accepted"


class _RecordingSMTP(SMTP):
    """aiosmtpd's server, keeping the start of each read (so a test can see what a client
    sent in one write: a pipelined envelope arrives in one read on loopback)."""

    def data_received(self, data: bytes) -> None:
        handler = self.event_handler
        if isinstance(handler, RecordingHandler) and len(handler.segments) < 10_000:
            handler.segments.append(bytes(data[:512]))
        super().data_received(data)


class Upstream:
    """An aiosmtpd server on 127.0.0.1 that can be stopped and started on the same port."""

    def __init__(self, *, implicit_tls: ssl.SSLContext | None = None, **smtp_kwargs: Any) -> None:
        self.implicit_tls = implicit_tls
        self.handler = RecordingHandler()
        self.port = 0
        self.server: asyncio.Server | None = None
        self.protocols: list[SMTP] = []
        self.smtp_kwargs = smtp_kwargs

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        handler = self.handler

        def factory() -> SMTP:
            handler.connections += 1
            handler.open_now += 1
            handler.open_max = max(handler.open_max, handler.open_now)
            proto = _RecordingSMTP(handler, hostname="upstream.test", enable_SMTPUTF8=True,
                                   **self.smtp_kwargs)
            self.protocols.append(proto)
            return proto

        self.server = await loop.create_server(factory, "127.0.0.1", self.port,
                                               reuse_address=True, ssl=self.implicit_tls)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for proto in self.protocols:
                if proto.transport is not None:
                    proto.transport.close()
            self.protocols.clear()
            await self.server.wait_closed()
            self.server = None


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    await up.start()
    yield up
    await up.stop()


@pytest.fixture
async def upstream2() -> AsyncIterator[Upstream]:
    up = Upstream()
    await up.start()
    yield up
    await up.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dead_port() -> int:
    """A loopback port with nothing listening (connection refused)."""
    return free_port()


# -- config ------------------------------------------------------------------------------------


def write_config(tmp_path: Path, routes: str, *, server: str = "", queue: str = "",
                 listen: str = "127.0.0.1:0", extra: str = "") -> Path:
    """A config file with a spool in tmp_path and fast retries; `routes` is TOML text."""
    # One process unless the test says otherwise (the default, "auto", runs listener workers
    # on a machine with two CPUs; tests/test_workers.py covers them).
    if "workers" not in server:
        server = "workers = 1\n" + textwrap.dedent(server)
    queue_lines = textwrap.dedent(queue)
    for key, default in (("retry_min", '"1s"'), ("retry_max", '"2s"')):
        if f"{key} =" not in queue_lines:
            queue_lines += f"\n{key} = {default}"
    text = f"""
[server]
listen = ["{listen}"]
hostname = "relay.test"
{textwrap.dedent(server)}

[queue]
path = "{tmp_path / 'queue'}"
{queue_lines}

{textwrap.dedent(routes)}
{textwrap.dedent(extra)}
"""
    path = tmp_path / "relayd.toml"
    path.write_text(text)
    return path


def smtp_route(name: str, senders: str, port: int, extra: str = "") -> str:
    return f"""
[routes.{name}]
senders = {senders}
upstream = "smtp"
host = "127.0.0.1"
port = {port}
tls = "none"
{extra}
"""


@contextlib.asynccontextmanager
async def run_service(config: Config | Path, **kwargs: Any) -> AsyncIterator[MainProcess]:
    """Start relayd in this event loop and always shut it down."""
    if isinstance(config, Path):
        config = load_config(config)
    service = MainProcess(config, **kwargs)
    await service.start()
    try:
        yield service
    finally:
        await service.stop(timeout=5)


# -- clients -----------------------------------------------------------------------------------


def message(sender: str = "alice@business.com", to: str = "bob@example.com",
            subject: str = "hello", body: str = "Hello there.\r\n") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{time.time_ns()}@test>\r\n\r\n{body}").encode()


async def send(port: int, sender: str, recipients: list[str], data: bytes,
               host: str = "127.0.0.1") -> dict[str, tuple[int, bytes]]:
    """Send with smtplib (a real blocking client) in a thread; returns refused recipients."""

    def go() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP(host, port, timeout=10) as client:
            return client.sendmail(sender, recipients, data)

    return await asyncio.to_thread(go)


async def wait_for(predicate: Callable[[], bool], timeout: float = WAIT_S,
                   what: str = "condition") -> None:
    """Poll until predicate() is true; bounded in time."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def service_port(service: MainProcess) -> int:
    return service.addresses[0][1]


def relayd_cli(*args: str, env: dict[str, str] | None = None,
               input: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real `relayd` command line in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*RELAYD, *args], capture_output=True, text=True, env=full_env,
                          input=input.decode() if input else None, timeout=timeout, cwd=REPO)


async def arelayd_cli(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """relayd_cli without blocking the event loop an in-process relayd runs in."""
    return await asyncio.to_thread(relayd_cli, *args, **kwargs)


@pytest.fixture
def spool_files(tmp_path: Path) -> Callable[[], list[str]]:
    def files() -> list[str]:
        d = tmp_path / "queue" / "msg"
        return sorted(os.listdir(d)) if d.exists() else []

    return files


def tmp_leftovers(queue: Path) -> list[str]:
    """What a message left in queue/tmp/: every name but dotfiles and the spent files that the
    spool keeps for reuse (relayd.queue.spares: `spare.*`, and `scrub.*` while one is
    emptied). A message being written, or one refused or cut off, has a name of its own;
    a spare may hold a delivered message's bytes until it is scrubbed (tests/test_queue.py)."""
    return sorted(p.name for p in (queue / "tmp").iterdir()
                  if not p.name.startswith((".", "spare.", "scrub.")))


@asynccontextmanager
async def daemon(cfg: Path, port: int, log: Path,
                 wrapper: Sequence[str] = ()) -> AsyncIterator[subprocess.Popen[bytes]]:
    """`relayd serve` in a subprocess (run by `wrapper`, such as taskset or chrt, if given),
    ready when systemd would call it ready: its port answers and it has logged its start line,
    which relayd.app writes inside its signal scope just before READY=1. The port alone is not
    enough: with listener workers it answers before SIGTERM is handled, and a SIGTERM then
    killed relayd by the default action. Always killed at the end."""
    starts = _start_lines(log)
    with open(log, "ab") as out:
        proc = subprocess.Popen([*wrapper, sys.executable, "-m", "relayd", "serve", "-c",
                                 str(cfg)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        await wait_for(lambda: (_port_open(port) and _start_lines(log) > starts)
                       or proc.poll() is not None, what="relayd start")
        assert proc.poll() is None, log.read_text()
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def _start_lines(log: Path) -> int:
    return log.read_bytes().count(b"relayd started with") if log.exists() else 0


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0



@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("RELAYD_CONFIG", raising=False)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    yield


# -- the fake identity provider and EWS (tests/fakes) -----------------------------------------


@pytest.fixture
def machine_ca_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on real machines: requests would prefer these over a session's `verify`."""
    from fakes.config import SYSTEM_BUNDLE

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", SYSTEM_BUNDLE)
    monkeypatch.setenv("CURL_CA_BUNDLE", SYSTEM_BUNDLE)


@pytest.fixture
def idp() -> Iterator[Any]:
    """A fake Microsoft identity platform (fakes.idp) over HTTPS."""
    from fakes.idp import start_idp

    server = start_idp()
    yield server
    server.stop()


@pytest.fixture
def ews(idp: Any) -> Iterator[Any]:
    """A fake EWS (fakes.ews) trusting idp's tokens; app-only calls must impersonate a mailbox."""
    from fakes.ews import EwsState, start_ews

    server = start_ews(EwsState(idp=idp.state, require_impersonation=True))
    yield server
    server.stop()


# -- raw SMTP ----------------------------------------------------------------------------------


async def read_reply(reader: asyncio.StreamReader, timeout: float = 10) -> bytes:
    """One SMTP reply, its lines joined (b"" when the server closed the connection)."""
    out = b""
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        out += line
        if not line or len(line) < 4 or line[3:4] != b"-":
            return out


async def smtp_exchange(port: int, lines: list[bytes], *, timeout: float = 10,
                        local_host: str | None = None) -> list[bytes]:
    """The banner, then each line's reply: the exact bytes a client sends, the exact replies."""
    local = (local_host, 0) if local_host else None
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=local)
    try:
        replies = [await read_reply(reader, timeout)]
        for line in lines:
            writer.write(line)
            await writer.drain()
            replies.append(await read_reply(reader, timeout))
    finally:
        writer.close()
    return replies


# -- a small filesystem -------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (needs root, as CI is; `.ci/run` runs as root)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(fs: Path) -> Path:
    """Fill the filesystem to the last block; returns the filler file."""
    filler = fs / "filler"
    with open(filler, "wb", buffering=0) as f:
        chunk = b"\0" * 65536
        with contextlib.suppress(OSError):
            while True:
                f.write(chunk)
                f.flush()
        with contextlib.suppress(OSError):
            while True:  # the last partial chunk
                f.write(b"\0" * 512)
                f.flush()
    with pytest.raises(OSError) as e, open(fs / "probe", "wb") as probe:
        probe.write(b"x" * 4096)
        probe.flush()
        os.fsync(probe.fileno())
    assert e.value.errno == errno.ENOSPC
    return filler
