"""A fake Google OAuth token endpoint: refresh-token grants and service-account JWT grants, and
the installed-app flow: an authorization endpoint (`auth`, beside `token`) with a login form and
the authorization_code grant with PKCE (S256)."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fakes.https import Handler, HttpsServer, start_https_server

CLIENT_ID = "123456789-abc.apps.googleusercontent.com"
CLIENT_SECRET = "GOCSPX-test-secret"
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GMAIL_SCOPE = "https://mail.google.com/"
GOOGLE_AUDIENCE = "https://oauth2.googleapis.com/token"


@dataclass
class Issued:
    user: str  # the refresh token's user, or the service account's subject
    scope: str
    expires_at: float


@dataclass
class Code:
    client_id: str
    redirect_uri: str
    scope: str
    code_challenge: str
    user: str


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class GoogleState:
    client_id: str = CLIENT_ID
    client_secret: str = CLIENT_SECRET
    refresh_tokens: dict[str, str] = field(default_factory=dict)  # refresh token -> user
    revoked: set[str] = field(default_factory=set)
    service_accounts: dict[str, Any] = field(default_factory=dict)  # client_email -> public key
    delegated_domain: str = "business.com"  # subjects domain-wide delegation allows
    token_lifetime_s: int = 3600
    fail_status: int | None = None
    requests: list[dict[str, str]] = field(default_factory=list)
    access_tokens: dict[str, Issued] = field(default_factory=dict)
    codes: dict[str, Code] = field(default_factory=dict)
    logins: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    base_url: str = ""

    @property
    def token_uri(self) -> str:
        return f"{self.base_url}/token"

    @property
    def auth_uri(self) -> str:
        return f"{self.base_url}/auth"

    def revoke_user(self, user: str) -> None:
        with self.lock:
            self.revoked.update(rt for rt, u in self.refresh_tokens.items() if u == user)

    def add_user(self, user: str) -> str:
        """A refresh token for `user`, as an installed-app consent would give."""
        rt = "1//" + secrets.token_urlsafe(24)
        with self.lock:
            self.refresh_tokens[rt] = user
        return rt

    def add_service_account(self, email: str = "relay@proj.iam.gserviceaccount.com",
                            client_id: str = "104050607080901020304") -> dict[str, Any]:
        """A service account; returns its JSON key as Google's console would download it."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        with self.lock:
            self.service_accounts[email] = key.public_key()
        return {"type": "service_account", "project_id": "proj", "private_key_id": "k1",
                "private_key": pem, "client_email": email, "client_id": client_id,
                "token_uri": self.token_uri}

    def check_bearer(self, token: str) -> Issued | None:
        with self.lock:
            issued = self.access_tokens.get(token)
        if issued is None or issued.expires_at < time.time():
            return None
        return issued

    def grants(self, grant_type: str) -> int:
        with self.lock:
            return sum(1 for r in self.requests if r.get("grant_type") == grant_type)


