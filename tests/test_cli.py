"""`relayd send-test` and the other commands an admin runs by hand."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import Upstream, arelayd_cli, dead_port, message, relayd_cli, smtp_route, write_config

from relayd import cli
from relayd.queue import Spool


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


def test_queue_list_json_keeps_the_layout_of_one_json_dump(tmp_path: Path) -> None:
    """The list is written entry by entry; the bytes are those of json.dumps(list, indent=2)."""
    cfg = write_config(tmp_path, smtp_route("staff", '["*"]', dead_port()))
    spool = Spool(tmp_path / "queue")
    spool.create()
    for count in (0, 1, 3):
        while len(spool.ids()) < count:
            spool.store_sync("a@business.com", ["x@example.com", "y@example.com"],
                              message(body="line\r\n\"quoted\"\r\n"))
        listed = relayd_cli("queue", "list", "--json", "-c", str(cfg))
        assert listed.returncode == 0, listed.stderr
        entries = json.loads(listed.stdout)
        assert [e["id"] for e in entries] == spool.ids()
        # the route, as `queue show --json` gives it (not the entry's pinned one, null)
        assert all(e["route"] == "staff" and e["route_pinned"] is False for e in entries)
        assert listed.stdout == json.dumps(entries, indent=2) + "\n"
    text = relayd_cli("queue", "list", "-c", str(cfg))
    assert text.stdout.splitlines()[-1] == "3 message(s) in the queue"
    assert all(line.endswith("<a@business.com> -> x@example.com, y@example.com  "
                             "[tries 0, next now]") for line in text.stdout.splitlines()[:3])


def test_queue_list_skips_a_message_that_leaves_while_it_lists(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """1. two messages queued 2. the listing sees three names, one of them delivered (gone)
    before it is read 3. two lines, no "unreadable"; a corrupt entry is still reported."""
    cfg = write_config(tmp_path, smtp_route("staff", '["*"]', dead_port()))
    spool = Spool(tmp_path / "queue")
    spool.create()
    for _ in range(2):
        spool.store_sync("a@business.com", ["x@example.com"], message())
    (spool.msg_dir / "0BBBBBBBBBBBBBBB").write_bytes(b"\x00\xff garbage")
    listed = spool.ids()
    monkeypatch.setattr(Spool, "ids", lambda self: sorted([*listed, "0AAAAAAAAAAAAAAA"]))
    assert cli.main(["queue", "list", "-c", str(cfg)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == "2 message(s) in the queue"
    assert "0AAAAAAAAAAAAAAA" not in out + err
    assert "0BBBBBBBBBBBBBBB: unreadable" in err


@pytest.mark.skipif(sys.platform == "win32", reason="pipes into POSIX head; Windows "
                    "has no SIGPIPE")
def test_commands_piped_into_head_end_quietly(tmp_path: Path) -> None:
    """`relayd log | head -1`, `relayd queue list | head -1`, `relayd check --explain | head
    -1`, each with more output than a pipe holds: exit 0 or the shell's SIGPIPE status (141),
    and nothing on stderr (no BrokenPipeError traceback)."""
    import shlex
    import subprocess
    import sys

    from conftest import REPO

    from relayd.config import load_config
    from relayd.journal import Journal

    many = "\n".join(f'[routes.r{i}]\nsenders = ["user{i}@business.com"]\nupstream = "outbox"\n'
                     f'path = "{tmp_path / "outbox"}"\n' for i in range(400))
    cfg = write_config(tmp_path, smtp_route("staff", '["*"]', dead_port()) + many)
    spool = Spool(tmp_path / "queue")
    spool.create()
    rcpts = [f"recipient{i}@example.com" for i in range(40)]
    for _ in range(100):  # about 1 KB a line: 100 KB of `queue list`
        spool.store_sync("a@business.com", rcpts, message())
    journal = Journal(load_config(cfg).journal)
    for i in range(2000):
        journal.record("accepted", f"ID{i:014d}", **{"from": "a@business.com"}, to=rcpts[:3],
                       route="staff", subject="piped")
    journal.close()
    for command in ("log", "queue list", "check --explain"):
        line = (f"{shlex.quote(sys.executable)} -m relayd {command} -c {shlex.quote(str(cfg))}"
                " | head -1 >/dev/null; exit ${PIPESTATUS[0]}")
        done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, cwd=REPO,
                              timeout=60)
        assert done.returncode in (0, 141), (command, done.returncode, done.stderr)
        assert done.stderr == "", (command, done.stderr)


def test_route_takes_an_address_in_angle_brackets(tmp_path: Path) -> None:
    """`relayd route '<alice@business.com>'`, as the address appears in MAIL FROM and logs."""
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', dead_port()))
    for written in ("<alice@business.com>", " <alice@business.com> ", "alice@business.com"):
        out = relayd_cli("route", "-c", str(cfg), written)
        assert out.returncode == 0, out.stdout
        assert out.stdout.startswith("alice@business.com: route staff ")
