"""Attempts whose answer was lost (relayd.delivery.doubt): Graph and EWS look in Sent Items
before sending again; SMTP says the resend may duplicate. Real fakes on loopback: the Graph and
EWS fakes keep the message and then answer 504, answer after relayd's timeout, or answer 503
without keeping it; an aiosmtpd upstream takes the message and answers after the timeout."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from conftest import (
    RecordingHandler,
    Upstream,
    message,
    run_service,
    send,
    service_port,
    smtp_route,
    wait_for,
    write_config,
)
from fakes.config import ALICE, ews_route_keys, staff_toml
from fakes.ews import EWS_PATH
from fakes.graph import GraphState, start_graph
from fakes.https import HttpsServer
from fakes.idp import CLIENT_ID, CLIENT_SECRET, TENANT, IdpState, start_idp

from relayd.config import Config, parse_config
from relayd.delivery import OutboundMessage, doubt, make_upstream
from relayd.delivery.doubt import http_in_doubt
from relayd.delivery.graph import GraphUpstream
from relayd.errors import InDoubtError, TransientDeliveryError, UpstreamUnavailableError
from relayd.journal import format_event
from relayd.metrics import Metrics

SENDER = "casemanager@business.com"
RCPT = "alice@example.net"


@pytest.fixture(autouse=True)
def short_lag(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound on Sent Items' lag is 30 s in service; seconds here."""
    monkeypatch.setattr(doubt, "SENT_ITEMS_LAG_S", 2.0)
    monkeypatch.setattr(doubt, "SENT_ITEMS_POLL_S", 0.3)


# -- the table ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "written", "code", "in_doubt"), [
    (None, False, "", False),  # refused, no such host, a write that failed
    (None, True, "", True),  # written, then a timeout, a reset or EOF before the status line
    (504, True, "", True),
    (502, True, "", True),
    (503, True, "UnknownError", True),
    (500, True, "", True),
    (503, True, "ApplicationThrottled", False),  # Graph's own throttling answer
    (503, True, "TooManyRequests", False),
    (429, True, "TooManyRequests", False),
    (401, True, "InvalidAuthenticationToken", False),
    (400, True, "ErrorInvalidRecipients", False),
    (403, True, "ErrorSendAsDenied", False),
    (413, True, "", False),
    (202, True, "", False),
])
def test_which_http_answers_leave_a_send_in_doubt(status: int | None, written: bool, code: str,
                                                  in_doubt: bool) -> None:
    assert http_in_doubt(status, written=written, error_code=code) is in_doubt


# -- Graph -------------------------------------------------------------------------------------


@dataclass
class GraphEnv:
    idp: IdpState
    graph: GraphState
    graph_url: str
    idp_url: str
    ca_file: Path
    tmp_path: Path

    def config(self, **route: Any) -> Config:
        keys = {"senders": ["*@business.com"], "upstream": "graph", "endpoint": self.graph_url,
                "tenant_id": TENANT, "client_id": CLIENT_ID,
                "client_secret_env": "GRAPH_SECRET", "authority": self.idp_url,
                "ca_file": str(self.ca_file), "timeout": "10s", **route}
        return parse_config({
            "server": {"listen": ["127.0.0.1:0"], "hostname": "relay.test"},
            "queue": {"path": str(self.tmp_path / "queue"), "retry_min": "1s",
                      "retry_max": "2s"},
            "auth": {"path": str(self.tmp_path / "tokens")},
            "routes": {"m365": keys}})


@pytest.fixture
def genv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[GraphEnv]:
    monkeypatch.setenv("GRAPH_SECRET", CLIENT_SECRET)
    idp_server: HttpsServer = start_idp()
    idp: IdpState = idp_server.state
    state = GraphState(token_ok=lambda token: idp.check_bearer(token) is not None)
    graph_server = start_graph(state)
    yield GraphEnv(idp, state, graph_server.base_url, idp_server.base_url,
                   graph_server.ca_file, tmp_path)
    graph_server.stop()
    idp_server.stop()


def journal(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for f in sorted((tmp_path / "journal").iterdir())
            for line in f.read_text().splitlines()]