class GoogleHandler(Handler):
    state: GoogleState  # type: ignore[assignment]

    def json(self, status: int, body: dict[str, Any]) -> None:
        self.reply(status, json.dumps(body), "application/json")

    AUTH_PARAMS = ("client_id", "redirect_uri", "response_type", "scope", "state",
                   "code_challenge", "code_challenge_method", "access_type", "prompt",
                   "login_hint")

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        parts = urllib.parse.urlsplit(self.path)
        if parts.path != "/auth":
            self.json(404, {"error": "not_found"})
            return
        self.login_form({k: v[0] for k, v in urllib.parse.parse_qs(parts.query).items()})

    def auth_problem(self, query: dict[str, str]) -> str | None:
        redirect = urllib.parse.urlsplit(query.get("redirect_uri", ""))
        if query.get("client_id") != self.state.client_id:
            return "Error 401: invalid_client. The OAuth client was not found."
        if redirect.scheme != "http" or redirect.hostname not in ("localhost", "127.0.0.1"):
            return "Error 400: redirect_uri_mismatch"
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            return "Error 400: invalid_request. PKCE required."
        return None

    def login_form(self, query: dict[str, str], error: str = "") -> None:
        problem = self.auth_problem(query)
        if problem:
            self.reply(400, f"<html><body><p id='error'>{html.escape(problem)}</p></body></html>",
                       "text/html")
            return
        hidden = "".join(f"<input type='hidden' name='{k}' value='{html.escape(query[k])}'>"
                         for k in self.AUTH_PARAMS if k in query)
        self.reply(200, f"""<!doctype html><html><head><title>Sign in - Google Accounts</title>
</head><body><h1>Sign in</h1><form method="post" action="/auth">{hidden}
<p><label>Email <input type="email" name="username" id="username"
 value="{html.escape(query.get("login_hint", ""))}"></label></p>
<p><label>Password <input type="password" name="password" id="password"></label></p>
{f"<p id='error'>{html.escape(error)}</p>" if error else ""}
<p><button type="submit" id="submit">Next</button></p></form></body></html>""",
                   "text/html; charset=utf-8")

    def login_submit(self, form: dict[str, str]) -> None:
        st = self.state
        query = {k: form[k] for k in self.AUTH_PARAMS if k in form}
        user = form.get("username", "").strip()
        if self.auth_problem(query) or not user:
            self.login_form(query, "Enter an email")
            return
        code = "4/" + secrets.token_urlsafe(24)
        with st.lock:
            st.logins.append(user)
            st.codes[code] = Code(query["client_id"], query["redirect_uri"],
                                  query.get("scope", ""), query["code_challenge"], user)
        back = urllib.parse.urlencode({"state": query.get("state", ""), "code": code,
                                       "scope": query.get("scope", "")})
        self.reply(302, "", headers={"Location": f"{query['redirect_uri']}?{back}"})

    def authorization_code(self, form: dict[str, str]) -> None:
        st = self.state
        if form.get("client_id") != st.client_id or form.get("client_secret") != st.client_secret:
            self.json(401, {"error": "invalid_client", "error_description": "Unauthorized"})
            return
        with st.lock:
            code = st.codes.pop(form.get("code", ""), None)
        if code is None:
            self.json(400, {"error": "invalid_grant", "error_description": "Malformed auth code."})
            return
        if form.get("redirect_uri") != code.redirect_uri:
            self.json(400, {"error": "redirect_uri_mismatch", "error_description": "Bad Request"})
            return
        verifier = form.get("code_verifier", "")
        if _b64url(hashlib.sha256(verifier.encode()).digest()) != code.code_challenge:
            self.json(400, {"error": "invalid_grant", "error_description":
                            "Invalid code verifier."})
            return
        rt = self.state.add_user(code.user)
        scope = " ".join(s for s in code.scope.split() if s not in ("openid", "email"))
        access = "ya29." + secrets.token_urlsafe(24)
        now = time.time()
        with st.lock:
            st.access_tokens[access] = Issued(code.user, scope, now + st.token_lifetime_s)
        claims = {"iss": "https://accounts.google.com", "aud": st.client_id, "sub": "1" * 21,
                  "email": code.user, "email_verified": True, "iat": int(now),
                  "exp": int(now) + 3600}
        id_token = ".".join([_b64url(b'{"alg":"RS256","typ":"JWT"}'),
                             _b64url(json.dumps(claims).encode()), _b64url(b"sig")])
        self.json(200, {"access_token": access, "expires_in": st.token_lifetime_s,
                        "refresh_token": rt, "scope": code.scope, "token_type": "Bearer",
                        "id_token": id_token})

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        st = self.state
        form = {k: v[0] for k, v in urllib.parse.parse_qs(self.read_body().decode()).items()}
        if self.path == "/auth":
            self.login_submit(form)
            return
        if self.path != "/token":
            self.json(404, {"error": "not_found"})
            return
        with st.lock:
            st.requests.append(form)
        if st.fail_status:
            self.json(st.fail_status, {"error": "internal_failure"})
            return
        grant = form.get("grant_type")
        if grant == "refresh_token":
            self.refresh(form)
        elif grant == JWT_GRANT:
            self.jwt_grant(form)
        elif grant == "authorization_code":
            self.authorization_code(form)
        else:
            self.json(400, {"error": "unsupported_grant_type"})

    def refresh(self, form: dict[str, str]) -> None:
        st = self.state
        if form.get("client_id") != st.client_id or form.get("client_secret") != st.client_secret:
            self.json(401, {"error": "invalid_client", "error_description": "Unauthorized"})
            return
        rt = form.get("refresh_token", "")
        with st.lock:
            user = st.refresh_tokens.get(rt)
            revoked = rt in st.revoked
        if user is None or revoked:
            self.json(400, {"error": "invalid_grant",
                            "error_description": "Token has been expired or revoked."})
            return
        self.issue(user, form.get("scope", GMAIL_SCOPE))

    def jwt_grant(self, form: dict[str, str]) -> None:
        st = self.state
        assertion = form.get("assertion", "")
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
            public_key = st.service_accounts[unverified["iss"]]
            # google-auth always names Google's own endpoint as the audience, as Google expects.
            claims = jwt.decode(assertion, public_key, algorithms=["RS256"],
                                audience=GOOGLE_AUDIENCE)
        except (jwt.PyJWTError, KeyError):
            self.json(400, {"error": "invalid_grant",
                            "error_description": "Invalid JWT Signature."})
            return
        subject = str(claims.get("sub", ""))
        if not subject.lower().endswith("@" + st.delegated_domain):
            self.json(401, {"error": "unauthorized_client", "error_description":
                            "Client is unauthorized to retrieve access tokens using this method, "
                            "or client not authorized for any of the scopes requested."})
            return
        self.issue(subject, str(claims.get("scope", "")))

    def issue(self, user: str, scope: str) -> None:
        st = self.state
        access = "ya29." + secrets.token_urlsafe(24)
        with st.lock:
            st.access_tokens[access] = Issued(user, scope, time.time() + st.token_lifetime_s)
        self.json(200, {"access_token": access, "expires_in": st.token_lifetime_s,
                        "token_type": "Bearer", "scope": scope})


def start_google(state: GoogleState | None = None) -> HttpsServer:
    """Start a fake Google token endpoint; routes use `server.state.token_uri` as authority."""
    st = state or GoogleState()
    server = start_https_server(GoogleHandler, st)
    st.base_url = server.base_url
    return server
