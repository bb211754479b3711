"""The few header facts relayd reads from a message it relays: Message-ID and Subject."""

from __future__ import annotations

import email.parser
import email.policy

MAX_HEADER_SCAN_BYTES = 256 * 1024
_HEADERS = email.parser.BytesHeaderParser(policy=email.policy.default)


def header_facts(data: bytes) -> tuple[str, str]:
    """The Message-ID and the decoded Subject of a message ("" when absent or unreadable)."""
    end = data.find(b"\r\n\r\n", 0, MAX_HEADER_SCAN_BYTES)
    head = data[: end + 2] if end >= 0 else data[:MAX_HEADER_SCAN_BYTES]
    try:
        msg = _HEADERS.parsebytes(head)
        mid = " ".join(str(msg.get("Message-ID", "") or "").split())
        subject = " ".join(str(msg.get("Subject", "") or "").split())
    except Exception:  # noqa: BLE001 - a header the email package cannot read is just absent
        return "", ""
    return mid[:998], subject[:998]
