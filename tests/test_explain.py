"""`relayd check --explain` for the four account layouts of DESIGN.md, line by line."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import relayd_cli, write_config

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
