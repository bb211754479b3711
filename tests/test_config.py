"""Config loading: every problem reported at once, each naming its key; `relayd check`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import relayd_cli

from relayd.config import (
    ConfigError,
    EwsSettings,
    GraphSettings,
    OAuthSettings,
    OutboxSettings,
    RouteConfig,
    SmtpSettings,
    load_config,
    parse_duration,
    parse_size,
)

GOOD = """
[server]
listen = ["127.0.0.1:2525"]
[queue]
path = "{tmp}/queue"
[routes.system]
senders = ["casemanager@business.com"]
upstream = "smtp"
host = "smtp.office365.com"
port = 587
username = "casemanager@business.com"
password_file = "{tmp}/secret"
[routes.drafts]
senders = ["*"]
upstream = "outbox"
path = "{tmp}/outbox"
"""


def write(tmp_path: Path, text: str) -> Path:
    secret = tmp_path / "secret"
    if not secret.exists():
        secret.write_text("hunter2-not-logged\n")
        secret.chmod(0o600)
    path = tmp_path / "relayd.toml"
    path.write_text(text.format(tmp=tmp_path))
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    return e.value.problems


def test_good_config_loads_with_secret_hidden(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    route = config.routes["system"]
    assert route.smtp.port == 587 and route.smtp.tls == "starttls" and route.smtp.auth == "password"
    assert route.smtp.password is not None and route.smtp.password.reveal() == "hunter2-not-logged"
    assert "hunter2" not in repr(route)


def test_every_problem_is_reported_naming_its_key(tmp_path: Path) -> None:
    text = GOOD.replace("port = 587", "port = 70000").replace(
        'upstream = "outbox"', 'upstream = "outbox"\ncolour = "blue"').replace(
        '[queue]', '[queue]\nmax_age = "forever"')
    found = problems(tmp_path, text)
    assert "routes.system.port: must be 1-65535" in found
    assert "routes.drafts.colour: unknown key" in found
    assert any(p.startswith("queue.max_age: must be a duration") for p in found)
    assert len(found) == 3


def test_duplicate_pattern_is_an_error(tmp_path: Path) -> None:
    text = GOOD.replace('senders = ["*"]', 'senders = ["casemanager@business.com"]')
    found = problems(tmp_path, text)
    assert any("routes.drafts.senders: 'casemanager@business.com' is already claimed by "
               "routes.system" in p or "routes.system.senders" in p for p in found)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX error texts and the chmod 600 "
                    "hint; on Windows the icacls hint: tests/test_platform.py")
def test_missing_and_unsafe_secret_files(tmp_path: Path) -> None:
    found = problems(tmp_path, GOOD.replace("{tmp}/secret", "{tmp}/nope"))
    assert found == [f"routes.system.password_file: cannot read {tmp_path}/nope: "
                     "No such file or directory"]
    write(tmp_path, GOOD)
    (tmp_path / "secret").chmod(0o644)
    found = problems(tmp_path, GOOD)
    assert found == [f"routes.system.password_file: {tmp_path}/secret is readable by group or "
                     "others; chmod 600 it"]


def test_password_env_and_credentials_directory(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYSTEM_PW", "from-env")
    config = load_config(write(tmp_path, GOOD.replace('password_file = "{tmp}/secret"',
                                                      'password_env = "SYSTEM_PW"')))
    assert config.routes["system"].smtp.password.reveal() == "from-env"  # type: ignore[union-attr]
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "system").write_text("from-credential")
    (creds / "system").chmod(0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    config = load_config(write(tmp_path, GOOD.replace('"{tmp}/secret"', '"system"')))
    assert config.routes["system"].smtp.password.reveal() == "from-credential"  # type: ignore[union-attr]


@pytest.mark.parametrize("fragment, expected", [
    ('upstream = "carrier-pigeon"', "routes.drafts.upstream: must be one of"),
    ('upstream = "outbox"\ntls = "none"', 'routes.drafts.tls: unknown key for upstream = "outbox"'),
    ('upstream = "outbox"\nmax_connections = 0', "routes.drafts.max_connections: must be 1-100"),
    ('upstream = "outbox"\nrate_limit = "fast"', "routes.drafts.rate_limit: must be a rate"),
])
def test_route_key_errors(tmp_path: Path, fragment: str, expected: str) -> None:
    found = problems(tmp_path, GOOD.replace('upstream = "outbox"', fragment))
    assert any(p.startswith(expected) for p in found), found


def test_cpu_scheduling_is_batch_by_default_or_inherit(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, GOOD)).server.cpu_scheduling == "batch"
    text = GOOD.replace("[server]", '[server]\ncpu_scheduling = "inherit"')
    assert load_config(write(tmp_path, text)).server.cpu_scheduling == "inherit"
    found = problems(tmp_path, GOOD.replace("[server]", '[server]\ncpu_scheduling = "fifo"'))
    assert found == ["server.cpu_scheduling: must be one of batch, inherit"]


def test_listening_off_loopback_needs_users(tmp_path: Path) -> None:
    found = problems(tmp_path, GOOD.replace('"127.0.0.1:2525"', '"0.0.0.0:2525"'))
    assert any(p.startswith("server.listen: 0.0.0.0:2525 is not a loopback address") for p in found)


def test_host_with_line_break_rejected(tmp_path: Path) -> None:
    found = problems(tmp_path, GOOD.replace('"smtp.office365.com"', '"evil\\r\\nRCPT TO:<x>"'))
    assert "routes.system.host: must not contain line breaks" in found


def test_units() -> None:
    assert parse_duration("90s") == 90 and parse_duration("5d") == 5 * 86400
    assert parse_size("35MB") == 35_000_000 and parse_size("512KB") == 512_000
    with pytest.raises(ValueError):
        parse_duration("5 weeks")


def test_check_command_exit_codes(tmp_path: Path) -> None:
    ok = relayd_cli("check", "-c", str(write(tmp_path, GOOD)))
    assert ok.returncode == 0 and "2 route(s)" in ok.stdout
    bad = GOOD.replace("port = 587", "port = 0").replace("[queue]", "[queue]\nspeed = 1")
    result = relayd_cli("check", "-c", str(write(tmp_path, bad)))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert "routes.system.port: must be 1-65535" in lines
    assert "queue.speed: unknown key" in lines
    assert "hunter2" not in result.stdout + result.stderr


def test_check_refuses_a_key_of_another_upstream_kind(tmp_path: Path) -> None:
    """A route takes its own upstream's keys only: `relayd check` exits 2 naming each stray key
    and the route's upstream (and nothing else: each route is valid without its stray keys)."""
    text = GOOD.replace('port = 587', 'port = 587\nserver = "mail.business.com"\n'
                        'endpoint = "https://graph.microsoft.com"').replace(
        'path = "{tmp}/outbox"', 'path = "{tmp}/outbox"\nca_file = "{tmp}/secret"\n'
        'save_to_sent = false') + """
[routes.app]
senders = ["app@business.com"]
upstream = "graph"
tenant_id = "t"
client_id = "c"
client_secret_file = "{tmp}/secret"
host = "smtp.office365.com"
username = "app@business.com"
[routes.onprem]
senders = ["*@business.com"]
upstream = "ews"
server = "mail.business.com"
username = "relay"
password_file = "{tmp}/secret"
endpoint = "https://graph.microsoft.com"
path = "{tmp}/outbox"
"""
    result = relayd_cli("check", "-c", str(write(tmp_path, text)))
    assert result.returncode == 2
    found = sorted(line for line in result.stderr.splitlines() if line.startswith("routes."))
    assert found == [
        'routes.app.host: unknown key for upstream = "graph"',
        'routes.app.username: unknown key for upstream = "graph"',
        'routes.drafts.ca_file: unknown key for upstream = "outbox"',
        'routes.drafts.save_to_sent: unknown key for upstream = "outbox"',
        'routes.onprem.endpoint: unknown key for upstream = "ews"',
        'routes.onprem.path: unknown key for upstream = "ews"',
        'routes.system.endpoint: unknown key for upstream = "smtp"',
        'routes.system.server: unknown key for upstream = "smtp"',
    ]


