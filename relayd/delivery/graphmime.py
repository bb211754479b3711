"""What Graph is given of a message: its MIME with the headers naming exactly the envelope's
recipients (and From rewritten when the route asks), and, for a message too large for one
sendMail, the MIME without its attachments plus those attachments (the draft path).

Graph sends to every To/Cc/Bcc address in the MIME and to nobody else, hence the first; the
recipient policy itself is relayd.delivery.mime's. Every field not edited keeps its bytes.
"""

from __future__ import annotations

import email.policy
from dataclasses import dataclass, field
from email.errors import NonASCIILocalPartDefect
from email.message import Message
from email.parser import BytesParser

from relayd.delivery.base import OutboundMessage
from relayd.delivery.mime import Head, add_bcc, address, restrict_to_envelope
from relayd.errors import PermanentDeliveryError


@dataclass
class Prepared:
    """What Graph is given for one message, and why it differs from what was queued."""

    mime: bytes
    mailbox: str
    added_bcc: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def prepare_mime(message: OutboundMessage, mailbox: str, *, from_rewrite: bool,
                 is_bounce: bool = False) -> Prepared:
    """Make the headers name exactly the envelope's recipients, and rewrite From when asked.

    Graph sends to every To/Cc/Bcc address in the MIME and to nobody else: relayd's recipient
    policy (relayd.delivery.mime) removes the addresses outside the envelope, and envelope
    recipients no header names go in an added Bcc field. Every field not edited keeps its bytes.
    """
    restricted = restrict_to_envelope(message.data, message.recipients)
    mime = add_bcc(restricted.data, restricted.unnamed)
    if from_rewrite or is_bounce:
        head = Head.split(mime)
        rewrite_from(head, mailbox, keep_reply_to=not is_bounce)
        mime = head.join()
    return Prepared(mime, mailbox, restricted.unnamed, restricted.removed)


def rewrite_from(head: Head, mailbox: str, *, keep_reply_to: bool) -> None:
    """From becomes the mailbox (display name kept); the original From becomes Reply-To unless
    the message already says where replies go. Sender would ask for send-on-behalf: dropped."""
    froms = head.index("from")
    original_raw = head.fields[froms[0]] if froms else b""
    original = head.value(original_raw) if froms else ""
    display = ""
    if original:
        header = email.policy.default.header_factory("from", original)
        addrs = list(header.addresses)
        # A UTF-8 local part is fine here (SMTPUTF8); any other defect makes the name doubtful.
        doubtful = [d for d in header.defects if not isinstance(d, NonASCIILocalPartDefect)]
        if len(addrs) == 1 and not doubtful:
            display = addrs[0].display_name
    new_from = head.render("From", [address(mailbox, display)])
    if froms:
        head.fields[froms[0]] = new_from
        for i in reversed(froms[1:]):
            del head.fields[i]
    else:
        head.fields.append(new_from)
    for i in reversed(head.index("sender")):
        del head.fields[i]
    if keep_reply_to and original_raw and not head.index("reply-to"):
        # The original value byte for byte, so an odd but working display name survives.
        head.fields.append(b"Reply-To:" + original_raw.split(b":", 1)[1])


# Splitting a large message into a draft and its attachments.


@dataclass
class Attachment:
    name: str
    content_type: str
    data: bytes
    content_id: str | None
    inline: bool


def split_attachments(data: bytes) -> tuple[bytes, list[Attachment]]:
    """The message without its attachment parts (re-serialized), and those parts' contents."""
    msg = BytesParser(policy=email.policy.default).parsebytes(data)
    attachments: list[Attachment] = []

    def detach(part: Message) -> bool:
        if part.is_multipart():
            return False
        disposition = part.get_content_disposition()
        if part.get_content_maintype() == "text" and disposition != "attachment":
            return False
        return disposition in ("attachment", "inline") or part.get("content-id") is not None \
            or part.get_content_maintype() not in ("text", "multipart")

    def walk(container: Message, depth: int) -> None:
        if depth > 32:  # nesting is bounded in any real message; stop a hostile one
            raise PermanentDeliveryError("message nests multiparts more than 32 deep", 554)
        payload = container.get_payload()
        if not isinstance(payload, list):
            return
        kept: list[Message | str] = []
        for part in payload:
            if not isinstance(part, Message):
                kept.append(part)
            elif detach(part):
                raw = part.get_payload(decode=True)
                content = raw if isinstance(raw, bytes) else part.as_bytes()
                cid = part.get("content-id")
                attachments.append(Attachment(
                    name=part.get_filename() or f"attachment-{len(attachments) + 1}",
                    content_type=part.get_content_type(),
                    data=content,
                    content_id=str(cid).strip().strip("<>") if cid else None,
                    inline=part.get_content_disposition() == "inline" or (
                        cid is not None and part.get_content_disposition() is None),
                ))
            else:
                walk(part, depth + 1)
                kept.append(part)
        container.set_payload(kept)

    walk(msg, 0)
    policy = email.policy.SMTPUTF8 if not data.isascii() else email.policy.SMTP
    return msg.as_bytes(policy=policy), attachments
