"""After an attempt: the decision (relayd.qmgr.outcome.decide) carried out, in a fixed order.

The manager carries a decision out in a fixed order, so that a crash at any point loses
nothing: (1) store the bounce for new failures (durably; its envelope names the message and
recipients it reports), (2) record the recipients' new state, (3) remove the message once
nothing is pending, (4) hand the bounce on for delivery. A bounce that cannot be stored leaves
the failure unrecorded and the message where it is, to be tried again after `retry_min`; a
bounce that cannot be built at all moves the message to corrupt/ with the reason. Every removal
is one log line naming the queue id and why; every outcome is one journal event per reply.

`Settling` is a part of relayd.qmgr.manager.QueueManager (a mixin: the state is the manager's).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from relayd import crashpoint
from relayd.bounce import Failure, build_bounce
from relayd.config import Config, RouteConfig
from relayd.delivery.agent import Report
from relayd.delivery.doubt import DUPLICATE_RISK
from relayd.errors import QueueError
from relayd.journal import Journal
from relayd.qmgr.observer import Observer
from relayd.qmgr.outcome import Attempted, Outcome, Policy, decide
from relayd.qmgr.queued import _NO_FAILURES, Queued
from relayd.queue import DELIVERED, FAILED, Entry, RecipientState, Spool
from relayd.reply import Reply

log = logging.getLogger("relayd.qmgr.manager")


class Settling:
    """Deciding and carrying out, and the journal, for relayd.qmgr.manager.QueueManager."""

    config: Config
    spool: Spool
    journal: Journal | None
    observer: Observer
    clock: Callable[[], float]
    on_bounce: Callable[[Entry, Entry], None] | None
    _messages: dict[str, Queued]
    _deleted_by: dict[str, str]
    _budget_waits: dict[str, str]
    _active: int
    _idle: asyncio.Event

    if TYPE_CHECKING:
        @property
        def policy(self) -> Policy: ...
        def route_for(self, entry: Entry) -> RouteConfig | None: ...
        def submit(self, entry: Entry, data: bytes | None = None) -> None: ...
        def _release(self, queued: Queued) -> None: ...
        def _defer(self, queued: Queued, when: float) -> None: ...
        async def _read_head(self, entry: Entry) -> bytes: ...

    def _record(self, event: str, queued: Queued, route: RouteConfig | None,
                recipients: list[str], **fields: Any) -> None:
        if self.journal is None:
            return
        entry = queued.entry
        self.journal.record(event, entry.id, message_id=entry.message_id,
                            **{"from": entry.sender}, to=recipients,
                            route=route.name if route else entry.route,
                            upstream=route.upstream_name if route else "",
                            bounce_for=entry.bounce_for,
                            **fields)

    def _record_grouped(self, event: str, queued: Queued, route: RouteConfig | None,
                        replies: dict[str, Reply], **fields: Any) -> None:
        """One event per distinct reply (recipients refused alike share one line)."""
        groups: dict[str, list[str]] = {}
        for rcpt, reply in replies.items():
            groups.setdefault(str(reply), []).append(rcpt)
        for said, rcpts in groups.items():
            self._record(event, queued, route, rcpts, reply=said, **fields)

    async def _settle(self, queued: Queued, route: RouteConfig | None, report: Report,
                      started: float) -> None:
        """Decide, then carry the decision out. Always leaves the message deferred, removed or
        quarantined, and never active."""
        try:
            await self._carry_out(queued, route, report, time.monotonic() - started)
        except Exception:
            # A bug, not a disk problem (those are handled where they happen): keep the message
            # and try again later; on disk it is still the previous state, so nothing is lost.
            log.exception("%s: cannot record the attempt's outcome; next try in %ds", queued.id,
                          self.config.queue.retry_min_s)
            if queued.id in self._messages:
                self._defer(queued, self.clock() + self.config.queue.retry_min_s)
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    async def _carry_out(self, queued: Queued, route: RouteConfig | None,
                         report: Report, latency_s: float) -> None:
        entry = queued.entry
        route_name = route.name if route else (entry.route or "-")
        now = self.clock()
        if queued.deleted:
            self._forget(queued, "deleted by the admin")
            return
        recipients = queued.to_try()
        outcome = decide(Attempted(recipients, entry.received, entry.backoff, entry.is_bounce,
                                   queued.last_reply), report, now, self.policy)
        was_started, entry.started = entry.started, 0  # the attempt is reported; saved below
        earlier_doubt = entry.doubt
        doubt_note = self._note_doubt(entry, route, route_name, report, was_started,
                                      outcome.tried)
        self._apply(queued, route_name, outcome)
        self._journal_outcome(queued, route, outcome, round(latency_s, 3),
                              "found-in-sent-items" if report.found_in_sent else "delivered",
                              doubt=report.doubt if outcome.tried else "",
                              earlier_doubt=earlier_doubt if report.found_in_sent else "",
                              may_duplicate=bool(report.doubt) and not entry.started)
        bounce: Entry | None = None
        if queued.unbounced:
            if entry.is_bounce:
                # Never bounce a bounce: say it loudly instead.
                log.error("%s: bounce to <%s> could not be delivered and is dropped: %s",
                          entry.id, ", ".join(queued.unbounced),
                          "; ".join(str(f.reply) for f in queued.unbounced.values()))
                self._record_failed(queued)
            else:
                stored = await self._store_bounce(queued, route_name)
                if stored is None:
                    self._log_delivered(entry.id, route_name, _by_reply(outcome.delivered))
                    if queued.id in self._messages:  # kept for the bounce, not quarantined
                        await self._save_state(entry)
                    return
                bounce = stored
                crashpoint.reached("bounce-stored")
        self._release(queued)
        delivered = _by_reply(outcome.delivered)
        if not entry.pending():
            self._remove_done(queued, route_name, outcome, bounce, delivered)
        else:
            await self._keep_pending(queued, route_name, outcome, delivered, now, bool(
                outcome.tried or was_started or bounce is not None), doubt_note)
        if bounce is not None:
            self.submit(bounce)

    async def _keep_pending(self, queued: Queued, route_name: str, outcome: Outcome,
                            delivered: dict[str, str], now: float, save: bool,
                            doubt_note: str) -> None:
        """Recipients are still pending: record the new state (when something changed on
        disk's terms, `save`) and defer the message to its next try."""
        entry = queued.entry
        self._log_delivered(entry.id, route_name, delivered)
        assert outcome.next_attempt is not None
        entry.next_attempt = outcome.next_attempt
        if outcome.hints:  # what the reply means, in the queue too (`queue list`)
            entry.last_error += "".join(f" ({h})" for h in dict.fromkeys(outcome.hints))
        if save:
            await self._save_state(entry)
        # else the route was held and nothing was tried: no try counted, no backoff, no
        # recipient's status changed, so the state on disk still holds; only the next try's
        # time is new, and an older one on disk just means an earlier try after a crash.
        # (At 100,000 queued with the upstream down, these saves were 62 % of the time.)
        delay = max(0.0, outcome.next_attempt - now)
        why = entry.last_error + doubt_note
        if outcome.tried:
            log.info("%s: deferred for %d recipient(s) via %s, next try in %ds: %s",
                     entry.id, len(entry.pending()), route_name, delay, why)
            self.observer.deferred(route_name)
        self._defer(queued, outcome.next_attempt)

    def _remove_done(self, queued: Queued, route_name: str, outcome: Outcome,
                     bounce: Entry | None, delivered: dict[str, str]) -> None:
        """Nothing is pending (step 3): remove the message, with one log line saying why."""
        entry = queued.entry
        crashpoint.reached("before-removal")
        if len(delivered) == 1 and not outcome.failed and bounce is None and \
                len(outcome.delivered) == len(entry.rcpt):
            # The common case in one line, not two: delivered to all, and so removed.
            [(said, rcpts)] = delivered.items()
            self.spool.remove(entry.id, has_state=entry.has_state, size=entry.file_size)
            log.info("%s: delivered to %s via %s: %s; removed from the queue", entry.id,
                     rcpts, route_name, said)
        else:
            self._log_delivered(entry.id, route_name, delivered)
            self._remove(entry, self._why_done(queued, outcome, bounce))
        self._messages.pop(entry.id, None)

    def _note_doubt(self, entry: Entry, route: RouteConfig | None, route_name: str,
                    report: Report, was_started: int, tried: bool) -> str:
        """An attempt whose answer was lost (relayd.delivery.doubt). On a dedupe route the
        message stays "started", as after a crash, so the next attempt looks in Sent Items
        first; elsewhere the resend may duplicate. Counted either way; returns what the
        deferral's log line adds."""
        if not report.doubt:
            entry.doubt, entry.doubt_at = "", 0.0
            return ""
        lookup = route is not None and route.dedupe and route.upstream in ("ews", "graph")
        if tried:
            self.observer.in_doubt(route_name, lookup)
        if not lookup:
            entry.doubt, entry.doubt_at = "", 0.0
            if DUPLICATE_RISK in report.doubt:
                return ""  # the reply says so already
            return f" (in doubt: {DUPLICATE_RISK})"
        entry.started = was_started or entry.attempts + 1
        if tried:  # a new doubt (a held route tried nothing: the old one stands)
            entry.doubt_at = time.time()
        entry.doubt = report.doubt
        return " (in doubt: the next attempt looks in Sent Items first)"

    def _apply(self, queued: Queued, route_name: str, outcome: Outcome) -> None:
        """The decision, in memory; failures wait in `unbounced` until their bounce is stored."""
        entry = queued.entry
        for rcpt, reply in outcome.delivered.items():
            entry.rcpt[rcpt] = RecipientState(DELIVERED, reply.smtp_code, _words(reply))
            self.observer.delivered(route_name)
        for rcpt, failed in outcome.failed.items():
            queued.failed(rcpt, Failure(rcpt, failed.reply, failed.status))
            what = "expired" if outcome.expired and failed.status == "4.4.7" else "failed"
            log.info("%s: %s for <%s> via %s: %s", entry.id, what, rcpt, route_name,
                     failed.reply)
        for rcpt, reply in outcome.pending.items():
            state = entry.rcpt[rcpt]
            state.code, state.text = reply.smtp_code, _words(reply)
            queued.replied(rcpt, reply)
            entry.last_error = str(reply)
        if outcome.tried and (outcome.delivered or outcome.failed or outcome.pending):
            entry.attempts += 1
        entry.backoff = outcome.backoff

    @staticmethod
    def _log_delivered(qid: str, route_name: str, delivered: dict[str, str]) -> None:
        for said, rcpts in delivered.items():
            log.info("%s: delivered to %s via %s: %s", qid, rcpts, route_name, said)

    def _journal_outcome(self, queued: Queued, route: RouteConfig | None, outcome: Outcome,
                         latency_s: float, delivered: str, *, doubt: str = "",
                         earlier_doubt: str = "", may_duplicate: bool = False) -> None:
        """`doubt`: this attempt's answer was lost; `earlier_doubt`: the doubt a lookup in
        Sent Items settled (found-in-sent-items)."""
        if self.journal is None or not outcome.tried:
            return
        attempt = queued.entry.attempts
        self._record_grouped(delivered, queued, route, outcome.delivered, attempt=attempt,
                             latency_s=latency_s, doubt=earlier_doubt)
        failed = {r: f.reply for r, f in outcome.failed.items()}
        self._record_grouped("expired" if outcome.expired else "failed", queued, route, failed,
                             attempt=attempt, latency_s=latency_s)
        self._record_grouped("deferred", queued, route, outcome.pending, attempt=attempt,
                             latency_s=latency_s, next_try=outcome.next_attempt, doubt=doubt,
                             may_duplicate=may_duplicate or None)

    def _record_failed(self, queued: Queued) -> None:
        for rcpt, failure in queued.unbounced.items():
            queued.entry.rcpt[rcpt] = RecipientState(FAILED, failure.reply.smtp_code,
                                                     _words(failure.reply))
        queued.unbounced = _NO_FAILURES

    async def _store_bounce(self, queued: Queued, route_name: str) -> Entry | None:
        """Build and store the bounce for the failures waiting for one. On success the failures
        are recorded in memory and the stored bounce returned; otherwise the message is kept
        (deferred) or, if no bounce can ever be built, quarantined; None then."""
        entry = queued.entry
        failures = list(queued.unbounced.values())
        try:
            original = queued.data if queued.data is not None else await self._read_head(entry)
            data = build_bounce(original=original, sender=entry.sender, failures=failures,
                                hostname=self.config.server.hostname, route=route_name,
                                queue_id=entry.id, arrival=entry.received)
        except OSError as e:
            self._keep_for_bounce(queued, f"cannot read the message: {e}")
            return None
        except Exception as e:  # noqa: BLE001 - whatever the email package raises
            why = f"cannot build a bounce for it: {type(e).__name__}: {e}"
            log.error("%s: moved to %s: %s", entry.id, self.spool.corrupt_dir, why)
            self._release(queued)
            self.spool.removing(entry.id)  # before it leaves `messages`: the scan skips it
            self._messages.pop(entry.id, None)
            await asyncio.to_thread(self.spool.quarantine, entry.id, why)
            return None
        pinned = route_name if route_name in self.config.routes else None
        try:
            bounce = await self.spool.store("", [entry.sender], data, client="relayd",
                                             route=pinned,
                                             bounce_for=(entry.id, list(queued.unbounced)))
        except (QueueError, OSError) as e:
            self._keep_for_bounce(queued, str(e))
            return None
        log.info("%s: bounce %s queued to <%s> for %d recipient(s)", entry.id, bounce.id,
                 entry.sender, len(failures))
        self._record("bounced", queued, self.config.routes.get(route_name),
                     list(queued.unbounced), bounce=bounce.id)
        self.observer.bounced(route_name)
        self._record_failed(queued)
        if self.on_bounce is not None:
            try:
                self.on_bounce(entry, bounce)
            except Exception:  # noqa: BLE001 - a hook must never undo a stored bounce
                log.exception("%s: the on_bounce hook failed", entry.id)
        return bounce

    def _keep_for_bounce(self, queued: Queued, why: str) -> None:
        retry = self.config.queue.retry_min_s
        log.warning("%s: cannot store the bounce for %d failed recipient(s) (%s); the message "
                    "stays in the queue and the bounce is tried again in %ds", queued.id,
                    len(queued.unbounced), why, retry)
        self._defer(queued, self.clock() + retry)

    async def _save_state(self, entry: Entry) -> None:
        try:
            await asyncio.to_thread(self.spool.save_state, entry)
        except OSError as e:
            # The previous state stays on disk: after a crash this attempt's deliveries may be
            # made again (at most twice), never lost. Failures are in their stored bounce.
            log.warning("%s: cannot save the delivery state: %s", entry.id, e)

    def _why_done(self, queued: Queued, outcome: Outcome, bounce: Entry | None) -> str:
        entry = queued.entry
        delivered = sum(1 for s in entry.rcpt.values() if s.status == DELIVERED)
        failed = len(entry.rcpt) - delivered
        if entry.is_bounce and failed:
            return "the bounce could not be delivered and was dropped (a bounce is never bounced)"
        parts = [f"{delivered} delivered"] if delivered else []
        if failed:
            what = "expired" if outcome.expired else "failed"
            parts.append(f"{failed} {what}" + (f", bounce {bounce.id}" if bounce else ""))
        return "done: " + ", ".join(parts)

    def _remove(self, entry: Entry, why: str) -> None:
        self.spool.remove(entry.id, has_state=entry.has_state, size=entry.file_size)
        log.info("%s: removed from the queue: %s", entry.id, why)

    def _forget(self, queued: Queued, why: str) -> None:
        admin = self._deleted_by.pop(queued.id, None)
        self._budget_waits.pop(queued.id, None)
        if why == "deleted by the admin":
            self._record("deleted", queued, self.route_for(queued.entry),
                         queued.entry.pending(), admin=admin)
        self._release(queued)
        self._messages.pop(queued.id, None)
        self._remove(queued.entry, why)


def _by_reply(replies: dict[str, Reply]) -> dict[str, str]:
    """Reply text -> the recipients that got it, as `<a>, <b>` (one log line per reply)."""
    groups: dict[str, list[str]] = {}
    for rcpt, reply in replies.items():
        groups.setdefault(str(reply), []).append(rcpt)
    return {said: ", ".join(f"<{r}>" for r in rcpts) for said, rcpts in groups.items()}


def _words(reply: Reply) -> str:
    """A reply without its code, as the state file keeps it (the code is stored beside it)."""
    return f"{reply.enhanced} {reply.text}" if reply.enhanced else reply.text