def test_a_route_holds_its_own_upstream_kind_only(tmp_path: Path) -> None:
    """What `relayd check` refuses in the file the types refuse in the code: each route holds
    one part, of its upstream's kind; reading another kind's raises, naming route and kind; an
    OAuth part goes only with the auth that takes one; routes compare by value (a reload)."""
    config = load_config(write(tmp_path, GOOD))
    system, drafts = config.routes["system"], config.routes["drafts"]
    assert isinstance(system.settings, SmtpSettings) and system.upstream == "smtp"
    assert isinstance(drafts.settings, OutboxSettings) and drafts.upstream == "outbox"
    # Path(str(...)): on Windows the tests' tmp_path writes forward slashes (tests/conftest.py)
    assert drafts.outbox.path == Path(str(tmp_path / "outbox")) and system.oauth is None
    with pytest.raises(TypeError, match='route system has upstream = "smtp", not "ews"'):
        system.ews  # noqa: B018 - the read is the test
    with pytest.raises(TypeError, match='route drafts has upstream = "outbox", not "smtp"'):
        drafts.smtp  # noqa: B018
    app = OAuthSettings("client-id", tenant_id="t")
    with pytest.raises(ValueError, match='OAuth settings go with auth = "xoauth2"'):
        SmtpSettings("smtp.office365.com", 587, auth="password", oauth=app)
    with pytest.raises(ValueError, match='OAuth settings go with auth = "oauth"'):
        EwsSettings(server="mail.business.com", auth="oauth")
    assert load_config(write(tmp_path, GOOD)).routes == config.routes
    graph = RouteConfig("app", ("app@business.com",), GraphSettings(app))
    assert graph.oauth is app and graph.upstream_name == "graph:https://graph.microsoft.com"


