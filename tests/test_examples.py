"""The provider recipes in conf/examples: each passes `relayd check` as shipped, and each
delivers one message to the fake of its provider once pointed at it."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from conftest import (
    RELAYD,
    REPO,
    RecordingHandler,
    Upstream,
    arelayd_cli,
    message,
    run_service,
    send,
    service_port,
    wait_for,
)
from fakes.ews import EWS_PATH, EwsState, start_ews
from fakes.google import GMAIL_SCOPE, GoogleState, start_google
from fakes.graph import GraphState, start_graph
from fakes.https import HttpsServer, shared_ca
from fakes.idp import IdpState, start_idp

EXAMPLES = REPO / "conf" / "examples"
# The provider recipes (issue 12); the account-layout examples are checked in test_config.
RECIPES = ("m365-graph-app", "m365-graph-shared-mailbox", "m365-hve",
           "azure-communication-services", "gmail-xoauth2", "gmail-app-password",
           "exchange-onprem-ews-ntlm", "smarthost",
           # consumer providers (issue 31)
           "outlook-com-xoauth2", "outlook-com-graph", "icloud-app-password",
           "yahoo-app-password")
# What `check --explain` names for the consumer providers' recipes (relayd.providers).
PROVIDER_LINES = {"outlook-com-xoauth2": "provider: Outlook.com",
                  "outlook-com-graph": "who signs in: personal Microsoft accounts only",
                  "icloud-app-password": "provider: Apple iCloud Mail",
                  "yahoo-app-password": "provider: Yahoo Mail"}
# What a test may change in an example to point it at a fake; nothing else is touched.
POINTING_KEYS = frozenset({"host", "port", "endpoint", "authority", "ca_file",
                           "service_endpoint"})
# *_file keys whose value is a secret relayd reads at load (relative: $CREDENTIALS_DIRECTORY).
SECRET_FILE_KEYS = ("password_file", "client_secret_file", "refresh_token_file")


# -- the examples as files ----------------------------------------------------------------------


def load_example(name: str) -> dict[str, Any]:
    with open(EXAMPLES / f"{name}.toml", "rb") as f:
        return tomllib.load(f)


def credential_names(data: dict[str, Any]) -> list[str]:
    """The credentials an example names: relative secret files, as systemd hands them over."""
    names = []
    for route in data.get("routes", {}).values():
        for key in SECRET_FILE_KEYS:
            value = route.get(key)
            if isinstance(value, str) and not Path(value).is_absolute():
                names.append(value)
    return names


def credentials(tmp_path: Path, values: dict[str, str]) -> Path:
    """A $CREDENTIALS_DIRECTORY holding `values` (credential name -> secret), mode 0600."""
    creds = tmp_path / "creds"
    creds.mkdir(exist_ok=True)
    for name, value in values.items():
        (creds / name).write_text(value)
        (creds / name).chmod(0o600)
    return creds


def toml_text(data: dict[str, Any]) -> str:
    """TOML for a parsed config: tables of strings, numbers, booleans and lists of strings
    (JSON spells those the way TOML does)."""
    lines: list[str] = []

    def table(prefix: str, keys: dict[str, Any]) -> None:
        values = {k: v for k, v in keys.items() if not isinstance(v, dict)}
        if prefix and (values or not keys):
            lines.append(f"\n[{prefix}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in values.items())
        for k, v in keys.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}" if prefix else k, v)

    table("", data)
    text = "\n".join(lines) + "\n"
    assert tomllib.loads(text) == data
    return text


def point_at_fakes(name: str, tmp_path: Path, routes: dict[str, dict[str, Any]]) -> Path:
    """The example `name` with only its listener, spool and the routes' host, port, endpoint,
    authority and CA moved to loopback and tmp_path; written next to the test's files."""
    data = load_example(name)
    data["server"]["listen"] = ["127.0.0.1:0"]
    data["queue"]["path"] = str(tmp_path / "queue")
    for section in ("journal", "auth"):
        if "path" in data.get(section, {}):
            data[section]["path"] = str(tmp_path / section)
    if "key_file" in data.get("auth", {}):
        data["auth"]["key_file"] = str(tmp_path / "token.key")
    for route_name, keys in routes.items():
        assert set(keys) <= POINTING_KEYS, f"{name}: a test may only repoint a route"
        data["routes"][route_name].update(keys)
    path = tmp_path / f"{name}.toml"
    path.write_text(toml_text(data))
    return path


