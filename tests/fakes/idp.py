"""A fake Microsoft identity platform for msal: discovery, token and device-code endpoints, and
an authorize endpoint with a login form for the authorization code flow with PKCE."""

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
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from .https import Handler, HttpsServer, start_https_server

TENANT = "contoso-tenant"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
CLIENT_SECRET = "app-secret-value"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
LOGIN_TITLE = "Sign in to your account"
# Personal Microsoft accounts (Outlook.com, Hotmail, Live): the `consumers` authority, and the
# tenant id every personal account's tokens carry (ID token claims reference, `tid`).
CONSUMERS = "consumers"
MSA_TENANT_ID = "9188040d-6c67-4c5b-b112-36a304b66dad"


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 S256: base64url(sha256(verifier)) without padding."""
    return _b64url(hashlib.sha256(verifier.encode()).digest())


def is_loopback_redirect(uri: str) -> bool:
    """Entra takes http://localhost (any port, any path) for "Mobile and desktop applications"."""
    parts = urllib.parse.urlsplit(uri)
    return parts.scheme == "http" and parts.hostname in ("localhost", "127.0.0.1")


@dataclass
class AuthCode:
    """What an authorization code was issued for; the token request must match it."""

    client_id: str
    redirect_uri: str
    scope: str
    code_challenge: str
    code_challenge_method: str
    nonce: str
    user: str


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class IssuedToken:
    kind: str  # "app" or "user"
    user: str | None
    scope: str
    expires_at: float


@dataclass
class IdpState:
    tenant: str = TENANT
    client_id: str = CLIENT_ID
    client_secret: str = CLIENT_SECRET
    certificate: x509.Certificate | None = None  # accepted for client assertions
    token_lifetime_s: int = 3600
    refresh_in_s: int | None = None  # tells msal to renew early (proactive refresh)
    device_user: str | None = None  # device codes are approved for this user on first poll
    device_interval_s: int = 1
    device_expires_s: int = 60  # a device code's lifetime (Entra: 15 minutes)
    fail_token_status: int | None = None  # answer every token request with this HTTP status
    # (grant type or "devicecode", form) of each token and device-code request
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    access_tokens: dict[str, IssuedToken] = field(default_factory=dict)
    refresh_tokens: dict[str, str] = field(default_factory=dict)  # refresh token -> user
    revoked: set[str] = field(default_factory=set)
    # device code -> [approved user or None, requested scope]
    device_codes: dict[str, list[str | None]] = field(default_factory=dict)
    # authorization code flow: user -> password (None: any password is accepted); redirect
    # URIs registered as "Web" (https, exact match; loopback ones are always allowed); codes.
    passwords: dict[str, str] | None = None
    web_redirect_uris: set[str] = field(default_factory=set)
    auth_codes: dict[str, AuthCode] = field(default_factory=dict)
    logins: list[str] = field(default_factory=list)  # users who submitted the login form
    # Personal accounts (tenant "consumers"): id tokens carry tid = MSA_TENANT_ID and the
    # account's sign-in name as preferred_username; `email` (the mailbox) only when the sign-in
    # asked for the `email` scope, as the real endpoint does. `mailboxes` maps a sign-in name
    # (a phone number, an alias) to its mailbox; by default the name is the mailbox.
    mailboxes: dict[str, str] = field(default_factory=dict)
    email_consent: set[str] = field(default_factory=set)  # users who granted `email`
    lock: threading.Lock = field(default_factory=threading.Lock)
    base_url: str = ""

    @property
    def personal(self) -> bool:
        return self.tenant == CONSUMERS

    def grants(self, grant_type: str) -> int:
        """How many token requests of this grant type arrived."""
        with self.lock:
            return sum(1 for g, _ in self.requests if g == grant_type)

    def revoke_user(self, user: str) -> None:
        """Revoke every refresh token of `user`, as an admin or a password change would."""
        with self.lock:
            self.revoked.update(rt for rt, u in self.refresh_tokens.items() if u == user)

    def check_bearer(self, token: str) -> IssuedToken | None:
        """The token's grant if it was issued here and has not expired."""
        with self.lock:
            issued = self.access_tokens.get(token)
        if issued is None or issued.expires_at < time.time():
            return None
        return issued

    @property
    def authority(self) -> str:
        return f"{self.base_url}/{self.tenant}"


