"""The delivery agent's timeouts and cancellation (relayd.delivery.agent), the same on every
Python from 3.11 to 3.13 (none of it rests on asyncio.wait_for, whose cancellation changed in
3.12): against a real aiosmtpd upstream and the Graph fake on loopback, an upstream that
answers just after the timeout, one that never answers, and a stop while a reply is awaited.
Each asserts what arrived upstream and what the agent reported."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Upstream, message, smtp_route, wait_for, write_config
from fakes.graph import GraphState, start_graph
from fakes.https import HttpsServer
from fakes.idp import CLIENT_ID, CLIENT_SECRET, TENANT, IdpState, start_idp

from relayd.config import load_config, parse_config
from relayd.delivery import Status, make_upstream
from relayd.delivery import agent as agent_module
from relayd.delivery.agent import DeliveryAgent, Job, Report

SENDER = "alice@business.com"
RCPT = "bob@example.com"


class HeldReplies:
    """An upstream handler's DATA that records the message (it has arrived), then holds the
    final reply: `hold_s` seconds, or until `release` is set (None: never, until the test
    ends)."""

    def __init__(self, upstream: Upstream, hold_s: float | None) -> None:
        self.record = upstream.handler.handle_DATA
        self.hold_s = hold_s
        self.release = asyncio.Event()
        upstream.handler.handle_DATA = self.handle_DATA  # type: ignore[method-assign]

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        reply = await self.record(server, session, envelope)
        if self.hold_s is None:
            await self.release.wait()
        else:
            await asyncio.sleep(self.hold_s)
        return reply


@pytest.fixture
async def agent_for(tmp_path: Path, upstream: Upstream) -> AsyncIterator[Any]:
    agents: list[DeliveryAgent] = []

    def make(timeout: str) -> DeliveryAgent:
        cfg = load_config(write_config(tmp_path, smtp_route(
            "staff", '["*@business.com"]', upstream.port, f'timeout = "{timeout}"')))
        route = cfg.routes["staff"]
        agents.append(DeliveryAgent(route, make_upstream(route, cfg), hold_s=30))
        return agents[-1]

    yield make
    for agent in agents:
        await agent.close(1)


def job(qid: str, data: bytes) -> Job:
    return Job(qid, SENDER, [RCPT], data)


def only(report: Report) -> tuple[Status, str]:
    [result] = report.results.values()
    return result.status, str(result.reply)


async def test_an_smtp_reply_just_after_the_timeout_is_late_the_message_in_doubt(
        agent_for: Any, upstream: Upstream) -> None:
    """1. The upstream takes the message and answers 250 0.5 s after the route's 1 s timeout
    2. the agent reports it deferred, in doubt (the server may have it: RFC 1047), and drops
    the connection 3. the next message goes on a new connection and is delivered."""
    held = HeldReplies(upstream, hold_s=1.5)
    agent = agent_for("1s")
    data = message()
    report = await asyncio.wait_for(agent.deliver(job("Q1", data)), 20)
    status, reply = only(report)
    assert status is Status.DEFERRED and "timed out waiting for server response" in reply.lower()
    assert "may duplicate" in report.doubt
    assert [m.data for m in upstream.messages] == [data]  # it arrived, its answer was late
    held.hold_s = 0
    second = message(subject="next")
    report = await asyncio.wait_for(agent.deliver(job("Q2", second)), 20)
    assert only(report)[0] is Status.DELIVERED and report.doubt == ""
    assert [m.data for m in upstream.messages] == [data, second]
    assert upstream.handler.connections == 2


@pytest.mark.parametrize("deadline", ["reply timeout", "agent deadline"])
async def test_an_smtp_upstream_that_never_answers_is_cut_off(
        agent_for: Any, upstream: Upstream, monkeypatch: pytest.MonkeyPatch,
        deadline: str) -> None:
    """The upstream takes the message and never answers. Either the client's reply timeout
    ends the attempt (deferred, in doubt) or, when the agent's own deadline comes first (its
    grace made negative here), the agent cuts the attempt off (deferred, timed out); the
    agent answers either way, and the upstream got the message once."""
    held = HeldReplies(upstream, hold_s=None)
    if deadline == "agent deadline":
        monkeypatch.setattr(agent_module, "ATTEMPT_GRACE_S", -1.0)  # 1 s, the reply's 2 s
    agent = agent_for("2s")
    data = message()
    try:
        report = await asyncio.wait_for(agent.deliver(job("Q1", data)), 20)
    finally:
        held.release.set()
    status, reply = only(report)
    assert status is Status.DEFERRED
    if deadline == "reply timeout":
        assert "timed out waiting for server response" in reply.lower()
        assert "may duplicate" in report.doubt
    else:
        assert reply == str(agent_module.TIMED_OUT) and report.doubt == ""  # smtp: no lookup
    assert [m.data for m in upstream.messages] == [data]


async def test_a_stop_while_the_final_smtp_reply_is_awaited_reports_stopped(
        agent_for: Any, upstream: Upstream) -> None:
    """1. The upstream has the message and holds its reply 2. the agent is closed with 0.2 s
    for its jobs: the attempt is cancelled during the reply 3. the job is reported deferred
    as stopped (not delivered, not timed out), the close returns, and the upstream has the
    message once."""
    held = HeldReplies(upstream, hold_s=None)
    agent = agent_for("10s")
    data = message()
    task = asyncio.create_task(agent.deliver(job("Q1", data)))
    try:
        await wait_for(lambda: len(upstream.messages) == 1, timeout=10, what="the message")
        await asyncio.wait_for(agent.close(0.2), 10)
        report = await asyncio.wait_for(task, 5)
    finally:
        held.release.set()
    assert only(report) == (Status.DEFERRED, str(agent_module.STOPPED))
    assert [m.data for m in upstream.messages] == [data]


# -- Graph (a lookup upstream: an attempt cut off there is in doubt) ---------------------------


@pytest.fixture
def graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[GraphState, Any]]:
    monkeypatch.setenv("GRAPH_SECRET", CLIENT_SECRET)
    idp_server: HttpsServer = start_idp()
    idp: IdpState = idp_server.state
    state = GraphState(token_ok=lambda token: idp.check_bearer(token) is not None)
    graph_server = start_graph(state)

    def make(timeout: str) -> DeliveryAgent:
        config = parse_config({
            "queue": {"path": str(tmp_path / "queue")}, "auth": {"path": str(tmp_path / "t")},
            "routes": {"m365": {
                "senders": ["*@business.com"], "upstream": "graph",
                "endpoint": graph_server.base_url, "tenant_id": TENANT, "client_id": CLIENT_ID,
                "client_secret_env": "GRAPH_SECRET", "authority": idp_server.base_url,
                "ca_file": str(graph_server.ca_file), "timeout": timeout}}})
        route = config.routes["m365"]
        return DeliveryAgent(route, make_upstream(route, config), hold_s=30)

    yield state, make
    graph_server.stop()
    idp_server.stop()


async def test_a_graph_answer_just_after_the_timeout_leaves_the_message_in_doubt(
        graph: tuple[GraphState, Any]) -> None:
    """Graph keeps the message and answers 202 1.5 s after the route's 1 s timeout: reported
    deferred and in doubt (the next attempt looks in Sent Items), Graph has it once."""
    state, make = graph
    state.after_keep.append("late:2.5")
    agent = make("1s")
    try:
        report = await asyncio.wait_for(agent.deliver(job("Q1", message())), 20)
    finally:
        await agent.close(1)
    status, reply = only(report)
    assert status is Status.DEFERRED and "did not answer in time" in reply
    assert "did not answer in time" in report.doubt
    assert len(state.sent) == 1


async def test_a_stop_while_graph_answers_leaves_the_message_in_doubt(
        graph: tuple[GraphState, Any]) -> None:
    """Graph has kept the message and is slow to answer; the agent is stopped meanwhile: the
    job is reported stopped and in doubt (cut off mid-call), Graph has the message once."""
    state, make = graph
    state.after_keep.append("late:2")
    agent = make("10s")
    task = asyncio.create_task(agent.deliver(job("Q1", message())))
    await wait_for(lambda: len(state.sent) == 1, timeout=10, what="the message at Graph")
    await asyncio.wait_for(agent.close(0.2), 10)
    report = await asyncio.wait_for(task, 5)
    assert only(report) == (Status.DEFERRED, str(agent_module.STOPPED))
    assert agent_module.CUT_OFF in report.doubt
    assert len(state.sent) == 1