async def relay_one(config: Config | Path, tmp_path: Path, sender: str = SENDER,
                    rcpt: str = RCPT, **service: Any) -> None:
    """Send one message through relayd and wait until it has left the queue."""
    async with run_service(config, **service) as svc:
        assert await send(service_port(svc), sender, [rcpt], message(sender, rcpt)) == {}
        await wait_for(lambda: not list((tmp_path / "queue" / "msg").iterdir()), timeout=30,
                       what="the spool empty")
        await asyncio.sleep(0.3)  # a second copy would be on its way by now


@pytest.mark.parametrize("lost", ["504", "502", "reset"])
async def test_graph_keeps_the_message_then_the_answer_is_lost_one_copy(
        genv: GraphEnv, lost: str) -> None:
    """1. Graph keeps the message, then a gateway answers 504 (502, or the connection is reset)
    2. relayd defers it, marked in doubt 3. the next attempt finds it in Sent Items 4. one copy;
    the journal has the doubt on the deferral and on found-in-sent-items."""
    genv.graph.after_keep.append(lost)
    await relay_one(genv.config(), genv.tmp_path)
    assert len(genv.graph.sent) == 1
    assert genv.graph.lookups >= 1
    events = journal(genv.tmp_path)
    [deferred] = [e for e in events if e["event"] == "deferred"]
    assert "Graph may have sent the message" in deferred["doubt"]
    if lost != "reset":
        assert lost in deferred["doubt"]
    assert "may_duplicate" not in deferred
    [found] = [e for e in events if e["event"] == "found-in-sent-items"]
    assert found["doubt"] == deferred["doubt"]
    assert "delivered" not in [e["event"] for e in events]


async def test_graph_keeps_the_message_and_answers_after_the_timeout_one_copy(
        genv: GraphEnv) -> None:
    """1. Graph keeps the message and answers 202 after relayd's 1 s timeout 2. relayd
    defers it in doubt 3. the next attempt finds it in Sent Items: one copy."""
    genv.graph.after_keep.append("late:2.5")
    await relay_one(genv.config(timeout="1s"), genv.tmp_path)
    assert len(genv.graph.sent) == 1
    events = journal(genv.tmp_path)
    [deferred] = [e for e in events if e["event"] == "deferred"]
    assert "did not answer in time" in deferred["doubt"]
    [found] = [e for e in events if e["event"] == "found-in-sent-items"]
    assert found["doubt"] == deferred["doubt"]


async def test_graph_503_that_sent_nothing_is_looked_up_then_sent_again(
        genv: GraphEnv) -> None:
    """1. sendMail answered 503 without keeping the message (not Graph's throttling body: in
    doubt) 2. the next attempt looks in Sent Items, finds nothing, looks again until the bound
    (2 s here) has passed 3. sends it: exactly one copy."""
    genv.graph.fail_next(503, code="UnknownError", message="Service Unavailable")
    await relay_one(genv.config(), genv.tmp_path)
    assert len(genv.graph.sent) == 1
    assert genv.graph.lookups >= 2  # looked again before concluding "not sent"
    events = journal(genv.tmp_path)
    assert [e["event"] for e in events if e["event"] != "accepted"] == ["deferred", "delivered"]
    assert "503" in events[1]["doubt"]


async def test_graph_throttling_503_is_not_in_doubt(genv: GraphEnv) -> None:
    """A 503 with Graph's throttling error body proves nothing was sent: retried as ever,
    without a lookup; one copy."""
    genv.graph.fail_next(503, code="ApplicationThrottled", message="throttled",
                         headers={"Retry-After": "1"})
    await relay_one(genv.config(), genv.tmp_path)
    assert len(genv.graph.sent) == 1
    assert genv.graph.lookups == 0
    [deferred] = [e for e in journal(genv.tmp_path) if e["event"] == "deferred"]
    assert "doubt" not in deferred


