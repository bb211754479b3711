"""Real HTTPS test servers on loopback: one test CA (trustme) and a threaded server per fake."""

from __future__ import annotations

import email.policy
import http.server
import shutil
import socket
import ssl
import struct
import tempfile
import threading
from dataclasses import dataclass, field
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import trustme

SERVER_IDENTITIES = ("127.0.0.1", "localhost", "::1")
STOP_TIMEOUT_S = 5.0


class TestCA:
    """A CA and one server certificate for loopback names, with the CA PEM written to a file.

    One CA is shared by every fake in a process so a route's single `ca_file` trusts them all
    (a route talks to both the identity provider and EWS/Graph).
    """

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        self.ca = trustme.CA()
        self._dir = Path(tempfile.mkdtemp(prefix="relayd-test-ca-"))
        self.ca_file = self._dir / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.server_cert = self.ca.issue_cert(*SERVER_IDENTITIES)

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_cert.configure_cert(ctx)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        return ctx

    def cleanup(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


_shared_ca: TestCA | None = None
_shared_lock = threading.Lock()


def shared_ca() -> TestCA:
    """The process-wide test CA, made on first use."""
    global _shared_ca
    with _shared_lock:
        if _shared_ca is None:
            _shared_ca = TestCA()
        return _shared_ca


def server_cert_files(directory: Path) -> tuple[Path, Path]:
    """The shared CA's server certificate chain and key as `tls.pem` and `tls.key` in
    `directory`: what relayd's `server.tls_cert` / `tls_key` name for HTTPS off loopback."""
    cert, key = directory / "tls.pem", directory / "tls.key"
    shared_ca().server_cert.cert_chain_pems[0].write_to_path(str(cert))
    shared_ca().server_cert.private_key_pem.write_to_path(str(key))
    return cert, key


class _TLSServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # Tests send many requests on fresh connections; a short queue would refuse some.
    request_queue_size = 64

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler], ctx: ssl.SSLContext,
                 state: Any) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.ctx = ctx
        self.state = state

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        # Handshake in the handler thread (lazily on first read), not in the accept loop, so
        # one client that never completes TLS cannot block the others.
        return self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up (tests provoking resets or timeouts) are not failures.
        pass


class Handler(http.server.BaseHTTPRequestHandler):
    """Base for fake endpoints: no Nagle delay, quiet logs, helpers to answer and to misbehave."""

    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"
    server: _TLSServer

    @property
    def state(self) -> Any:
        return self.server.state

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def reply(self, status: int, body: bytes | str = b"", content_type: str = "text/plain",
              headers: dict[str, str] | None = None) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def reset_connection(self) -> None:
        """Abort with a TCP RST (SO_LINGER 0), as a crashed or overloaded server would."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        try:
            # Close the socket under TLS without a close_notify, so the client sees a reset.
            socket.socket.close(self.connection)
        except OSError:
            pass


@dataclass
class HttpsServer:
    """A running fake: its base URL, the CA file that trusts it, its shared state, and stop()."""

    base_url: str
    ca_file: Path
    state: Any
    host: str
    port: int
    _server: _TLSServer = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(STOP_TIMEOUT_S)

    def __enter__(self) -> HttpsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_https_server(handler: type[http.server.BaseHTTPRequestHandler], state: Any = None,
                       ca: TestCA | None = None) -> HttpsServer:
    """Serve `handler` over TLS on 127.0.0.1, port 0, in a background thread.

    Handlers reach `state` as `self.server.state` (or `self.state` on Handler subclasses).
    """
    ca = ca or shared_ca()
    server = _TLSServer(handler, ca.server_context(), state)
    host, port = server.server_address[:2]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name=f"https-fake-{port}", daemon=True)
    thread.start()
    return HttpsServer(f"https://127.0.0.1:{port}", ca.ca_file, state, str(host), int(port),
                       server, thread)


def message_id(mime: bytes) -> str:
    """A message's Message-ID header, as the fakes' Sent Items index it."""
    msg = BytesParser(policy=email.policy.default).parsebytes(mime, headersonly=True)
    return " ".join(str(msg.get("Message-ID", "") or "").split())
