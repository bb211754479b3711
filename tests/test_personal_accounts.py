"""Outlook.com personal accounts: the fake identity provider's `consumers` tenant, a personal
account's browser sign-in in headless Chromium (`relayd auth login --browser`, and the web
page's /signin), then its mail over SMTP XOAUTH2 and over Graph with its own token."""

from __future__ import annotations

import io
import tomllib
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import message, run_service, send, service_port, wait_for
from fakes.graph import GraphState, start_graph
from fakes.https import shared_ca
from fakes.idp import CONSUMERS, MSA_TENANT_ID, IdpState, start_idp
from test_auth_login import Login, headless_chromium, sign_in_by_hand
from test_examples import (  # noqa: F401 - smtp_account is a fixture
    load_example,
    point_at_fakes,
    smtp_account,
    smtp_pointing,
    toml_text,
)

from relayd.auth.claims import microsoft_account, microsoft_names
from relayd.auth.oauth import delegated_scopes, has_signed_in
from relayd.auth.oauth import login as device_login
from relayd.auth.registry import make_token_provider
from relayd.config import load_config

ALICE = "alice@outlook.com"  # signs in with her phone number, as personal accounts may
ALICE_PHONE = "+15550100"
CAROL = "carol@hotmail.com"  # signs in with her address
SMTP_SEND = "https://outlook.office.com/SMTP.Send"


@dataclass
class Consumers:
    idp: IdpState
    graph: GraphState
    idp_url: str
    graph_url: str

    def mailbox_of(self, token: str) -> str | None:
        """The mailbox of the personal account a user token was issued to."""
        issued = self.idp.check_bearer(token)
        if issued is None or issued.kind != "user" or issued.user is None:
            return None
        return self.idp.mailboxes.get(issued.user, issued.user)


@pytest.fixture
def consumers() -> Iterator[Consumers]:
    """The identity provider's `consumers` tenant knowing the recipes' app, and a Graph that
    takes its tokens and knows personal accounts as /me only."""
    client_id = load_example("outlook-com-xoauth2")["routes"]["outlook"]["client_id"]
    assert load_example("outlook-com-graph")["routes"]["outlook-graph"]["client_id"] == client_id
    idp_server = start_idp(IdpState(tenant=CONSUMERS, client_id=client_id,
                                    mailboxes={ALICE_PHONE: ALICE}))
    idp: IdpState = idp_server.state
    graph = GraphState(token_ok=lambda token: idp.check_bearer(token) is not None,
                       personal_mailboxes={ALICE, CAROL})
    graph_server = start_graph(graph)
    env = Consumers(idp, graph, idp_server.base_url, graph_server.base_url)
    graph.me = env.mailbox_of
    yield env
    graph_server.stop()
    idp_server.stop()


