"""`relayd auth login`: interactive delegated sign-in by the authorization code flow with PKCE.

Policy: `--browser` (the default) listens on 127.0.0.1 for the identity provider's redirect to
`http://localhost:PORT` (Entra's "Mobile and desktop applications" platform takes any port;
Google's installed-app clients take any loopback port), prints the sign-in URL alone on its own
line and opens a browser where there is a desktop. `--paste` prints the same URL and reads back
the address the browser ended on, for a server without a browser. `--device` is the device code
flow (relayd.auth.oauth.login), which Microsoft-managed Conditional Access now blocks in many
tenants: it stays for the tenants that allow it.

The signed-in account must be `--user` (case-insensitive), else nothing is stored: a delegated
route sends only as the account that signed in. A Microsoft account is named by its id token's
preferred_username or upn and, for a personal account (Outlook.com; tid 9188040d-...), also by
`email`, which relayd asks for on routes personal accounts sign in to (`microsoft_names`).
The token is stored where the daemon reads it (relayd.auth.tokencache.TokenStore), which picks
up the new file without a restart.
State and PKCE: msal generates and checks both for Microsoft; for Google this module does
(`secrets.compare_digest` on state, S256 challenge). Rejected: a fixed port (another process may
hold it) and an https loopback listener (a self-signed certificate the browser warns about; the
code is useless without the verifier, which never leaves this process).
"""

from __future__ import annotations

import base64
import hashlib
import html
import http.server
import json
import os
import secrets
import sys
import threading
import time
import warnings
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import parse_qs, urlencode, urlsplit

import msal  # type: ignore[import-untyped]
import requests

from relayd.auth.claims import microsoft_account, signed_in_account
from relayd.auth.oauth import authority_url, is_google_oauth, signin_scopes
from relayd.auth.oauth import login as device_login
from relayd.auth.tokencache import TokenStore
from relayd.auth.tokens import oauth_of
from relayd.config import Config, OAuthSettings, RouteConfig
from relayd.errors import AuthenticationError
from relayd.http import route_session

LOGIN_TIMEOUT_S = 600.0  # --browser gives up (exit 1) when no redirect came in this long
# Test-only: seconds to wait instead of LOGIN_TIMEOUT_S (tests of the timeout itself).
TIMEOUT_ENV = "RELAYD_TEST_LOGIN_TIMEOUT_S"
POLL_S = 0.5  # how often the listener looks at the clock while it waits
GOOGLE_AUTH_URI = "https://accounts.google.com/o/oauth2/v2/auth"
GOOGLE_LOGIN_SCOPES = ("openid", "email")  # so the token endpoint says who signed in
MODES = ("browser", "paste", "device")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


@dataclass
class SignInOutcome:
    """The end of one sign-in: what to tell the person, and the exit code."""

    ok: bool
    message: str


class _Flow:
    """One sign-in in progress: the URL to open, and how to finish it from the redirect."""

    auth_uri: str

    def finish(self, query: dict[str, str]) -> SignInOutcome:
        raise NotImplementedError

    def close(self) -> None:
        """Release the HTTP session."""


def _first_line(text: object) -> str:
    lines = str(text or "").strip().splitlines()
    return lines[0][:300] if lines else ""


def _claims(id_token: str) -> dict[str, Any]:
    """The claims of an id_token received straight from the token endpoint over TLS (OIDC
    Core 3.1.3.7: TLS server validation stands in for the signature check there)."""
    try:
        payload = id_token.split(".")[1]
        doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def check_account(signed_in: str, user: str) -> SignInOutcome | None:
    """None when `signed_in` is `user`; otherwise the refusal (nothing is stored)."""
    if not signed_in:
        return SignInOutcome(False, "the identity provider did not say who signed in; "
                             "nothing stored")
    if signed_in.lower() != user.lower():
        return SignInOutcome(False, f"signed in as {signed_in}, but --user is {user}: a delegated "
                             "route sends only as the account that signed in; nothing stored")
    return None


