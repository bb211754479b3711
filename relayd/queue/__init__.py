"""The durable spool: the files of the queue directory, and nothing about scheduling.

Modules: `spool` (Spool: the files, reading and writing entries), `entry` (Entry, queue ids),
`commit` (the writer thread's group commit, Draft), `control` (requests from the CLI),
`spares` (spent message files kept for reuse). Durable writes are relayd.platform.fs's.

Layout under `queue.path` (Postfix keeps a similar split between content and state):
  msg/ID      one line of JSON (the envelope), a newline, then the message bytes exactly as
              received; written once to tmp/, fsynced, renamed into msg/, msg/ fsynced.
  state/ID    per-recipient delivery state (JSON), replaced atomically after an attempt that
              leaves work to do. No state file means every recipient is still pending.
  state/mailboxes  each sending mailbox's recent recipient counts (relayd.qmgr.pacing),
              written by the writer thread at most once a second while they change.
  corrupt/    entries that could not be read, moved aside with a .why file beside them.
  control/    requests from `relayd queue retry|delete` while the daemon runs.
  tmp/        files being written, and spent message files kept for reuse (relayd.queue.spares);
              anything left here after a crash was never acknowledged.
  lock        held by the running daemon (relayd.platform.fs: flock; on Windows a byte lock).

Every file is closed before it is renamed or removed (NTFS refuses both on an open file;
relayd.platform.fs has the checker that the tests switch on).

Whether a message is being delivered, held or deferred is the queue manager's, in memory
(relayd.qmgr), so after a crash every entry is simply due again: at most the message that was
in flight is delivered twice. A bounce's envelope names the message and recipients it reports
(`bounce_for`), so recovery can tell which failures are already bounced even when the crash came
between storing the bounce and recording the failure.
"""

from relayd.platform.fs import write_atomic  # its home; named here for older imports
from relayd.queue.commit import Draft
from relayd.queue.control import CONTROL_ACTIONS, QUEUE_ACTIONS
from relayd.queue.entry import (
    DELIVERED,
    FAILED,
    FORMAT_VERSION,
    ID_RE,
    PENDING,
    Entry,
    RecipientState,
    new_id,
)
from relayd.queue.spool import SUBDIRS, USAGE_FILE, Spool

__all__ = [
    "CONTROL_ACTIONS",
    "DELIVERED",
    "FAILED",
    "FORMAT_VERSION",
    "ID_RE",
    "PENDING",
    "QUEUE_ACTIONS",
    "SUBDIRS",
    "USAGE_FILE",
    "Draft",
    "Entry",
    "RecipientState",
    "Spool",
    "new_id",
    "write_atomic",
]
