"""Intake: store an accepted message durably, then hand its queue id on.

The listener starts an `Incoming` at DATA, writes the message into it as it arrives, and answers
250 only when `Incoming.finish` returns. A message up to MAX_HEADER_SCAN_BYTES stays in memory
and is written in one piece; a larger one is written to a spool draft from then on, so memory
does not grow with message size (the header facts need no more than that first part). What
follows depends on the process: in the main process the entry goes to the queue manager (with
the bytes of a message held in memory, so the first attempt need not read them back); in a
listener worker its queue id goes to the main process, which loads it from the spool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from relayd import crashpoint
from relayd.errors import QueueError
from relayd.headers import MAX_HEADER_SCAN_BYTES, header_facts
from relayd.journal import Journal
from relayd.queue import Draft, Entry, Spool, new_id

log = logging.getLogger(__name__)

HandOn = Callable[[Entry, bytes | None], None]
# route name -> the host name for a Message-ID to add when the message has none (routes with
# dedupe look the message up by it after a crash), or None to leave the message as it is
MessageIdHost = Callable[[str], str | None]


class Intake:
    def __init__(self, spool: Spool, hand_on: HandOn, journal: Journal | None = None,
                 message_id_host: MessageIdHost | None = None) -> None:
        self.spool = spool
        self.hand_on = hand_on
        self.journal = journal
        self.message_id_host = message_id_host

    def begin(self, sender: str, recipients: Sequence[str], mail_options: Sequence[str],
              client: str, route: str, *, login: str = "",
              pinned_route: str | None = None) -> Incoming:
        """A message about to arrive (at DATA)."""
        return Incoming(self, sender, recipients, mail_options, client, route, login,
                        pinned_route)

    async def store(self, sender: str, recipients: Sequence[str], data: bytes,
                     mail_options: Sequence[str], client: str, route: str, *,
                     login: str = "", pinned_route: str | None = None) -> Entry:
        """A whole message at once. Durable when this returns (QueueError or OSError when it
        cannot be)."""
        incoming = self.begin(sender, recipients, mail_options, client, route, login=login,
                              pinned_route=pinned_route)
        incoming.write(data)
        return await incoming.finish()

    def _facts(self, head: bytes, route: str) -> tuple[str, str, str | None, bytes]:
        """Message-ID, Subject, the queue id to use (when a Message-ID is made from it) and
        the header line to put first (b"" for none)."""
        message_id, subject = header_facts(head)
        host = self.message_id_host(route) if self.message_id_host and not message_id else None
        if not host:
            return message_id, subject, None, b""
        # `<QUEUEID@hostname>`, so a dedupe lookup after a crash can find the message.
        queue_id = new_id()
        message_id = f"<{queue_id}@{host}>"
        return message_id, subject, queue_id, f"Message-ID: {message_id}\r\n".encode()

    def _queued(self, entry: Entry, subject: str, route: str, data: bytes | None) -> None:
        log.info("%s: queued from=<%s> to=%d size=%d client=%s route=%s", entry.id,
                 entry.sender, len(entry.recipients), entry.size, entry.client, route)
        self.journal_stored(entry, subject, route)
        crashpoint.reached("accepted")
        self.hand_on(entry, data)

    def journal_stored(self, entry: Entry, subject: str, route: str) -> None:
        """The journal's `accepted` event (none from a listener worker's intake, which has no
        journal: the main process records it when the worker reports the id, see
        relayd.service.Service.report_stored)."""
        if self.journal is not None:
            self.journal.record("accepted", entry.id, message_id=entry.message_id,
                                **{"from": entry.sender}, to=entry.recipients, route=route,
                                client=entry.client, login=entry.login, size=entry.size,
                                subject=subject)


class Incoming:
    """One message as it arrives: `write` what the client sends (as stored: unstuffed, CRLF),
    then `finish` once, or `discard`. A write that fails (the disk is full) is remembered and
    the rest is dropped, so the listener can read the client's data to its end and then answer
    451 from `finish`."""

    def __init__(self, intake: Intake, sender: str, recipients: Sequence[str],
                 mail_options: Sequence[str], client: str, route: str, login: str,
                 pinned_route: str | None) -> None:
        self.intake = intake
        self.sender = sender
        self.recipients = recipients
        self.mail_options = mail_options
        self.client = client
        self.route = route
        self.login = login
        self.pinned_route = pinned_route
        self._held: list[bytes] = []
        self._held_size = 0
        self._draft: Draft | None = None
        self._subject = ""
        self._error: OSError | None = None

    def write(self, data: bytes) -> None:
        if self._error is not None or not data:
            return
        try:
            if self._draft is not None:
                self._draft.write(data)
                return
            self._held.append(data)
            self._held_size += len(data)
            if self._held_size > MAX_HEADER_SCAN_BYTES:
                self._spill()
        except OSError as e:
            self._error = e
            self.discard()

    def _spill(self) -> None:
        """From here on the message goes to a draft in the spool, not to memory."""
        held = b"".join(self._held)
        self._held, self._held_size = [], 0
        message_id, self._subject, queue_id, first = self.intake._facts(held, self.route)
        self._draft = self.intake.spool.draft(
            self.sender, self.recipients, self.mail_options, client=self.client,
            route=self.pinned_route, message_id=message_id, login=self.login,
            queue_id=queue_id)
        self._draft.write(first + held)

    async def finish(self) -> Entry:
        """Durable when this returns (QueueError or OSError when it cannot be)."""
        if self._error is not None:
            raise QueueError(f"cannot store the message: {self._error.strerror or self._error}")
        intake = self.intake
        draft = self._draft
        if draft is None:
            data = b"".join(self._held)
            self._held = []
            message_id, subject, queue_id, first = intake._facts(data, self.route)
            data = first + data
            entry = await intake.spool.store(
                self.sender, self.recipients, data, self.mail_options, client=self.client,
                route=self.pinned_route, message_id=message_id, login=self.login,
                queue_id=queue_id)
            intake._queued(entry, subject, self.route, data)
            return entry
        try:
            entry = await intake.spool.commit(draft)
        except Exception:
            draft.discard()  # not when cancelled: the writer thread may be sealing it
            raise
        self._draft = None
        intake._queued(entry, self._subject, self.route, None)
        return entry

    def discard(self) -> None:
        """Drop what was received (the client went away, or the message is refused)."""
        self._held = []
        if self._draft is not None:
            self._draft.discard()
            self._draft = None