def store_signin(config: Config, route: RouteConfig, account: str, cache: str,
                 expires_at: float | None) -> SignInOutcome:
    store = TokenStore(config)
    key = account.lower()
    try:
        with store.locked():
            store.save(route.name, key, cache)
        now = time.time()
        store.write_state(route.name, key, last_error=None, expires_at=expires_at,
                          refreshed_at=now, signed_in_at=now)
    except OSError as e:
        return SignInOutcome(False, f"cannot store the token in {store.root}: {e.strerror}")
    return SignInOutcome(True, f"Signed in as {key}; token stored for route {route.name} "
                         f"({store.path(route.name, key)}).")


# -- Microsoft (msal) ----------------------------------------------------------------------------


class MicrosoftFlow(_Flow):
    def __init__(self, config: Config, route: RouteConfig, user: str, redirect_uri: str) -> None:
        self.config, self.route, self.user = config, route, user
        oauth = oauth_of(route)
        authority, custom = authority_url(oauth)
        self.cache = msal.SerializableTokenCache()
        self.http = route_session(route)
        self.app = msal.PublicClientApplication(
            oauth.client_id, authority=authority, http_client=self.http,
            instance_discovery=False if custom else None, token_cache=self.cache)
        # The answer comes in the redirect's query (response_mode "query"): --paste has the
        # admin paste the address the browser ended on, which a form post would not put in
        # it, and --browser's redirect goes to this machine's loopback. msal warns that
        # form_post is "recommended" on every sign-in; the warning is for web apps, not this.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="response_mode='form_post'")
            self.flow = self.app.initiate_auth_code_flow(
                signin_scopes(route), redirect_uri=redirect_uri, login_hint=user)
        self.auth_uri = str(self.flow["auth_uri"])

    def finish(self, query: dict[str, str]) -> SignInOutcome:
        if "error" in query:
            return SignInOutcome(False, f"sign-in refused: {query['error']}: "
                                 f"{_first_line(query.get('error_description'))}")
        try:
            result = self.app.acquire_token_by_auth_code_flow(self.flow, query)
        except ValueError as e:  # msal: state mismatch (another sign-in's redirect, or forged)
            return SignInOutcome(False, f"the redirect does not belong to this sign-in ({e}); "
                                 "nothing stored")
        except (requests.RequestException, msal.exceptions.MsalError, RuntimeError) as e:
            return SignInOutcome(False, f"identity provider unreachable: {type(e).__name__}: "
                                 f"{_first_line(e)}")
        if "access_token" not in result:
            return SignInOutcome(False, f"sign-in failed: {result.get('error')}: "
                                 f"{_first_line(result.get('error_description'))}")
        refusal = check_account(microsoft_account(result.get("id_token_claims") or {},
                                                  self.user), self.user)
        if refusal:
            return refusal
        return store_signin(self.config, self.route, self.user, self.cache.serialize(),
                            time.time() + float(result.get("expires_in") or 0))

    def close(self) -> None:
        self.http.close()


# -- Google (installed-app flow) -----------------------------------------------------------------


def google_auth_uri(oauth: OAuthSettings) -> str:
    """Google's authorization endpoint; with `authority` (the token endpoint of a test or
    proxying server) it is the sibling path `auth` of it."""
    if oauth.authority:
        base = oauth.authority.rstrip("/").rsplit("/", 1)[0]
        return f"{base}/auth"
    return GOOGLE_AUTH_URI


