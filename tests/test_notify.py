"""[notify]: a real relayd mails the admin through the route of notify.sender when something
needs a person, once per condition per repeat, across restarts, and never about its own notices."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import re
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import pytest
from conftest import (
    Received,
    Upstream,
    dead_port,
    message,
    run_service,
    send,
    service_port,
    smtp_route,
    wait_for,
    write_config,
)

from relayd import notify
from relayd.auth import TokenHealth
from relayd.config import load_config
from relayd.delivery import make_upstream
from relayd.errors import QueueError
from relayd.notify import NOTICE_HEADER, Notifier, duration
from relayd.qmgr import QueueManager
from relayd.queue import FAILED, Entry, RecipientState, Spool

ALICE, BOB, NOBODY = "alice@business.com", "bob@example.com", "nobody@example.com"
ADMIN, SENDER = "it@business.com", "relayd@business.com"
UNKNOWN_USER = "550 5.1.1 <nobody@example.com>: no such user"
SUBJECT = "relayd on relay.test: "


@pytest.fixture(autouse=True)
def fast_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notify, "NOTIFY_CHECK_S", 0.1)


def config(tmp_path: Path, staff_port: int, admin_port: int, notify_extra: str = "",
           routes: str = "", extra: str = "") -> Path:
    """Route staff (*@business.com) and route system (notify.sender) to the admin's upstream."""
    return write_config(
        tmp_path, smtp_route("staff", '["*@business.com"]', staff_port)
        + smtp_route("system", f'["{SENDER}"]', admin_port) + routes,
        extra=f'{extra}\n[notify]\nto = ["{ADMIN}"]\nsender = "{SENDER}"\n{notify_extra}')


def notices(up: Upstream) -> list[EmailMessage]:
    out = []
    for m in up.messages:
        if m.mail_from == SENDER:
            assert m.rcpt_tos == [ADMIN]
            msg = email.message_from_bytes(m.data, policy=email.policy.default)
            assert isinstance(msg, EmailMessage)
            out.append(msg)
    return out


def body(msg: EmailMessage) -> str:
    part = msg.get_body(("plain",))
    assert part is not None
    text = part.get_content()
    assert isinstance(text, str)
    return text


def bounces(up: Upstream) -> list[Received]:
    return [m for m in up.messages if m.mail_from == ""]


