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
from relayd.queue import Entry, Spool

log = logging.getLogger(__name__)

HandOn = Callable[[Entry, bytes], None]


class Intake:
    def __init__(self, spool: Spool, hand_on: HandOn) -> None:
        self.spool = spool
        self.hand_on = hand_on

    async def accept(self, sender: str, recipients: Sequence[str], data: bytes,
                     mail_options: Sequence[str], client: str, route: str) -> Entry:
        """Durable when this returns (QueueError or OSError when it cannot be)."""
        entry = await self.spool.accept(sender, recipients, data, mail_options, client=client)
        log.info("%s: queued from=<%s> to=%d size=%d client=%s route=%s", entry.id,
                 entry.sender, len(entry.recipients), entry.size, entry.client, route)
        crashpoint.reached("accepted")
        self.hand_on(entry, data)
        return entry