class GoogleFlow(_Flow):
    def __init__(self, config: Config, route: RouteConfig, user: str, redirect_uri: str,
                 scopes: list[str]) -> None:
        from relayd.auth.google import GOOGLE_TOKEN_URI

        self.config, self.route, self.user = config, route, user
        self.oauth = oauth_of(route)
        self.redirect_uri = redirect_uri
        self.token_uri = self.oauth.authority or GOOGLE_TOKEN_URI
        self.state = secrets.token_urlsafe(24)
        self.verifier = secrets.token_urlsafe(48)  # 64 characters, RFC 7636's 43-128
        challenge = base64.urlsafe_b64encode(
            hashlib.sha256(self.verifier.encode()).digest()).rstrip(b"=").decode()
        self.scopes = [*scopes, *GOOGLE_LOGIN_SCOPES]
        self.http = route_session(route)
        self.auth_uri = google_auth_uri(self.oauth) + "?" + urlencode({
            "client_id": self.oauth.client_id, "redirect_uri": redirect_uri,
            "response_type": "code", "scope": " ".join(self.scopes), "state": self.state,
            "code_challenge": challenge,
            "code_challenge_method": "S256", "access_type": "offline", "prompt": "consent",
            "login_hint": user})

    def finish(self, query: dict[str, str]) -> SignInOutcome:
        if not secrets.compare_digest(query.get("state", ""), self.state):
            return SignInOutcome(False, "the redirect does not belong to this sign-in (state "
                                 "mismatch); nothing stored")
        if "error" in query:
            return SignInOutcome(False, f"sign-in refused: {query['error']}")
        if not query.get("code"):
            return SignInOutcome(False, "the redirect carries no authorization code")
        secret = self.oauth.client_secret.reveal() if self.oauth.client_secret else ""
        try:
            resp = self.http.post(self.token_uri, data={
                "grant_type": "authorization_code", "code": query["code"],
                "client_id": self.oauth.client_id, "client_secret": secret,
                "redirect_uri": self.redirect_uri, "code_verifier": self.verifier},
                timeout=self.route.timeout_s)
            body = resp.json()
        except (requests.RequestException, ValueError) as e:
            return SignInOutcome(False, f"Google token endpoint {self.token_uri} unreachable: "
                                 f"{type(e).__name__}: {_first_line(e)}")
        if not isinstance(body, dict) or resp.status_code != 200 or "refresh_token" not in body:
            error = body.get("error") if isinstance(body, dict) else resp.status_code
            desc = body.get("error_description", "") if isinstance(body, dict) else ""
            return SignInOutcome(False, f"sign-in failed: {error}: {_first_line(desc)}".rstrip(": ")
                           + ("" if not isinstance(body, dict) or "error" in body
                              else " (no refresh token in the answer)"))
        refusal = check_account(signed_in_account(_claims(str(body.get("id_token") or ""))),
                                self.user)
        if refusal:
            return refusal
        expires_at = time.time() + float(body.get("expires_in") or 0)
        cache = json.dumps({"refresh_token": body["refresh_token"],
                            "access_token": body.get("access_token"), "expires_at": expires_at})
        return store_signin(self.config, self.route, self.user, cache, expires_at)

    def close(self) -> None:
        self.http.close()


# -- the loopback listener and the paste prompt ----------------------------------------------


def _page(outcome: SignInOutcome) -> bytes:
    title = "Signed in" if outcome.ok else "Sign-in failed"
    advice = ("You can close this window; relayd now sends as this account." if outcome.ok
              else "Nothing was stored. Run relayd auth login again.")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>relayd: {title}</title>"
            f"</head><body style='font-family:sans-serif;margin:3em'><h1>{title}</h1>"
            f"<p id='result'>{html.escape(outcome.message)}</p><p>{advice}</p></body></html>"
            ).encode()


class _Callback(http.server.BaseHTTPRequestHandler):
    server: _CallbackServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        srv = self.server
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if parts.path not in ("", "/") or not ({"code", "error"} & query.keys()) \
                or srv.outcome is not None:
            # favicon.ico, a stray visit, or a second redirect after the sign-in ended
            self.send_error(404)
            return
        outcome = srv.finish(query)
        body = _page(outcome)
        self.send_response(200 if outcome.ok else 400)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)
        srv.outcome = outcome


class _CallbackServer(http.server.HTTPServer):
    def __init__(self, port: int, finish: Callable[[dict[str, str]], SignInOutcome]) -> None:
        super().__init__(("127.0.0.1", port), _Callback)
        self.finish = finish
        self.outcome: SignInOutcome | None = None


def _timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        return float(raw) if raw else LOGIN_TIMEOUT_S
    except ValueError:
        return LOGIN_TIMEOUT_S


def _has_desktop() -> bool:
    # Without one, webbrowser would start a text-mode browser in this terminal.
    return sys.platform in ("darwin", "win32") or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _open_browser(url: str) -> None:
    def go() -> None:
        try:
            webbrowser.open(url)
        except Exception:  # noqa: BLE001, S110 - a browser that cannot start is not an error
            pass

    threading.Thread(target=go, daemon=True).start()


def parse_pasted(text: str) -> dict[str, str]:
    """The query of the address the browser ended on (a whole URL, or just its query)."""
    text = text.strip()
    query = urlsplit(text).query if "?" in text or "://" in text else text.lstrip("?")
    return {k: v[0] for k, v in parse_qs(query).items()}