def test_every_recipe_exists() -> None:
    assert all((EXAMPLES / f"{name}.toml").is_file() for name in RECIPES)


@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("*.toml")))
async def test_example_passes_relayd_check_as_shipped(tmp_path: Path, name: str) -> None:
    """The file itself, unchanged, with its secrets handed over as systemd credentials."""
    names = credential_names(load_example(name))
    creds = credentials(tmp_path, {n: f"example-secret-{i}" for i, n in enumerate(names)})
    result = await arelayd_cli("check", "-c", str(EXAMPLES / f"{name}.toml"),
                               env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert result.returncode == 0, result.stderr
    assert ": ok, " in result.stdout
    # The only warnings an example may draw are provider switch-offs (issue 27): the System
    # Email example's basic SMTP AUTH to Exchange Online.
    warnings = [w for w in result.stderr.splitlines() if w.startswith("warning")]
    assert all("December 2026" in w for w in warnings), warnings
    assert bool(warnings) == (name == "system-email"), warnings
    assert "example-secret" not in result.stdout + result.stderr


# -- SMTP upstreams: STARTTLS with the test CA, password or XOAUTH2 -----------------------------


@dataclass
class SmtpAccount(RecordingHandler):
    """Requires STARTTLS, then AUTH (PLAIN/LOGIN with `password`, or XOAUTH2 when
    `token_ok` is set) before MAIL; records each login."""

    username: str = ""
    password: str = ""
    token_ok: Callable[[str, str], bool] | None = None
    xoauth2: list[tuple[str, bool]] = field(default_factory=list)
    xoauth2_raw: list[str] = field(default_factory=list)  # each decoded initial response
    refusal: str = ""  # the reply to a wrong password (aiosmtpd's 535 5.7.8 when empty)

    def authenticate(self, server: SMTP, session: Session, envelope: Envelope,
                     mechanism: str, auth_data: Any) -> AuthResult:
        ok = (isinstance(auth_data, LoginPassword) and auth_data.login.decode() == self.username
              and auth_data.password.decode() == self.password)
        if ok:
            self.logins.append(self.username)
        # handled=False, or aiosmtpd sends no 535 at all (FIELD-NOTES)
        return AuthResult(success=ok, handled=False, message=None if ok else self.refusal or None)

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:  # noqa: N802
        if self.token_ok is None or len(args) < 2:
            return AuthResult(success=False, handled=False, message="504 5.5.4 Not offered")
        raw = base64.b64decode(args[1]).decode()
        self.xoauth2_raw.append(raw)
        fields = raw.split("\x01")
        user = fields[0].removeprefix("user=")
        token = fields[1].removeprefix("auth=Bearer ")
        ok = self.token_ok(user, token)
        self.xoauth2.append((user, ok))
        if ok:
            return AuthResult(success=True, auth_data=user)
        return AuthResult(success=False, handled=False,
                          message="535 5.7.8 Username and Password not accepted")


@pytest.fixture
async def smtp_account() -> AsyncIterator[Callable[..., Any]]:
    """Start a STARTTLS upstream that takes one account: smtp_account(username=..., ...)."""
    started: list[Upstream] = []

    async def start(**account: Any) -> Upstream:
        handler = SmtpAccount(**account)
        up = Upstream(tls_context=shared_ca().server_context(), require_starttls=True,
                      auth_required=True, authenticator=handler.authenticate)
        up.handler = handler
        await up.start()
        started.append(up)
        return up

    yield start
    for up in started:
        await up.stop()


def smtp_pointing(up: Upstream) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": up.port, "ca_file": str(shared_ca().ca_file)}


@pytest.mark.parametrize(("name", "route", "sender", "recipient"), [
    ("m365-hve", "hve", "notifications@business.com", "staff@business.com"),
    ("icloud-app-password", "icloud", "office@icloud.com", "client@example.com"),
    ("azure-communication-services", "acs", "donotreply@notify.business.com",
     "customer@example.com"),
    ("gmail-app-password", "gmail", "office@business.com", "client@example.com"),
    ("smarthost", "smarthost", "alice@business.com", "client@example.com"),
])
async def test_password_recipe_delivers_over_starttls(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smtp_account: Any,
        name: str, route: str, sender: str, recipient: str) -> None:
    """1. the recipe, pointed at a STARTTLS upstream with the test CA (tls stays "starttls")
    2. one message in 3. the upstream saw STARTTLS, then AUTH as the recipe's username with
    the credential's password, then the message with its envelope, byte for byte."""
    keys = load_example(name)["routes"][route]
    password = f"pw-for-{route}"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY",
                       str(credentials(tmp_path, {keys["password_file"]: password})))
    up = await smtp_account(username=keys["username"], password=password)
    cfg = point_at_fakes(name, tmp_path, {route: smtp_pointing(up)})
    data = message(sender=sender, to=recipient, subject=f"via {name}")
    async with run_service(cfg) as svc:
        assert await send(service_port(svc), sender, [recipient], data) == {}
        await wait_for(lambda: len(up.messages) == 1, what=f"delivery through {name}")
    [got] = up.messages
    assert (got.mail_from, got.rcpt_tos, got.data) == (sender, [recipient], data)
    assert up.handler.logins == [keys["username"]]
    assert keys["tls"] == "starttls" and keys["port"] == 587