async def test_sent_items_lag_is_waited_for(genv: GraphEnv) -> None:
    """1. Graph keeps the message and answers 504 2. Sent Items shows it only 1.5 s after the
    send 3. relayd's next attempt (1 s later) does not find it at first, looks again within
    the bound, and finds it: one copy."""
    genv.graph.after_keep.append("504")
    genv.graph.sent_items_lag_s = 1.5
    await relay_one(genv.config(), genv.tmp_path)
    assert len(genv.graph.sent) == 1
    assert genv.graph.lookups >= 2
    assert "found-in-sent-items" in [e["event"] for e in journal(genv.tmp_path)]


async def test_graph_lookup_refused_sends_again_and_says_dedupe_is_off(
        genv: GraphEnv, caplog: pytest.LogCaptureFixture) -> None:
    """1. Graph keeps the message and answers 504 2. the lookup is refused (403: no
    Mail.ReadBasic) 3. relayd sends it again (at least once: two copies) and logs once that
    dedupe is off for the route."""
    caplog.set_level(logging.INFO, logger="relayd")
    genv.graph.after_keep.append("504")
    genv.graph.read_sent = False
    await relay_one(genv.config(), genv.tmp_path)
    assert len(genv.graph.sent) == 2
    offs = [r for r in caplog.records if "dedupe is off" in r.getMessage()]
    assert len(offs) == 1 and "route m365" in offs[0].getMessage()


async def test_graph_refused_connection_is_not_in_doubt(genv: GraphEnv) -> None:
    """Nothing reached a server: unreachable (the route is held), not in doubt."""
    from conftest import dead_port

    config = genv.config(endpoint=f"https://127.0.0.1:{dead_port()}")
    up = make_upstream(config.routes["m365"], config)
    assert isinstance(up, GraphUpstream)
    session = up.session()
    try:
        with pytest.raises(TransientDeliveryError) as caught:
            await session.deliver(OutboundMessage("Q1", SENDER, [RCPT], message(SENDER, RCPT)))
        assert isinstance(caught.value, UpstreamUnavailableError)
        assert not isinstance(caught.value, InDoubtError)
    finally:
        await session.close()
        await up.close()
    assert genv.graph.sent == []


async def test_the_doubt_survives_a_restart(genv: GraphEnv) -> None:
    """1. Graph keeps the message and answers 504 2. relayd defers it in doubt and stops
    before the next try 3. the state file holds the doubt 4. after the restart the next attempt
    looks in Sent Items, finds it: one copy, journaled with the doubt."""
    config = genv.config()
    slow = dataclasses.replace(config, queue=dataclasses.replace(
        config.queue, retry_min_s=3.0, retry_max_s=3.0))
    genv.graph.after_keep.append("504")
    async with run_service(slow) as svc:
        assert await send(service_port(svc), SENDER, [RCPT], message(SENDER, RCPT)) == {}
        await wait_for(lambda: any(q.entry.doubt for q in svc.qmgr.view.messages()),
                       what="the attempt in doubt")
    [state_file] = (genv.tmp_path / "queue" / "state").iterdir()
    state = json.loads(state_file.read_text())
    assert state["started"] and "504" in state["doubt"]["why"]
    await relay_one_queued(config, genv.tmp_path)
    assert len(genv.graph.sent) == 1
    [found] = [e for e in journal(genv.tmp_path) if e["event"] == "found-in-sent-items"]
    assert "504" in found["doubt"]


async def relay_one_queued(config: Config, tmp_path: Path) -> None:
    async with run_service(config):
        await wait_for(lambda: not list((tmp_path / "queue" / "msg").iterdir()), timeout=30,
                       what="the spool empty")


# -- EWS ---------------------------------------------------------------------------------------


async def test_ews_refused_connection_is_not_in_doubt(tmp_path: Path, idp: HttpsServer) -> None:
    """exchangelib re-raises a refused connection as ErrorTimeoutExpired, like a read timeout:
    relayd tells them apart, and a refused one is unreachable, not in doubt."""
    from conftest import dead_port
    from fakes.config import staff_config

    config = staff_config(tmp_path, ews_route_keys(
        tmp_path, idp, f"https://127.0.0.1:{dead_port()}{EWS_PATH}"))
    up = make_upstream(config.routes["staff"], config)
    session = up.session()
    try:
        with pytest.raises(TransientDeliveryError) as caught:
            await session.deliver(OutboundMessage("Q1", ALICE, ["bob@example.com"],
                                                  message(ALICE, "bob@example.com")))
        assert isinstance(caught.value, UpstreamUnavailableError), caught.value
        assert not isinstance(caught.value, InDoubtError)
    finally:
        await session.close()
        await up.close()




