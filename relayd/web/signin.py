"""Users' self-service sign-in through the web page (`/signin`), for the delegated routes.

- A button per delegated identity (a Microsoft app registration used by routes with
  `flow = "device"`). The user signs in at the provider (authorization code flow with PKCE; on
  loopback as a public client with redirect `http://localhost:PORT/signin/callback`, elsewhere
  as a Web app with the route's client secret and `https://HOST:PORT/signin/callback`); relayd
  stores the token for the delegated route that covers the signed-in address, exactly as
  `relayd auth login` does, and says which address can now send. An account no delegated route
  covers is refused and nothing is stored.
- Sign-in abuse (`SignIns`, `_Handler`): pending sign-ins are capped per client address
  (MAX_PENDING_SIGNINS_PER_CLIENT) and in all (MAX_PENDING_SIGNINS), with a page saying so, so
  that anonymous starts from one address cannot lock every user out. Each sign-in's `state` is
  bound to a random value in a cookie set by the page that started it (HttpOnly,
  SameSite=Lax, Secure off loopback, Path=/signin); the answer is taken only from the browser
  that holds it, so an attacker cannot finish a sign-in of theirs in a victim's browser
  (login CSRF). The start is first sent to the host of the redirect URI, so the cookie is
  set where the answer arrives. Microsoft answers with `response_mode=form_post` (the code in
  no URL), a cross-site POST, which a SameSite=Lax cookie does not come with: relayd answers
  it with a page that posts the same fields again to itself (same site, so the cookie comes),
  submitted by /signin/continue.js (a script file: the CSP allows no inline script) or by
  its button. Google answers with a GET, which brings the cookie at once.
"""

from __future__ import annotations

import base64
import hmac
import logging
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from relayd.config import Config, RouteConfig
from relayd.router import Router

log = logging.getLogger("relayd.web.server")

SIGNIN_FLOW_TTL_S = 900.0  # a sign-in started and not finished is forgotten after this
MAX_PENDING_SIGNINS = 200
MAX_PENDING_SIGNINS_PER_CLIENT = 5  # sign-ins started from one address and not finished


@dataclass
class _Pending:
    group: str
    flow: Any  # msal's flow dict (Microsoft), or a relayd.auth.login.GoogleFlow
    started: float
    client: str = ""  # the address that started it
    binding: str = ""  # the value of the cookie set in the browser that started it


