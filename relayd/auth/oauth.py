"""Microsoft OAuth through MSAL: app-only and delegated token providers, auth login and status."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import urlsplit

import msal  # type: ignore[import-untyped]
import requests

import relayd.auth.health as token_health
from relayd.auth.claims import MSA_TENANT_ID, microsoft_account
from relayd.auth.tokencache import Stamp, TokenStore
from relayd.auth.tokens import AccessToken, TokenHealth, oauth_of, register_live
from relayd.config import Config, EwsSettings, GraphSettings, OAuthSettings, RouteConfig
from relayd.errors import AuthenticationError
from relayd.http import route_session

log = logging.getLogger(__name__)

MICROSOFT_AUTHORITY = "https://login.microsoftonline.com"
EXCHANGE_ONLINE_HOST = "outlook.office365.com"
SMTP_DELEGATED_SCOPE = "https://outlook.office.com/SMTP.Send"
SMTP_APP_SCOPE = "https://outlook.office365.com/.default"
PERSONAL_TENANTS = ("consumers", "common", MSA_TENANT_ID)
# msal treats a cached access token as expired 5 minutes before its end; renew no later.
MSAL_EXPIRY_MARGIN_S = 300
# Use a short-lived token (under msal's margin) this long before renewing it.
MIN_TOKEN_USE_S = 30
APP_ACCOUNT = "app"  # status file name for a route's client-credentials token
_KEY_RE = re.compile(
    r"-----BEGIN (?:RSA |EC |ENCRYPTED )?PRIVATE KEY-----.+?-----END (?:RSA |EC |ENCRYPTED )?"
    r"PRIVATE KEY-----", re.DOTALL)


def is_microsoft_oauth(route: RouteConfig) -> bool:
    return route.oauth is not None and route.oauth.provider == "microsoft"


def is_google_oauth(route: RouteConfig) -> bool:
    return route.oauth is not None and route.oauth.provider == "google"


def authority_url(oauth: OAuthSettings) -> tuple[str, bool]:
    """(authority URL, whether it is a custom one). `authority` is the identity provider's base
    URL (national cloud, test server); the tenant is appended unless the URL already has a path."""
    if oauth.authority:
        base = oauth.authority.rstrip("/")
        if urlsplit(base).path.strip("/"):
            return base, True
        return f"{base}/{oauth.tenant_id or 'organizations'}", True
    return f"{MICROSOFT_AUTHORITY}/{oauth.tenant_id or 'organizations'}", False


def ews_host(ews: EwsSettings) -> str:
    if ews.service_endpoint:
        return urlsplit(ews.service_endpoint).hostname or EXCHANGE_ONLINE_HOST
    return ews.server or EXCHANGE_ONLINE_HOST


def app_scopes(route: RouteConfig) -> list[str]:
    """The client-credentials scope for a route's resource."""
    if isinstance(route.settings, EwsSettings):
        return [f"https://{ews_host(route.settings)}/.default"]
    if isinstance(route.settings, GraphSettings):
        return [f"{route.settings.endpoint.rstrip('/')}/.default"]
    return [SMTP_APP_SCOPE]


def delegated_scopes(route: RouteConfig) -> list[str]:
    """The delegated (device-flow) scope for a route's resource."""
    if isinstance(route.settings, EwsSettings):
        return [f"https://{ews_host(route.settings)}/EWS.AccessAsUser.All"]
    if isinstance(route.settings, GraphSettings):
        return [f"{route.settings.endpoint.rstrip('/')}/Mail.Send"]
    return [SMTP_DELEGATED_SCOPE]


def takes_personal_accounts(route: RouteConfig) -> bool:
    """Whether personal Microsoft accounts (Outlook.com, Hotmail, Live) sign in for this route:
    its tenant is `consumers` (personal accounts only), `common` (both kinds) or the personal
    accounts' own tenant id."""
    return route.oauth is not None and (route.oauth.tenant_id or "").lower() in PERSONAL_TENANTS


def signin_scopes(route: RouteConfig) -> list[str]:
    """The scopes of an interactive sign-in: the route's delegated scope, plus OpenID `email`
    where personal accounts sign in. A personal account's preferred_username is its sign-in
    name (an address, a phone number or another name), and only the `email` claim, which needs
    that scope, names its mailbox for certain (relayd.auth.claims.microsoft_account)."""
    scopes = delegated_scopes(route)
    return [*scopes, "email"] if takes_personal_accounts(route) else scopes