async def test_yahoo_recipe_delivers_over_implicit_tls(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1. the Yahoo recipe (port 465, tls = "implicit"), pointed at an upstream that speaks TLS
    from the first byte with the test CA 2. one message in 3. the upstream saw AUTH as the
    recipe's username with the app password, then the message."""
    keys = load_example("yahoo-app-password")["routes"]["yahoo"]
    assert (keys["port"], keys["tls"]) == (465, "implicit")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY",
                       str(credentials(tmp_path, {keys["password_file"]: "app-pw"})))
    handler = SmtpAccount(username=keys["username"], password="app-pw")
    # aiosmtpd cannot tell that implicit TLS is TLS: AUTH is offered, not required (the
    # recorded login below shows relayd used it).
    up = Upstream(implicit_tls=shared_ca().server_context(), auth_require_tls=False,
                  authenticator=handler.authenticate)
    up.handler = handler
    await up.start()
    try:
        cfg = point_at_fakes("yahoo-app-password", tmp_path, {"yahoo": smtp_pointing(up)})
        sender = "office@yahoo.com"
        data = message(sender=sender, to="client@example.com", subject="via Yahoo")
        async with run_service(cfg) as svc:
            assert await send(service_port(svc), sender, ["client@example.com"], data) == {}
            await wait_for(lambda: len(up.messages) == 1, what="delivery through Yahoo")
    finally:
        await up.stop()
    assert (up.messages[0].mail_from, up.messages[0].data) == (sender, data)
    assert handler.logins == [keys["username"]]


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository as committed, cloned anew: what a new admin gets."""
    dest = tmp_path_factory.mktemp("clone") / "relayd"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(dest)], check=True,
                   capture_output=True, timeout=120)
    return dest


@pytest.mark.parametrize("name", RECIPES)
async def test_recipe_loads_and_explains_in_a_fresh_clone(
        tmp_path: Path, fresh_clone: Path, name: str) -> None:
    """`relayd check --explain` on the recipe of a fresh clone, run there, with its secrets as
    systemd credentials: exit 0, every route explained in plain words, no secret shown; the
    consumer providers' recipes name what the provider refuses."""
    path = fresh_clone / "conf" / "examples" / f"{name}.toml"
    names = credential_names(load_example(name))
    creds = credentials(tmp_path, {n: f"example-secret-{i}" for i, n in enumerate(names)})
    # python -m relayd in the clone runs the clone's own code (its directory comes first).
    result = await asyncio.to_thread(
        subprocess.run, [*RELAYD, "check", "--explain", "-c", str(path)], cwd=fresh_clone,
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "CREDENTIALS_DIRECTORY": str(creds)})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert ": ok, " in out and "warning" not in result.stderr
    for route in load_example(name)["routes"]:
        assert f"route {route}: " in out
    assert out.count("  who may send: ") == out.count("  as which account: ") >= 1
    assert "example-secret" not in out + result.stderr
    if name in PROVIDER_LINES:
        assert PROVIDER_LINES[name] in out, out


