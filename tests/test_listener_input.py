"""Bad addresses at MAIL and RCPT: the exact reply, no traceback, nothing in the spool, and the
daemon goes on serving. Sender matching folds ASCII case only."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import (
    Upstream,
    message,
    run_service,
    send,
    service_port,
    smtp_exchange,
    smtp_route,
    tmp_leftovers,
    wait_for,
    write_config,
)

from relayd.app import MainProcess
from relayd.config import load_config
from relayd.router import Router, normalize


@pytest.fixture
def cfg(tmp_path: Path, upstream: Upstream) -> Path:
    return write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port)
                        + smtp_route("kate", '["kate@corp.test"]', upstream.port))


def nothing_stored(svc: MainProcess, tmp_path: Path) -> None:
    assert svc.spool.ids() == []
    assert sorted(p.name for p in (tmp_path / "queue" / "msg").iterdir()) == []
    assert tmp_leftovers(tmp_path / "queue") == []


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert bad == [], [r.getMessage() for r in bad]


# (what the client sends at MAIL FROM, the reply's first 9 bytes)
BAD_SENDERS = [
    (b"MAIL FROM:<\r\n", b"501 5.1.7"),  # IndexError inside the email header parser
    (b'MAIL FROM:<"\r\n', b"501 5.1.7"),  # IndexError too
    (b"MAIL FROM:<a@[\r\n", b"501 5.1.7"),  # AttributeError
    (b"MAIL FROM:a@\r\n", b"501 5.1.7"),
    (b"MAIL FROM:<@>\r\n", b"501 5.1.7"),
    (b"MAIL FROM:<\xff\xfe@business.com>\r\n", b"553 5.1.7"),  # invalid UTF-8
    (b"MAIL FROM:<\xff\xfe@business.com> SMTPUTF8\r\n", b"553 5.1.7"),
    (b"MAIL FROM:<a@business.\xc3>\r\n", b"553 5.1.7"),  # a truncated sequence
    ("MAIL FROM:<jörg@business.com>\r\n".encode(), b"553 5.6.7"),  # no SMTPUTF8
]

BAD_RECIPIENTS = [
    (b"RCPT TO:<\r\n", b"501 5.1.3"),
    (b'RCPT TO:<"\r\n', b"501 5.1.3"),
    (b"RCPT TO:<x@[\r\n", b"501 5.1.3"),
    (b"RCPT TO:<\xff@example.com>\r\n", b"553 5.1.3"),
    ("RCPT TO:<jörg@example.com>\r\n".encode(), b"553 5.6.7"),  # transaction without SMTPUTF8
]


@pytest.mark.parametrize(("line", "reply"), BAD_SENDERS)
async def test_bad_sender_gets_its_reply(cfg: Path, upstream: Upstream, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture, line: bytes,
                                         reply: bytes) -> None:
    caplog.set_level(logging.INFO)
    async with run_service(cfg) as svc:
        port = service_port(svc)
        replies = await smtp_exchange(port, [
            b"EHLO client\r\n", line, b"RCPT TO:<x@example.com>\r\n", b"DATA\r\n", b"QUIT\r\n"])
        assert replies[2][:9] == reply, replies[2]
        assert replies[3].startswith(b"503")  # no transaction was started
        assert replies[4].startswith(b"503")
        assert replies[5].startswith(b"221")
        nothing_stored(svc, tmp_path)
        await send(port, "ok@business.com", ["x@example.com"], message())
        await wait_for(lambda: len(upstream.messages) == 1)
    no_tracebacks(caplog)


@pytest.mark.parametrize(("line", "reply"), BAD_RECIPIENTS)
async def test_bad_recipient_gets_its_reply(cfg: Path, upstream: Upstream, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture, line: bytes,
                                            reply: bytes) -> None:
    caplog.set_level(logging.INFO)
    async with run_service(cfg) as svc:
        port = service_port(svc)
        replies = await smtp_exchange(port, [
            b"EHLO client\r\n", b"MAIL FROM:<a@business.com>\r\n", line, b"DATA\r\n",
            b"QUIT\r\n"])
        assert replies[2].startswith(b"250 2.1.0")
        assert replies[3][:9] == reply, replies[3]
        assert replies[4].startswith(b"503")  # no valid recipient, so no DATA
        nothing_stored(svc, tmp_path)
        await send(port, "ok@business.com", ["x@example.com"], message())
        await wait_for(lambda: len(upstream.messages) == 1)
    no_tracebacks(caplog)


async def test_bad_recipient_leaves_the_good_ones(cfg: Path, upstream: Upstream) -> None:
    """An invalid recipient is refused alone; the message goes to the valid one."""
    async with run_service(cfg) as svc:
        replies = await smtp_exchange(service_port(svc), [
            b"EHLO client\r\n", b"MAIL FROM:<a@business.com>\r\n",
            b"RCPT TO:<\xff\xfe@example.com>\r\n", b"RCPT TO:<good@example.com>\r\n",
            b"DATA\r\n", message() + b".\r\n", b"QUIT\r\n"])
        assert replies[3].startswith(b"553 5.1.3")
        assert replies[4].startswith(b"250 2.1.5")
        assert replies[6].startswith(b"250 2.0.0")
        await wait_for(lambda: len(upstream.messages) == 1)
    assert upstream.messages[0].rcpt_tos == ["good@example.com"]


async def test_utf8_addresses_with_smtputf8_are_accepted(cfg: Path) -> None:
    async with run_service(cfg) as svc:
        replies = await smtp_exchange(service_port(svc), [
            b"EHLO client\r\n", "MAIL FROM:<jörg@business.com> SMTPUTF8\r\n".encode(),
            "RCPT TO:<zoë@example.com>\r\n".encode(), b"RSET\r\n"])
    assert replies[2].startswith(b"250 2.1.0")
    assert replies[3].startswith(b"250 2.1.5")


async def test_kelvin_sign_does_not_fold_to_k(cfg: Path, tmp_path: Path) -> None:
    """str.lower() makes U+212A KELVIN SIGN a k: `\u212aate@corp.test` must not take
    kate@corp.test's route. ASCII case still folds."""
    async with run_service(cfg) as svc:
        replies = await smtp_exchange(service_port(svc), [
            b"EHLO client\r\n", "MAIL FROM:<\u212aate@corp.test> SMTPUTF8\r\n".encode(),
            b"MAIL FROM:<KATE@Corp.Test>\r\n", b"QUIT\r\n"])
        assert replies[2].startswith(b"550 5.7.1 "), replies[2]
        assert replies[3].startswith(b"250 2.1.0 ")
        nothing_stored(svc, tmp_path)