def _first_line(text: object) -> str:
    return str(text or "").strip().splitlines()[0] if str(text or "").strip() else ""


def _login_hint(route: str, account: str) -> str:
    return f"run `relayd auth login {route} --user {account}`"


@dataclass
class _UserCache:
    app: msal.PublicClientApplication
    cache: msal.SerializableTokenCache
    stamp: Stamp


class MsalTokenProvider:
    """TokenProvider for Microsoft routes.

    flow = "app": client credentials (secret or certificate); the token lives in msal's in-memory
    cache and is renewed by msal before it expires. flow = "device": the user's token cache from
    `relayd auth login`, read from the encrypted store (again whenever its file changes) and
    refreshed silently; refreshed caches are written back.
    """

    def __init__(self, route: RouteConfig, config: Config, scopes: Sequence[str]) -> None:
        self.route = route
        self.oauth = oauth_of(route)
        self.config = config
        self.scopes = list(scopes)
        self.authority, custom = authority_url(self.oauth)
        # A custom authority is not in Microsoft's instance list: skip that lookup (it would go
        # to login.microsoftonline.com) and use the authority's own OpenID discovery.
        self._instance_discovery: bool | None = False if custom else None
        self._http = route_session(route)
        self._lock = threading.Lock()
        self._app: msal.ConfidentialClientApplication | None = None
        self._users: dict[str, _UserCache] = {}
        self._force: set[str] = set()
        self._last: dict[str, str] = {}  # account -> token last handed out
        self._expires: dict[str, float] = {}  # account -> when that token expires
        self._failing: set[str] = set()
        self._refreshed: set[str] = set()  # accounts whose last token came from the IdP
        self._idle_tried: dict[str, float] = {}  # account -> last background refresh attempt
        # token file -> (its stamp, account, latest access-token expiry, refresh token held)
        self._summaries: dict[str, tuple[Stamp, str, float | None, bool]] = {}
        self.store = TokenStore(config)
        register_live(self)  # relayd.auth.registry reads its health

    @property
    def delegated(self) -> bool:
        return self.route.delegated

    # -- TokenProvider -------------------------------------------------------------------------

    async def token(self, account: str) -> str:
        return (await asyncio.to_thread(self.acquire, account)).token

    def invalidate(self, account: str) -> None:
        key = self._key(account)
        with self._lock:
            self._force.add(key)

    # -- blocking API (for code already on a worker thread, e.g. exchangelib) --------------------

    def acquire(self, account: str) -> AccessToken:
        """A valid token for `account` (ignored for app-only); AuthenticationError otherwise."""
        key = self._key(account)
        try:
            if self.delegated:
                tok = self._acquire_user(key)
            else:
                tok = self._acquire_app()
        except AuthenticationError as e:
            self._failed(key, str(e))
            raise
        except (requests.RequestException, msal.exceptions.MsalError, ValueError, RuntimeError,
                OSError) as e:
            # msal raises requests' errors for network trouble and ValueError when the
            # authority's discovery document cannot be had.
            msg = (f"route {self.route.name}: identity provider unreachable: "
                   f"{type(e).__name__}: {_first_line(e)}")
            self._failed(key, msg)
            raise AuthenticationError(msg) from None
        refreshed = key in self._refreshed
        self._refreshed.discard(key)
        if refreshed or key in self._failing or self._last.get(key) != tok.token:
            self._failing.discard(key)
            fields: dict[str, Any] = {"last_error": None, "expires_at": tok.expires_at}
            if refreshed:
                fields["refreshed_at"] = time.time()
            self.store.update_state(self.route.name, key, **fields)
        self._last[key] = tok.token
        self._expires[key] = tok.expires_at
        return tok

    def expiries(self) -> dict[str, float]:
        return dict(self._expires)

    def close(self) -> None:
        self._http.close()

    def _key(self, account: str) -> str:
        return account.lower() if self.delegated else APP_ACCOUNT

    def _failed(self, key: str, message: str) -> None:
        if key not in self._failing:
            log.warning("route %s: OAuth token for %s unavailable: %s", self.route.name,
                        key, message)
        self._failing.add(key)
        self.store.update_state(self.route.name, key, last_error=message,
                                failed_at=time.time())

    def _result(self, result: Mapping[str, Any] | None, key: str) -> AccessToken:
        if result and "access_token" in result:
            if result.get("token_source") == "identity_provider":
                self._refreshed.add(key)
            now = time.time()
            expires_at = now + float(result.get("expires_in") or 0)
            # A token shorter-lived than msal's margin is still used for a while (up to its
            # end), so a renewal can never hand back an already-stale token in a loop.
            renew_at = max(expires_at - MSAL_EXPIRY_MARGIN_S,
                           min(expires_at - 1, now + MIN_TOKEN_USE_S))
            if result.get("refresh_on"):
                # The identity provider asked for an early renewal (refresh_in); msal honours it.
                renew_at = min(renew_at, max(float(result["refresh_on"]), now + 1))
            return AccessToken(str(result["access_token"]), renew_at, expires_at)
        if not result:
            raise AuthenticationError(f"route {self.route.name}: no usable token for {key}; "
                                      + _login_hint(self.route.name, key))
        error = str(result.get("error") or "error")
        text = f"route {self.route.name}: token refused: {error}: " \
               f"{_first_line(result.get('error_description'))}"
        if self.delegated and (error in ("invalid_grant", "interaction_required")
                               or token_health.needs_signin(text)):
            text += "; " + _login_hint(self.route.name, key)
        raise AuthenticationError(text)

    # -- token health ----------------------------------------------------------------------------

    def health(self) -> list[TokenHealth]:
        """Each credential of this route (the app's, or each signed-in user's), from memory and
        the token store's files; no network."""
        name = self.route.name
        cred = token_health.credential_expiry(self.route)
        if not self.delegated:
            state = self.store.read_state(name, APP_ACCOUNT)
            problem = str(state.get("last_error") or "")
            return [TokenHealth(
                route=name, account="", expires_at=self._expires.get(APP_ACCOUNT)
                or state.get("expires_at"), last_refreshed=state.get("refreshed_at"),
                problem=problem, credential_expires_at=cred,
                fix=(f"check the client secret or certificate of routes.{name} against the app "
                     "registration" if problem else ""))]
        out = []
        for path in self.store.files(name):
            try:
                summary = self._summary(path)
            except AuthenticationError as e:
                out.append(TokenHealth(route=name, account=path.name, needs_signin=True,
                                       problem=str(e), credential_expires_at=cred,
                                       fix=token_health.fix_command(name, "ADDR")))
                continue
            if summary is None:
                continue
            stamp, account, expiry, has_refresh = summary
            state = self.store.read_state(name, account)
            problem = str(state.get("last_error") or "")
            if not problem and not has_refresh:
                problem = "no refresh token stored"
            signin = not has_refresh or token_health.needs_signin(problem)
            out.append(TokenHealth(
                route=name, account=account, expires_at=self._expires.get(account, expiry),
                last_refreshed=state.get("refreshed_at") or state.get("signed_in_at")
                or stamp.mtime_ns / 1e9,
                needs_signin=signin, problem=problem, credential_expires_at=cred,
                fix=token_health.fix_command(name, account) if signin else ""))
        return out

    def _summary(self, path: Any) -> tuple[Stamp, str, float | None, bool] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        stamp = Stamp(st.st_ino, st.st_mtime_ns, st.st_size)
        held = self._summaries.get(str(path))
        if held is not None and held[0] == stamp:
            return held
        stored = self.store.load_file(path)
        if stored is None:
            return None
        expiry, has_refresh = _cache_summary(stored.cache)
        summary = (stored.stamp, stored.account, expiry, has_refresh)
        self._summaries[str(path)] = summary
        return summary

    async def refresh_idle(self, now: float | None = None) -> None:
        """Keep idle delegated tokens alive (relayd.auth.health.refresh_idle); app-only
        tokens are fetched on use."""
        if not self.delegated:
            return
        await token_health.refresh_idle(self, self.route.name, self._idle_tried, now)

    # -- client credentials ----------------------------------------------------------------------

    def _credential(self) -> str | dict[str, str]:
        route, oauth = self.route, self.oauth
        if oauth.certificate_file is not None:
            try:
                pem = oauth.certificate_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise AuthenticationError(f"route {route.name}: cannot read certificate_file "
                                          f"{oauth.certificate_file}: {e}") from None
            m = _KEY_RE.search(pem)
            if not m:
                raise AuthenticationError(f"route {route.name}: certificate_file "
                                          f"{oauth.certificate_file} holds no private key")
            return {"private_key": m.group(0),
                    "thumbprint": (oauth.thumbprint or "").replace(":", "").strip()}
        if oauth.client_secret is None:
            raise AuthenticationError(f"route {route.name}: no client secret or certificate")
        return oauth.client_secret.reveal()

    def _app_client(self) -> msal.ConfidentialClientApplication:
        with self._lock:
            if self._app is None:
                # Building it fetches the OpenID configuration; on failure it is retried next time.
                self._app = msal.ConfidentialClientApplication(
                    self.oauth.client_id, client_credential=self._credential(),
                    authority=self.authority, http_client=self._http,
                    instance_discovery=self._instance_discovery, token_cache=msal.TokenCache())
            return self._app

    def _acquire_app(self) -> AccessToken:
        app = self._app_client()
        with self._lock:
            forced = APP_ACCOUNT in self._force
        if forced:
            # The upstream refused the cached token: drop it so msal fetches a new one.
            cache = app.token_cache
            for at in list(cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN)):
                cache.remove_at(at)
        tok = self._result(app.acquire_token_for_client(self.scopes), APP_ACCOUNT)
        with self._lock:
            self._force.discard(APP_ACCOUNT)
        return tok

    # -- delegated (device flow) -----------------------------------------------------------------

    def _user(self, key: str) -> _UserCache:
        name = self.route.name
        with self._lock:
            u = self._users.get(key)
            stamp = self.store.stamp(name, key)
            if stamp is None:
                self._users.pop(key, None)
                raise AuthenticationError(f"route {name}: {key} has not signed in; "
                                          + _login_hint(name, key))
            if u is not None and u.stamp == stamp:
                return u
            stored = self.store.load(name, key)
            if stored is None:
                raise AuthenticationError(f"route {name}: {key} has not signed in; "
                                          + _login_hint(name, key))
            if u is None:
                cache = msal.SerializableTokenCache()
                cache.deserialize(stored.cache)
                app = msal.PublicClientApplication(
                    self.oauth.client_id, authority=self.authority, http_client=self._http,
                    instance_discovery=self._instance_discovery, token_cache=cache)
                u = _UserCache(app, cache, stored.stamp)
                self._users[key] = u
            else:
                # `relayd auth login` wrote a new cache: take it without a restart.
                u.cache.deserialize(stored.cache)
                u.stamp = stored.stamp
            return u

    def _acquire_user(self, key: str) -> AccessToken:
        u = self._user(key)
        accounts = u.app.get_accounts(username=key) or _sole_account(u.app)
        if not accounts:
            raise AuthenticationError(f"route {self.route.name}: the stored sign-in is not for "
                                      f"{key}; " + _login_hint(self.route.name, key))
        with self._lock:
            forced = key in self._force
        result = u.app.acquire_token_silent_with_error(self.scopes, accounts[0],
                                                       force_refresh=forced)
        tok = self._result(result, key)
        with self._lock:
            self._force.discard(key)
        if u.cache.has_state_changed:
            self._save(key, u)
        return tok

    def _save(self, key: str, u: _UserCache) -> None:
        with self.store.locked():
            if self.store.stamp(self.route.name, key) != u.stamp:
                return  # a newer sign-in was stored meanwhile; it wins, we re-read it next time
            u.stamp = self.store.save(self.route.name, key, u.cache.serialize())
            u.cache.has_state_changed = False