async def test_hve_recipe_refuses_an_external_recipient_at_rcpt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smtp_account: Any) -> None:
    """HVE takes internal mail only: with the recipe's `recipients`, an outside address is
    refused while the client is connected; the internal one in the same message goes out."""
    keys = load_example("m365-hve")["routes"]["hve"]
    monkeypatch.setenv("CREDENTIALS_DIRECTORY",
                       str(credentials(tmp_path, {keys["password_file"]: "pw"})))
    up = await smtp_account(username=keys["username"], password="pw")
    cfg = point_at_fakes("m365-hve", tmp_path, {"hve": smtp_pointing(up)})
    sender = "notifications@business.com"
    data = message(sender=sender, to="staff@business.com")
    async with run_service(cfg) as svc:
        refused = await send(service_port(svc), sender,
                             ["staff@business.com", "someone@example.com"], data)
        assert list(refused) == ["someone@example.com"]
        code, text = refused["someone@example.com"]
        assert code == 550 and b"5.7.1" in text and b"hve" in text
        await wait_for(lambda: len(up.messages) == 1, what="the internal recipient's copy")
    assert up.messages[0].rcpt_tos == ["staff@business.com"]


@pytest.fixture
def google() -> Iterator[HttpsServer]:
    routes = load_example("gmail-xoauth2")["routes"]
    server = start_google(GoogleState(client_id=routes["gmail"]["client_id"],
                                      client_secret="gmail-client-secret"))
    yield server
    server.stop()


async def test_gmail_xoauth2_recipe_delivers_with_refresh_token_and_service_account(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smtp_account: Any,
        google: HttpsServer) -> None:
    """1. the recipe's two routes, pointed at one STARTTLS upstream and the fake Google token
    endpoint 2. office@ (its refresh token) and alice@ (the service account, alice as subject)
    each send one message 3. each AUTH XOAUTH2 carried a token Google issued to that user for
    https://mail.google.com/."""
    st: GoogleState = google.state
    routes = load_example("gmail-xoauth2")["routes"]
    sa_key = st.add_service_account(client_id=routes["workspace"]["client_id"])
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials(tmp_path, {
        routes["gmail"]["client_secret_file"]: st.client_secret,
        routes["gmail"]["refresh_token_file"]: st.add_user("office@business.com"),
        routes["workspace"]["client_secret_file"]: json.dumps(sa_key),
    })))

    def token_ok(user: str, token: str) -> bool:
        issued = st.check_bearer(token)
        return issued is not None and issued.user == user and issued.scope == GMAIL_SCOPE

    up = await smtp_account(token_ok=token_ok)
    pointing = {**smtp_pointing(up), "authority": st.token_uri}
    cfg = point_at_fakes("gmail-xoauth2", tmp_path, {"gmail": pointing, "workspace": pointing})
    office = message(sender="office@business.com", to="client@example.com", subject="office")
    alice = message(sender="alice@business.com", to="client@example.com", subject="alice")
    async with run_service(cfg) as svc:
        port = service_port(svc)
        assert await send(port, "office@business.com", ["client@example.com"], office) == {}
        assert await send(port, "alice@business.com", ["client@example.com"], alice) == {}
        await wait_for(lambda: len(up.messages) == 2, what="both messages")
    assert sorted(up.handler.xoauth2) == [("alice@business.com", True),
                                          ("office@business.com", True)]
    assert sorted((m.mail_from, m.data) for m in up.messages) == [
        ("alice@business.com", alice), ("office@business.com", office)]
    assert st.grants("refresh_token") == 1
    assert st.grants("urn:ietf:params:oauth:grant-type:jwt-bearer") == 1


# -- Graph: the fake identity provider and the fake Graph, over HTTPS with the test CA -------------


@dataclass
class GraphFakes:
    idp: IdpState
    graph: GraphState
    pointing: dict[str, Any]


@pytest.fixture
def graph_fakes(request: pytest.FixtureRequest) -> Iterator[GraphFakes]:
    """An identity provider that knows the recipe's tenant and app, and a Graph trusting it."""
    name, route, graph_options = request.param
    graph_state = GraphState(**graph_options)
    keys = load_example(name)["routes"][route]
    idp_server = start_idp(IdpState(tenant=keys["tenant_id"], client_id=keys["client_id"],
                                    client_secret=f"secret-of-{route}"))
    idp: IdpState = idp_server.state
    graph_state.token_ok = lambda token: idp.check_bearer(token) is not None
    graph_server = start_graph(graph_state)
    yield GraphFakes(idp, graph_state, {"endpoint": graph_server.base_url,
                                        "authority": idp_server.base_url,
                                        "ca_file": str(shared_ca().ca_file)})
    graph_server.stop()
    idp_server.stop()


