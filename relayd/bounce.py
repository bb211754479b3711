"""Delivery status notifications (RFC 3464) for recipients that failed for good."""

from __future__ import annotations

import email.policy
import email.utils
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage, Message

ENHANCED_RE = re.compile(r"^\s*([245]\.\d{1,3}\.\d{1,3})\b")
MAX_DIAGNOSTIC_CHARS = 900


@dataclass(frozen=True)
class Failure:
    recipient: str
    code: int | None
    text: str
    status: str | None = None  # an RFC 3463 status that overrides the one derived from text


def status_code(failure: Failure) -> str:
    """The RFC 3463 status: the upstream's enhanced code when it gave one."""
    if failure.status:
        return failure.status
    m = ENHANCED_RE.match(failure.text)
    if m:
        return m.group(1)
    if failure.code is not None and 400 <= failure.code < 600:
        return f"{failure.code // 100}.0.0"
    return "5.0.0"


def _one_line(text: str) -> str:
    return " ".join(text.split())[:MAX_DIAGNOSTIC_CHARS]


def build_bounce(*, original: bytes, sender: str, failures: Sequence[Failure], hostname: str,
                 route: str, queue_id: str, arrival: float) -> bytes:
    """A multipart/report bounce to `sender` listing each failed recipient and the upstream's
    own words, with the original headers attached."""
    # An internationalized sender needs a UTF-8 header (RFC 6532); the route then sends the
    # bounce with SMTPUTF8 because its envelope address is not ASCII either.
    policy = email.policy.SMTP if sender.isascii() else email.policy.SMTPUTF8
    msg = EmailMessage(policy=policy)
    msg["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    msg["To"] = sender
    msg["Subject"] = "Undelivered Mail Returned to Sender"
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=hostname)
    msg["Auto-Submitted"] = "auto-replied"

    lines = [
        f"This is the mail system at {hostname}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        f"It was sent through the route \"{route}\" (queue id {queue_id}).",
        "",
    ]
    for f in failures:
        said = f"{f.code} {_one_line(f.text)}" if f.code is not None else _one_line(f.text)
        lines.extend(textwrap.wrap(f"<{f.recipient}>: {said}", width=76,
                                   subsequent_indent="    ", break_long_words=False,
                                   break_on_hyphens=False))
    lines.append("")
    msg.set_content("\n".join(lines))
    msg.make_mixed()
    # make_mixed gives multipart/mixed; a DSN is multipart/report.
    msg.replace_header("Content-Type", 'multipart/report; report-type="delivery-status"')
    msg.set_boundary(email.utils.make_msgid(domain="bounce").strip("<>").replace("@", "."))

    status = Message()
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {hostname}"
    per_message["X-Relayd-Queue-ID"] = queue_id
    per_message["Arrival-Date"] = email.utils.formatdate(arrival, localtime=True)
    blocks = [per_message]
    for f in failures:
        block = Message()
        block["Final-Recipient"] = f"rfc822; {f.recipient}"
        block["Action"] = "failed"
        block["Status"] = status_code(f)
        if f.code is not None:
            block["Diagnostic-Code"] = f"smtp; {f.code} {_one_line(f.text)}"
        else:
            block["Diagnostic-Code"] = f"x-relayd; {_one_line(f.text)}"
        blocks.append(block)
    status.set_type("message/delivery-status")
    del status["MIME-Version"]
    for block in blocks:
        status.attach(block)
    msg.attach(status)  # type: ignore[arg-type]  # a plain Message part is what DSNs need

    head_part = Message()
    head_part.set_type("text/rfc822-headers")
    del head_part["MIME-Version"]
    raw_headers = _header_block(original)
    if any(b > 127 for b in raw_headers):
        head_part["Content-Transfer-Encoding"] = "8bit"
    # surrogateescape carries 8-bit header bytes through the generator unchanged
    head_part.set_payload(raw_headers.decode("ascii", "surrogateescape"))
    msg.attach(head_part)  # type: ignore[arg-type]
    return msg.as_bytes(policy=policy)


def _header_block(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]