def _sole_account(app: msal.ClientApplication) -> list[dict[str, Any]]:
    """The one account of a user's token file when msal's username (the id token's
    preferred_username) is not the address the file is stored under: a personal Microsoft
    account that signed in with a phone number or another alias, accepted by its `email` claim
    (relayd.auth.claims.microsoft_account). Each file is written only after that check, for
    that address alone, so its single account is the one that passed it."""
    accounts: list[dict[str, Any]] = app.get_accounts()
    return accounts if len(accounts) == 1 else []


# -- functions for the CLI and the listener ------------------------------------------------------


def has_signed_in(config: Config, route: RouteConfig, account: str) -> bool:
    """Whether `account` has a stored delegated token for `route` (one stat: fast)."""
    return TokenStore(config).exists(route.name, account.lower())


# The token endpoint's answers for a device code whose time is up (RFC 8628 3.5; Entra:
# AADSTS70019 "code expired" is expired_token, older answers say code_expired).
DEVICE_CODE_EXPIRED = ("expired_token", "code_expired")


def _minutes(seconds: object) -> str:
    try:
        value = float(str(seconds))
    except ValueError:
        return "a few minutes"
    return f"{value / 60:.0f} minutes" if value >= 120 else f"{value:.0f} seconds"


def _device_code_signin(route: RouteConfig, user: str | None, out: TextIO
                        ) -> tuple[dict[str, Any], msal.SerializableTokenCache] | None:
    """The device-code flow at the identity provider (msal): the user signs in elsewhere while
    this polls. The token endpoint's answer and the cache holding it; None (said on `out`)
    when the sign-in failed."""
    oauth = oauth_of(route)
    authority, custom = authority_url(oauth)
    cache = msal.SerializableTokenCache()
    http = route_session(route)
    try:
        app = msal.PublicClientApplication(
            oauth.client_id, authority=authority, http_client=http,
            instance_discovery=False if custom else None, token_cache=cache)
        flow = app.initiate_device_flow(scopes=signin_scopes(route))
        if "user_code" not in flow:
            out.write(f"relayd: the identity provider refused the sign-in: "
                      f"{flow.get('error')}: {_first_line(flow.get('error_description'))}\n")
            return None
        out.write(str(flow.get("message") or
                      f"Open {flow['verification_uri']} and enter the code {flow['user_code']}")
                  + "\n")
        if user:
            out.write(f"Sign in as {user}.\n")
        out.flush()
        result = app.acquire_token_by_device_flow(flow)  # polls until done or the code expires
    except (requests.RequestException, msal.exceptions.MsalError, ValueError, RuntimeError) as e:
        out.write(f"relayd: identity provider unreachable: {type(e).__name__}: "
                  f"{_first_line(e)}\n")
        return None
    finally:
        http.close()
    if "access_token" not in result:
        if result.get("error") in DEVICE_CODE_EXPIRED or (
                result.get("error") in ("authorization_pending", "slow_down")
                and float(flow.get("expires_at", 0)) <= time.time()):
            # msal stops polling when the code's time is up and hands back the last answer,
            # "authorization_pending", which reads as if the sign-in were still under way.
            out.write(f"relayd: the code expired before anyone signed in with it (a device "
                      f"code lasts {_minutes(flow.get('expires_in'))}); run `relayd auth login "
                      f"{route.name} --device` again, or use --browser or --paste\n")
            return None
        out.write(f"relayd: sign-in failed: {result.get('error')}: "
                  f"{_first_line(result.get('error_description'))}\n")
        return None
    return result, cache