@pytest.mark.usefixtures("machine_ca_env")
@pytest.mark.parametrize(("graph_fakes", "name", "route", "sender", "mailbox"), [
    (("m365-graph-app", "m365", {}), "m365-graph-app", "m365",
     "alice@business.com", "alice@business.com"),
    # The shared mailbox sends as itself: this fake refuses a From other than the mailbox.
    (("m365-graph-shared-mailbox", "support", {"send_as_denied": True}),
     "m365-graph-shared-mailbox", "support", "support@business.com", "support@business.com"),
], indirect=["graph_fakes"], ids=["m365-graph-app", "m365-graph-shared-mailbox"])
async def test_graph_recipe_delivers_app_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, graph_fakes: GraphFakes,
        name: str, route: str, sender: str, mailbox: str) -> None:
    """1. the recipe, pointed at the fake identity provider and Graph (REQUESTS_CA_BUNDLE set
    to the system store, as on real machines) 2. one message in 3. Graph's sendMail for the
    recipe's mailbox got the message's MIME, with an app-only token for the recipe's app."""
    keys = load_example(name)["routes"][route]
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials(
        tmp_path, {keys["client_secret_file"]: graph_fakes.idp.client_secret})))
    cfg = point_at_fakes(name, tmp_path, {route: graph_fakes.pointing})
    data = message(sender=sender, to="client@example.com", subject=f"via {name}")
    async with run_service(cfg) as svc:
        assert await send(service_port(svc), sender, ["client@example.com"], data) == {}
        await wait_for(lambda: len(graph_fakes.graph.sent) == 1, what="Graph sendMail")
    [sent] = graph_fakes.graph.sent
    assert (sent.via, sent.mailbox, sent.recipients) == ("sendMail", mailbox,
                                                        ["client@example.com"])
    assert sent.mime.endswith(data)
    issued = graph_fakes.idp.check_bearer(sent.token)
    assert issued is not None and issued.kind == "app"
    assert issued.scope.split()[0] == graph_fakes.pointing["endpoint"] + "/.default"
    assert graph_fakes.idp.grants("client_credentials") == 1


# -- EWS with NTLM: the fake EWS over HTTPS with the test CA ------------------------------------


@pytest.mark.usefixtures("machine_ca_env")
async def test_ews_ntlm_recipe_delivers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1. the recipe, pointed at the fake EWS, which takes NTLM only 2. one message in
    3. CreateItem came over a connection NTLM-authenticated as BUSINESS\\svc-relay, with the
    message's MIME, sent and saved to Sent Items."""
    keys = load_example("exchange-onprem-ews-ntlm")["routes"]["staff"]
    domain, _, user = keys["username"].partition("\\")
    password = "ntlm-pw"
    users = tmp_path / "ntlm-users"
    users.write_text(f"{domain}:{user}:{password}\n")
    monkeypatch.setenv("NTLM_USER_FILE", str(users))  # the fake server's accounts (spnego)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY",
                       str(credentials(tmp_path, {keys["password_file"]: password})))
    ews = start_ews(EwsState(auth="ntlm", password=password))
    try:
        cfg = point_at_fakes("exchange-onprem-ews-ntlm", tmp_path, {"staff": {
            "service_endpoint": ews.base_url + EWS_PATH, "ca_file": str(ews.ca_file)}})
        sender = "alice@business.com"
        data = message(sender=sender, to="client@example.com", subject="via EWS")
        async with run_service(cfg) as svc:
            assert await send(service_port(svc), sender, ["client@example.com"], data) == {}
            await wait_for(lambda: len(ews.state.sent) == 1, what="EWS CreateItem")
    finally:
        ews.stop()
    [sent] = ews.state.sent
    assert sent.authorization.startswith("ntlm:") and user in sent.authorization
    assert sent.mime.endswith(data)
    assert sent.bcc == []  # the envelope recipient is the MIME To: nothing added
    assert sent.disposition == "SendAndSaveCopy"
