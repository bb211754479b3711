"""Intake: store an accepted message durably, then hand its queue id on.

The listener calls `accept` at the end of DATA and answers 250 only when it returns. What
follows depends on the process: in the main process the entry goes to the queue manager (with
its bytes, so the first attempt need not read them back); in a listener worker its queue id goes
to the main process, which loads it from the spool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from relayd import crashpoint
from relayd.headers import header_facts
from relayd.journal import Journal
from relayd.queue import Entry, Spool, new_id

log = logging.getLogger(__name__)

HandOn = Callable[[Entry, bytes], None]
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

    async def accept(self, sender: str, recipients: Sequence[str], data: bytes,
                     mail_options: Sequence[str], client: str, route: str, *,
                     login: str = "", pinned_route: str | None = None) -> Entry:
        """Durable when this returns (QueueError or OSError when it cannot be)."""
        message_id, subject = header_facts(data)
        queue_id = None
        host = self.message_id_host(route) if self.message_id_host and not message_id else None
        if host:
            # `<QUEUEID@hostname>`, so a dedupe lookup after a crash can find the message.
            queue_id = new_id()
            message_id = f"<{queue_id}@{host}>"
            data = f"Message-ID: {message_id}\r\n".encode() + data
        entry = await self.spool.accept(sender, recipients, data, mail_options, client=client,
                                        route=pinned_route, message_id=message_id, login=login,
                                        queue_id=queue_id)
        log.info("%s: queued from=<%s> to=%d size=%d client=%s route=%s", entry.id,
                 entry.sender, len(entry.recipients), entry.size, entry.client, route)
        if self.journal is not None:
            self.journal.record("accepted", entry.id, message_id=message_id, **{"from": sender},
                                to=entry.recipients, route=route, client=client, login=login,
                                size=entry.size, subject=subject)
        crashpoint.reached("accepted")
        self.hand_on(entry, data)
        return entry