async def test_unreachable_route_one_notice_and_none_after_restart(
        tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    """1. route staff's upstream refuses connections 2. a message waits on it 3. past the
    threshold exactly one notice reaches the admin through route system 4. restart within
    repeat: the route fails again past the threshold, and no second notice."""
    monkeypatch.setattr(notify, "ROUTE_FAILING_AFTER_S", 1.0)
    port = dead_port()
    cfg = config(tmp_path, port, upstream.port)
    async with run_service(cfg) as service:
        assert await send(service_port(service), ALICE, [BOB], message()) == {}
        await wait_for(lambda: len(notices(upstream)) == 1, what="the notice")
        [notice] = notices(upstream)
        assert notice["Subject"] == SUBJECT + "route staff cannot reach its upstream"
        assert notice["From"] == SENDER and notice["To"] == ADMIN
        assert notice[NOTICE_HEADER] == "route:staff:unreachable"
        text = body(notice)
        assert f"127.0.0.1:{port}" in text
        assert "relayd queue retry --all" in text and "relayd queue list" in text
        assert "Since: " in text and "1 message(s) are waiting" in text
        await asyncio.sleep(1.0)  # ten more checks
        assert len(notices(upstream)) == 1
    state = json.loads((tmp_path / "notify-state.json").read_text())
    assert "route:staff:unreachable" in state["sent"]

    async with run_service(cfg) as service:

        def failing_long() -> bool:
            stats = service.qmgr.view.route_stats().get("staff")
            since = stats.failing_since if stats else None
            return since is not None and time.time() - since > 1.5

        await wait_for(failing_long, what="route staff failing past the threshold again")
        await asyncio.sleep(0.5)
        assert len(notices(upstream)) == 1


async def test_bounces_are_reported_and_summarised_once_per_repeat(
        tmp_path: Path, upstream: Upstream, upstream2: Upstream) -> None:
    """1. staff's upstream refuses a recipient 2. the bounce goes to the sender, a notice to
    the admin (queue id, sender, recipient, reply) 3. two more bounces within repeat: no notice
    4. after repeat one notice counts both."""
    upstream.handler.rcpt_replies[NOBODY] = UNKNOWN_USER
    cfg = config(tmp_path, upstream.port, upstream2.port, 'repeat = "4s"')
    async with run_service(cfg) as service:
        assert await send(service_port(service), ALICE, [NOBODY], message(to=NOBODY)) == {}
        await wait_for(lambda: len(notices(upstream2)) == 1, what="the bounce notice")
        first = time.monotonic()
        [bounce] = bounces(upstream)
        assert bounce.rcpt_tos == [ALICE]
        match = re.search(rb"queue id (\w+)", bounce.data)
        assert match is not None
        qid = match.group(1).decode()
        [notice] = notices(upstream2)
        assert notice["Subject"] == SUBJECT + "1 bounce(s) sent on route staff"
        text = body(notice)
        assert f"- {qid} from <{ALICE}>" in text
        assert f"<{NOBODY}>: 550 5.1.1" in text and "relayd log --id" in text

        for i in range(2):
            await send(service_port(service), ALICE, [NOBODY], message(to=NOBODY,
                                                                       subject=f"again {i}"))
        await wait_for(lambda: len(bounces(upstream)) == 3, what="two more bounces")
        await asyncio.sleep(0.3)
        if time.monotonic() - first < 3.5:
            assert len(notices(upstream2)) == 1  # within repeat: remembered, not sent
        await wait_for(lambda: len(notices(upstream2)) == 2, what="the summary after repeat")
        summary = notices(upstream2)[1]
        assert summary["Subject"] == SUBJECT + "2 bounce(s) sent on route staff"
        assert body(summary).count(f"<{NOBODY}>: 550 5.1.1") == 2


async def test_a_notice_that_bounces_is_not_reported(tmp_path: Path, upstream: Upstream,
                                                      upstream2: Upstream) -> None:
    """1. a bounce on staff 2. its notice is refused by the admin's upstream (550) 3. the
    notice's bounce goes to notify.sender 4. no notice about that, then or later."""
    upstream.handler.rcpt_replies[NOBODY] = UNKNOWN_USER
    upstream2.handler.rcpt_replies[ADMIN] = "550 5.1.1 <it@business.com>: no such user"
    cfg = config(tmp_path, upstream.port, upstream2.port, 'repeat = "1s"')
    async with run_service(cfg) as service:
        assert await send(service_port(service), ALICE, [NOBODY], message(to=NOBODY)) == {}
        await wait_for(lambda: len(bounces(upstream2)) == 1, what="the notice's bounce")
        [notice_bounce] = bounces(upstream2)
        assert notice_bounce.rcpt_tos == [SENDER]
        assert NOTICE_HEADER.encode() in notice_bounce.data  # the original's headers
        await asyncio.sleep(2.5)  # past repeat, many checks
        assert service.notifier is not None
        assert set(service.notifier.state.sent) <= {"bounce:staff"}
        assert not service.notifier.state.bounces
        assert len(bounces(upstream2)) == 1 and not notices(upstream2)
        await wait_for(lambda: not service.qmgr.view.count(), what="an empty queue")


async def test_message_deferred_longer_than_deferred_after(tmp_path: Path,
                                                           upstream: Upstream) -> None:
    """1. staff's upstream down 2. a message waits longer than deferred_after = 2s 3. one
    notice names it and the commands to look at it."""
    cfg = config(tmp_path, dead_port(), upstream.port, 'deferred_after = "2s"')
    async with run_service(cfg) as service:
        assert await send(service_port(service), ALICE, [BOB], message()) == {}
        [qid] = service.qmgr.view.ids()
        await wait_for(lambda: len(notices(upstream)) == 1, what="the deferred notice")
        [notice] = notices(upstream)
        assert notice["Subject"] == (SUBJECT + "1 message(s) deferred for more than 2s on "
                                     "route staff")
        text = body(notice)
        assert f"{qid} from <{ALICE}>" in text
        assert "relayd queue list" in text and f"relayd queue show {qid}" in text
        await asyncio.sleep(1.0)
        assert len(notices(upstream)) == 1


def oauth_routes(cert: Path) -> str:
    return f"""
[routes.app]
senders = ["app@business.com"]
upstream = "graph"
tenant_id = "tenant"
client_id = "app-client"
client_secret_env = "NOTIFY_TEST_SECRET"
client_secret_expires = "2099-01-01"

[routes.certapp]
senders = ["cert@business.com"]
upstream = "graph"
tenant_id = "tenant"
client_id = "cert-client"
certificate_file = "{cert}"
thumbprint = "00"

[routes.people]
senders = ["*@people.business.com"]
upstream = "graph"
tenant_id = "tenant"
client_id = "people-client"
flow = "device"
"""


async def test_token_health_sign_in_secret_and_certificate(
        tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker given TokenHealth values: a user who must sign in again, a client secret
    expiring in 5 days, a certificate expiring in 10: one notice each, none again in repeat."""
    monkeypatch.setenv("NOTIFY_TEST_SECRET", "s3cret")
    cert = tmp_path / "app.pem"
    cert.write_text("not read by this test\n")
    cfg = config(tmp_path, upstream.port, upstream.port, routes=oauth_routes(cert))
    now = time.time()
    health = [
        TokenHealth("people", "carol@people.business.com", needs_signin=True,
                    problem="AADSTS70043: The refresh token has expired",
                    fix="relayd auth login people --user carol@people.business.com"),
        TokenHealth("app", "", credential_expires_at=now + 5 * 86400),
        TokenHealth("certapp", "", credential_expires_at=now + 10 * 86400),
        TokenHealth("app", "", expires_at=now + 3600),  # healthy: nothing to say
    ]
    async with run_service(cfg) as service:
        assert service.notifier is not None
        sent = await service.notifier.check(health)
        assert sorted(sent) == ["expiry:app", "expiry:certapp",
                                "signin:people:carol@people.business.com"]
        await wait_for(lambda: len(notices(upstream)) == 3, what="three notices")
        assert await service.notifier.check(health) == []
        by_key = {n[NOTICE_HEADER]: n for n in notices(upstream)}
        signin = by_key["signin:people:carol@people.business.com"]
        assert signin["Subject"] == (SUBJECT + "carol@people.business.com must sign in again "
                                     "(route people)")
        assert "relayd auth login people --user carol@people.business.com" in body(signin)
        assert "AADSTS70043" in body(signin)
        secret = by_key["expiry:app"]
        assert secret["Subject"] == SUBJECT + "the client secret of route app expires in 5 days"
        assert 'routes.app.client_secret_expires = "YYYY-MM-DD"' in body(secret)
        certificate = by_key["expiry:certapp"]
        assert certificate["Subject"] == (SUBJECT + "the client certificate of route certapp "
                                          "expires in 10 days")
        assert "routes.certapp.certificate_file" in body(certificate)
        await asyncio.sleep(0.5)
        assert len(notices(upstream)) == 3


def test_duration_words() -> None:
    assert duration(2) == "2s"
    assert duration(15 * 60) == "15m"
    assert duration(3725) == "1h 2m"
    assert duration(5 * 86400 - 3) == "5 days"


def test_authentication_failure_says_how_to_sign_in() -> None:
    from relayd.delivery.agent import RouteStats
    from relayd.notify import route_conditions

    now = time.time()
    stats = {"people": RouteStats(failing_since=now - 1000, failing_kind="authentication",
                                  last_failure_reply="535 5.7.3 Authentication unsuccessful"),
             "fresh": RouteStats(failing_since=now - 60, failing_kind="unreachable")}
    [cond] = route_conditions(stats, {}, {"people": (3, 3, now - 1000)}, now, 900)
    assert cond.key == "route:people:authentication"
    assert cond.subject == "route people is failing authentication"
    assert "relayd auth login people --user ADDRESS" in cond.body
    assert "535 5.7.3 Authentication unsuccessful" in cond.body
    assert "3 message(s) are waiting" in cond.body


BASE = {"queue": {"path": "/tmp/relayd-notify-test"},
        "routes": {"system": {"senders": [SENDER], "upstream": "smtp", "host": "127.0.0.1",
                              "port": 25, "tls": "none", "recipients": ["*@business.com"]}}}


def test_config_defaults() -> None:
    from relayd.config import parse_config

    cfg = parse_config({**BASE, "notify": {"to": [ADMIN], "sender": SENDER}})
    assert cfg.notify is not None
    assert (cfg.notify.to, cfg.notify.sender) == ((ADMIN,), SENDER)
    assert (cfg.notify.deferred_after_s, cfg.notify.expiry_warning_s,
            cfg.notify.repeat_s) == (3600, 30 * 86400, 86400)
    assert parse_config(BASE).notify is None
    cfg = parse_config({**BASE, "notify": {"to": [ADMIN], "sender": SENDER, "repeat": "2h",
                                           "deferred_after": "2s", "expiry_warning": "7d"}})
    assert cfg.notify is not None
    assert (cfg.notify.deferred_after_s, cfg.notify.expiry_warning_s,
            cfg.notify.repeat_s) == (2, 7 * 86400, 7200)


def test_config_every_problem_with_its_key() -> None:
    from relayd.config import parse_config
    from relayd.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        parse_config({**BASE, "notify": {"to": ["not an address"], "sender": "who@nowhere.com",
                                         "repeat": "0s", "deferred_after": "soon", "cc": []}})
    assert e.value.problems == [
        "notify.to: 'not an address' is not an email address",
        "notify.deferred_after: must be a duration such as 30s, 5m, 1h or 5d",
        "notify.repeat: must be more than 0s",
        "notify.cc: unknown key",
        "notify.sender: 'who@nowhere.com' matches no route's senders; notices go out through "
        "the sender's route",
    ]
    with pytest.raises(ConfigError) as e:
        parse_config({**BASE, "notify": {"to": ["it@elsewhere.com"], "sender": SENDER}})
    assert e.value.problems == ["notify.to: 'it@elsewhere.com' is not allowed by "
                                "routes.system.recipients, the route of notify.sender"]
    with pytest.raises(ConfigError) as e:
        parse_config({**BASE, "notify": {}})
    assert [p.split(":")[0] for p in e.value.problems] == ["notify.to", "notify.sender"]


def test_one_expiry_notice_per_app_not_per_user() -> None:
    from relayd.notify import token_conditions

    now = time.time()
    health = [TokenHealth("people", f"u{i}@business.com", credential_expires_at=now + 86400)
              for i in range(3)]
    [cond] = token_conditions(health, {}, now, 30 * 86400)
    assert cond.key == "expiry:people"
    assert cond.subject == "the client secret of route people expires in 1d"


def certificate_expiring(path: Path, days: float) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relayd app")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=days)).sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    path.chmod(0o600)


async def test_token_health_end_to_end(tmp_path: Path, upstream: Upstream,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With the routes' own token health (relayd.auth.health): a client_secret_expires in 5
    days and a certificate that expires in 10, on idle Graph routes: one notice each, from the
    notifier's own loop."""
    pytest.importorskip("relayd.auth.health")
    import datetime as dt

    monkeypatch.setenv("NOTIFY_TEST_SECRET", "s3cret")
    cert = tmp_path / "app.pem"
    certificate_expiring(cert, 10.2)
    day = (dt.datetime.now(dt.UTC) + dt.timedelta(days=5.5)).date().isoformat()
    routes = oauth_routes(cert).replace('client_secret_expires = "2099-01-01"',
                                        f'client_secret_expires = "{day}"')
    cfg = config(tmp_path, upstream.port, upstream.port, routes=routes,
                 extra=f'[auth]\npath = "{tmp_path / "tokens"}"\n')
    async with run_service(cfg):
        await wait_for(lambda: len(notices(upstream)) == 2, what="two expiry notices")
        by_key = {n[NOTICE_HEADER]: n for n in notices(upstream)}
        assert set(by_key) == {"expiry:app", "expiry:certapp"}
        assert by_key["expiry:app"]["Subject"].startswith(
            SUBJECT + "the client secret of route app expires in ")
        assert by_key["expiry:certapp"]["Subject"] == (
            SUBJECT + "the client certificate of route certapp expires in 10 days")
        await asyncio.sleep(0.5)
        assert len(notices(upstream)) == 2


async def test_revoked_refresh_token_one_notice_none_after_restart(
        tmp_path: Path, upstream: Upstream) -> None:
    """1. alice signs in to the delegated Graph route 2. her refresh token is revoked 3. her
    message is deferred 4. exactly one notice (sign in again, with the command) reaches the
    admin through route system 5. restart within repeat: still deferred, no second notice."""
    pytest.importorskip("relayd.auth.health")
    import io

    from test_auth_login import login_env

    from relayd.auth.oauth import login

    with login_env(tmp_path) as env:
        auth = (f'[auth]\npath = "{tmp_path / "tokens"}"\n'
                f'key_file = "{tmp_path / "token.key"}"\n')
        cfg = write_config(tmp_path, env.route_toml() + smtp_route(
            "system", f'["{SENDER}"]', upstream.port),
            extra=f'{auth}\n[notify]\nto = ["{ADMIN}"]\nsender = "{SENDER}"\n')
        env.idp.device_user = ALICE
        out = io.StringIO()
        assert await asyncio.to_thread(login, load_config(cfg), "m365", ALICE, out) == 0
        env.idp.revoke_user(ALICE)
        with env.idp.lock:
            env.idp.access_tokens.clear()
        key = f"signin:m365:{ALICE}"
        msg = f"From: {ALICE}\r\nTo: bob@example.net\r\nSubject: x\r\n\r\nx\r\n".encode()
        for restart in (False, True):
            async with run_service(cfg) as service:
                if not restart:
                    assert await send(service_port(service), ALICE, ["bob@example.net"],
                                      msg) == {}
                await wait_for(lambda: any(q.attempts and q.state == "deferred"
                                           for q in service.qmgr.view.messages()),
                               what="alice's message deferred")
                if not restart:
                    await wait_for(lambda: len(notices(upstream)) == 1, what="the notice")
                await asyncio.sleep(1.0)  # ten checks
                assert [n[NOTICE_HEADER] for n in notices(upstream)] == [key]
        [notice] = notices(upstream)
        assert notice["Subject"] == SUBJECT + f"{ALICE} must sign in again (route m365)"
        assert f"relayd auth login m365 --user {ALICE}" in body(notice)
        assert env.graph.sent == []  # neither the message nor a bounce


class FakeIntake:
    """Stands in for the intake in the checker's unit tests: records what it is given, or fails
    as a full disk would, and can run something while a notice is being stored."""

    def __init__(self) -> None:
        self.notices: list[tuple[str, list[str], bytes]] = []
        self.fail = 0
        self.during: list[Callable[[], None]] = []

    async def store(self, sender: str, recipients: list[str], data: bytes,
                     mail_options: list[str], client: str, route: str) -> Entry:
        assert client == notify.NOTICE_CLIENT and route == "system"
        while self.during:
            self.during.pop()()
        if self.fail:
            self.fail -= 1
            raise QueueError("no space left on device")
        self.notices.append((sender, recipients, data))
        return Entry(id=f"N{len(self.notices)}", sender=sender, recipients=recipients,
                     received=time.time(), client=client)


def checker(tmp_path: Path, clock: list[float], health: list[TokenHealth],
            intake: FakeIntake) -> Notifier:
    cfg = load_config(config(tmp_path, 25, 25, 'repeat = "1h"'))
    qmgr = QueueManager(cfg, Spool(cfg.queue.path), make_upstream)
    return Notifier(cfg, qmgr, intake,  # type: ignore[arg-type]
                    clock=lambda: clock[0], token_health=lambda: health)


async def test_once_per_repeat_clears_and_comes_back_and_survives_restarts(
        tmp_path: Path) -> None:
    """Fake clock: reported once; cleared and back within repeat: nothing; after repeat:
    again. A new checker on the same state file remembers; a notice that cannot be stored is
    tried at the next check."""
    clock = [1_000_000.0]
    needs = [TokenHealth("staff", ALICE, needs_signin=True, problem="invalid_grant")]
    health: list[TokenHealth] = list(needs)
    intake = FakeIntake()
    n = checker(tmp_path, clock, health, intake)
    assert await n.check() == [f"signin:staff:{ALICE}"]
    clock[0] += 600
    assert await n.check() == []
    health.clear()  # signed in again
    clock[0] += 600
    assert await n.check() == []
    health.extend(needs)  # and lapsed again, within repeat
    clock[0] += 600
    assert await n.check() == []
    again = checker(tmp_path, clock, health, intake)  # a restart
    assert await again.check() == []
    clock[0] += 1800
    intake.fail = 1
    assert await again.check() == []  # could not be stored: logged, not recorded
    assert await again.check() == [f"signin:staff:{ALICE}"]
    assert len(intake.notices) == 2


async def test_bounces_arriving_while_a_notice_is_stored_wait_for_the_next(
        tmp_path: Path) -> None:
    clock = [1_000_000.0]
    intake = FakeIntake()
    n = checker(tmp_path, clock, [], intake)

    def bounced(i: int) -> None:
        original = Entry(id=f"Q{i}", sender=ALICE, recipients=[NOBODY], received=clock[0],
                         rcpt={NOBODY: RecipientState(FAILED, 550, "5.1.1 no such user")})
        bounce = Entry(id=f"B{i}", sender="", recipients=[ALICE], received=clock[0],
                       bounce_for=original.id, bounce_rcpts=[NOBODY])
        n.on_bounce(original, bounce)

    bounced(1)
    intake.during.append(lambda: bounced(2))
    assert await n.check() == ["bounce:staff"]
    assert b"- Q1 from <alice@business.com> (bounce B1):" in intake.notices[0][2]
    assert b"Q2" not in intake.notices[0][2]
    assert [b["id"] for b in n.state.bounces["staff"]] == ["Q2"]
    clock[0] += 3600
    assert await n.check() == ["bounce:staff"]
    assert b"1 bounce(s) sent on route staff" in intake.notices[1][2]
    assert b"<nobody@example.com>: 550 5.1.1 no such user" in intake.notices[1][2]
    assert not n.state.bounces


def test_listener_workers_do_not_notify(tmp_path: Path) -> None:
    """The checker runs where the queue manager does: the main process, not its workers."""
    from relayd.app import MainProcess
    from relayd.service import ListenerWorker

    cfg = load_config(config(tmp_path, 25, 25))
    main = MainProcess(cfg)
    assert main.notifier is not None and main.qmgr.on_bounce == main.notifier.on_bounce
    assert getattr(ListenerWorker(cfg, report=lambda line: None), "notifier", None) is None


async def test_a_wrong_upstream_password_is_deferred_and_said_once_loudly(
        tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    """The decision for 535 5.7.8 (a wrong password): deferred, as Postfix does, until
    queue.max_age; said once, loudly: 1. three messages, each tried and refused at AUTH
    2. one ERROR line for the run of failures naming the decision and the fix 3. the status
    page's "Needs attention" and the route's row say it 4. one notice, at once (not after
    the 15 minutes an unreachable upstream waits), saying it too."""
    from typing import Any

    from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

    from relayd.web.pages import status_page

    def refuse(server: SMTP, session: Session, envelope: Envelope, mechanism: str,
               auth_data: Any) -> AuthResult:
        return AuthResult(success=False, handled=False,
                          message="535 5.7.8 Error: authentication failed")

    wrong = Upstream(auth_require_tls=False, authenticator=refuse)
    await wrong.start()
    secret = tmp_path / "pw"
    secret.write_text("wrong\n")
    secret.chmod(0o600)
    cfg = write_config(
        tmp_path, smtp_route("staff", '["*@business.com"]', wrong.port,
                             f'username = "{ALICE}"\npassword_file = "{secret}"')
        + smtp_route("system", f'["{SENDER}"]', upstream.port),
        queue='retry_min = "1s"\nretry_max = "1s"',
        extra=f'[notify]\nto = ["{ADMIN}"]\nsender = "{SENDER}"\n')
    try:
        async with run_service(cfg) as svc:
            for i in range(3):
                await send(service_port(svc), ALICE, [BOB], message(subject=f"m{i}"))
            await wait_for(lambda: sum(q.entry.attempts for q in svc.qmgr.view.messages()
                                       if q.entry.sender == ALICE) >= 5, what="tried again")
            page = status_page(await svc.web_snapshot()).decode()
            await wait_for(lambda: len(notices(upstream)) == 1, what="the notice")
            # The notice is queued mail too: it is in the queue until relayd reads the 250.
            await wait_for(lambda: all(q.entry.sender == ALICE
                                       for q in svc.qmgr.view.messages()),
                           what="the notice's 250 read")
            await asyncio.sleep(0.5)  # further checks send nothing more
            assert all(q.entry.attempts for q in svc.qmgr.view.messages())
    finally:
        await wrong.stop()
    loud = [r for r in caplog.records if r.levelname == "ERROR"
            and "as Postfix does" in r.getMessage()]
    assert len(loud) == 1, [r.getMessage() for r in loud]
    text = loud[0].getMessage()
    assert "535 5.7.8" in text and "queue.max_age" in text and "routes.staff" in text
    assert "relayd queue retry --all" in text
    assert "Needs attention" in page and "as Postfix does" in page
    [notice] = notices(upstream)
    assert notice["Subject"] == SUBJECT + "route staff is failing authentication"
    assert "as Postfix does" in body(notice) and "queue.max_age" in body(notice)
    assert wrong.messages == []
