"""Postfix as a front MTA (`relayhost = [127.0.0.1]:PORT`) relaying into relayd, and the
delivery status notifications it hands on with MAIL FROM:<>."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    Upstream,
    _port_open,
    free_port,
    message,
    run_service,
    smtp_route,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.skipif(
    shutil.which("postfix") is None or os.geteuid() != 0,
    reason="needs Postfix (apt-get install postfix) and root to run a private instance")

MAIN_CF = """
compatibility_level = 3.6
queue_directory = {root}/spool
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = front.test
mydomain = front.test
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{relayd_port}
smtputf8_enable = no
smtp_tls_security_level = none
smtpd_tls_security_level = none
maillog_file = {log}
biff = no
"""


@contextlib.contextmanager
def front_postfix(relayd_port: int) -> Iterator[tuple[int, Path]]:
    """A private Postfix instance on a free port relaying everything to relayd; its port and
    log file. Stopped and removed at the end."""
    root = Path(tempfile.mkdtemp(prefix="relayd-postfix-"))
    root.chmod(0o755)  # Postfix's daemons run as postfix and must reach their directories
    # maillog_file must live under /var (maillog_file_prefixes), or `postfix start` fails.
    log = Path("/var/log") / f"relayd-test-{root.name}.log"
    port = free_port()
    etc = root / "etc"
    etc.mkdir()
    (root / "data").mkdir()
    (root / "spool").mkdir()
    shutil.chown(root / "data", "postfix", "postfix")
    shutil.copy("/etc/postfix/master.cf", etc / "master.cf")
    if Path("/etc/postfix/dynamicmaps.cf").exists():
        shutil.copy("/etc/postfix/dynamicmaps.cf", etc / "dynamicmaps.cf")
    (etc / "main.cf").write_text(MAIN_CF.format(root=root, relayd_port=relayd_port, log=log))
    run = ["postconf", "-c", str(etc)]
    subprocess.run([*run, "-F", "*/*/chroot = n"], check=True, timeout=30)
    subprocess.run([*run, "-M#", "smtp/inet"], check=True, timeout=30)
    subprocess.run([*run, "-Me", f"127.0.0.1:{port}/inet=127.0.0.1:{port} inet n - n - - smtpd"],
                   check=True, timeout=30)
    out = root / "start.out"
    try:
        with open(out, "wb") as f:
            # `postfix start` leaves a daemon holding its stdout: never wait for EOF on it.
            subprocess.run(["postfix", "-c", str(etc), "start"], stdin=subprocess.DEVNULL,
                           stdout=f, stderr=subprocess.STDOUT, timeout=60, check=False)
        deadline = time.monotonic() + 20
        while not _port_open(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _port_open(port), out.read_text() + (log.read_text() if log.exists() else "")
        yield port, log
    finally:
        subprocess.run(["postfix", "-c", str(etc), "stop"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
                       check=False)
        shutil.rmtree(root, ignore_errors=True)
        log.unlink(missing_ok=True)


def submit(port: int, sender: str, to: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
        client.sendmail(sender, [to], message(sender=sender, to=to, subject=subject))


def relayd_config(tmp_path: Path, port: int, upstream: Upstream, upstream2: Upstream,
                  server: str) -> Path:
    routes = (smtp_route("staff", '["*@business.com"]', upstream.port)
              + smtp_route("system", '["casemanager@business.com"]', upstream2.port))
    return write_config(tmp_path, routes, listen=f"127.0.0.1:{port}", server=server)


async def test_postfix_hands_on_mail_and_its_dsn_takes_null_sender_route(
        tmp_path: Path, upstream: Upstream, upstream2: Upstream) -> None:
    """1. null_sender_route = "system" 2. Postfix relays alice's message: delivered through
    staff 3. it relays eve's, which relayd refuses at MAIL FROM (no route) 4. Postfix bounces
    it with MAIL FROM:<> through relayd 5. the DSN arrives through the system route."""
    port = free_port()
    cfg = relayd_config(tmp_path, port, upstream, upstream2, 'null_sender_route = "system"')
    async with run_service(cfg):
        with front_postfix(port) as (front, _):
            await asyncio.to_thread(submit, front, "alice@business.com", "x@example.com",
                                    "via postfix")
            await asyncio.to_thread(submit, front, "eve@elsewhere.org", "y@example.com",
                                    "no route")
            await wait_for(lambda: len(upstream.messages) == 1 and len(upstream2.messages) == 1,
                           timeout=60, what="the message and the DSN upstream")
    relayed = upstream.messages[0]
    assert (relayed.mail_from, relayed.rcpt_tos) == ("alice@business.com", ["x@example.com"])
    assert b"Subject: via postfix" in relayed.data
    dsn = upstream2.messages[0]
    assert (dsn.mail_from, dsn.rcpt_tos) == ("", ["eve@elsewhere.org"])
    assert b"multipart/report" in dsn.data and b"5.7.1" in dsn.data


async def test_postfix_dsn_refused_without_null_sender_route(
        tmp_path: Path, upstream: Upstream, upstream2: Upstream) -> None:
    port = free_port()
    cfg = relayd_config(tmp_path, port, upstream, upstream2, "")
    async with run_service(cfg) as svc:
        with front_postfix(port) as (front, log):
            await asyncio.to_thread(submit, front, "eve@elsewhere.org", "y@example.com",
                                    "no route")
            await wait_for(lambda: log.exists() and "Null sender not accepted" in log.read_text(),
                           timeout=60, what="Postfix to log relayd's refusal of the DSN")
        assert svc.spool.ids() == []
    assert upstream.messages == [] and upstream2.messages == []
