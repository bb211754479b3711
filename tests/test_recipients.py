"""routes.*.recipients: RCPT outside a route's recipient patterns is refused at once."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

from conftest import (
    Upstream,
    message,
    relayd_cli,
    run_service,
    service_port,
    smtp_route,
    wait_for,
    write_config,
)

HVE = 'recipients = ["*@business.com", "auditor@partner.example"]'


async def test_an_allowed_and_a_refused_recipient_in_one_transaction(
        tmp_path: Path, upstream: Upstream) -> None:
    """1. an HVE-like route that takes internal mail only 2. one transaction to an internal and
    an external address 3. the external one is refused at RCPT with 550 5.7.1 naming the
    route 4. only the internal one arrives upstream."""
    cfg = write_config(tmp_path, smtp_route("hve", '["*@business.com"]', upstream.port, HVE))
    async with run_service(cfg) as svc:
        def go() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", service_port(svc), timeout=10) as client:
                return client.sendmail("alice@business.com",
                                       ["bob@Business.com", "carol@example.net"], message())
        refused = await asyncio.to_thread(go)
        assert refused == {"carol@example.net": (
            550, b"5.7.1 Recipient not allowed through route hve (routes.hve.recipients)")}
        await wait_for(lambda: len(upstream.messages) == 1 and not svc.qmgr.view.count())
    [got] = upstream.messages
    assert got.rcpt_tos == ["bob@Business.com"]


def test_relayd_route_to_says_whether_a_recipient_is_allowed(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, smtp_route("hve", '["*@business.com"]', 2525, HVE) +
                       smtp_route("other", '["*"]', 2526))
    ok = relayd_cli("route", "alice@business.com", "--to", "auditor@partner.example",
                    "--to", "x@BUSINESS.com", "-c", str(cfg))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[1:] == [
        "  to auditor@partner.example: allowed by routes.hve.recipients",
        "  to x@BUSINESS.com: allowed by routes.hve.recipients"]
    no = relayd_cli("route", "alice@business.com", "--to", "carol@example.net", "-c", str(cfg))
    assert no.returncode == 1
    assert no.stdout.splitlines()[1] == ("  to carol@example.net: refused at RCPT TO with "
                                         "550 5.7.1 (not in routes.hve.recipients)")
    anyone = relayd_cli("route", "zed@elsewhere.example", "--to", "carol@example.net",
                        "-c", str(cfg))
    assert anyone.returncode == 0 and "to carol@example.net: allowed" in anyone.stdout


def test_an_empty_recipients_list_is_a_config_error(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, smtp_route("hve", '["*@business.com"]', 2525,
                                            "recipients = []"))
    out = relayd_cli("check", "-c", str(cfg))
    assert out.returncode == 2
    assert "routes.hve.recipients: must list at least one address or pattern" in out.stderr