def test_check_reports_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[server\nlisten = ")
    result = relayd_cli("check", "-c", str(path))
    assert result.returncode == 2 and "not valid TOML" in result.stderr
    result = relayd_cli("check", "-c", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "file not found" in result.stderr


def test_config_from_environment_variable(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    result = relayd_cli("check", env={"RELAYD_CONFIG": str(path)})
    assert result.returncode == 0, result.stderr
    assert os.fspath(path) in result.stdout


def test_bundled_example_configs_are_valid(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent / "conf"
    result = relayd_cli("check", "-c", str(root / "relayd.toml"))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["individual", "shared-mailbox", "global-account",
                                  "system-email"])
def test_layout_examples_are_valid(tmp_path: Path, name: str) -> None:
    """Each account layout example passes `relayd check` once its credentials exist."""
    creds = tmp_path / "creds"
    creds.mkdir()
    for secret in ("alice", "bob", "support", "staff", "system"):
        (creds / secret).write_text("example-secret")
        (creds / secret).chmod(0o600)
    example = Path(__file__).resolve().parent.parent / "conf" / "examples" / f"{name}.toml"
    result = relayd_cli("check", "-c", str(example), env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert result.returncode == 0, result.stderr
    assert "example-secret" not in result.stdout + result.stderr


def test_google_xoauth2_needs_a_client_secret(tmp_path: Path) -> None:
    route = """
[routes.gmail]
senders = ["*@gmail-business.com"]
upstream = "smtp"
host = "smtp.gmail.com"
auth = "xoauth2"
provider = "google"
client_id = "123.apps.googleusercontent.com"
"""
    found = problems(tmp_path, GOOD + route)
    assert [p for p in found if p.startswith("routes.gmail.")] == [
        "routes.gmail.client_secret_file: required for Google: the OAuth client secret (with "
        "refresh_token_file) or the service account's JSON key"]


def test_a_refresh_token_file_is_for_google_only(tmp_path: Path) -> None:
    """Microsoft's XOAUTH2 tokens come from MSAL (the app's, or users' sign-ins): a
    refresh_token_file there would be left unread, so `relayd check` names it."""
    secret = tmp_path / "token"
    secret.write_text("1//refresh")
    secret.chmod(0o600)
    route = f"""
[routes.o365]
senders = ["*@o365.example"]
upstream = "smtp"
host = "smtp.office365.com"
auth = "xoauth2"
provider = "microsoft"
tenant_id = "t"
client_id = "c"
flow = "device"
refresh_token_file = "{secret}"
"""
    found = problems(tmp_path, GOOD + route)
    assert [p for p in found if p.startswith("routes.o365.")] == [
        "routes.o365.refresh_token_file: does not apply with this route's other settings "
        "(auth, flow, tls)"]


def test_check_warns_when_graph_cannot_honour_save_to_sent(tmp_path: Path) -> None:
    route = """
[routes.m365]
senders = ["*@m365.example"]
upstream = "graph"
tenant_id = "t"
client_id = "c"
client_secret_file = "{tmp}/secret"
save_to_sent = false
"""
    result = relayd_cli("check", "-c", str(write(tmp_path, GOOD + route)))
    assert result.returncode == 0, result.stderr
    assert "warning: routes.m365.save_to_sent:" in result.stderr


def test_graph_routes_default_to_32_sessions_others_to_2(tmp_path: Path) -> None:
    """Graph limits each mailbox to 4 requests at once (relayd.delivery.graph keeps to it), so
    a graph route's sessions default to 32 and its mailboxes send side by side."""
    route = """
[routes.m365]
senders = ["*@m365.example"]
upstream = "graph"
tenant_id = "t"
client_id = "c"
client_secret_file = "{tmp}/secret"
"""
    config = load_config(write(tmp_path, GOOD + route))
    assert config.routes["m365"].max_connections == 32
    assert config.routes["system"].max_connections == 2


def test_notify_sender_is_checked_against_the_route_the_router_picks(tmp_path: Path) -> None:
    """[notify]'s check and the router share one rule (relayd.patterns.best_pattern): the exact
    address's route, not the *@domain one, must allow notify.to."""
    from relayd.config import parse_config
    from relayd.router import Router

    outbox = {"upstream": "outbox", "path": str(tmp_path)}
    routes = {"alerts": {**outbox, "senders": ["Relayd@business.com"],
                         "recipients": ["it@business.com"]},
              "staff": {**outbox, "senders": ["*@business.com"]}}
    notify = {"sender": "relayd@BUSINESS.com", "to": ["boss@elsewhere.com"]}
    with pytest.raises(ConfigError) as e:
        parse_config({"routes": routes, "notify": notify})
    assert e.value.problems == ["notify.to: 'boss@elsewhere.com' is not allowed by "
                                "routes.alerts.recipients, the route of notify.sender"]
    config = parse_config({"routes": routes, "notify": {**notify, "to": ["it@business.com"]}})
    match = Router(config.routes).match("relayd@BUSINESS.com")
    assert match is not None and (match.route.name, match.pattern) == ("alerts",
                                                                       "relayd@business.com")
