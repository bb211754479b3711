"""End to end through EWS: smtplib -> relayd -> fake EWS (OAuth at a fake IdP); kill -9 mid-call."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import daemon, free_port, message, run_service, send, wait_for, write_config
from fakes.config import ALICE, ews_route_keys, staff_toml
from fakes.ews import EWS_PATH
from fakes.https import HttpsServer


def ews_route(tmp_path: Path, idp: HttpsServer, ews: HttpsServer, **extra: Any) -> str:
    return staff_toml(tmp_path, ews_route_keys(tmp_path, idp, ews.base_url + EWS_PATH,
                                               ca_file=str(ews.ca_file), **extra))


async def test_smtp_in_ews_out(tmp_path: Path, idp: HttpsServer, ews: HttpsServer) -> None:
    """1. Case Manager submits by SMTP with a Bcc-only recipient 2. relayd queues it 3. EWS
    receives the same message (relayd may add only a trace header) with the Bcc recipient,
    impersonating the sender, saved to Sent Items."""
    cfg = write_config(tmp_path, ews_route(tmp_path, idp, ews))
    data = message(sender=ALICE, to="bob@example.com", subject="hearing")
    async with run_service(cfg) as service:
        port = service.addresses[0][1]
        refused = await send(port, ALICE, ["bob@example.com", "judge@example.com"], data)
        assert refused == {}
        await wait_for(lambda: len(ews.state.sent) == 1, what="EWS CreateItem")
    [sent] = ews.state.sent
    assert sent.mime.endswith(data)
    assert sent.bcc == ["judge@example.com"]
    assert sent.impersonated == ALICE and sent.disposition == "SendAndSaveCopy"
    assert idp.state.grants("client_credentials") == 1


async def test_permanent_ews_refusal_bounces_to_the_sender(tmp_path: Path, idp: HttpsServer,
                                                           ews: HttpsServer) -> None:
    """1. EWS answers ErrorSendAsDenied 2. a bounce goes to the sender through the same route,
    from the sender's own mailbox, quoting the server's words."""
    cfg = write_config(tmp_path, ews_route(tmp_path, idp, ews, save_to_sent=False))
    ews.state.faults = ["sendas"]
    async with run_service(cfg) as service:
        port = service.addresses[0][1]
        await send(port, ALICE, ["bob@example.com"], message(sender=ALICE, to="bob@example.com"))
        await wait_for(lambda: len(ews.state.sent) == 1, what="the bounce")
    [bounce] = ews.state.sent
    assert bounce.impersonated == ALICE
    assert bounce.bcc == []  # the bounce names alice in its To header
    assert ALICE.encode() in bounce.mime.split(b"\r\n\r\n")[0]
    assert b"ErrorSendAsDenied" in bounce.mime


async def test_busy_server_defers_then_delivers(tmp_path: Path, idp: HttpsServer,
                                                ews: HttpsServer) -> None:
    cfg = write_config(tmp_path, ews_route(tmp_path, idp, ews, save_to_sent=False))
    ews.state.faults = ["busy", "http500"]
    ews.state.busy_back_off_ms = 100
    async with run_service(cfg) as service:
        port = service.addresses[0][1]
        await send(port, ALICE, ["bob@example.com"], message(sender=ALICE, to="bob@example.com"))
        await wait_for(lambda: len(ews.state.sent) == 1, timeout=30, what="delivery after retries")
    assert ews.state.calls.count("CreateItem") == 3


async def test_kill_9_during_an_ews_call_loses_nothing(tmp_path: Path, idp: HttpsServer,
                                                       ews: HttpsServer) -> None:
    """1. relayd serve accepts a message 2. its CreateItem is held by EWS 3. kill -9
    4. that call dies unanswered (not sent) 5. restart 6. the message is delivered, once."""
    port = free_port()
    cfg = write_config(tmp_path, ews_route(tmp_path, idp, ews, save_to_sent=False),
                       listen=f"127.0.0.1:{port}")
    log = tmp_path / "relayd.log"
    ews.state.block = threading.Event()
    ews.state.faults = ["reset"]  # the held call ends without sending
    data = message(sender=ALICE, to="bob@example.com", subject="kill-9")
    async with daemon(cfg, port, log) as proc:
        assert await send(port, ALICE, ["bob@example.com"], data) == {}
        await wait_for(ews.state.entered.is_set, what="CreateItem in flight")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    ews.state.block.set()
    ews.state.block = None
    await wait_for(lambda: not ews.state.faults, what="held call finished")
    assert ews.state.sent == []
    async with daemon(cfg, port, log):
        await wait_for(lambda: len(ews.state.sent) >= 1, timeout=30, what="redelivery")
        await wait_for(lambda: not list((tmp_path / "queue" / "msg").iterdir()),
                       what="empty spool")
    assert len(ews.state.sent) == 1
    assert ews.state.sent[0].mime.endswith(data)


async def test_send_test_through_an_ews_route(tmp_path: Path, idp: HttpsServer,
                                              ews: HttpsServer) -> None:
    """`relayd send-test` proves an EWS route's credentials by hand, bypassing the queue."""
    from conftest import arelayd_cli

    cfg = write_config(tmp_path, ews_route(tmp_path, idp, ews))
    result = await arelayd_cli("send-test", "-c", str(cfg), "--from", ALICE,
                               "--to", "bob@example.com")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "route: staff (upstream ews)" in result.stdout
    assert "<bob@example.com>: delivered" in result.stdout
    [sent] = ews.state.sent
    assert b"Subject: relayd test message" in sent.mime
    assert sent.impersonated == ALICE


