"""The decision after an attempt (relayd.qmgr.outcome.decide), on a fake clock: no I/O."""

from __future__ import annotations

import pytest

from relayd.delivery import RecipientResult, Status
from relayd.delivery.agent import Report
from relayd.qmgr.outcome import NO_RESULT, Attempted, Policy, backoff_delay, decide
from relayd.reply import DAY_S, HOUR_S, Reply

POLICY = Policy(retry_min_s=60, retry_max_s=3600, max_age_s=5 * DAY_S)
T0 = 1_800_000_000.0  # the fake clock's "received"
A, B = "a@example.com", "b@example.com"


def msg(*pending: str, backoff: int = 0, is_bounce: bool = False,
        last: dict[str, Reply] | None = None) -> Attempted:
    return Attempted(list(pending or (A,)), T0, backoff, is_bounce, last or {})


def res(status: Status, code: int, text: str) -> RecipientResult:
    return RecipientResult.smtp(status, code, text)


OK = res(Status.DELIVERED, 250, "2.0.0 ok")
BUSY = res(Status.DEFERRED, 451, "4.3.0 busy")
UNKNOWN = res(Status.FAILED, 550, "5.1.1 no such user")


def test_delivered_failed_and_pending_per_recipient() -> None:
    out = decide(msg(A, B, "c@example.com"), Report({A: OK, B: UNKNOWN}), T0 + 10, POLICY)
    assert set(out.delivered) == {A}
    assert out.failed[B].status == "5.1.1" and out.failed[B].reply.smtp_code == 550
    assert out.pending == {"c@example.com": NO_RESULT}  # missing from the report: pending
    assert out.bounce and out.tried and not out.expired
    assert out.next_attempt == T0 + 10 + 60


@pytest.mark.parametrize(("backoff", "delay"), [(0, 60), (1, 120), (2, 240), (5, 1920),
                                                 (6, 3600), (20, 3600)])
def test_backoff_doubles_from_retry_min_to_retry_max(backoff: int, delay: float) -> None:
    out = decide(msg(backoff=backoff), Report({A: BUSY}), T0, POLICY)
    assert out.backoff == backoff + 1
    assert out.next_attempt == T0 + delay
    assert backoff_delay(backoff + 1, POLICY) == delay


def test_retry_after_wins_over_backoff_within_retry_max() -> None:
    assert decide(msg(backoff=4), Report({A: BUSY}, retry_after=7), T0, POLICY
                  ).next_attempt == T0 + 7
    assert decide(msg(), Report({A: BUSY}, retry_after=0), T0, POLICY).next_attempt == T0 + 1
    assert decide(msg(), Report({A: BUSY}, retry_after=99999), T0, POLICY
                  ).next_attempt == T0 + 3600


def test_max_age_expires_what_is_pending_with_4_4_7_and_the_last_reply() -> None:
    now = T0 + 5 * DAY_S + 1
    out = decide(msg(A, B), Report({A: OK, B: BUSY}), now, POLICY)
    assert set(out.delivered) == {A}
    assert out.expired and out.bounce and out.next_attempt is None and not out.pending
    failed = out.failed[B]
    assert failed.status == "4.4.7" and failed.reply.enhanced == "4.4.7"
    assert "expired after 120.0 hours" in failed.reply.text
    assert "451 4.3.0 busy" in failed.reply.text


def test_next_try_is_never_later_than_the_expiry() -> None:
    now = T0 + 5 * DAY_S - 30
    out = decide(msg(backoff=3), Report({A: BUSY}), now, POLICY)
    assert out.next_attempt == T0 + 5 * DAY_S


def test_a_bounce_is_never_bounced() -> None:
    out = decide(msg(is_bounce=True), Report({A: UNKNOWN}), T0, POLICY)
    assert A in out.failed and not out.bounce


def test_a_held_route_defers_without_a_try() -> None:
    down = Reply.smtp(None, "cannot connect to 127.0.0.1:25: refused")
    out = decide(msg(A, B, backoff=3), Report(held_s=42.5, held_reply=down), T0, POLICY)
    assert not out.tried and out.backoff == 3  # not counted, backoff unchanged
    assert out.pending == {A: down, B: down}
    assert out.next_attempt == T0 + 42.5
    assert not out.failed and not out.delivered


def test_a_held_route_still_expires_old_mail() -> None:
    out = decide(msg(), Report(held_s=10), T0 + 6 * DAY_S, POLICY)
    assert out.expired and out.failed[A].status == "4.4.7"


@pytest.mark.parametrize(("status", "code", "text", "not_before"), [
    (Status.FAILED, 554, "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException;"
     " Failed to process message due to a permanent exception", DAY_S),
    (Status.FAILED, 550, "5.4.5 Daily user sending limit exceeded.", DAY_S),
    (Status.FAILED, 550, "5.4.5 Daily user sending quota exceeded.", DAY_S),
    (Status.FAILED, 550, "5.7.30 Basic authentication is not supported for Client Submission",
     HOUR_S),
    (Status.DEFERRED, 535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is "
     "disabled for the Tenant.", HOUR_S),
    (Status.FAILED, 554, "Graph sendMail: 403 ErrorExceededMessageLimit: Cannot send mail",
     HOUR_S),
    (Status.FAILED, 554, "Graph sendMail: 400 MailboxConcurrency: too many", 0),
    (Status.FAILED, 554, "5.3.2 ErrorServerBusy: The server cannot service this request", 0),
])
def test_provider_replies_that_clear_by_themselves_defer(status: Status, code: int, text: str,
                                                         not_before: float) -> None:
    out = decide(msg(), Report({A: res(status, code, text)}), T0, POLICY)
    assert not out.failed and A in out.pending and not out.bounce
    assert out.next_attempt == T0 + max(not_before, 60)  # past retry_max when the row says so
    assert out.hints


def test_provider_quota_bounces_at_max_age() -> None:
    quota = res(Status.FAILED, 550, "5.4.5 Daily user sending limit exceeded.")
    out = decide(msg(), Report({A: quota}), T0 + 5 * DAY_S, POLICY)
    assert out.expired and out.failed[A].status == "4.4.7"
    assert "Daily user sending limit" in out.failed[A].reply.text


def test_dsn_status_follows_the_outcome_class() -> None:
    assert Reply.smtp(550, "5.1.1 no").status(permanent=True) == "5.1.1"
    assert Reply.smtp(550, "no enhanced code").status(permanent=True) == "5.0.0"
    # an enhanced code of the other class never goes next to "failed"
    assert Reply.smtp(451, "4.3.0 busy").status(permanent=True) == "5.0.0"
    assert Reply(None, None, "x", "graph").status(permanent=False) == "4.0.0"
