"""relayd.qmgr.pacing: the per-mailbox rate and budget decisions, on a fake clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from relayd.config import (
    NO_RATE,
    EwsSettings,
    GraphSettings,
    OAuthSettings,
    RateLimit,
    RouteConfig,
    SmtpSettings,
    UpstreamSettings,
    load_config,
)
from relayd.errors import ConfigError
from relayd.qmgr import pacing
from relayd.qmgr.pacing import GO, Ledger, Limits, TooMany, Usage, WaitBudget, WaitRate, decide
from relayd.reply import Reply, reinterpret

T0 = 1_800_000_000.0  # a fake clock's epoch seconds


def route(settings: UpstreamSettings, **kw: object) -> RouteConfig:
    return RouteConfig("r", ("*",), settings, **kw)  # type: ignore[arg-type]


APP = OAuthSettings("app-id")


def test_rate_spaces_messages_evenly_and_never_catches_up() -> None:
    limits = Limits(RateLimit(30, 60.0), 0)
    usage = Usage()
    assert decide(usage, limits, 1, T0) == GO
    pacing.take(usage, limits, 1, T0)
    assert decide(usage, limits, 1, T0 + 1.0) == WaitRate(T0 + 2.0)
    assert decide(usage, limits, 1, T0 + 2.0) == GO
    pacing.take(usage, limits, 1, T0 + 2.0)
    # A slot taken late (the timer fired 10 s after it) is not followed by a burst.
    pacing.take(usage, limits, 1, T0 + 14.0)
    assert decide(usage, limits, 1, T0 + 15.0) == WaitRate(T0 + 16.0)


def test_budget_defers_until_the_oldest_counts_leave_the_window() -> None:
    limits = Limits(None, 50)
    usage = Usage()
    for i in range(50):
        assert decide(usage, limits, 1, T0 + i) == GO
        reserved = pacing.take(usage, limits, 1, T0 + i)
        pacing.settle(usage, reserved, 1, T0 + i)
    wait = decide(usage, limits, 1, T0 + 60)
    assert isinstance(wait, WaitBudget)
    assert (wait.used, wait.budget) == (50, 50)
    width = pacing.WINDOW_S / pacing.BUCKETS
    # Never earlier than a day after the first count; at most a bucket's width later.
    assert T0 + pacing.WINDOW_S <= wait.until <= T0 + pacing.WINDOW_S + width
    assert decide(usage, limits, 1, wait.until) == GO
    assert usage.used(T0 + 2 * pacing.WINDOW_S) == 0


def test_recipients_under_way_count_and_undelivered_ones_are_refunded() -> None:
    limits = Limits(None, 10)
    usage = Usage()
    first = pacing.take(usage, limits, 6, T0)
    assert isinstance(decide(usage, limits, 5, T0), WaitBudget)  # 6 under way + 5 > 10
    pacing.settle(usage, first, 2, T0 + 1)  # 4 of the 6 were not delivered
    assert usage.used(T0 + 1) == 2
    assert decide(usage, limits, 5, T0 + 1) == GO


def test_a_message_larger_than_the_whole_budget_is_too_many() -> None:
    assert decide(Usage(), Limits(None, 50), 51, T0) == TooMany(51, 50)
    reply = pacing.too_many_reply("big@business.com", "staff", TooMany(51, 50), pacing.WINDOW_S)
    assert reply.smtp_code == 550 and reply.enhanced == "5.5.3"
    assert "mailbox_daily_recipients" in reply.text and "50" in reply.text


def test_budget_comes_before_rate() -> None:
    limits = Limits(RateLimit(1, 60.0), 1)
    usage = Usage()
    pacing.settle(usage, pacing.take(usage, limits, 1, T0), 1, T0)
    assert isinstance(decide(usage, limits, 1, T0 + 1), WaitBudget)


def test_counts_survive_a_save_and_load(tmp_path: Path) -> None:
    ledger = Ledger()
    usage = ledger.of("a@business.com")
    usage.route = "staff"
    ledger.settle("a@business.com", pacing.take(usage, Limits(None, 50), 3, T0), 3, T0)
    assert ledger.dirty
    other = Ledger()
    other.load(ledger.to_json(T0 + 10), T0 + 10)
    assert other.usage["a@business.com"].used(T0 + 10) == 3
    assert other.usage["a@business.com"].route == "staff"
    late = Ledger()
    late.load(ledger.to_json(T0 + 10), T0 + 2 * pacing.WINDOW_S)
    assert late.usage == {}


@pytest.mark.parametrize(("settings", "kw", "expected"), [
    (GraphSettings(APP, endpoint="https://graph.microsoft.com"), {},
     (RateLimit(30, 60.0), 10_000)),
    (GraphSettings(APP, endpoint="https://127.0.0.1:8443"), {}, (None, 0)),
    (EwsSettings(server="outlook.office365.com"), {}, (RateLimit(30, 60.0), 10_000)),
    (EwsSettings(service_endpoint="https://mail.example/EWS/Exchange.asmx"), {}, (None, 0)),
    (SmtpSettings("smtp.office365.com", 25), {}, (RateLimit(30, 60.0), 10_000)),
    (SmtpSettings("smtp.gmail.com", 25), {}, (None, 2_000)),
    (SmtpSettings("smtp.azurecomm.net", 25), {}, (RateLimit(100, 3600.0), 0)),
    (SmtpSettings("smtp.office365.com", 25), {"mailbox_rate_limit": NO_RATE,
                                              "mailbox_daily_recipients": 0}, (None, 0)),
    (SmtpSettings("smtp.office365.com", 25), {"mailbox_daily_recipients": 500},
     (RateLimit(30, 60.0), 500)),
])
def test_provider_defaults_and_route_overrides(settings: UpstreamSettings, kw: dict[str, object],
                                               expected: tuple[object, int]) -> None:
    limits = pacing.limits_for(route(settings, **kw))
    assert (limits.rate, limits.daily_recipients) == expected


def test_config_keys(tmp_path: Path) -> None:
    def load(lines: str) -> object:
        path = tmp_path / "c.toml"
        path.write_text(f'[queue]\npath = "{tmp_path}/q"\n[routes.a]\nsenders = ["*"]\n'
                        f'upstream = "smtp"\nhost = "127.0.0.1"\ntls = "none"\n{lines}\n')
        return load_config(path).routes["a"]

    r = load('mailbox_rate_limit = "2/s"\nmailbox_daily_recipients = 50')
    assert isinstance(r, RouteConfig)
    assert r.mailbox_rate_limit == RateLimit(2, 1.0) and r.mailbox_daily_recipients == 50
    r = load("mailbox_rate_limit = 0\nmailbox_daily_recipients = 0")
    assert isinstance(r, RouteConfig) and r.mailbox_rate_limit == NO_RATE
    with pytest.raises(ConfigError) as e:
        load('mailbox_rate_limit = "fast"\nmailbox_daily_recipients = -1')
    assert "routes.a.mailbox_rate_limit" in str(e.value)
    assert "routes.a.mailbox_daily_recipients" in str(e.value)


@pytest.mark.parametrize("said", [
    "550 5.1.8 Access denied, bad outbound sender AS(42004)",
    "550 5.7.1 ErrorAccessDenied: the sending user is restricted from sending mail",
])
def test_a_blocked_mailbox_is_named_and_waits(said: str) -> None:
    code, _, text = said.partition(" ")
    reply = Reply.smtp(int(code), text)
    assert pacing.is_blocked(reply)
    meaning = reinterpret(reply)
    assert meaning is not None and "Remove-BlockedSenderAddress" in meaning.hint
    assert not pacing.is_blocked(Reply.smtp(550, "5.7.1 ErrorSendAsDenied: not allowed"))