class IdpHandler(Handler):
    state: IdpState  # type: ignore[assignment]

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        st = self.state
        base = f"{st.base_url}/{st.tenant}"
        if self.path.split("?")[0] == f"/{st.tenant}/v2.0/.well-known/openid-configuration":
            # The consumers authority names the personal accounts' tenant as its issuer.
            issuer = f"{st.base_url}/{MSA_TENANT_ID}/v2.0" if st.personal else f"{base}/v2.0"
            self.json(200, {
                "issuer": issuer,
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "response_types_supported": ["code", "id_token", "code id_token"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
            })
            return
        if self.path.split("?")[0] == f"/{st.tenant}/oauth2/v2.0/authorize":
            query = {k: v[0] for k, v in
                     urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).items()}
            self.authorize_form(query)
            return
        self.json(404, {"error": "not_found"})

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        st = self.state
        form = {k: v[0] for k, v in urllib.parse.parse_qs(self.read_body().decode()).items()}
        if self.path == f"/{st.tenant}/oauth2/v2.0/devicecode":
            with st.lock:
                st.requests.append(("devicecode", form))
            self.device_code(form)
        elif self.path == f"/{st.tenant}/oauth2/v2.0/authorize":
            self.authorize_submit(form)
        elif self.path == f"/{st.tenant}/oauth2/v2.0/token":
            with st.lock:
                st.requests.append((form.get("grant_type", ""), form))
            if st.fail_token_status:
                self.json(st.fail_token_status, {"error": "temporarily_unavailable",
                                                 "error_description": "try later"})
                return
            self.token(form)
        else:
            self.json(404, {"error": "not_found"})

    def json(self, status: int, body: dict[str, Any]) -> None:
        self.reply(status, json.dumps(body), "application/json")

    # -- authorization code flow: the login page -------------------------------------------------

    AUTH_PARAMS = ("client_id", "response_type", "redirect_uri", "scope", "state",
                   "code_challenge", "code_challenge_method", "nonce", "login_hint",
                   "response_mode")

    def authorize_problem(self, query: dict[str, str]) -> str | None:
        st = self.state
        if query.get("client_id") != st.client_id:
            return "AADSTS700016: Application with identifier was not found in the directory."
        redirect = query.get("redirect_uri", "")
        if not (is_loopback_redirect(redirect) or redirect in st.web_redirect_uris):
            return ("AADSTS50011: The redirect URI specified in the request does not match the "
                    "redirect URIs configured for the application.")
        if query.get("response_type") != "code":
            return "AADSTS900144: The request body must contain the parameter response_type=code."
        if not query.get("code_challenge") or query.get("code_challenge_method") != "S256":
            return "AADSTS9002325: Proof Key for Code Exchange is required."
        return None

    def page(self, status: int, body: str) -> None:
        self.reply(status, f"<!doctype html><html><head><meta charset='utf-8'><title>"
                   f"{LOGIN_TITLE}</title></head><body style='font-family:sans-serif;"
                   f"background:#f2f2f2'><div style='background:#fff;width:440px;margin:60px "
                   f"auto;padding:44px'>{body}</div></body></html>", "text/html; charset=utf-8")

    def authorize_form(self, query: dict[str, str], error: str = "") -> None:
        problem = self.authorize_problem(query)
        if problem:
            self.page(400, f"<h1>Sorry, but we're having trouble signing you in.</h1>"
                      f"<p id='error'>{html.escape(problem)}</p>")
            return
        hidden = "".join(f"<input type='hidden' name='{k}' value='{html.escape(query[k])}'>"
                         for k in self.AUTH_PARAMS if k in query)
        user = html.escape(query.get("login_hint", ""))
        self.page(200 if not error else 401, f"""
<h1>Sign in</h1>
<form method="post" action="/{self.state.tenant}/oauth2/v2.0/authorize">
{hidden}
<p><label>Email, phone or Skype <input type="text" name="username" id="username"
 value="{user}"></label></p>
<p><label>Password <input type="password" name="password" id="password"></label></p>
{f"<p id='error' style='color:#e00'>{html.escape(error)}</p>" if error else ""}
<p><button type="submit" id="submit">Sign in</button></p>
</form>""")

    def authorize_submit(self, form: dict[str, str]) -> None:
        st = self.state
        query = {k: form[k] for k in self.AUTH_PARAMS if k in form}
        if self.authorize_problem(query):
            self.authorize_form(query)
            return
        user = form.get("username", "").strip()
        password = form.get("password", "")
        if not user or (st.passwords is not None and st.passwords.get(user) != password):
            self.authorize_form(query, "Your account or password is incorrect.")
            return
        code = "code-" + secrets.token_urlsafe(24)
        with st.lock:
            st.logins.append(user)
            st.auth_codes[code] = AuthCode(query["client_id"], query["redirect_uri"],
                                           query.get("scope", ""), query["code_challenge"],
                                           query["code_challenge_method"],
                                           query.get("nonce", ""), user)
        back = {"code": code, "state": query.get("state", ""), "session_state": "s1"}
        if query.get("response_mode") == "form_post":
            # As Entra does: a page that posts the answer to the redirect URI by itself.
            fields = "".join(f"<input type='hidden' name='{k}' value='{html.escape(v)}'>"
                             for k, v in back.items())
            self.reply(200, f"<!doctype html><html><body onload='document.forms[0].submit()'>"
                       f"<form method='post' action='{html.escape(query['redirect_uri'])}'>"
                       f"{fields}<noscript><button type='submit'>Continue</button></noscript>"
                       f"</form></body></html>", "text/html; charset=utf-8")
            return
        sep = "&" if "?" in query["redirect_uri"] else "?"
        self.reply(302, "", headers={
            "Location": query["redirect_uri"] + sep + urllib.parse.urlencode(back)})

    def authorization_code(self, form: dict[str, str]) -> None:
        """The token request for a code: one use, same client and redirect_uri, PKCE S256."""
        st = self.state
        with st.lock:
            issued = st.auth_codes.pop(form.get("code", ""), None)
        if issued is None:
            self.error("invalid_grant", "AADSTS70008: The provided authorization code or "
                       "refresh token has expired or was already used.")
            return
        if form.get("client_id") != issued.client_id:
            self.error("invalid_grant", "AADSTS70000: the code was issued to another client.")
            return
        if form.get("redirect_uri") != issued.redirect_uri:
            self.error("invalid_grant", "AADSTS50011: The redirect URI does not match the one "
                       "the authorization code was issued for.")
            return
        if pkce_challenge(form.get("code_verifier", "")) != issued.code_challenge:
            self.error("invalid_grant", "AADSTS501481: The Code_Verifier does not match the "
                       "code_challenge supplied in the authorization request.")
            return
        if "email" in issued.scope.split():
            with st.lock:
                st.email_consent.add(issued.user)
        self.issue("user", issued.user, form.get("scope") or issued.scope, nonce=issued.nonce)

    def error(self, error: str, description: str, status: int = 400) -> None:
        self.json(status, {"error": error, "error_description": description,
                           "error_codes": [70000]})

    def device_code(self, form: dict[str, str]) -> None:
        st = self.state
        if form.get("client_id") != st.client_id:
            self.error("unauthorized_client", "AADSTS700016: unknown application")
            return
        code = secrets.token_urlsafe(16)
        user_code = secrets.token_hex(4).upper()
        with st.lock:
            st.device_codes[code] = [None, form.get("scope", "")]
        self.json(200, {
            "device_code": code, "user_code": user_code,
            "verification_uri": f"{st.base_url}/devicelogin",
            "expires_in": st.device_expires_s,
            "interval": st.device_interval_s,
            "message": f"To sign in, open {st.base_url}/devicelogin and enter {user_code}.",
        })

    def client_ok(self, form: dict[str, str]) -> bool:
        st = self.state
        if form.get("client_id") != st.client_id:
            self.error("unauthorized_client", "AADSTS700016: unknown application")
            return False
        if "client_secret" in form:
            if form["client_secret"] != st.client_secret:
                self.error("invalid_client", "AADSTS7000215: Invalid client secret provided.",
                           401)
                return False
            return True
        if form.get("client_assertion_type") == JWT_BEARER:
            if st.certificate is None or not self.assertion_ok(form.get("client_assertion", "")):
                self.error("invalid_client", "AADSTS700027: Client assertion failed signature "
                           "validation.", 401)
                return False
            return True
        return form.get("grant_type") != "client_credentials"  # public clients have no secret

    def assertion_ok(self, assertion: str) -> bool:
        st = self.state
        cert = st.certificate
        assert cert is not None
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(assertion, cert.public_key(),  # type: ignore[arg-type]
                                algorithms=["RS256", "PS256"],
                                audience=f"{st.authority}/oauth2/v2.0/token")
        except jwt.PyJWTError:
            return False
        x5t = _b64url(cert.fingerprint(hashes.SHA1()))  # noqa: S303 - what Entra ID checks
        x5t256 = _b64url(cert.fingerprint(hashes.SHA256()))
        # msal keeps the base64 padding on x5t; Entra ID accepts either form.
        got, got256 = (str(header.get(h, "")).rstrip("=") for h in ("x5t", "x5t#S256"))
        return (got == x5t or got256 == x5t256) and \
            claims.get("iss") == st.client_id and claims.get("sub") == st.client_id

    def token(self, form: dict[str, str]) -> None:
        st = self.state
        grant = form.get("grant_type", "")
        if not self.client_ok(form):
            return
        scope = form.get("scope", "")
        if grant == "client_credentials":
            self.issue("app", None, scope)
        elif grant == "refresh_token":
            rt = form.get("refresh_token", "")
            with st.lock:
                user = st.refresh_tokens.get(rt)
                revoked = rt in st.revoked
            if user is None or revoked:
                self.error("invalid_grant", "AADSTS50173: The provided grant has expired due "
                           "to it being revoked, a fresh auth token is needed.")
                return
            self.issue("user", user, scope)
        elif grant == "authorization_code":
            self.authorization_code(form)
        elif grant == DEVICE_GRANT:
            code = form.get("device_code", "")
            with st.lock:
                if code not in st.device_codes:
                    known = False
                else:
                    known = True
                    approved, scope = st.device_codes[code]
                    if approved is None and st.device_user is not None:
                        st.device_codes[code][0] = st.device_user  # approved; next poll wins
            if not known:
                self.error("expired_token", "AADSTS70020: The provided value for the input "
                           "parameter 'device_code' is not valid.")
            elif approved is None:
                self.error("authorization_pending", "AADSTS70016: OAuth 2.0 device flow error. "
                           "Authorization is pending.")
            else:
                with st.lock:
                    del st.device_codes[code]
                    if "email" in (scope or "").split():
                        st.email_consent.add(approved)
                self.issue("user", approved, scope or "")
        else:
            self.error("unsupported_grant_type", f"grant {grant!r} is not supported")

    def issue(self, kind: str, user: str | None, scope: str, nonce: str = "") -> None:
        st = self.state
        now = time.time()
        access = "at-" + secrets.token_urlsafe(24)
        body: dict[str, Any] = {"token_type": "Bearer", "access_token": access,
                                "expires_in": st.token_lifetime_s,
                                "ext_expires_in": st.token_lifetime_s,
                                "scope": " ".join(s for s in scope.split()
                                                  if s not in ("openid", "profile",
                                                               "offline_access"))}
        if st.refresh_in_s is not None:
            body["refresh_in"] = st.refresh_in_s
        with st.lock:
            st.access_tokens[access] = IssuedToken(kind, user, scope, now + st.token_lifetime_s)
        if user is not None:
            refresh = "rt-" + secrets.token_urlsafe(24)
            with st.lock:
                st.refresh_tokens[refresh] = user
                consented = user in st.email_consent
            body["refresh_token"] = refresh
            if st.personal:
                # A personal account's object id is its 64-bit id in GUID form.
                digest = hashlib.sha256(user.encode()).hexdigest()
                oid = f"00000000-0000-0000-{digest[:4]}-{digest[4:16]}"
                tid, issuer = MSA_TENANT_ID, f"{st.base_url}/{MSA_TENANT_ID}/v2.0"
            else:
                oid, tid, issuer = "oid-" + user.split("@")[0], st.tenant, f"{st.authority}/v2.0"
            body["client_info"] = _b64url(json.dumps({"uid": oid, "utid": tid}).encode())
            claims = {"aud": st.client_id, "iss": issuer, "iat": int(now),
                      "nbf": int(now), "exp": int(now) + 3600, "oid": oid, "sub": oid,
                      "tid": tid, "preferred_username": user, "name": user,
                      "ver": "2.0"}
            if st.personal and consented:
                claims["email"] = st.mailboxes.get(user, user)
            if nonce:
                claims["nonce"] = nonce
            body["id_token"] = ".".join([_b64url(b'{"alg":"none","typ":"JWT"}'),
                                         _b64url(json.dumps(claims).encode()), ""])
        self.json(200, body)


