"""Google OAuth tokens for XOAUTH2: a user's refresh token, or a service account's delegation."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import google.auth.exceptions
import google.auth.transport.requests
import requests
from google.oauth2 import credentials as user_credentials
from google.oauth2 import service_account

import relayd.auth.health as token_health
from relayd.auth.tokencache import TokenStore
from relayd.auth.tokens import AccessToken, TokenHealth, oauth_of, register_live
from relayd.config import Config, RouteConfig
from relayd.errors import AuthenticationError
from relayd.http import route_session

log = logging.getLogger(__name__)

GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
GMAIL_SCOPE = "https://mail.google.com/"  # what XOAUTH2 to smtp.gmail.com needs
# Renew this long before a token's end, so a token never expires between AUTH and DATA.
RENEW_BEFORE_S = 300
# Hand out no token with less than this left (a very short-lived token is still used once).
MIN_TOKEN_USE_S = 30
REFRESH_ACCOUNT = "refresh-token"  # the one cache key of a refresh-token route


def _first_line(error: BaseException) -> str:
    text = str(error.args[0]) if error.args else str(error)
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


def _expiry_ts(expiry: dt.datetime | None, now: float) -> float:
    if expiry is None:  # the token endpoint gave no lifetime: assume Google's usual hour
        return now + 3600
    if expiry.tzinfo is None:  # google-auth keeps naive UTC datetimes
        expiry = expiry.replace(tzinfo=dt.UTC)
    return expiry.timestamp()


class GoogleTokenProvider:
    """TokenProvider for provider = "google".

    With `refresh_token_file`/`_env`: the installed-app consent of one Google user; client_id and
    client_secret are that OAuth client's. Without a refresh token: a service account with
    domain-wide delegation, its JSON key given as `client_secret_file`/`_env` (a secret file,
    mode 0600) and `client_id` the service account's client ID (the one authorised in the Admin
    console); each account (sender or mailbox) gets its own token with that account as subject.
    `authority`, when set, is the token endpoint URL (default Google's). Tokens live in memory.
    With flow = "device" and no refresh token: each user's refresh token from `relayd auth
    login` (installed-app flow with PKCE), read from the encrypted token store.
    """

    def __init__(self, route: RouteConfig, config: Config, scopes: Sequence[str]) -> None:
        self.route = route
        self.oauth = oauth_of(route)
        self.config = config
        self.scopes = list(scopes)
        self.token_uri = self.oauth.authority or GOOGLE_TOKEN_URI
        if self.oauth.refresh_token is not None:
            self.mode = "refresh_token"
        elif self.oauth.flow == "device":
            self.mode = "delegated"
        else:
            self.mode = "service_account"
        self.store = TokenStore(config)
        self._problems: dict[str, str] = {}  # account -> why its last fetch failed
        self._refreshed_at: dict[str, float] = {}
        self._idle_tried: dict[str, float] = {}
        # The route's timeout replaces the 120 s google-auth asks for (relayd.http).
        self._session = route_session(route)
        self._request = google.auth.transport.requests.Request(self._session)
        self._lock = threading.Lock()
        self._tokens: dict[str, AccessToken] = {}
        self._sa_info: dict[str, Any] | None = None
        register_live(self)  # relayd.auth.registry reads its health

    # -- TokenProvider -------------------------------------------------------------------------

    async def token(self, account: str) -> str:
        return await asyncio.to_thread(self.acquire, account)

    def expiries(self) -> dict[str, float]:
        with self._lock:
            return {key: tok.expires_at for key, tok in self._tokens.items()}

    def invalidate(self, account: str) -> None:
        with self._lock:
            self._tokens.pop(self._key(account), None)

    def close(self) -> None:
        self._session.close()

    # -- blocking ------------------------------------------------------------------------------

    def _key(self, account: str) -> str:
        return REFRESH_ACCOUNT if self.mode == "refresh_token" else account.lower()

    def acquire(self, account: str) -> str:
        """A token for `account`, fetched when none is held or it is near its end."""
        key = self._key(account)
        # One fetch at a time: concurrent sessions wait for it rather than each asking Google.
        with self._lock:
            held = self._tokens.get(key)
            if held is not None and time.time() < held.renew_at:
                return held.token
            try:
                token = self._fetch(account)
            except AuthenticationError as e:
                self._problems[key] = str(e)
                if self.mode == "delegated":
                    self.store.update_state(self.route.name, key, last_error=str(e),
                                            failed_at=time.time())
                raise
            self._tokens[key] = token
            now = time.time()
            self._refreshed_at[key] = now
            self._problems.pop(key, None)
            if self.mode == "delegated":
                self.store.update_state(self.route.name, key, last_error=None,
                                        expires_at=token.expires_at, refreshed_at=now)
            return token.token

    # -- token health ----------------------------------------------------------------------------

    def health(self) -> list[TokenHealth]:
        """Each account this route holds a credential for; no network."""
        name = self.route.name
        cred = token_health.credential_expiry(self.route)
        if self.mode == "delegated":
            out = []
            for path in self.store.files(name):
                try:
                    stored = self.store.load_file(path)
                except AuthenticationError as e:
                    out.append(TokenHealth(route=name, account=path.name, needs_signin=True,
                                           problem=str(e), credential_expires_at=cred,
                                           fix=token_health.fix_command(name, "ADDR")))
                    continue
                if stored is None:
                    continue
                acct = stored.account
                state = self.store.read_state(name, acct)
                problem = str(state.get("last_error") or "")
                signin = token_health.needs_signin(problem)
                held = self._tokens.get(acct)
                out.append(TokenHealth(
                    route=name, account=acct,
                    expires_at=held.expires_at if held else state.get("expires_at"),
                    last_refreshed=state.get("refreshed_at") or state.get("signed_in_at")
                    or stored.stamp.mtime_ns / 1e9,
                    needs_signin=signin, problem=problem, credential_expires_at=cred,
                    fix=token_health.fix_command(name, acct) if signin else ""))
            return out
        # No lock: a fetch in progress holds it, and plain dict reads are safe.
        tokens, problems = dict(self._tokens), dict(self._problems)
        keys = sorted(set(tokens) | set(problems))
        if self.mode == "refresh_token" and not keys:
            keys = [REFRESH_ACCOUNT]
        return [TokenHealth(
            route=name, account="" if key == REFRESH_ACCOUNT else key,
            expires_at=tokens[key].expires_at if key in tokens else None,
            last_refreshed=self._refreshed_at.get(key),
            # refresh_token_file was made by hand: a new one is made the same way, or by
            # switching the route to flow = "device" and `relayd auth login`.
            needs_signin=token_health.needs_signin(problems.get(key)),
            problem=problems.get(key, ""), credential_expires_at=cred,
            fix=(f"replace routes.{name}.refresh_token_file (a new consent), or use "
                 f'flow = "device" and relayd auth login {name} --user ADDR'
                 if token_health.needs_signin(problems.get(key)) else ""))
            for key in keys]

    async def refresh_idle(self, now: float | None = None) -> None:
        """Keep idle delegated tokens alive (relayd.auth.health.refresh_idle); a service
        account needs nothing."""
        if self.mode != "delegated":
            return
        await token_health.refresh_idle(self, self.route.name, self._idle_tried, now)

    def _fetch(self, account: str) -> AccessToken:
        route = self.route
        try:
            creds = self._credentials(account)
            creds.refresh(self._request)  # type: ignore[no-untyped-call]
        except google.auth.exceptions.RefreshError as e:
            # e.g. "invalid_grant: Token has been expired or revoked." - the server's words only.
            text = (f"route {route.name}: Google refused the token request for {account}: "
                    f"{_first_line(e)}")
            if self.mode == "delegated" and token_health.needs_signin(text):
                text += f"; run `{token_health.fix_command(route.name, account.lower())}`"
            raise AuthenticationError(text) from None
        except (google.auth.exceptions.GoogleAuthError, requests.RequestException,
                OSError) as e:
            raise AuthenticationError(f"route {route.name}: Google token endpoint "
                                      f"{self.token_uri} unreachable: {type(e).__name__}: "
                                      f"{_first_line(e)}") from None
        if not creds.token:
            raise AuthenticationError(f"route {route.name}: Google answered without a token")
        now = time.time()
        expires = _expiry_ts(creds.expiry, now)
        renew_at = max(expires - RENEW_BEFORE_S, now + min(MIN_TOKEN_USE_S, expires - now))
        log.debug("route %s: Google token for %s valid until %.0f", route.name, account, expires)
        return AccessToken(str(creds.token), renew_at, expires)

    def _credentials(self, account: str) -> user_credentials.Credentials | \
            service_account.Credentials:
        route, oauth = self.route, self.oauth
        if self.mode == "delegated":
            return self._delegated_credentials(account)
        if self.mode == "refresh_token":
            assert oauth.refresh_token is not None
            if oauth.client_secret is None:
                raise AuthenticationError(f"route {route.name}: a Google refresh token needs "
                                          "client_secret_file (the OAuth client's secret)")
            return user_credentials.Credentials(  # type: ignore[no-untyped-call]
                token=None, refresh_token=oauth.refresh_token.reveal(),
                token_uri=self.token_uri, client_id=oauth.client_id,
                client_secret=oauth.client_secret.reveal(), scopes=self.scopes)
        info = self._service_account_info()
        creds = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
            info, scopes=self.scopes, subject=account)
        return creds  # type: ignore[no-any-return]

    def _delegated_credentials(self, account: str) -> user_credentials.Credentials:
        route, oauth = self.route, self.oauth
        key = account.lower()
        hint = f"; run `{token_health.fix_command(route.name, key)}`"
        stored = self.store.load(route.name, key)
        if stored is None:
            raise AuthenticationError(f"route {route.name}: {key} has not signed in" + hint)
        try:
            refresh_token = str(json.loads(stored.cache)["refresh_token"])
        except (ValueError, KeyError, TypeError):
            raise AuthenticationError(f"route {route.name}: the stored sign-in of {key} holds "
                                      "no Google refresh token" + hint) from None
        if oauth.client_secret is None:
            raise AuthenticationError(f"route {route.name}: Google sign-ins need "
                                      "client_secret_file (the OAuth client's secret)")
        return user_credentials.Credentials(  # type: ignore[no-untyped-call]
            token=None, refresh_token=refresh_token, token_uri=self.token_uri,
            client_id=oauth.client_id, client_secret=oauth.client_secret.reveal(),
            scopes=self.scopes)

    def _service_account_info(self) -> dict[str, Any]:
        route, oauth = self.route, self.oauth
        if self._sa_info is not None:
            return self._sa_info
        problem = (f"route {route.name}: without refresh_token_file, a Google route needs a "
                   "service account JSON key as client_secret_file")
        if oauth.client_secret is None:
            raise AuthenticationError(problem)
        try:
            info = json.loads(oauth.client_secret.reveal())
        except ValueError:
            raise AuthenticationError(problem + " (it is not JSON)") from None
        if not isinstance(info, dict) or info.get("type") != "service_account":
            raise AuthenticationError(problem + ' (its "type" is not "service_account")')
        missing = [k for k in ("client_email", "private_key") if not info.get(k)]
        if missing:
            raise AuthenticationError(problem + f" (it lacks {', '.join(missing)})")
        if oauth.client_id and info.get("client_id") and str(info["client_id"]) != oauth.client_id:
            raise AuthenticationError(
                f"route {route.name}: client_id {oauth.client_id} is not the client ID of the "
                f"service account key ({info['client_id']}); domain-wide delegation is granted "
                "to the key's client ID")
        # `authority` overrides the key's own token_uri (a test or proxying endpoint).
        if oauth.authority or not info.get("token_uri"):
            info["token_uri"] = self.token_uri
        self._sa_info = info
        return info