def sign_in_in_chromium(driver: Any, url: str, sign_in_name: str) -> None:
    """What the person does on the login page: their sign-in name (replacing the hint), a
    password, Sign in."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    field = driver.find_element(By.ID, "username")
    field.clear()
    field.send_keys(sign_in_name)
    driver.find_element(By.ID, "password").send_keys("pw")
    driver.find_element(By.ID, "submit").click()


async def test_personal_account_signs_in_by_phone_and_sends_over_smtp_xoauth2(
        tmp_path: Path, consumers: Consumers,
        smtp_account: Any) -> None:  # noqa: F811 - the fixture imported above
    """1. the outlook-com-xoauth2 recipe, pointed at the `consumers` tenant of the fake identity
    provider and a STARTTLS upstream that checks each XOAUTH2 string 2. `relayd auth login
    --browser`: Chromium signs in as Alice's personal account with her phone number (her
    preferred_username), and the id token names her mailbox in `email`, tid is the personal
    accounts' tenant 3. stored for alice@outlook.com 4. her message goes out with AUTH
    XOAUTH2 as alice@outlook.com and a token for SMTP.Send that relayd refreshed (the sign-in's
    token was shorter-lived than msal's margin) 5. a second message reuses that token."""
    idp = consumers.idp
    idp.token_lifetime_s = 120  # under msal's 5-minute margin: the first use refreshes
    used: list[str] = []

    def token_ok(user: str, token: str) -> bool:
        issued = idp.check_bearer(token)
        used.append(token)
        return issued is not None and SMTP_SEND in issued.scope.split() and \
            consumers.mailbox_of(token) == user

    up = await smtp_account(token_ok=token_ok)
    cfg = point_at_fakes("outlook-com-xoauth2", tmp_path, {"outlook": {
        **smtp_pointing(up), "authority": consumers.idp_url}})

    login = Login(cfg, ALICE, "browser", route="outlook")
    url = login.url()
    parts = urllib.parse.urlsplit(url)
    assert parts.path == f"/{CONSUMERS}/oauth2/v2.0/authorize"
    scopes = urllib.parse.parse_qs(parts.query)["scope"][0].split()
    assert SMTP_SEND in scopes and "email" in scopes
    with headless_chromium(tmp_path) as driver:
        sign_in_in_chromium(driver, url, ALICE_PHONE)
        rc, out = login.finish()
        assert rc == 0, out
        await wait_for(lambda: "Signed in" in driver.page_source, what="relayd's answer page")
    assert f"Signed in as {ALICE}" in out
    assert idp.logins == [ALICE_PHONE]
    config = load_config(cfg)
    assert has_signed_in(config, config.routes["outlook"], ALICE)
    signed_in_token = next(iter(idp.access_tokens))

    first = message(sender=ALICE, to="bob@example.net", subject="first")
    second = message(sender=ALICE, to="bob@example.net", subject="second")
    async with run_service(cfg) as svc:
        assert await send(service_port(svc), ALICE, ["bob@example.net"], first) == {}
        await wait_for(lambda: len(up.messages) == 1, what="the first message upstream")
        assert await send(service_port(svc), ALICE, ["bob@example.net"], second) == {}
        await wait_for(lambda: len(up.messages) == 2, what="the second message upstream")
    assert [(m.mail_from, m.data) for m in up.messages] == [(ALICE, first), (ALICE, second)]
    assert up.handler.xoauth2 and all(ok for _, ok in up.handler.xoauth2)
    assert up.handler.xoauth2_raw == [f"user={ALICE}\x01auth=Bearer {t}\x01\x01" for t in used]
    assert signed_in_token not in used
    assert idp.grants("refresh_token") == 1
    assert len(set(used)) == 1


async def test_personal_account_signs_in_at_the_web_page_and_sends_through_graph(
        tmp_path: Path, consumers: Consumers) -> None:
    """1. the outlook-com-graph recipe with the web page on, pointed at the `consumers` tenant
    and the fake Graph 2. Carol opens /signin in Chromium, picks Sign in with Microsoft and signs
    in with her hotmail.com address 3. relayd stores her token for the route and says so
    4. her message goes out through Graph's /me/sendMail (Graph refuses /users/{address} for
    personal accounts) with her delegated Mail.Send token."""
    from selenium.webdriver.common.by import By

    cfg = point_at_fakes("outlook-com-graph", tmp_path, {"outlook-graph": {
        "endpoint": consumers.graph_url, "authority": consumers.idp_url,
        "ca_file": str(shared_ca().ca_file)}})
    data = tomllib.loads(cfg.read_text())
    data["web"] = {"listen": "127.0.0.1:0"}
    cfg.write_text(toml_text(data))

    mail = message(sender=CAROL, to="dave@example.org", subject="via Graph")
    with headless_chromium(tmp_path) as driver:
        async with run_service(cfg) as svc:
            driver.get(f"http://127.0.0.1:{svc.web_port}/signin")
            driver.find_element(By.LINK_TEXT, "Sign in with Microsoft").click()
            await wait_for(lambda: "password" in driver.page_source, what="the login form")
            assert f"/{CONSUMERS}/oauth2/v2.0/authorize" in driver.current_url
            driver.find_element(By.ID, "username").send_keys(CAROL)
            driver.find_element(By.ID, "password").send_keys("pw")
            driver.find_element(By.ID, "submit").click()
            # page_source, not an element: the answer page replaces the form-post page, and an
            # element found in between goes stale.
            await wait_for(lambda: "/signin/callback" in driver.current_url
                           and "can now send mail" in driver.page_source,
                           what="relayd's answer")
            assert f"{CAROL} can now send mail" in driver.page_source
            assert await send(service_port(svc), CAROL, ["dave@example.org"], mail) == {}
            await wait_for(lambda: len(consumers.graph.sent) == 1, what="Graph sendMail")
    [sent] = consumers.graph.sent
    assert (sent.mailbox, sent.recipients, sent.via) == (CAROL, ["dave@example.org"],
                                                         "sendMail")
    assert sent.mime.endswith(mail)
    assert ("POST", "/v1.0/me/sendMail", 202) in consumers.graph.requests
    issued = consumers.idp.check_bearer(sent.token)
    assert issued is not None and issued.kind == "user" and issued.user == CAROL
    assert f"{consumers.graph_url}/Mail.Send" in issued.scope.split()


def test_personal_account_of_another_mailbox_stores_nothing(
        tmp_path: Path, consumers: Consumers) -> None:
    """A phone number whose account's mailbox is not --user: refused, nothing stored."""
    consumers.idp.mailboxes["+15550199"] = "mallory@outlook.com"
    cfg = point_at_fakes("outlook-com-xoauth2", tmp_path, {"outlook": {
        "host": "127.0.0.1", "port": 25, "authority": consumers.idp_url,
        "ca_file": str(shared_ca().ca_file)}})
    login = Login(cfg, ALICE, "paste", route="outlook")
    login.paste(sign_in_by_hand(login.url(), shared_ca().ca_file, "+15550199"))
    rc, out = login.finish()
    assert rc == 1, out
    assert "nothing stored" in out and ALICE in out
    assert not list(tmp_path.glob("auth/*.token"))


def test_device_code_sign_in_of_a_personal_account(tmp_path: Path,
                                                   consumers: Consumers) -> None:
    """`relayd auth login --device` at the consumers tenant, approved by Alice's phone-number
    sign-in: stored for alice@outlook.com (the email scope was asked for), and the daemon's
    token provider hands out her SMTP.Send token for that address."""
    consumers.idp.device_user = ALICE_PHONE
    cfg = point_at_fakes("outlook-com-xoauth2", tmp_path, {"outlook": {
        "host": "127.0.0.1", "port": 25, "authority": consumers.idp_url,
        "ca_file": str(shared_ca().ca_file)}})
    config = load_config(cfg)
    out = io.StringIO()
    assert device_login(config, "outlook", ALICE, out) == 0, out.getvalue()
    assert f"Signed in as {ALICE}" in out.getvalue()
    [(_, form)] = [r for r in consumers.idp.requests if r[0] == "devicecode"]
    assert "email" in form["scope"].split()
    route = config.routes["outlook"]
    tokens = make_token_provider(route, config, delegated_scopes(route))
    try:
        token = tokens.acquire(ALICE).token  # type: ignore[attr-defined]
    finally:
        tokens.close()
    assert consumers.mailbox_of(token) == ALICE


def test_which_claims_name_the_account() -> None:
    """A personal account (tid of the personal accounts' tenant) is named by its email too; a
    work account's email is a directory attribute and never names it."""
    personal = {"tid": MSA_TENANT_ID, "preferred_username": ALICE_PHONE, "email": ALICE}
    assert microsoft_names(personal) == [ALICE_PHONE, ALICE]
    assert microsoft_account(personal, ALICE.upper()) == ALICE
    assert microsoft_account(personal, None) == ALICE
    work = {"tid": "contoso-tenant", "preferred_username": "mallory@business.com",
            "email": ALICE}
    assert microsoft_names(work) == ["mallory@business.com"]
    assert microsoft_account(work, ALICE) == "mallory@business.com"
