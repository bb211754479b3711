"""`relayd check --explain` for the four account layouts of DESIGN.md, line by line."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, relayd_cli, write_config

from relayd.config import load_config
from relayd.explain import explain

OAUTH = ('tenant_id = "contoso-tenant"\nclient_id = "app-1234"\n'
         'client_secret_env = "RELAYD_TEST_SECRET"\n')

LAYOUTS = {
    "individual": ('''
[routes.alice]
senders = ["alice@business.com"]
upstream = "smtp"
host = "smtp.gmail.com"
port = 587
tls = "starttls"
username = "alice@business.com"
password_env = "RELAYD_TEST_SECRET"
''', [
        "route alice: SMTP to smtp.gmail.com:587 (STARTTLS)",
        "  who may send: alice@business.com; from the allowed client addresses without a login",
        "  to whom: anyone",
        "  as which account: alice@business.com with a password (basic SMTP AUTH)",
        "  the upstream is asked to: send as its own account",
    ]),
    "shared mailbox": ('''
[routes.support]
senders = ["support@business.com"]
upstream = "graph"
mailbox = "support@business.com"
''' + OAUTH, [
        "route support: Microsoft Graph sendMail at https://graph.microsoft.com",
        "  who may send: support@business.com; from the allowed client addresses without a "
        "login",
        "  to whom: anyone",
        "  as which account: OAuth app-only: app app-1234 in tenant contoso-tenant with a "
        "client secret (application permission; scope it to these mailboxes); sending from the "
        "mailbox support@business.com",
        "  the upstream is asked to: send from support@business.com with each sender's From "
        "unchanged (needs Send As or Send on Behalf on support@business.com); save a copy in "
        "Sent Items; after a crash mid-send, look in Sent Items before sending again (dedupe)",
    ]),
    "global account": ('''
[routes.staff]
senders = ["*@business.com"]
recipients = ["*@business.com", "*@partner.example"]
upstream = "ews"
auth = "oauth"
service_endpoint = "https://outlook.office365.com/EWS/Exchange.asmx"
save_to_sent = false
rate_limit = "30/min"
''' + OAUTH, [
        "route staff: Exchange Web Services at https://outlook.office365.com/EWS/Exchange.asmx",
        "  who may send: any address @business.com; from the allowed client addresses "
        "without a login",
        "  to whom: any address @business.com, any address @partner.example",
        "  as which account: OAuth app-only: app app-1234 in tenant contoso-tenant with a "
        "client secret (application permission; scope it to these mailboxes); sending from "
        "each sender's own mailbox",
        "  the upstream is asked to: send from each sender's own mailbox as that sender; keep "
        "no copy in Sent Items; dedupe cannot look without a Sent Items copy: at least once; "
        "at most 30 messages per 60 s",
        "  warning: EWS at Exchange Online (outlook.office365.com) is blocked since "
        "2026-10-01 unless the tenant sets EWSEnabled and allows this app (EWSAllowedAppIDs), "
        'and gone for good on 2027-04-01; move this route to upstream = "graph" '
        "(conf/examples/m365-graph-app.toml, docs/graph.md)",
    ]),
    "delegated": ('''
[routes.m365]
senders = ["*@business.com"]
upstream = "graph"
flow = "device"
tenant_id = "contoso-tenant"
client_id = "app-1234"
''', [
        "route m365: Microsoft Graph sendMail at https://graph.microsoft.com",
        "  who may send: any address @business.com; from the allowed client addresses "
        "without a login",
        "  to whom: anyone",
        "  as which account: OAuth delegated: each user's own token from `relayd auth login "
        "m365 --user ADDRESS` (app app-1234, tenant contoso-tenant); a user sends only as the "
        "account that signed in; sending from each sender's own mailbox",
        "  the upstream is asked to: send from each sender's own mailbox as that sender; save "
        "a copy in Sent Items; after a crash mid-send, look in Sent Items before sending "
        "again (dedupe)",
    ]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_account_layout_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       layout: str) -> None:
    monkeypatch.setenv("RELAYD_TEST_SECRET", "not-shown")
    routes, expected = LAYOUTS[layout]
    cfg = write_config(tmp_path, routes)
    lines = explain(load_config(cfg))
    assert lines == expected
    assert not any("not-shown" in line for line in lines)


def test_a_delegated_google_route_is_explained_as_users_sign_ins(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """flow = "device" without refresh_token_file: each user signs in (relayd auth login,
    /signin), not a service account, whatever the client secret is."""
    monkeypatch.setenv("RELAYD_TEST_SECRET", "not-shown")
    cfg = write_config(tmp_path, '''
[routes.gmail]
senders = ["*@gmail-business.com"]
upstream = "smtp"
host = "smtp.gmail.com"
auth = "xoauth2"
provider = "google"
client_id = "123.apps.googleusercontent.com"
client_secret_env = "RELAYD_TEST_SECRET"
flow = "device"
''')
    [line] = [x for x in explain(load_config(cfg)) if "as which account" in x]
    assert line == ("  as which account: each sender's own address, OAuth delegated: each user's "
                    "own token from `relayd auth login gmail --user ADDRESS` (Google client "
                    "123.apps.googleusercontent.com); a user sends only as the account that "
                    "signed in")


def test_check_explain_prints_it_with_the_logins_that_may_use_a_route(
        tmp_path: Path) -> None:
    from relayd.auth.passwords import hash_password

    users = (f'[server.users.casemanager]\npassword_hash = "{hash_password("pw")}"\n'
             'senders = ["*@business.com"]\n'
             f'[server.users.scanner]\npassword_hash = "{hash_password("pw")}"\n'
             'senders = ["scanner@other.example"]\n')
    cfg = write_config(tmp_path, LAYOUTS["individual"][0], server=users)
    out = relayd_cli("check", "--explain", "-c", str(cfg),
                     env={"RELAYD_TEST_SECRET": "not-shown"})
    assert out.returncode == 0, out.stderr
    assert ("  who may send: alice@business.com; listener logins that may use these "
            "addresses: casemanager") in out.stdout.splitlines()
    assert "not-shown" not in out.stdout


def test_check_refuses_a_username_without_a_password_and_points_password_to_password_file(
        tmp_path: Path) -> None:
    """1. `username` with no password: relayd would send without AUTH; exit 2 naming the key
    2. `password = "x"` (a Windows admin's first try): the hint to password_file/_env."""
    route = ('[routes.staff]\nsenders = ["*@business.com"]\nupstream = "smtp"\n'
             'host = "smtp.isp.example"\nusername = "relay@business.com"\n')
    cfg = write_config(tmp_path, route)
    out = relayd_cli("check", "-c", str(cfg))
    assert out.returncode == 2 and ": ok" not in out.stdout
    [line] = out.stderr.splitlines()
    assert line.startswith("routes.staff.username: given without a password")
    assert "password_file" in line
    cfg = write_config(tmp_path, route + 'password = "x"\n')
    out = relayd_cli("check", "-c", str(cfg))
    assert out.returncode == 2
    [line] = [p for p in out.stderr.splitlines() if p.startswith("routes.staff.password:")]
    assert "password_file" in line and "password_env" in line
    assert '"x"' not in out.stderr  # the secret is not echoed


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "conf/examples").glob("*.toml")))
def test_check_explain_explains_each_example_without_its_secrets(name: str) -> None:
    """An example read where its secrets are not (outside the systemd unit, a fresh clone):
    every route is explained, then the secrets that cannot be read are listed, exit 2."""
    import os
    import subprocess
    import sys
    import tomllib

    path = REPO / "conf/examples" / f"{name}.toml"
    routes = tomllib.loads(path.read_text())["routes"]
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    out = subprocess.run([sys.executable, "-m", "relayd", "check", "--explain", "-c",
                          str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=env, cwd=REPO, timeout=60)
    lines = out.stdout.splitlines()
    secrets = [k for r in routes.values() for k in r if k.endswith(("_file", "_env"))
               and k != "certificate_file"]
    problems = [i for i, line in enumerate(lines) if "needs $CREDENTIALS_DIRECTORY" in line]
    if not secrets:  # a delegated public client: nothing to hand over, nothing missing
        assert out.returncode == 0 and not problems, out.stdout
        problems = [len(lines)]
    else:
        assert out.returncode == 2, out.stdout
        assert problems and problems == list(range(problems[0], len(lines))), out.stdout
    for route in routes:
        explained = [i for i, line in enumerate(lines) if line.startswith(f"route {route}: ")]
        assert explained and explained[0] < problems[0], (route, out.stdout)
        block = lines[explained[0]:explained[0] + 5]
        assert [b.split(":")[0].strip() for b in block[1:]] == [
            "who may send", "to whom", "as which account", "the upstream is asked to"], block


def test_office365_basic_auth_warning_on_the_system_email_example(tmp_path: Path) -> None:
    """conf/examples/system-email.toml sends with a password to smtp.office365.com: `check`
    and `check --explain` name the December 2026 switch-off and the Graph example (the start-up
    log and the status page: tests/test_web.py)."""
    path = REPO / "conf/examples/system-email.toml"
    creds = tmp_path / "creds"
    creds.mkdir()
    for name in ("system", "staff"):
        (creds / name).write_text("example-secret")
        (creds / name).chmod(0o600)
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    out = relayd_cli("check", "-c", str(path), env=env)
    assert out.returncode == 0, out.stderr
    [warning] = out.stderr.splitlines()
    assert warning.startswith("warning: routes.system: basic SMTP AUTH")
    for words in ("smtp.office365.com", "end of December 2026", 'upstream = "graph"',
                  "conf/examples/m365-graph-app.toml", 'auth = "xoauth2"'):
        assert words in warning
    assert (REPO / "conf/examples/m365-graph-app.toml").is_file()
    out = relayd_cli("check", "--explain", "-c", str(path), env=env)
    lines = out.stdout.splitlines()
    system = lines.index("route system: SMTP to smtp.office365.com:587 (STARTTLS)")
    staff = next(i for i, line in enumerate(lines) if line.startswith("route staff:"))
    [here] = [line for line in lines[system:staff] if line.startswith("  warning: ")]
    assert "end of December 2026" in here and "m365-graph-app.toml" in here
    assert not any("warning" in line for line in lines[staff:])
