"""The `[web]` page: `/` the admin's status page, `/signin` users' self-service sign-in.

Rules:
- Off unless `[web] listen` is set. On a loopback address it is plain HTTP and the status page
  needs no login (only people on this machine reach it). Elsewhere it is HTTPS with
  `server.tls_cert` and the status page asks for a login (HTTP Basic, over TLS only) of one of
  `[web] admins` (`[server.users]` names, checked against their scrypt hashes).
- `/signin`: users' self-service sign-in, and its bounds: relayd.web.signin.
- Admin logins (HTTP Basic): the password is always checked against a hash (a dummy one for
  an unknown or non-admin name), so every name costs the same scrypt time; names compare in
  constant time; an address with failed logins waits 1 s, doubling to 60 s, before its next
  try is even looked at (429 meanwhile).
- Every response, the standard library's error pages included, carries SECURITY_HEADERS:
  a CSP that allows no script at all, X-Frame-Options DENY, Referrer-Policy no-referrer,
  nosniff, no-store.
- The pages are rendered by relayd.web.pages from a snapshot taken on the event loop; no secret
  or token is ever in a snapshot, a page or a log line.
- It runs in a thread of its own (http.server from the standard library): a slow or hostile
  browser never blocks the event loop, and the identity provider's token exchange (blocking,
  through msal) happens there too.
- Bounded, so that no visitor can stop it or starve the rest of relayd of descriptors
  (`_Server`): the accept thread only accepts; the TLS handshake runs in the connection's own
  thread with TLS_HANDSHAKE_TIMEOUT_S; at most MAX_CONNECTIONS connections at once and
  MAX_CONNECTIONS_PER_CLIENT from one address (beyond them: 503 and close, or a plain close
  on the HTTPS port, where a reply needs the handshake it would wait for; one log line a
  minute); every connection ends by REQUEST_DEADLINE_S after it was accepted, however slowly
  its bytes trickle (each read's own timeout would let a byte every few seconds keep it
  forever). The descriptors it can hold are the cap plus its listening socket, far below
  the 1,024 a default soft limit gives the whole process.
Rejected alternatives: a web framework, or moving the page onto the event loop with a server
library (aiohttp, uvicorn + starlette): three pages and one redirect do not need one, the
sign-in's token exchange blocks (msal) and would need threads there anyway, and another
dependency would have to be kept up to date on every admin's machine; the four bounds above
are forty lines around the standard library's server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hmac
import http.cookies
import http.server
import logging
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from relayd.auth.passwords import hash_password, verify_password
from relayd.config import Config
from relayd.web.console import Console, Request, is_console_path
from relayd.web.pages import (
    Snapshot,
    address_page,
    continue_page,
    message_page,
    signin_page,
    status_page,
)
from relayd.web.signin import SIGNIN_FLOW_TTL_S, SigninBusy, SignIns

if TYPE_CHECKING:
    from relayd.qmgr.manager import QueueManager

log = logging.getLogger(__name__)

SNAPSHOT_TIMEOUT_S = 5.0
SIGNIN_COOKIE = "relayd_signin"
CONTINUE_FIELD = "relayd_continue"  # marks the answer as posted again by relayd's own page
CONTINUE_SCRIPT = b"document.forms[0].submit();\n"
CONTINUE_CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'self'; "
                "form-action 'self'")
FAILED_LOGIN_DELAY_S = 1.0  # an address's wait after a failed admin login, doubling
FAILED_LOGIN_DELAY_MAX_S = 60.0
FAILED_LOGIN_TRACKED = 10_000  # addresses remembered with their failures
MAX_FORM_BYTES = 64 * 1024
MAX_CONNECTIONS = 64  # connections at once; each is a thread and a descriptor
MAX_CONNECTIONS_PER_CLIENT = 16  # of those, from one address
TLS_HANDSHAKE_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 10.0  # one read of a request
REQUEST_DEADLINE_S = 30.0  # from accept to the connection's end, whatever it does
REFUSED_LOG_INTERVAL_S = 60.0
BUSY_REPLY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
              b"Connection: close\r\nContent-Length: 31\r\nRetry-After: 10\r\n\r\n"
              b"Too many connections; try again")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@functools.cache
def _dummy_hash() -> str:
    """Checked against when the name is unknown or no admin (same cost as a real check)."""
    return hash_password("relayd-web-no-such-admin")


class LoginFailures:
    """Failed admin logins per client address: each failure makes that address wait
    FAILED_LOGIN_DELAY_S, doubling to FAILED_LOGIN_DELAY_MAX_S; a success clears it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_client: dict[str, tuple[int, float]] = {}  # failures, until (monotonic)

    def wait(self, client: str) -> float:
        with self._lock:
            _, until = self._by_client.get(client, (0, 0.0))
        return max(0.0, until - time.monotonic())

    def failed(self, client: str) -> None:
        with self._lock:
            count = self._by_client.pop(client, (0, 0.0))[0] + 1
            if len(self._by_client) >= FAILED_LOGIN_TRACKED:
                del self._by_client[next(iter(self._by_client))]  # the oldest
            delay = min(FAILED_LOGIN_DELAY_S * 2 ** (count - 1), FAILED_LOGIN_DELAY_MAX_S)
            self._by_client[client] = (count, time.monotonic() + delay)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._by_client.pop(client, None)