@pytest.mark.parametrize("fault", ["keep-then-hang:2.5", "keep-then-http504",
                                   "keep-then-http503"])
async def test_ews_create_item_kept_then_the_answer_is_lost_one_copy(
        tmp_path: Path, idp: HttpsServer, ews: HttpsServer, fault: str) -> None:
    """1. Exchange sends and saves the message, then its answer is lost (no answer within
    relayd's 1 s timeout, or a gateway's 504/503) 2. relayd defers it in doubt 3. the next
    attempt finds it with FindItem on its Message-ID 4. one copy."""
    keys = ews_route_keys(tmp_path, idp, ews.base_url + EWS_PATH, ca_file=str(ews.ca_file),
                          timeout="1s")
    cfg = write_config(tmp_path, staff_toml(tmp_path, keys))
    ews.state.faults = [fault]
    await relay_one(cfg, tmp_path, ALICE, "bob@example.com")
    assert len(ews.state.sent) == 1
    assert len(ews.state.searches) >= 1
    events = journal(tmp_path)
    [deferred] = [e for e in events if e["event"] == "deferred"]
    assert "Exchange may have sent the message" in deferred["doubt"]
    [found] = [e for e in events if e["event"] == "found-in-sent-items"]
    assert found["doubt"] == deferred["doubt"]


async def test_ews_lookup_refused_sends_again_and_says_dedupe_is_off(
        tmp_path: Path, idp: HttpsServer, ews: HttpsServer,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relayd")
    keys = ews_route_keys(tmp_path, idp, ews.base_url + EWS_PATH, ca_file=str(ews.ca_file))
    cfg = write_config(tmp_path, staff_toml(tmp_path, keys))
    ews.state.faults = ["keep-then-http504"]
    ews.state.search_denied = True
    await relay_one(cfg, tmp_path, ALICE, "bob@example.com")
    assert len(ews.state.sent) == 2
    assert sum("dedupe is off" in r.getMessage() for r in caplog.records) == 1


# -- SMTP --------------------------------------------------------------------------------------


class SlowAfterData(RecordingHandler):
    """Takes the message, then answers the first DATA only after relayd's timeout."""

    slow: int = 1

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        if self.slow:
            self.slow -= 1
            await asyncio.sleep(2.5)
        return reply


@pytest.fixture
async def slow_upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    up.handler = SlowAfterData()
    await up.start()
    yield up
    await up.stop()


async def test_smtp_timeout_after_the_end_of_data_says_the_resend_may_duplicate(
        tmp_path: Path, slow_upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    """1. the upstream takes the message and does not answer the final "." within relayd's
    1 s timeout (RFC 1047's window) 2. relayd cannot look: it logs and journals that the resend
    may duplicate, counts it, and sends again 3. two copies, as SMTP allows."""
    caplog.set_level(logging.INFO, logger="relayd")
    cfg = write_config(tmp_path, smtp_route("staff", '["*@contoso.com"]', slow_upstream.port,
                                            'timeout = "1s"'))
    metrics = Metrics()
    await relay_one(cfg, tmp_path, ALICE, "bob@example.com", observer=metrics)
    assert len(slow_upstream.messages) == 2
    [deferred] = [e for e in journal(tmp_path) if e["event"] == "deferred"]
    assert deferred["may_duplicate"] is True
    assert "RFC 1047" in deferred["doubt"] and "may duplicate" in deferred["reply"]
    line = format_event(deferred)  # what `relayd log` prints
    assert "may_duplicate=True" in line and 'doubt="4.4.2 no reply after the end of DATA' in line
    lines = [r.getMessage() for r in caplog.records if "deferred" in r.getMessage()]
    assert len(lines) == 1 and "the resend may duplicate it" in lines[0]
    text = metrics.render().decode()
    assert 'relayd_attempts_in_doubt_total{lookup="no",route="staff"} 1.0' in text
