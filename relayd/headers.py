"""The few header facts relayd reads from a message it relays: Message-ID and Subject.

Read with a regular expression over the header block, not the email package's parser: this
runs for every accepted message, and the parser costs several times more than the rest of
intake. The email package still decodes an RFC 2047 Subject (`=?utf-8?q?...?=`) when there is
one, and anything it cannot read is simply left out (these facts are for the journal and for
dedupe; the message itself is never changed by reading them).
"""

from __future__ import annotations

import email.header
import re

MAX_HEADER_SCAN_BYTES = 256 * 1024
MAX_VALUE_CHARS = 998
_FIELD_RE = re.compile(rb"^(message-id|subject)[ \t]*:[ \t]*((?:[^\r\n]*)(?:\r?\n[ \t][^\r\n]*)*)",
                       re.IGNORECASE | re.MULTILINE)


def header_facts(data: bytes) -> tuple[str, str]:
    """The Message-ID and the decoded Subject of a message ("" when absent)."""
    end = data.find(b"\r\n\r\n", 0, MAX_HEADER_SCAN_BYTES)
    head = data[: end + 2] if end >= 0 else data[:MAX_HEADER_SCAN_BYTES]
    mid = subject = ""
    for m in _FIELD_RE.finditer(head):
        value = b" ".join(m.group(2).split()).decode("utf-8", "replace")
        if m.group(1).lower() == b"message-id":
            mid = mid or value
        elif not subject:
            subject = _decoded(value)
    return mid[:MAX_VALUE_CHARS], subject[:MAX_VALUE_CHARS]


def _decoded(value: str) -> str:
    if "=?" not in value:
        return value
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (ValueError, LookupError, UnicodeError):
        return value
