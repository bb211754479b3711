"""relayd.providers: which consumer provider a route talks to, and the fix said for its usual
refusals in send-test's output, the delivery log and the status page."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import arelayd_cli, message, run_service, send, service_port, wait_for
from test_examples import (  # noqa: F401 - smtp_account is a fixture
    credentials,
    load_example,
    point_at_fakes,
    smtp_account,
    smtp_pointing,
    toml_text,
)

from relayd.config import RouteConfig, load_config
from relayd.providers import explain_line, fix_for, provider_of
from relayd.web.pages import status_page

ICLOUD_FIX = "Apple iCloud Mail: use an app-specific password"


@pytest.fixture
def route_of(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., RouteConfig]:
    """route_of(recipe, **keys): the recipe's one route with `keys` changed, as relayd loads
    it (its password a systemd credential)."""
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials(
        tmp_path, {"icloud": "pw", "yahoo": "pw", "smarthost": "pw"})))

    def load(name: str, **keys: Any) -> RouteConfig:
        data = load_example(name)
        data["queue"]["path"] = str(tmp_path / "queue")
        [(route_name, route)] = data["routes"].items()
        route.update(keys)
        path = tmp_path / f"{name}.toml"
        path.write_text(toml_text(data))
        return load_config(path).routes[route_name]

    return load


def test_provider_by_host_and_by_account_domain(route_of: Callable[..., RouteConfig]) -> None:
    icloud = route_of("icloud-app-password")
    assert provider_of(icloud) is not None and provider_of(icloud).name == "Apple iCloud Mail"
    # a test server (or a custom host): the account's domain still names the provider
    pointed = route_of("icloud-app-password", host="127.0.0.1")
    assert provider_of(pointed) is provider_of(icloud)
    yahoo = route_of("yahoo-app-password")
    assert provider_of(yahoo) is not None and provider_of(yahoo).name == "Yahoo Mail"
    # a smarthost of a domain of no provider: nothing is guessed
    assert provider_of(route_of("smarthost")) is None


def test_fix_only_for_a_refused_login_on_a_password_route(
        route_of: Callable[..., RouteConfig]) -> None:
    icloud = route_of("icloud-app-password", host="127.0.0.1")
    refusal = "535 127.0.0.1 refused the credentials for office@icloud.com: 535 5.7.8 nope"
    assert fix_for(icloud, refusal).startswith(ICLOUD_FIX)
    assert fix_for(icloud, "550 5.1.1 User unknown") == ""
    assert fix_for(route_of("smarthost"), refusal) == ""


def test_outlook_com_password_route_is_told_to_use_the_xoauth2_recipe(
        route_of: Callable[..., RouteConfig]) -> None:
    """A password route to Outlook.com (the setup every old guide gives): Outlook.com's basic
    auth refusal names the xoauth2 recipe, and --explain warns before the first message."""
    route = route_of("smarthost", host="smtp-mail.outlook.com",
                   username="alice@outlook.com", senders=["alice@outlook.com"])
    said = ("535 5.7.139 Authentication unsuccessful, basic authentication is disabled. "
            "[PN0PR01CA0024.INDPRD01.PROD.OUTLOOK.COM]")
    fix = fix_for(route, said)
    assert "this account needs the xoauth2 recipe" in fix
    assert "conf/examples/outlook-com-xoauth2.toml" in fix
    line = explain_line(route)
    assert line is not None and "WARNING" in line and "xoauth2 recipe" in line


async def test_icloud_535_names_the_app_specific_password_fix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        smtp_account: Any,  # noqa: F811 - the fixture imported above
        caplog: pytest.LogCaptureFixture) -> None:
    """1. the iCloud recipe, pointed at a STARTTLS upstream that refuses its password with
    535 5.7.8 (as iCloud refuses an Apple Account password) 2. relayd send-test: fails, and
    says to use an app-specific password 3. relayd serve takes a message: the log line of the
    refused login says the same, the message stays queued (deferred, not bounced) and the
    status page shows the fix under the route's last failure."""
    keys = load_example("icloud-app-password")["routes"]["icloud"]
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials(
        tmp_path, {keys["password_file"]: "the-apple-account-password"})))
    up = await smtp_account(username=keys["username"], password="an-app-specific-password")
    cfg = point_at_fakes("icloud-app-password", tmp_path, {"icloud": smtp_pointing(up)})
    sender = "office@icloud.com"

    result = await arelayd_cli("send-test", "-c", str(cfg), "--from", sender,
                               "--to", "client@example.com")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "535" in result.stdout and "5.7.8" in result.stdout
    assert f"   fix: {ICLOUD_FIX}" in result.stdout, result.stdout
    assert "the-apple-account-password" not in result.stdout + result.stderr

    caplog.set_level(logging.INFO, logger="relayd")
    async with run_service(cfg) as svc:
        data = message(sender=sender, to="client@example.com", subject="refused")
        assert await send(service_port(svc), sender, ["client@example.com"], data) == {}
        await wait_for(lambda: any(ICLOUD_FIX in r.getMessage() for r in caplog.records),
                       what="the refused login's log line")
        page = status_page(await svc.web_snapshot()).decode()
    [line] = [r for r in caplog.records if ICLOUD_FIX in r.getMessage()]
    assert line.levelno == logging.ERROR and "5.7.8" in line.getMessage()
    assert "route icloud" in line.getMessage()
    assert f"fix: {ICLOUD_FIX}" in page
    assert up.messages == [] and up.handler.logins == []
    assert "the-apple-account-password" not in caplog.text + page


async def test_outlook_com_basic_auth_refusal_names_the_xoauth2_recipe_in_send_test(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        smtp_account: Any) -> None:  # noqa: F811 - the fixture imported above
    """A password route to an Outlook.com account (what every guide written before September
    2024 gives), against an upstream answering as Outlook.com does now: send-test fails and
    says this account needs the xoauth2 recipe."""
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials(tmp_path, {"outlook": "pw"})))
    up = await smtp_account(username="alice@outlook.com", password="never", refusal=(
        "535 5.7.139 Authentication unsuccessful, basic authentication is disabled. "
        "[PN0PR01CA0024.INDPRD01.PROD.OUTLOOK.COM]"))
    data = load_example("smarthost")
    data["queue"]["path"] = str(tmp_path / "queue")
    data["routes"] = {"outlook": {
        "senders": ["alice@outlook.com"], "upstream": "smtp", "tls": "starttls",
        "username": "alice@outlook.com", "password_file": "outlook", **smtp_pointing(up)}}
    cfg = tmp_path / "outlook-password.toml"
    cfg.write_text(toml_text(data))
    result = await arelayd_cli("send-test", "-c", str(cfg), "--from", "alice@outlook.com",
                               "--to", "client@example.com")
    assert result.returncode == 1
    assert "5.7.139" in result.stdout
    assert "fix: Outlook.com (Microsoft personal account): this account needs the xoauth2 " \
        "recipe" in result.stdout, result.stdout
    explained = await arelayd_cli("check", "--explain", "-c", str(cfg))
    assert "WARNING: this route logs in with a password, which Outlook.com refuses" in \
        explained.stdout