class SigninBusy(LookupError):
    """Too many sign-ins under way (from this address, or in all): `status` for the page."""

    def __init__(self, text: str, status: int) -> None:
        super().__init__(text)
        self.status = status


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
        from relayd.auth.oauth import is_google_oauth

        return [r for r in self.config.routes.values() if is_google_oauth(r) and r.delegated]

    def start_google(self, address: str, client: str = "") -> tuple[str, str]:
        """Google's authorize URL for `address`, which a delegated Google route must cover:
        Google's installed-app flow wants the user up front (login_hint), and relayd checks
        that the account that signs in is that address."""
        from relayd.auth.google import GMAIL_SCOPE
        from relayd.auth.login import GoogleFlow
        from relayd.auth.oauth import is_google_oauth

        address = address.strip().lower()
        route = self.router.lookup(address) if "@" in address else None
        if route is None or not is_google_oauth(route) or not route.delegated:
            raise LookupError(f"no route of this relay sends for {address!r} with Google "
                              "sign-in; ask your administrator")
        self._room(client)
        flow = GoogleFlow(self.config, route, address, self.redirect_uri, [GMAIL_SCOPE])
        try:
            binding = self._remember(flow.state, _Pending("google", flow, time.monotonic(),
                                                          client))
        except LookupError:
            flow.close()
            raise
        return flow.auth_uri, binding

    def _room(self, client: str) -> None:
        """SigninBusy when `client` (or everyone) has as many sign-ins under way as allowed.
        Sign-ins older than SIGNIN_FLOW_TTL_S are forgotten first."""
        now = time.monotonic()
        with self._lock:
            for old in [k for k, p in self._pending.items()
                        if now - p.started > SIGNIN_FLOW_TTL_S]:
                gone = self._pending.pop(old)
                if gone.group == "google":
                    gone.flow.close()
            mine = sum(1 for p in self._pending.values() if p.client == client)
            if mine >= MAX_PENDING_SIGNINS_PER_CLIENT:
                raise SigninBusy(f"{mine} sign-ins started from your address are not finished. "
                                 "Finish one of them, or start again in "
                                 f"{int(SIGNIN_FLOW_TTL_S // 60)} minutes.", 429)
            if len(self._pending) >= MAX_PENDING_SIGNINS:
                log.warning("web sign-in: %d sign-ins under way, the most allowed; refusing "
                            "new ones until some finish or expire", len(self._pending))
                raise SigninBusy("Too many sign-ins are under way on this relay. Try again in "
                                 "a few minutes.", 503)

    def _remember(self, state: str, pending: _Pending) -> str:
        """Keep a started sign-in; returns the value its browser's cookie must carry."""
        self._room(pending.client)
        pending.binding = secrets.token_urlsafe(32)
        with self._lock:
            self._pending[state] = pending
        return pending.binding

    def _app(self, route: RouteConfig) -> Any:
        import msal  # type: ignore[import-untyped]

        from relayd.auth.oauth import authority_url
        from relayd.auth.tokens import oauth_of
        from relayd.http import route_session

        oauth = oauth_of(route)
        authority, custom = authority_url(oauth)
        kwargs: dict[str, Any] = {"authority": authority, "http_client": route_session(route),
                                  "instance_discovery": False if custom else None}
        if self.redirect_uri.startswith("https://") and oauth.client_secret is not None:
            return msal.ConfidentialClientApplication(
                oauth.client_id, client_credential=oauth.client_secret.reveal(), **kwargs)
        return msal.PublicClientApplication(oauth.client_id, **kwargs)

    def start(self, key: str, client: str = "") -> tuple[str, str]:
        """The provider's authorize URL for a new sign-in, and its cookie's value."""
        from relayd.auth.oauth import signin_scopes

        route = self.groups.get(key)
        if route is None:
            raise LookupError("no such sign-in")
        self._room(client)
        app = self._app(route)
        # form_post: the code comes back in a POST body, never in a URL a browser keeps.
        flow = app.initiate_auth_code_flow(signin_scopes(route),
                                           redirect_uri=self.redirect_uri,
                                           prompt="select_account", response_mode="form_post")
        binding = self._remember(str(flow["state"]),
                                 _Pending(key, flow, time.monotonic(), client))
        return str(flow["auth_uri"]), binding

    def finish(self, params: dict[str, str], binding: str = "") -> tuple[bool, str]:
        """Complete a sign-in from the redirect's query; (ok, what to tell the user)."""
        from relayd.auth.tokencache import TokenStore
        from relayd.errors import AuthenticationError

        with self._lock:
            pending = self._pending.get(params.get("state", ""))
            bound = pending is not None and bool(binding) and \
                hmac.compare_digest(pending.binding.encode(), binding.encode())
            if bound:
                del self._pending[params.get("state", "")]
        if pending is None:
            return False, "This sign-in is unknown or has expired. Start again."
        if not bound:
            # Left pending: the browser that started it may still finish it.
            log.warning("web sign-in: an answer came to a browser that did not start that "
                        "sign-in; refused")
            return False, ("This sign-in was started in another browser, or this browser did "
                           "not keep its cookie. Start again from the sign-in page here.")
        if "error" in params:
            return False, (f"The sign-in was not completed: {params.get('error')}: "
                           f"{params.get('error_description', '')}")
        try:
            TokenStore(self.config).fernet(create=True)  # the cache key, made on first use
        except (AuthenticationError, OSError) as e:
            log.error("web sign-in: %s", e)
            return False, "relayd could not store the sign-in; tell your administrator."
        if pending.group == "google":
            return self._finish_google(pending, params)
        return self._finish_microsoft(pending, params)

    @staticmethod
    def _finish_google(pending: _Pending, params: dict[str, str]) -> tuple[bool, str]:
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

    def _finish_microsoft(self, pending: _Pending, params: dict[str, str]) -> tuple[bool, str]:
        """The code exchanged (msal), the account checked against the delegated routes, and
        its token stored for the route that covers it."""
        import msal

        from relayd.auth.login import SignInOutcome, store_signin
        from relayd.auth.oauth import signin_scopes
        from relayd.errors import AuthenticationError

        route = self.groups[pending.group]
        cache = msal.SerializableTokenCache()
        app = self._app(route)
        app.token_cache = cache
        try:
            result = app.acquire_token_by_auth_code_flow(pending.flow, params,
                                                         scopes=signin_scopes(route))
        except ValueError:
            return False, "The sign-in answer did not match the sign-in it belongs to."
        if "access_token" not in result:
            return False, f"The sign-in failed: {result.get('error')}"
        account = self._account(pending.group, result.get("id_token_claims") or {})
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
            stored = SignInOutcome(False, str(e))
        if not stored.ok:
            log.error("web sign-in: %s", stored.message)
            return False, "relayd could not store the sign-in; tell your administrator."
        log.info("web sign-in: %s signed in for route %s", account, covering.name)
        return True, f"{account} can now send mail through relayd (route {covering.name})."

    def _account(self, group: str, claims: dict[str, Any]) -> str:
        """The signed-in address a delegated route of `group` covers, among the names the id
        token gives (a personal account's sign-in name and its `email`:
        relayd.auth.claims.microsoft_names); else the first, which no route covers."""
        from relayd.auth.claims import microsoft_names

        names = [n.lower() for n in microsoft_names(claims)]
        for name in names:
            route = self.router.lookup(name)
            if route is not None and _delegated_microsoft(route) and _group(route) == group:
                return name
        return names[0] if names else ""


def _delegated_microsoft(route: RouteConfig) -> bool:
    from relayd.auth.oauth import is_microsoft_oauth

    return route.delegated and is_microsoft_oauth(route)


def _group(route: RouteConfig) -> str:
    from relayd.auth.oauth import authority_url, delegated_scopes
    from relayd.auth.tokens import oauth_of

    oauth = oauth_of(route)
    ident = f"{oauth.client_id}|{authority_url(oauth)[0]}|{' '.join(delegated_scopes(route))}"
    return base64.urlsafe_b64encode(ident.encode()).decode().rstrip("=")[:32]