def login(config: Config, route_name: str, user: str | None, out: TextIO) -> int:
    """`relayd auth login ROUTE [--user ADDR]`: device-code sign-in, stored encrypted."""
    route = config.routes.get(route_name)
    if route is None:
        out.write(f"relayd: no route named {route_name!r}\n")
        return 2
    if not is_microsoft_oauth(route) or not route.delegated:
        out.write(f'relayd: route {route_name} does not use delegated OAuth (flow = "device")\n')
        return 2
    store = TokenStore(config)
    try:
        store.fernet(create=True)
    except (AuthenticationError, OSError) as e:
        out.write(f"relayd: {e}\n")
        return 1
    signed = _device_code_signin(route, user, out)
    if signed is None:
        return 1
    result, cache = signed
    signed_in = microsoft_account(result.get("id_token_claims") or {}, user).lower()
    if not signed_in:
        out.write("relayd: the identity provider did not say who signed in; nothing stored\n")
        return 1
    if user and signed_in != user.lower():
        out.write(f"relayd: signed in as {signed_in}, but --user is {user}: a delegated route "
                  "sends only as the account that signed in; nothing stored\n")
        return 1
    try:
        with store.locked():
            store.save(route.name, signed_in, cache.serialize())
        now = time.time()
        store.write_state(route.name, signed_in, last_error=None, refreshed_at=now,
                          signed_in_at=now, expires_at=now + float(result.get("expires_in") or 0))
    except OSError as e:
        out.write(f"relayd: cannot store the token cache in {store.root}: {e.strerror}\n")
        return 1
    out.write(f"Signed in as {signed_in}; token cache stored for route {route.name} "
              f"({store.path(route.name, signed_in)}).\n")
    return 0


def _cache_summary(cache_json: str) -> tuple[float | None, bool]:
    """(latest access-token expiry, whether a refresh token is stored) from an msal cache."""
    try:
        doc = json.loads(cache_json) if cache_json else {}
    except ValueError:
        return None, False
    expiries = [float(at.get("expires_on", 0)) for at in (doc.get("AccessToken") or {}).values()]
    return (max(expiries) if expiries else None), bool(doc.get("RefreshToken"))
