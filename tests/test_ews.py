"""EwsUpstream against a fake EWS (SOAP over real HTTPS) and a fake identity provider."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fakes.config import ALICE, ews_route_keys, staff_config
from fakes.ews import EWS_PATH
from fakes.https import HttpsServer

from relayd.auth.oauth import login
from relayd.auth.registry import status
from relayd.config import Config
from relayd.delivery import OutboundMessage, Status, Upstream, make_upstream
from relayd.errors import AuthenticationError, PermanentDeliveryError, TransientDeliveryError
from relayd.policy import SenderPolicy

pytestmark = pytest.mark.usefixtures("machine_ca_env")


def make_config(tmp_path: Path, idp: HttpsServer, ews: HttpsServer, *, flow: str = "app",
                **route: Any) -> Config:
    keys = ews_route_keys(tmp_path, idp, ews.base_url + EWS_PATH, flow=flow)
    if route.get("auth") in ("basic", "ntlm"):
        for k in ("authority", "tenant_id", "client_id", "flow", "client_secret_file"):
            keys.pop(k, None)
        pw = tmp_path / "ews-password"
        pw.write_text(ews.state.password)
        pw.chmod(0o600)
        keys.update(username=ews.state.username, password_file=str(pw))
    keys.update(route)
    return staff_config(tmp_path, {k: v for k, v in keys.items() if v is not None})


def mime(sender: str = ALICE, to: str = "bob@example.com", cc: str | None = "carol@example.com",
         extra: str = "") -> bytes:
    cc_line = f"Cc: Carol <{cc}>\r\n" if cc else ""
    return (f"From: Alice <{sender}>\r\nTo: Bob <{to}>\r\n{cc_line}{extra}"
            f"Subject: case 42\r\nMessage-ID: <{time.time_ns()}@cm.test>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            "Hearing moved to Tuesday.\r\n").encode()


async def deliver(up: Upstream, data: bytes, recipients: list[str],
                  sender: str = ALICE) -> dict[str, Any]:
    session = up.session()
    try:
        return await session.deliver(OutboundMessage("q1", sender, recipients, data))
    finally:
        await session.close()


@pytest.fixture
async def upstreams() -> Any:
    made: list[Upstream] = []

    def make(config: Config) -> Upstream:
        up = make_upstream(config.routes["staff"], config)
        made.append(up)
        return up

    yield make
    for up in made:
        await up.close()


# -- app-only OAuth ------------------------------------------------------------------------------


async def test_app_flow_sends_mime_as_is_with_bcc_only_recipients(
        tmp_path: Path, idp: HttpsServer, ews: HttpsServer, upstreams: Any) -> None:
    """1. a message To bob, Cc carol, envelope also names dave (Bcc) 2. EWS gets the MIME
    unchanged, dave as the only Bcc, SendAndSaveCopy into Sent Items, impersonating alice."""
    up = upstreams(make_config(tmp_path, idp, ews))
    data = mime()
    rcpts = ["bob@example.com", "carol@example.com", "dave@example.com"]
    results = await deliver(up, data, rcpts)
    assert {r: v.status for r, v in results.items()} == {r: Status.DELIVERED for r in rcpts}
    [sent] = ews.state.sent
    assert sent.mime == data
    assert sent.bcc == ["dave@example.com"]
    assert sent.to == [] and sent.cc == []
    assert sent.disposition == "SendAndSaveCopy"
    assert sent.saved_folder is not None
    assert sent.impersonated == ALICE
    assert sent.authorization == "bearer:app"
    assert "GetFolder" in ews.state.calls


async def test_app_token_reused_across_messages_and_mailboxes(
        tmp_path: Path, idp: HttpsServer, ews: HttpsServer, upstreams: Any) -> None:
    up = upstreams(make_config(tmp_path, idp, ews, save_to_sent=False))
    for sender in (ALICE, "bob@contoso.com", ALICE):
        await deliver(up, mime(sender), ["x@example.com"], sender=sender)
    assert [s.impersonated for s in ews.state.sent] == [ALICE, "bob@contoso.com", ALICE]
    assert idp.state.grants("client_credentials") == 1
    form = idp.state.requests[0][1]
    assert form["scope"] == "https://127.0.0.1/.default"


async def test_save_to_sent_false_is_one_send_only_call(
        tmp_path: Path, idp: HttpsServer, ews: HttpsServer, upstreams: Any) -> None:
    up = upstreams(make_config(tmp_path, idp, ews, save_to_sent=False))
    await deliver(up, mime(), ["bob@example.com", "carol@example.com"])
    [sent] = ews.state.sent
    assert sent.disposition == "SendOnly" and sent.saved_folder is None and sent.bcc == []
    assert ews.state.calls == ["CreateItem"]


async def test_fixed_mailbox(tmp_path: Path, idp: HttpsServer, ews: HttpsServer,
                             upstreams: Any) -> None:
    up = upstreams(make_config(tmp_path, idp, ews, mailbox="support@contoso.com"))
    await deliver(up, mime(), ["bob@example.com"])
    assert ews.state.sent[0].impersonated == "support@contoso.com"
    assert ews.state.sent[0].mime.startswith(b"From: Alice <alice@contoso.com>")


async def test_header_recipient_not_in_envelope_is_not_sent_to(
        tmp_path: Path, idp: HttpsServer, ews: HttpsServer, upstreams: Any) -> None:
    """1. To bob, Cc carol; this attempt's envelope is bob only 2. carol's Cc field is removed,
    the rest of the MIME is byte for byte the one sent 3. bob, named in To, is no Bcc."""
    up = upstreams(make_config(tmp_path, idp, ews))
    data = mime()
    await deliver(up, data, ["bob@example.com"])  # carol is in Cc but not in the envelope
    [sent] = ews.state.sent
    assert b"carol@example.com" not in sent.mime
    assert sent.mime == data.replace(b"Cc: Carol <carol@example.com>\r\n", b"")
    assert sent.bcc == [] and sent.cc == []


async def test_token_renewed_when_the_identity_provider_says_so(
        tmp_path: Path, idp: HttpsServer, ews: HttpsServer, upstreams: Any) -> None:
    """1. tokens say refresh_in 1 s 2. a message 3. after 1.3 s another 4. the second went out
    with a new token, fetched once."""
    idp.state.refresh_in_s = 1
    up = upstreams(make_config(tmp_path, idp, ews, save_to_sent=False))
    await deliver(up, mime(), ["bob@example.com", "carol@example.com"])
    await asyncio.sleep(1.3)
    await deliver(up, mime(), ["bob@example.com", "carol@example.com"])
    assert idp.state.grants("client_credentials") == 2
    assert len(ews.state.sent) == 2


async def test_max_connections_bounds_concurrent_calls(
        tmp_path: Path, idp: HttpsServer, ews: HttpsServer, upstreams: Any) -> None:
    up = upstreams(make_config(tmp_path, idp, ews, save_to_sent=False, max_connections=2))
    ews.state.block = threading.Event()
    tasks = [asyncio.create_task(deliver(up, mime(), ["bob@example.com", "carol@example.com"]))
             for _ in range(5)]
    await asyncio.sleep(1.0)
    names = {t.name for t in threading.enumerate() if t.name.startswith("ews-staff")}
    assert len(names) <= 2
    ews.state.block.set()
    await asyncio.gather(*tasks)
    assert len(ews.state.sent) == 5


# -- faults --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "code", "words"), [
    ("sendas", 550, "ErrorSendAsDenied"),
    ("nomailbox", 550, "has no mailbox"),
    ("badrecipient", 550, "isn't valid"),
    ("toolarge", 552, "exceeds the maximum"),
])
async def test_permanent_faults_bounce_with_the_servers_words(
        tmp_path: Path, idp: HttpsServer, ews: HttpsServer, upstreams: Any,
        fault: str, code: int, words: str) -> None:
    up = upstreams(make_config(tmp_path, idp, ews, save_to_sent=False))
    ews.state.faults = [fault]
    with pytest.raises(PermanentDeliveryError) as e:
        await deliver(up, mime(), ["bob@example.com", "carol@example.com"])
    assert e.value.code == code and words in e.value.text
    assert not ews.state.sent


async def test_server_busy_defers_with_back_off(tmp_path: Path, idp: HttpsServer,
                                                ews: HttpsServer, upstreams: Any) -> None:
    up = upstreams(make_config(tmp_path, idp, ews, save_to_sent=False))
    ews.state.faults = ["busy"]
    with pytest.raises(TransientDeliveryError) as e:
        await deliver(up, mime(), ["bob@example.com", "carol@example.com"])
    assert not isinstance(e.value, PermanentDeliveryError)
    assert e.value.retry_after == 30.0 and "ErrorServerBusy" in e.value.text
    await deliver(up, mime(), ["bob@example.com", "carol@example.com"])  # then it works
    assert len(ews.state.sent) == 1


@pytest.mark.parametrize("fault", ["http500", "reset", "hang:3"])
async def test_server_trouble_defers(tmp_path: Path, idp: HttpsServer, ews: HttpsServer,
                                     upstreams: Any, fault: str) -> None:
    up = upstreams(make_config(tmp_path, idp, ews, save_to_sent=False, timeout="1s"))
    ews.state.faults = [fault]
    with pytest.raises(TransientDeliveryError) as e:
        await deliver(up, mime(), ["bob@example.com", "carol@example.com"])
    assert not isinstance(e.value, AuthenticationError)
    await deliver(up, mime(), ["bob@example.com", "carol@example.com"])
    assert len(ews.state.sent) == 1


async def test_401_defers_and_the_next_attempt_gets_a_new_token(
        tmp_path: Path, idp: HttpsServer, ews: HttpsServer, upstreams: Any) -> None:
    up = upstreams(make_config(tmp_path, idp, ews, save_to_sent=False))
    await deliver(up, mime(), ["bob@example.com", "carol@example.com"])
    ews.state.faults = ["http401"]
    with pytest.raises(AuthenticationError):
        await deliver(up, mime(), ["bob@example.com", "carol@example.com"])
    await deliver(up, mime(), ["bob@example.com", "carol@example.com"])
    assert idp.state.grants("client_credentials") == 2
    assert len(ews.state.sent) == 2


async def test_identity_provider_refusal_defers(tmp_path: Path, idp: HttpsServer,
                                                ews: HttpsServer, upstreams: Any) -> None:
    idp.state.client_secret = "rotated"
    up = upstreams(make_config(tmp_path, idp, ews))
    with pytest.raises(AuthenticationError, match="invalid_client"):
        await deliver(up, mime(), ["bob@example.com", "carol@example.com"])
    assert ews.state.calls == []


# -- basic / NTLM --------------------------------------------------------------------------------


async def test_basic_auth(tmp_path: Path, idp: HttpsServer, ews: HttpsServer,
                          upstreams: Any) -> None:
    ews.state.auth = "basic"
    up = upstreams(make_config(tmp_path, idp, ews, auth="basic", save_to_sent=False))
    await deliver(up, mime(), ["bob@example.com", "carol@example.com"])
    [sent] = ews.state.sent
    assert sent.authorization == f"basic:{ews.state.username}"
    assert sent.impersonated is None


async def test_basic_auth_wrong_password_defers(tmp_path: Path, idp: HttpsServer,
                                                ews: HttpsServer, upstreams: Any) -> None:
    ews.state.auth = "basic"
    up = upstreams(make_config(tmp_path, idp, ews, auth="basic"))
    ews.state.password = "changed"  # the route still has the old one
    with pytest.raises(AuthenticationError) as e:
        await deliver(up, mime(), ["bob@example.com", "carol@example.com"])
    assert "changed" not in str(e.value)


async def test_ca_file_is_what_trusts_the_endpoint(tmp_path: Path, idp: HttpsServer,
                                                   ews: HttpsServer, upstreams: Any) -> None:
    ews.state.auth = "basic"
    up = upstreams(make_config(tmp_path, idp, ews, auth="basic", ca_file=None))
    with pytest.raises(TransientDeliveryError, match="cannot reach"):
        await deliver(up, mime(), ["bob@example.com", "carol@example.com"])


async def test_ntlm_auth(tmp_path: Path, idp: HttpsServer, ews: HttpsServer, upstreams: Any,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    users = tmp_path / "ntlm-users"
    users.write_text(f"CONTOSO:svc-relay:{ews.state.password}\n")
    monkeypatch.setenv("NTLM_USER_FILE", str(users))
    ews.state.auth = "ntlm"
    up = upstreams(make_config(tmp_path, idp, ews, auth="ntlm", username="CONTOSO\\svc-relay",
                               save_to_sent=False))
    await deliver(up, mime(), ["bob@example.com", "carol@example.com"])
    [sent] = ews.state.sent
    assert sent.authorization.startswith("ntlm:") and "svc-relay" in sent.authorization


# -- delegated (device flow) ---------------------------------------------------------------------


async def test_device_flow_refuses_until_signed_in_then_sends_as_the_user(
        tmp_path: Path, idp: HttpsServer, ews: HttpsServer, upstreams: Any) -> None:
    config = make_config(tmp_path, idp, ews, flow="device", save_to_sent=False)
    up = upstreams(config)
    policy = SenderPolicy(config)
    route = config.routes["staff"]
    refusal = policy.not_signed_in(route, ALICE)
    assert refusal is not None and refusal.startswith("550 5.7.1")
    assert "relayd auth login staff --user alice@contoso.com" in refusal
    idp.state.device_user = ALICE
    assert await asyncio.to_thread(login, config, "staff", ALICE, io.StringIO()) == 0
    assert policy.not_signed_in(route, ALICE) is None
    assert policy.not_signed_in(route, "bob@contoso.com") is not None
    await deliver(up, mime(), ["bob@example.com", "carol@example.com"])
    [sent] = ews.state.sent
    assert sent.authorization == f"bearer:{ALICE}"
    assert sent.impersonated is None


async def test_revoked_refresh_token_defers_and_status_says_so(
        tmp_path: Path, idp: HttpsServer, ews: HttpsServer, upstreams: Any) -> None:
    """1. alice signs in, sends 2. her refresh token is revoked and EWS answers 401 3. the next
    message defers (AuthenticationError) 4. `auth status` shows invalid_grant, no token."""
    config = make_config(tmp_path, idp, ews, flow="device", save_to_sent=False)
    up = upstreams(config)
    idp.state.device_user = ALICE
    assert await asyncio.to_thread(login, config, "staff", ALICE, io.StringIO()) == 0
    await deliver(up, mime(), ["bob@example.com", "carol@example.com"])
    idp.state.revoke_user(ALICE)
    ews.state.faults = ["http401"]
    with pytest.raises(AuthenticationError):
        await deliver(up, mime(), ["bob@example.com", "carol@example.com"])
    with pytest.raises(AuthenticationError, match="invalid_grant"):
        await deliver(up, mime(), ["bob@example.com", "carol@example.com"])
    out = io.StringIO()
    assert status(config, out) == 1
    assert "invalid_grant" in out.getvalue() and ALICE in out.getvalue()
    assert "at-" not in out.getvalue()
    assert len(ews.state.sent) == 1