def _make_flow(config: Config, route: RouteConfig, user: str, redirect_uri: str) -> _Flow:
    if is_google_oauth(route):
        from relayd.auth.google import GMAIL_SCOPE

        return GoogleFlow(config, route, user, redirect_uri, [GMAIL_SCOPE])
    return MicrosoftFlow(config, route, user, redirect_uri)


def login(config: Config, route_name: str, user: str | None, mode: str, port: int,
          out: TextIO, inp: TextIO) -> int:
    """`relayd auth login ROUTE --user ADDR [--browser | --paste | --device] [--port N]`."""
    route = config.routes.get(route_name)
    if route is None:
        out.write(f"relayd: no route named {route_name!r}\n")
        return EXIT_USAGE
    if not route.delegated:
        out.write(f'relayd: route {route_name} does not use delegated OAuth (flow = "device"; '
                  "for Google without refresh_token_file)\n")
        return EXIT_USAGE
    if mode == "device":
        if is_google_oauth(route):
            out.write("relayd: Google has no device sign-in for mail; use --browser or "
                      "--paste\n")
            return EXIT_USAGE
        return device_login(config, route_name, user, out)
    if not user:
        out.write("relayd: --user ADDR is required: the account that will sign in\n")
        return EXIT_USAGE
    try:
        TokenStore(config).fernet(create=True)
    except (AuthenticationError, OSError) as e:
        out.write(f"relayd: {e}\n")
        return EXIT_FAILED
    server: _CallbackServer | None = None
    if mode == "browser":
        try:
            server = _CallbackServer(port, lambda q: SignInOutcome(False, "not started"))
        except OSError as e:
            out.write(f"relayd: cannot listen on 127.0.0.1:{port}: {e.strerror}\n")
            return EXIT_FAILED
        port = server.server_address[1]
    redirect_uri = f"http://localhost:{port}" if port else "http://localhost"
    try:
        flow = _make_flow(config, route, user, redirect_uri)
    except (requests.RequestException, msal.exceptions.MsalError, ValueError,
            RuntimeError) as e:
        # msal fetches the authority's OpenID configuration first.
        out.write(f"relayd: identity provider unreachable: {type(e).__name__}: "
                  f"{_first_line(e)}\n")
        if server is not None:
            server.server_close()
        return EXIT_FAILED
    try:
        if server is not None:
            outcome = _wait_for_redirect(server, flow, user, out)
        else:
            outcome = _paste(flow, user, out, inp)
    finally:
        flow.close()
        if server is not None:
            server.server_close()
    out.write((outcome.message if outcome.ok else f"relayd: {outcome.message}") + "\n")
    return EXIT_OK if outcome.ok else EXIT_FAILED


def _wait_for_redirect(server: _CallbackServer, flow: _Flow, user: str,
                       out: TextIO) -> SignInOutcome:
    server.finish = flow.finish
    out.write(f"Sign in as {user} in a browser on this machine, at this address:\n")
    out.write(flow.auth_uri + "\n")
    out.write(f"Waiting for the sign-in (redirect to http://localhost:{server.server_address[1]})"
              "...\n")
    out.flush()
    if _has_desktop():
        _open_browser(flow.auth_uri)
    deadline = time.monotonic() + _timeout()
    server.timeout = POLL_S
    while server.outcome is None:
        if time.monotonic() > deadline:
            return SignInOutcome(False, f"no sign-in within {_timeout():.0f}s; nothing stored")
        try:
            server.handle_request()
        except OSError:  # a client that hung up mid-request; keep waiting
            continue
    return server.outcome


def _paste(flow: _Flow, user: str, out: TextIO, inp: TextIO) -> SignInOutcome:
    out.write(f"Sign in as {user} in a browser on any machine, at this address:\n")
    out.write(flow.auth_uri + "\n")
    out.write("The browser then ends on an address starting http://localhost that does not "
              "load; paste that whole address here:\n")
    out.flush()
    line = inp.readline()
    query = parse_pasted(line)
    if not ({"code", "error"} & query.keys()):
        return SignInOutcome(False, "that is not the address the sign-in ended on (it has no "
                             "code=); nothing stored")
    return flow.finish(query)
