"""Every corpus message through relayd: byte-identical over SMTP, MIME-equivalent over Graph."""

from __future__ import annotations

import asyncio
import json
import smtplib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import Upstream, run_service, service_port, smtp_route, wait_for, write_config
from fakes.graph import GraphState, start_graph
from fakes.idp import CLIENT_ID, CLIENT_SECRET, TENANT, IdpState, start_idp
from mimeutil import assert_mime_equivalent, corpus, parse, without_headers

from relayd.delivery.mime import header_recipients
from relayd.headers import header_facts
from relayd.journal import Query, read

BCC_ONLY = "hidden@example.org"  # an envelope recipient no header names
CORPUS_FILES = corpus()


def test_corpus_is_big_enough_and_crlf() -> None:
    assert len(CORPUS_FILES) >= 12
    for path in CORPUS_FILES:
        data = path.read_bytes()
        assert b"\n" not in data.replace(b"\r\n", b""), f"{path.name}: bare LF"
        assert b"\r" not in data.replace(b"\r\n", b""), f"{path.name}: bare CR"


def envelope(data: bytes) -> tuple[str, list[str], list[str]]:
    """Sender (the From address), recipients (header ones plus a Bcc-only one), MAIL options."""
    msg = parse(data)
    # The parser keeps raw UTF-8 header bytes as surrogates; the address is UTF-8 (RFC 6532).
    raw = msg["from"].addresses[0].addr_spec
    sender = raw.encode("ascii", "surrogateescape").decode("utf-8")
    recipients = [*header_recipients(data), BCC_ONLY]
    options = []
    if not all(a.isascii() for a in (sender, *recipients)):
        options.append("SMTPUTF8")
    if not data.isascii():
        options.append("BODY=8BITMIME")
    return sender, recipients, options


async def submit(port: int, data: bytes) -> None:
    sender, recipients, options = envelope(data)

    def go() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            refused = client.sendmail(sender, recipients, data, mail_options=options)
            assert refused == {}

    await asyncio.to_thread(go)


def as_transmitted(data: bytes) -> bytes:
    """SMTP cannot carry a message without a final line break; the client adds one."""
    return data if data.endswith(b"\r\n") else data + b"\r\n"


@pytest.mark.parametrize("path", CORPUS_FILES, ids=[p.stem for p in CORPUS_FILES])
async def test_smtp_arrival_is_byte_identical(tmp_path: Path, upstream: Upstream,
                                              path: Path) -> None:
    data = path.read_bytes()
    sender, recipients, options = envelope(data)
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    async with run_service(cfg) as svc:
        await submit(service_port(svc), data)
        await wait_for(lambda: len(upstream.messages) == 1, what="delivery")
    [got] = upstream.messages
    assert got.data == as_transmitted(data)
    assert got.mail_from == sender
    assert got.rcpt_tos == recipients
    if "SMTPUTF8" in options:
        assert "SMTPUTF8" in got.mail_options
    # The journal recorded it, and finds it again by Message-ID.
    recorded = list(read(tmp_path / "journal", Query()))
    assert [e["event"] for e in recorded] == ["accepted", "delivered"]
    mid = header_facts(as_transmitted(data))[0]
    if mid:
        assert [e["id"] for e in read(tmp_path / "journal", Query(message_id=mid))] == \
            [recorded[0]["id"]] * 2


@pytest.fixture
async def graph_route(tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Path, GraphState]]:
    monkeypatch.setenv("GRAPH_SECRET", CLIENT_SECRET)
    idp_server = start_idp()
    idp: IdpState = idp_server.state
    state = GraphState(token_ok=lambda token: idp.check_bearer(token) is not None)
    graph_server = start_graph(state)
    route = {"senders": ["*@business.com"], "upstream": "graph",
             "endpoint": graph_server.base_url, "tenant_id": TENANT, "client_id": CLIENT_ID,
             "client_secret_env": "GRAPH_SECRET", "authority": idp_server.base_url,
             "ca_file": str(graph_server.ca_file)}
    text = "[routes.m365]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in route.items())
    cfg = write_config(tmp_path, text, extra=f'[auth]\npath = "{tmp_path / "tokens"}"\n')
    yield cfg, state
    graph_server.stop()
    idp_server.stop()


@pytest.mark.parametrize("path", CORPUS_FILES, ids=[p.stem for p in CORPUS_FILES])
async def test_graph_arrival_is_mime_equivalent(graph_route: tuple[Path, GraphState],
                                                path: Path) -> None:
    cfg, state = graph_route
    data = path.read_bytes()
    sender, recipients, _ = envelope(data)
    async with run_service(cfg) as svc:
        await submit(service_port(svc), data)
        await wait_for(lambda: len(state.sent) == 1, what="delivery through Graph")
    [sent] = state.sent
    assert sent.via == "sendMail" and sent.mailbox == sender
    # Graph sends to exactly the envelope: the header recipients and the Bcc-only one.
    assert sorted(a.lower() for a in sent.recipients) == sorted(a.lower() for a in recipients)
    assert_mime_equivalent(as_transmitted(data), sent.mime, ignore={"bcc"})
    # Stronger than equivalence: apart from the added Bcc field the bytes are the ones sent.
    assert without_headers(sent.mime, {"bcc"}) == as_transmitted(data)
