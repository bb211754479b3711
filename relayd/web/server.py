"""The `[web]` page: `/` the admin's status page, `/signin` users' self-service sign-in.

Rules:
- Off unless `[web] listen` is set. On a loopback address it is plain HTTP and the status page
  needs no login (only people on this machine reach it). Elsewhere it is HTTPS with
  `server.tls_cert` and the status page asks for a login (HTTP Basic, over TLS only) of one of
  `[web] admins` (`[server.users]` names, checked against their scrypt hashes).
- `/signin`: a button per delegated identity (a Microsoft app registration used by routes with
  `flow = "device"`). The user signs in at the provider (authorization code flow with PKCE; on
  loopback as a public client with redirect `http://localhost:PORT/signin/callback`, elsewhere
  as a Web app with the route's client secret and `https://HOST:PORT/signin/callback`; the
  provider posts its answer there, `response_mode=form_post`, so the code is in no URL); relayd
  stores the token for the delegated route that covers the signed-in address, exactly as
  `relayd auth login` does, and says which address can now send. An account no delegated route
  covers is refused and nothing is stored.
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
import http.server
import logging
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from relayd.auth.passwords import verify_password
from relayd.config import Config, RouteConfig
from relayd.router import Router
from relayd.web.pages import Snapshot, address_page, message_page, signin_page, status_page

log = logging.getLogger(__name__)

SNAPSHOT_TIMEOUT_S = 5.0
SIGNIN_FLOW_TTL_S = 900.0  # a sign-in started and not finished is forgotten after this
MAX_PENDING_SIGNINS = 200
FAILED_LOGIN_DELAY_S = 1.0
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


@dataclass
class _Pending:
    group: str
    flow: Any  # msal's flow dict (Microsoft), or a relayd.auth.login.GoogleFlow
    started: float


class SignIns:
    """Delegated sign-in through the web page: the identities on offer and flows under way."""

    def __init__(self, config: Config, redirect_uri: str) -> None:
        self.config = config
        self.redirect_uri = redirect_uri
        self.router = Router(config.routes)
        self.groups: dict[str, RouteConfig] = {}  # one route per app registration + scopes
        for route in config.routes.values():
            if _delegated_microsoft(route):
                self.groups.setdefault(_group(route), route)
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()

    def choices(self) -> list[tuple[str, str]]:
        many = len(self.groups) > 1
        out = [("Sign in with Microsoft" + (f" ({route.name})" if many else ""),
                f"/signin/start?{urllib.parse.urlencode({'id': key})}")
               for key, route in self.groups.items()]
        if self.google_routes():
            out.append(("Sign in with Google", "/signin/google"))
        return out

    def google_routes(self) -> list[RouteConfig]:
        from relayd.auth.login import is_delegated

        return [r for r in self.config.routes.values()
                if r.provider == "google" and is_delegated(r)]

    def start_google(self, address: str) -> str:
        """Google's authorize URL for `address`, which a delegated Google route must cover:
        Google's installed-app flow wants the user up front (login_hint), and relayd checks
        that the account that signs in is that address."""
        from relayd.auth.google import GMAIL_SCOPE
        from relayd.auth.login import GoogleFlow, is_delegated

        address = address.strip().lower()
        route = self.router.lookup(address) if "@" in address else None
        if route is None or route.provider != "google" or not is_delegated(route):
            raise LookupError(f"no route of this relay sends for {address!r} with Google "
                              "sign-in; ask your administrator")
        flow = GoogleFlow(self.config, route, address, self.redirect_uri, [GMAIL_SCOPE])
        self._remember(flow.state, _Pending("google", flow, time.monotonic()))
        return flow.auth_uri

    def _remember(self, state: str, pending: _Pending) -> None:
        now = time.monotonic()
        with self._lock:
            for old in [k for k, p in self._pending.items()
                        if now - p.started > SIGNIN_FLOW_TTL_S]:
                gone = self._pending.pop(old)
                if gone.group == "google":
                    gone.flow.close()
            if len(self._pending) >= MAX_PENDING_SIGNINS:
                raise LookupError("too many sign-ins under way; try again in a few minutes")
            self._pending[state] = pending

    def _app(self, route: RouteConfig) -> Any:
        import msal  # type: ignore[import-untyped]

        from relayd.auth.oauth import authority_url
        from relayd.http import route_session

        authority, custom = authority_url(route)
        kwargs: dict[str, Any] = {"authority": authority, "http_client": route_session(route),
                                  "instance_discovery": False if custom else None}
        if self.redirect_uri.startswith("https://") and route.client_secret is not None:
            return msal.ConfidentialClientApplication(
                route.client_id, client_credential=route.client_secret.reveal(), **kwargs)
        return msal.PublicClientApplication(route.client_id, **kwargs)

    def start(self, key: str) -> str:
        """The provider's authorize URL for a new sign-in."""
        from relayd.auth.oauth import delegated_scopes

        route = self.groups.get(key)
        if route is None:
            raise LookupError("no such sign-in")
        app = self._app(route)
        # form_post: the code comes back in a POST body, never in a URL a browser keeps.
        flow = app.initiate_auth_code_flow(delegated_scopes(route),
                                           redirect_uri=self.redirect_uri,
                                           prompt="select_account", response_mode="form_post")
        self._remember(str(flow["state"]), _Pending(key, flow, time.monotonic()))
        return str(flow["auth_uri"])

    def finish(self, params: dict[str, str]) -> tuple[bool, str]:
        """Complete a sign-in from the redirect's query; (ok, what to tell the user)."""
        import msal

        from relayd.auth.login import Outcome, store_signin
        from relayd.auth.oauth import delegated_scopes
        from relayd.auth.tokencache import TokenStore
        from relayd.errors import AuthenticationError

        with self._lock:
            pending = self._pending.pop(params.get("state", ""), None)
        if pending is None:
            return False, "This sign-in is unknown or has expired. Start again."
        if "error" in params:
            return False, (f"The sign-in was not completed: {params.get('error')}: "
                           f"{params.get('error_description', '')}")
        try:
            TokenStore(self.config).fernet(create=True)  # the cache key, made on first use
        except (AuthenticationError, OSError) as e:
            log.error("web sign-in: %s", e)
            return False, "relayd could not store the sign-in; tell your administrator."
        if pending.group == "google":
            try:
                done = pending.flow.finish(params)
            finally:
                pending.flow.close()
            if not done.ok:
                log.warning("web sign-in (Google) for %s: %s", pending.flow.user, done.message)
                return False, f"Not signed in: {done.message}."
            log.info("web sign-in: %s signed in for route %s", pending.flow.user,
                     pending.flow.route.name)
            return True, (f"{pending.flow.user} can now send mail through relayd "
                          f"(route {pending.flow.route.name}).")
        route = self.groups[pending.group]
        cache = msal.SerializableTokenCache()
        app = self._app(route)
        app.token_cache = cache
        try:
            result = app.acquire_token_by_auth_code_flow(pending.flow, params,
                                                         scopes=delegated_scopes(route))
        except ValueError:
            return False, "The sign-in answer did not match the sign-in it belongs to."
        if "access_token" not in result:
            return False, f"The sign-in failed: {result.get('error')}"
        claims = result.get("id_token_claims") or {}
        account = str(claims.get("preferred_username") or claims.get("upn") or "").lower()
        covering = self.router.lookup(account) if account else None
        if covering is None or not _delegated_microsoft(covering) or \
                _group(covering) != pending.group:
            log.warning("web sign-in: %s signed in, but no delegated route covers that address; "
                        "nothing stored", account or "an unnamed account")
            return False, (f"{account or 'This account'} signed in, but no route of this relay "
                           "sends for that address with delegated sign-in. Nothing was stored; "
                           "ask your administrator.")
        try:
            stored = store_signin(self.config, covering, account, cache.serialize(),
                                  time.time() + float(result.get("expires_in") or 0))
        except (AuthenticationError, OSError) as e:
            stored = Outcome(False, str(e))
        if not stored.ok:
            log.error("web sign-in: %s", stored.message)
            return False, "relayd could not store the sign-in; tell your administrator."
        log.info("web sign-in: %s signed in for route %s", account, covering.name)
        return True, f"{account} can now send mail through relayd (route {covering.name})."