class WebServer:
    def __init__(self, config: Config,
                 snapshot: Callable[[], Coroutine[Any, Any, Snapshot]],
                 qmgr: QueueManager | None = None,
                 journal_healthy: Callable[[], bool] = lambda: True) -> None:
        self.config = config
        self.take_snapshot = snapshot
        self.qmgr = qmgr  # the console's queue (relayd.web.console); None: status page only
        self.journal_healthy = journal_healthy
        self.console: Console | None = None
        self.port: int | None = None
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.signins: SignIns | None = None
        self.failures = LoginFailures()

    async def start(self) -> int:
        web = self.config.web
        assert web.listen is not None
        self._loop = asyncio.get_running_loop()
        context = None
        if self.qmgr is not None:
            self.console = Console(self.config, self._loop, self.qmgr, self.snapshot,
                                   self.admin, self.journal_healthy)
        if not web.loopback:
            server = self.config.server
            assert server.tls_cert is not None and server.tls_key is not None
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(server.tls_cert, server.tls_key)
        httpd = await asyncio.to_thread(_make_server, self, web.listen.host, web.listen.port,
                                        context)
        self._httpd = httpd
        self.port = int(httpd.server_address[1])
        scheme = "http" if web.loopback else "https"
        host = "localhost" if web.loopback else self.config.server.hostname
        self.signins = SignIns(self.config, f"{scheme}://{host}:{self.port}/signin/callback")
        self._thread = threading.Thread(target=httpd.serve_forever, name="web", daemon=True)
        self._thread.start()
        log.info("web page on %s://%s:%d/", scheme, web.listen.host, self.port)
        return self.port

    async def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            await asyncio.to_thread(httpd.shutdown)
            httpd.server_close()

    def snapshot(self) -> Snapshot:
        """From a request thread: the daemon's state, taken on the event loop."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(self.take_snapshot(), self._loop).result(
            SNAPSHOT_TIMEOUT_S)

    def admin(self, authorization: str | None, client: str = "",
              names: tuple[str, ...] | None = None) -> bool | float:
        """Whether a request may see the status page: True, False, or the seconds `client`
        must still wait after its failed logins (its login is not even looked at). `names`:
        the logins allowed (default `[web] admins`; the console adds `[web] viewers`)."""
        web = self.config.web
        if web.loopback:
            return True
        if not authorization or not authorization.startswith("Basic "):
            return False
        wait = self.failures.wait(client)
        if wait > 0:
            return wait
        try:
            login, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
        except ValueError:
            login, password = "", ""
        user = self.config.server.users.get(login)
        allowed = web.admins if names is None else names
        is_admin = any(hmac.compare_digest(login.encode(), a.encode()) for a in allowed)
        # Always one scrypt: an unknown or non-admin name costs what a wrong password does.
        stored = user.password_hash.reveal() if user is not None and is_admin else _dummy_hash()
        if verify_password(password, stored) and user is not None and is_admin:
            self.failures.succeeded(client)
            return True
        log.warning("web: failed login for %r from %s", login[:64], client)
        self.failures.failed(client)
        return False


def _make_server(web: WebServer, host: str, port: int,
                 context: ssl.SSLContext | None) -> _Server:
    class ServerHandler(_Handler):  # this server's handler class: one per WebServer
        server_app = web

    return _Server((host, port), ServerHandler, context)


class _Server(http.server.ThreadingHTTPServer):
    """http.server's threading server with the bounds of the module docstring."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[_Handler],
                 context: ssl.SSLContext | None) -> None:
        super().__init__(address, handler)
        self.context = context
        self._lock = threading.Lock()
        # accepted socket -> (client address, deadline); the TLS socket once it has one
        self._open: dict[int, tuple[str, float, socket.socket]] = {}
        self._per_client: dict[str, int] = {}
        self._refused = 0
        self._refused_logged = -REFUSED_LOG_INTERVAL_S

    def process_request(self, request: Any, client_address: Any) -> None:
        """In the accept thread: admit the connection (a thread of its own) or refuse it."""
        client = str(client_address[0])
        with self._lock:
            admitted = len(self._open) < MAX_CONNECTIONS and \
                self._per_client.get(client, 0) < MAX_CONNECTIONS_PER_CLIENT
            if admitted:
                self._open[id(request)] = (client, time.monotonic() + REQUEST_DEADLINE_S,
                                           request)
                self._per_client[client] = self._per_client.get(client, 0) + 1
        if not admitted:
            self._refuse(request, client)
            return
        super().process_request(request, client_address)

    def _refuse(self, request: socket.socket, client: str) -> None:
        if self.context is None:
            with contextlib.suppress(OSError):
                request.setblocking(False)  # never wait on a client here (the accept thread)
                request.send(BUSY_REPLY)
        with contextlib.suppress(OSError):
            request.close()
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged >= REFUSED_LOG_INTERVAL_S:
            log.warning("web: refused %d connection(s) over the limit of %d at once (%d per "
                        "address), the latest from %s", self._refused, MAX_CONNECTIONS,
                        MAX_CONNECTIONS_PER_CLIENT, client)
            self._refused_logged, self._refused = now, 0

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the connection's thread: the TLS handshake (bounded), then the request."""
        conn: socket.socket = request
        try:
            if self.context is not None:
                request.settimeout(TLS_HANDSHAKE_TIMEOUT_S)
                try:
                    conn = self.context.wrap_socket(request, server_side=True)
                except (OSError, ValueError) as e:
                    log.debug("web: TLS handshake with %s failed: %s", client_address[0], e)
                    return
                with self._lock:
                    entry = self._open.get(id(request))
                    if entry is not None:
                        self._open[id(request)] = (entry[0], entry[1], conn)
            conn.settimeout(READ_TIMEOUT_S)
            super().finish_request(conn, client_address)
        finally:
            if conn is not request:
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(conn, socket.SHUT_WR)
                conn.close()

    def close_request(self, request: Any) -> None:
        with self._lock:
            entry = self._open.pop(id(request), None)
            if entry is not None:
                left = self._per_client[entry[0]] - 1
                if left:
                    self._per_client[entry[0]] = left
                else:
                    del self._per_client[entry[0]]
        super().close_request(request)

    def service_actions(self) -> None:
        """Every poll of the accept loop (0.5 s): end the connections past their deadline.
        Shutting the socket down wakes the thread that reads it, which then ends."""
        now = time.monotonic()
        with self._lock:
            late = [sock for _, deadline, sock in self._open.values() if deadline <= now]
        for sock in late:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # not SSLSocket's: no unwrap

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed (reset, timed out, ended at its deadline): one DEBUG line,
        never the standard library's traceback on stderr."""
        log.debug("web: connection from %s ended early", client_address[0])