def test_router_folds_ascii_only(cfg: Path) -> None:
    router = Router(load_config(cfg).routes)
    assert normalize("\u212aATE@Corp.TEST") == "\u212aate@corp.test"
    assert router.lookup("\u212aate@corp.test") is None
    route = router.lookup("Kate@CORP.test")
    assert route is not None and route.name == "kate"
    # Non-ASCII letters match a pattern exactly, as written.
    staff = router.lookup("\u00c9milie@business.com")  # through *@business.com
    assert staff is not None and staff.name == "staff"


def test_plain_path_fast_path_gives_the_parsers_answer() -> None:
    """RelaySMTP._getaddr reads `<local@domain>` with a regular expression instead of the
    email package's parser: for every input the expression takes, the answer is the
    parser's (address and the rest of the line)."""
    import random
    from email._header_value_parser import get_angle_addr

    from relayd.smtpaddr import plain_path

    rng = random.Random(9)
    alphabet = "abcdefgh.......-_+=!#$%&'*/?^`{|}~09@@@ <>\"()[],;:\\\t\xe9"
    tails = ["", " ", " SIZE=10", "  BODY=8BITMIME", "x", "(c)", " (c) SIZE=1", "\t"]
    taken = 0
    for _ in range(20_000):
        if rng.random() < 0.5:  # mostly well formed: dot-atoms around one @
            def atoms() -> str:
                return ".".join("".join(rng.choice("ab0-_+=!#$%&'*/?^`{|}~")
                                        for _ in range(rng.randrange(1, 5)))
                                for _ in range(rng.randrange(1, 3)))
            inner = atoms() + "@" + atoms()
        else:
            inner = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 14)))
        arg = rng.choice(["", " "]) + "<" + inner + ">" + rng.choice(tails)
        fast = plain_path(arg)
        if fast is None:
            continue
        taken += 1
        address, rest = get_angle_addr(arg)
        assert fast == (address.addr_spec, rest), arg
    assert taken > 500