def _delegated_microsoft(route: RouteConfig) -> bool:
    from relayd.auth.oauth import is_microsoft_oauth

    return route.flow == "device" and is_microsoft_oauth(route)


def _group(route: RouteConfig) -> str:
    from relayd.auth.oauth import authority_url, delegated_scopes

    ident = f"{route.client_id}|{authority_url(route)[0]}|{' '.join(delegated_scopes(route))}"
    return base64.urlsafe_b64encode(ident.encode()).decode().rstrip("=")[:32]


class WebServer:
    def __init__(self, config: Config,
                 snapshot: Callable[[], Coroutine[Any, Any, Snapshot]]) -> None:
        self.config = config
        self.take_snapshot = snapshot
        self.port: int | None = None
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.signins: SignIns | None = None

    async def start(self) -> int:
        web = self.config.web
        assert web.listen is not None
        self._loop = asyncio.get_running_loop()
        context = None
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

    def admin(self, authorization: str | None) -> bool:
        """Whether a request may see the status page."""
        web = self.config.web
        if web.loopback:
            return True
        if not authorization or not authorization.startswith("Basic "):
            return False
        try:
            login, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
        except ValueError:
            return False
        user = self.config.server.users.get(login)
        if user is None or login not in web.admins:
            time.sleep(FAILED_LOGIN_DELAY_S)
            return False
        if verify_password(password, user.password_hash.reveal()):
            return True
        log.warning("web: failed login for %r", login[:64])
        time.sleep(FAILED_LOGIN_DELAY_S)
        return False


def _make_server(web: WebServer, host: str, port: int,
                 context: ssl.SSLContext | None) -> _Server:
    class Handler(_Handler):
        server_app = web

    return _Server((host, port), Handler, context)


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
    server_version = "relayd"
    sys_version = ""
    timeout = READ_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        log.debug("web: %s %s", self.address_string(), format % args)

    def send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib naming
        self.do_GET()

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        """The identity provider's answer to a sign-in (response_mode=form_post)."""
        app = self.server_app
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
        self.signin_answer({k: v[0] for k, v in urllib.parse.parse_qs(body).items()})

    def to_provider(self, start: Callable[[str], str], arg: str) -> None:
        """Send the browser to the identity provider, or say why not."""
        try:
            target = start(arg)
        except LookupError as e:
            self.send(400, message_page("Cannot sign in", str(e), False))
            return
        self.send(302, b"", {"Location": target})

    def signin_answer(self, params: dict[str, str]) -> None:
        """The provider's answer (query or form): finish the sign-in and tell the person."""
        signins = self.server_app.signins
        assert signins is not None
        try:
            ok, text = signins.finish(params)
        except Exception as e:  # noqa: BLE001 - one line, and the person is told
            log.error("web sign-in failed: %s: %s", type(e).__name__, e)
            ok, text = False, "relayd could not complete the sign-in; tell your administrator."
        self.send(200 if ok else 400, message_page("Signed in" if ok else "Not signed in",
                                                   text, ok))

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        app = self.server_app
        url = urllib.parse.urlsplit(self.path)
        params = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        hostname = app.config.server.hostname
        try:
            if url.path == "/":
                if not app.admin(self.headers.get("Authorization")):
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