class _Handler(http.server.BaseHTTPRequestHandler):
    server_app: WebServer
    protocol_version = "HTTP/1.0"
    # A malformed request line would otherwise be answered as HTTP/0.9: a body, no headers.
    default_request_version = "HTTP/1.0"
    server_version = "relayd"
    sys_version = ""
    timeout = READ_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        log.debug("web: %s %s", self.address_string(), format % args)

    csp = SECURITY_HEADERS["Content-Security-Policy"]  # one response may allow its script file

    def end_headers(self) -> None:
        """Every response, the standard library's own error pages too, with these."""
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, self.csp if name == "Content-Security-Policy" else value)
        super().end_headers()

    def send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
             cookies: list[str] | None = None) -> None:
        headers = dict(headers or {})
        self.send_response(status)
        self.send_header("Content-Type", headers.pop("Content-Type", "text/html; charset=utf-8"))
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        for cookie in cookies or ():
            self.send_header("Set-Cookie", cookie)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def signin_cookie(self, value: str, max_age: int) -> str:
        cookie: http.cookies.SimpleCookie = http.cookies.SimpleCookie()
        cookie[SIGNIN_COOKIE] = value
        morsel = cookie[SIGNIN_COOKIE]
        morsel["path"] = "/signin"
        morsel["max-age"] = max_age
        morsel["httponly"] = True
        morsel["samesite"] = "Lax"
        if not self.server_app.config.web.loopback:
            morsel["secure"] = True
        return morsel.OutputString()

    def binding(self) -> str:
        """The sign-in cookie this browser sent, or ""."""
        cookie: http.cookies.SimpleCookie = http.cookies.SimpleCookie()
        with contextlib.suppress(http.cookies.CookieError):
            cookie.load(self.headers.get("Cookie") or "")
        morsel = cookie.get(SIGNIN_COOKIE)
        return morsel.value if morsel is not None else ""

    def canonical(self) -> str | None:
        """Where a sign-in must start when this request came to another host name than the
        redirect URI's (http://127.0.0.1:PORT vs http://localhost:PORT): the cookie must be
        set where the provider's answer arrives. None when it is the same host."""
        signins = self.server_app.signins
        assert signins is not None
        want = urllib.parse.urlsplit(signins.redirect_uri)
        if (self.headers.get("Host") or "").lower() == want.netloc.lower():
            return None
        return urllib.parse.urlunsplit((want.scheme, want.netloc, *urllib.parse.urlsplit(
            self.path)[2:4], ""))

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib naming
        self.do_GET()

    def console(self, method: str, url: urllib.parse.SplitResult) -> bool:
        """A console page or action (relayd.web.console), answered; False: not the console's."""
        console = self.server_app.console
        if console is None or not is_console_path(url.path):
            return False
        form: dict[str, str] = {}
        if method == "POST":
            length_text = self.headers.get("Content-Length") or "0"
            length = int(length_text) if length_text.isdigit() else 0
            if length > MAX_FORM_BYTES:
                self.send(413, message_page("Too large", "The form was too large.", False))
                return True
            body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
            form = {k: v[0] for k, v in urllib.parse.parse_qs(body).items()}
        query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        try:
            answer = console.handle(Request(method, url.path, query,
                                            self.headers.get("Authorization"),
                                            self.headers.get("Accept") or "", form,
                                            self.client_address[0]))
        except Exception as e:  # noqa: BLE001 - one line and a page, never a traceback
            log.warning("web: %s %s failed: %s: %s", method, url.path, type(e).__name__, e)
            self.send(503, message_page("Unavailable", "relayd is busy or stopping; try "
                                        "again.", False))
            return True
        self.send(answer.status, answer.body,
                  {**answer.headers, "Content-Type": answer.content_type})
        return True

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        """The identity provider's answer to a sign-in (response_mode=form_post), or a
        console action."""
        app = self.server_app
        if self.console("POST", urllib.parse.urlsplit(self.path)):
            return
        if urllib.parse.urlsplit(self.path).path != "/signin/callback" or app.signins is None:
            self.send(404, message_page("Not found", "Try / or /signin.", False))
            return
        length_text = self.headers.get("Content-Length") or "0"
        length = int(length_text) if length_text.isdigit() else 0
        if not 0 < length <= MAX_FORM_BYTES:
            self.send(400, message_page("Not signed in", "The sign-in answer was empty or too "
                                        "large.", False))
            return
        body = self.rfile.read(length).decode("utf-8", "replace")
        params = {k: v[0] for k, v in urllib.parse.parse_qs(body).items()}
        if params.pop(CONTINUE_FIELD, None) is None and not self.binding():
            # The provider's cross-site post, without the sign-in's cookie: post it again
            # from this site, which brings the cookie (module docstring).
            self.csp = CONTINUE_CSP
            self.send(200, continue_page("/signin/callback", {**params, CONTINUE_FIELD: "1"}))
            return
        self.signin_answer(params)

    def to_provider(self, start: Callable[[str, str], tuple[str, str]], arg: str) -> None:
        """Send the browser to the identity provider with the sign-in's cookie, or say why
        not (first to the redirect URI's host, where the cookie must live)."""
        canonical = self.canonical()
        if canonical is not None:
            self.send(302, b"", {"Location": canonical})
            return
        try:
            target, binding = start(arg, self.client_address[0])
        except SigninBusy as e:
            self.send(e.status, message_page("Cannot sign in now", str(e), False))
            return
        except LookupError as e:
            self.send(400, message_page("Cannot sign in", str(e), False))
            return
        self.send(302, b"", {"Location": target},
                  cookies=[self.signin_cookie(binding, int(SIGNIN_FLOW_TTL_S))])

    def signin_answer(self, params: dict[str, str]) -> None:
        """The provider's answer (query or form): finish the sign-in and tell the person."""
        signins = self.server_app.signins
        assert signins is not None
        try:
            ok, text = signins.finish(params, self.binding())
        except Exception as e:  # noqa: BLE001 - one line, and the person is told
            log.error("web sign-in failed: %s: %s", type(e).__name__, e)
            ok, text = False, "relayd could not complete the sign-in; tell your administrator."
        self.send(200 if ok else 400, message_page("Signed in" if ok else "Not signed in",
                                                   text, ok),
                  cookies=[self.signin_cookie("", 0)] if ok else None)

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        app = self.server_app
        url = urllib.parse.urlsplit(self.path)
        params = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        hostname = app.config.server.hostname
        if self.console("GET", url):
            return
        try:
            if url.path == "/":
                allowed = app.admin(self.headers.get("Authorization"), self.client_address[0])
                if allowed is not True and allowed is not False:
                    self.send(429, message_page("Too many failed logins", "Try again in "
                                                f"{int(allowed) + 1} seconds.", False),
                              {"Retry-After": str(int(allowed) + 1)})
                    return
                if not allowed:
                    self.send(401, message_page("Login required", "Log in as an administrator "
                                                "of this relay.", False),
                              {"WWW-Authenticate": 'Basic realm="relayd", charset="UTF-8"'})
                    return
                self.send(200, status_page(app.snapshot()))
            elif url.path == "/signin":
                assert app.signins is not None
                self.send(200, signin_page(hostname, app.signins.choices()))
            elif url.path == "/signin/google":
                self.send(200, address_page(hostname))
            elif url.path == "/signin/google/start":
                assert app.signins is not None
                self.to_provider(app.signins.start_google, params.get("address", ""))
            elif url.path == "/signin/start":
                assert app.signins is not None
                self.to_provider(app.signins.start, params.get("id", ""))
            elif url.path == "/signin/continue.js":
                self.send(200, CONTINUE_SCRIPT,
                          {"Content-Type": "text/javascript; charset=utf-8"})
            elif url.path == "/signin/callback":
                self.signin_answer(params)  # Google answers with a GET; Microsoft posts
            else:
                self.send(404, message_page("Not found", "Try / or /signin.", False))
        except Exception as e:  # noqa: BLE001 - one line and a page, never a traceback
            log.warning("web: %s %s failed: %s: %s", self.command, url.path,
                        type(e).__name__, e)
            with contextlib.suppress(OSError):
                self.send(503, message_page("Unavailable", "relayd is busy or stopping; try "
                                            "again.", False))