def start_idp(state: IdpState | None = None) -> HttpsServer:
    """Start a fake identity provider; its authority is `server.state.authority`."""
    st = state or IdpState()
    server = start_https_server(IdpHandler, st)
    st.base_url = server.base_url
    return server


def oauth_route_keys(idp: HttpsServer, secret_dir: Path, *, flow: str = "app",
                     secret: str = CLIENT_SECRET) -> dict[str, Any]:
    """The OAuth keys of a route that signs in at this fake (client secret for the app flow)."""
    keys: dict[str, Any] = {"auth": "oauth", "authority": idp.base_url, "tenant_id": TENANT,
                            "client_id": CLIENT_ID, "flow": flow, "ca_file": str(idp.ca_file)}
    if flow == "app":
        path = secret_dir / "client-secret"
        path.write_text(secret)
        path.chmod(0o600)
        keys["client_secret_file"] = str(path)
    return keys


def make_certificate(directory: Path) -> tuple[x509.Certificate, Path, str]:
    """An app certificate as Entra ID takes it: (certificate, PEM file with key and cert,
    SHA-1 thumbprint in hex)."""
    import datetime

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relayd test app")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    path = directory / "app-cert.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
                     + cert.public_bytes(serialization.Encoding.PEM))
    path.chmod(0o600)
    return cert, path, cert.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303
