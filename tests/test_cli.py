"""`relayd send-test` and the other commands an admin runs by hand."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import Upstream, arelayd_cli, dead_port, relayd_cli, smtp_route, write_config


async def test_send_test_delivers_through_the_senders_route(tmp_path: Path,
                                                            upstream: Upstream) -> None:
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port))
    result = await arelayd_cli("send-test", "-c", str(cfg), "--from", "alice@business.com",
                               "--to", "bob@example.com")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1. route: staff (upstream smtp)" in result.stdout
    assert "<bob@example.com>: delivered: 250" in result.stdout
    [got] = upstream.messages
    assert got.mail_from == "alice@business.com" and got.rcpt_tos == ["bob@example.com"]
    assert b"Subject: relayd test message" in got.data
    assert not os.path.exists(tmp_path / "queue" / "msg") or not os.listdir(
        tmp_path / "queue" / "msg")  # bypasses the queue


async def test_send_test_reports_failures_and_exits_1(tmp_path: Path, upstream: Upstream) -> None:
    upstream.handler.rcpt_replies["nobody@example.com"] = "550 5.1.1 No such user"
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port)
                       + smtp_route("down", '["*@down.example"]', dead_port()))
    refused = await arelayd_cli("send-test", "-c", str(cfg), "--from", "alice@business.com",
                                "--to", "nobody@example.com")
    assert refused.returncode == 1 and "failed: 550 5.1.1 No such user" in refused.stdout
    down = await arelayd_cli("send-test", "-c", str(cfg), "--from", "x@down.example",
                             "--to", "bob@example.com")
    assert down.returncode == 1 and "4. failed (temporary): cannot connect" in down.stdout
    unknown = await arelayd_cli("send-test", "-c", str(cfg), "--from", "eve@evil.example",
                                "--to", "bob@example.com")
    assert unknown.returncode == 1 and "no route" in unknown.stdout


def test_send_test_through_the_outbox(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, f"""
[routes.dry]
senders = ["*"]
upstream = "outbox"
path = "{tmp_path / 'outbox'}"
""")
    result = relayd_cli("send-test", "-c", str(cfg), "--from", "a@b.example", "--to",
                        "c@d.example")
    assert result.returncode == 0, result.stdout
    [eml] = list((tmp_path / "outbox").glob("*.eml"))
    data = eml.read_bytes()
    assert data.startswith(b"Return-Path: <a@b.example>\r\nX-Relayd-Recipient: <c@d.example>\r\n")
    assert b"From: a@b.example" in data


def test_usage_errors_exit_2() -> None:
    assert relayd_cli("frobnicate").returncode == 2
    assert relayd_cli("route").returncode == 2
    assert relayd_cli("send-test", "--from", "a@b.c").returncode == 2
