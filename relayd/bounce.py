"""Delivery status notifications (RFC 3464) for recipients that failed for good."""

from __future__ import annotations

import email.policy
import email.utils
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage, Message

from relayd.reply import Reply


@dataclass(frozen=True)
class Failure:
    recipient: str
    reply: Reply  # what the upstream (or relayd, for an expiry) said
    status: str  # the DSN status (RFC 3463), decided by relayd.qmgr.outcome


def _printable(address: str) -> str:
    """An address as a DSN can show it: bytes that are not UTF-8 (which reach relayd as lone
    surrogates) as \\xNN escapes, so one bad address never makes the whole bounce unbuildable."""
    return address.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def diagnostic_code(reply: Reply) -> str:
    """RFC 3464 Diagnostic-Code: `smtp; 550 5.1.1 ...` when an SMTP server said it, else the
    protocol's own words under an x- type (`x-graph; Graph sendMail: 404 ...`)."""
    if reply.source == "smtp" and reply.smtp_code is not None:
        return f"smtp; {reply.one_line()}"
    words = " ".join(reply.text.split())[:900]
    return f"x-{reply.source}; {words}"


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
        said = f.reply.one_line()
        lines.extend(textwrap.wrap(f"<{_printable(f.recipient)}>: {said}", width=76,
                                   subsequent_indent="    ", break_long_words=False,
                                   break_on_hyphens=False))
    lines.append("")
    msg.set_content("\n".join(lines))
    msg.make_mixed()
    # make_mixed gives multipart/mixed; a DSN is multipart/report.
    msg.replace_header("Content-Type", 'multipart/report; report-type="delivery-status"')
    msg.set_boundary(email.utils.make_msgid(domain="bounce").strip("<>").replace("@", "."))

    status = _delivery_status(failures, hostname, queue_id, arrival)
    msg.attach(status)  # type: ignore[arg-type]  # a plain Message part is what DSNs need

    head_part = _headers_part(original)
    msg.attach(head_part)  # type: ignore[arg-type]
    return msg.as_bytes(policy=policy)


def _delivery_status(failures: Sequence[Failure], hostname: str, queue_id: str,
                     arrival: float) -> Message:
    """The machine-readable part (RFC 3464): the per-message fields, then one block per
    failed recipient."""
    status = Message()
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {hostname}"
    per_message["X-Relayd-Queue-ID"] = queue_id
    per_message["Arrival-Date"] = email.utils.formatdate(arrival, localtime=True)
    blocks = [per_message]
    for f in failures:
        block = Message()
        block["Final-Recipient"] = f"rfc822; {_printable(f.recipient)}"
        block["Action"] = "failed"
        block["Status"] = f.status
        block["Diagnostic-Code"] = diagnostic_code(f.reply)
        blocks.append(block)
    status.set_type("message/delivery-status")
    del status["MIME-Version"]
    for block in blocks:
        status.attach(block)
    return status


def _headers_part(original: bytes) -> Message:
    """The original message's header section, as text/rfc822-headers."""
    head_part = Message()
    head_part.set_type("text/rfc822-headers")
    del head_part["MIME-Version"]
    raw_headers = _header_block(original)
    if any(b > 127 for b in raw_headers):
        head_part["Content-Transfer-Encoding"] = "8bit"
    # surrogateescape carries 8-bit header bytes through the generator unchanged
    head_part.set_payload(raw_headers.decode("ascii", "surrogateescape"))
    return head_part


def _header_block(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]