@pytest.mark.parametrize(("recorded", "denied", "copies", "found"), [
    (True, False, 1, True),    # Exchange sent and saved it, then relayd died: not sent again
    (False, False, 1, False),  # relayd died before Exchange sent it: sent once after restart
    (True, True, 2, False),    # the account may not search Sent Items: sent again
])
async def test_kill_9_mid_create_item_is_looked_up_in_sent_items(
        tmp_path: Path, idp: HttpsServer, ews: HttpsServer, recorded: bool, denied: bool,
        copies: int, found: bool) -> None:
    """1. CreateItem stalls (after or before Exchange keeps the message) 2. kill -9 of relayd
    3. restart: FindItem in Sent Items by InternetMessageId 4. `copies` copies in the end."""
    port = free_port()
    cfg = write_config(tmp_path, ews_route(tmp_path, idp, ews), listen=f"127.0.0.1:{port}")
    log_file = tmp_path / "relayd.log"
    ews.state.block = threading.Event()
    ews.state.record_then_block = recorded
    if not recorded:
        ews.state.faults = ["reset"]  # the held call ends without sending
    ews.state.search_denied = denied
    data = message(sender=ALICE, to="bob@example.com", subject="dedupe")
    async with daemon(cfg, port, log_file) as proc:
        assert await send(port, ALICE, ["bob@example.com"], data) == {}
        await wait_for(ews.state.entered.is_set, what="CreateItem in flight")
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
    ews.state.block.set()
    ews.state.block = None
    await wait_for(lambda: not ews.state.faults, what="held call finished")
    assert len(ews.state.sent) == (1 if recorded else 0)
    async with daemon(cfg, port, log_file):
        await wait_for(lambda: not list((tmp_path / "queue" / "msg").iterdir()), timeout=30,
                       what="the spool empty after the restart")
        await asyncio.sleep(0.5)
    assert len(ews.state.sent) == copies
    assert len(ews.state.searches) == 1  # looked up once, after the restart only
    kinds = [json.loads(line)["event"] for f in sorted((tmp_path / "journal").iterdir())
             for line in f.read_text().splitlines()]
    assert ("found-in-sent-items" in kinds) == found
    if denied:
        assert log_file.read_text().count("dedupe is off") == 1


async def test_utf8_header_addresses_match_their_envelope_recipients(
        tmp_path: Path, idp: HttpsServer, ews: HttpsServer) -> None:
    """A UTF-8 To address that is also an envelope recipient stays in To (not removed, not
    added as Bcc); an RFC 2047 display name and another case of the domain match too."""
    cfg = write_config(tmp_path, ews_route(tmp_path, idp, ews))
    data = (f"From: {ALICE}\r\nTo: danglüe@email.com\r\n"
            "Cc: =?utf-8?q?J=C3=B6rg?= <jorg@Example.COM>\r\nSubject: x\r\n"
            "Message-ID: <utf8@test>\r\n\r\nhi\r\n").encode()

    def go(port: int) -> None:
        import smtplib

        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail(ALICE, ["danglüe@email.com", "jorg@example.com"], data,
                            mail_options=["SMTPUTF8"])

    async with run_service(cfg) as service:
        await asyncio.to_thread(go, service.addresses[0][1])
        await wait_for(lambda: len(ews.state.sent) == 1, what="EWS CreateItem")
    [sent] = ews.state.sent
    assert sent.mime.endswith(data)
    assert sent.bcc == []
