"""The raw header of a queued message, and what Exchange (EWS, Graph) is told to send it to.

Exchange reads recipients from a message's To, Cc and Bcc fields: given the MIME, it sends to
every address they name, and nobody told it otherwise is sent a copy. relayd must deliver to the
envelope of this attempt, no more and no fewer, and change the bytes as little as it can. The one
policy both Exchange upstreams apply (`restrict_to_envelope`):

- A To/Cc/Bcc address the envelope does not name (a retry after a partial delivery, or a client
  whose envelope differs from its header, like cron's `To: root`) is removed from the field that
  names it; a field left empty is removed. Nothing else is touched: every other field, and every
  field naming only envelope recipients, keeps its bytes.
- An envelope recipient no To/Cc/Bcc field names (a blind copy) is returned as `unnamed`; the
  upstream gives it to Exchange as a blind copy: Graph in an added `Bcc:` field (`add_bcc`), EWS
  in the item's BccRecipients, which leaves the MIME untouched.

Why this and not renaming every To/Cc/Bcc field to X-Original-* and sending the whole envelope
as Bcc (what the EWS upstream used to do): renaming edits every recipient field even when a single
address is out of place, and the copies then arrive with no To or Cc at all, so the people the
sender addressed see an "undisclosed recipients" message unlike the one everyone else got. Editing
only the addresses that must go keeps what readers see as it was sent, for the recipients this
attempt reaches; the addresses removed were already served or never asked for.
"""

from __future__ import annotations

import email.policy
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.headerregistry import Address, Group
from typing import Protocol

from relayd.config import OutboxSettings, RouteConfig
from relayd.errors import PermanentDeliveryError

# The fields Exchange takes recipients from, lower case.
RECIPIENT_HEADERS = ("to", "cc", "bcc")


@dataclass
class Head:
    """The header block split into raw fields, so editing one leaves the others byte-identical."""

    fields: list[bytes]  # each raw field, folded continuation lines and line ending included
    eol: bytes
    body: bytes  # the blank separator line and everything after it

    @classmethod
    def split(cls, data: bytes) -> Head:
        crlf, lf = data.find(b"\r\n\r\n"), data.find(b"\n\n")
        if crlf >= 0 and (lf < 0 or crlf < lf):
            end, eol = crlf + 2, b"\r\n"
        elif lf >= 0:
            end, eol = lf + 1, b"\n"
        else:
            end, eol = len(data), b"\r\n"
        head, body = data[:end], data[end:]
        fields: list[bytes] = []
        for line in head.splitlines(keepends=True):
            if line[:1] in (b" ", b"\t") and fields:
                fields[-1] += line
            else:
                fields.append(line)
        return cls(fields, eol, body)

    def join(self) -> bytes:
        return b"".join(self.fields) + self.body

    @staticmethod
    def name(raw: bytes) -> str:
        """The field's name, lower case."""
        return raw.split(b":", 1)[0].strip().decode("ascii", "replace").lower()

    @staticmethod
    def value(raw: bytes) -> str:
        """The unfolded value, decoded as UTF-8 (RFC 6532) with undecodable bytes kept."""
        text = raw.split(b":", 1)[1] if b":" in raw else b""
        return b"".join(text.splitlines()).strip().decode("utf-8", "surrogateescape")

    def index(self, name: str) -> list[int]:
        return [i for i, f in enumerate(self.fields) if self.name(f) == name]

    def values(self, name: str) -> list[str]:
        return [self.value(self.fields[i]) for i in self.index(name)]

    def without(self, names: set[str]) -> Head:
        """A copy without the fields named in `names` (lower case)."""
        return Head([f for f in self.fields if self.name(f) not in names], self.eol, self.body)

    def render(self, name: str, value: str | Sequence[Address | Group]) -> bytes:
        """A new header field folded by the email package, in this message's line endings."""
        if isinstance(value, str):
            ascii_only = value.isascii()
        else:
            ascii_only = all(_is_ascii(v) for v in value)
        policy = (email.policy.SMTP if ascii_only else email.policy.SMTPUTF8).clone(
            linesep=self.eol.decode())
        header = policy.header_factory(name, value)
        folded: str = header.fold(policy=policy)
        return folded.encode("utf-8", "surrogateescape")


def _is_ascii(item: Address | Group) -> bool:
    addresses = item.addresses if isinstance(item, Group) else (item,)
    return all(a.addr_spec.isascii() for a in addresses)


def parse_addresses(value: str) -> tuple[Group, ...]:
    """An address-list value as groups (a lone address is a group without a display name)."""
    header = email.policy.default.header_factory("to", value)
    return tuple(header.groups)


def address(addr_spec: str, display_name: str = "") -> Address:
    """An Address from an address string, a UTF-8 local part included."""
    # Address(addr_spec=...) refuses a UTF-8 local part; built from its halves it is accepted.
    local, _, domain = addr_spec.rpartition("@")
    return Address(display_name, username=local or addr_spec, domain=domain if local else "")


def _norm(addr: str) -> str:
    """An address as compared with the envelope: Unicode NFC, case folded, the domain in its
    IDNA (xn--) form, so `danglüe@Email.com`, an RFC 2047-decoded field and
    `user@xn--mnchen-3ya.de` / `user@münchen.de` each match their envelope address."""
    local, at, domain = unicodedata.normalize("NFC", addr.strip()).rpartition("@")
    if not at:
        return domain.lower()
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        pass
    return f"{local.lower()}@{domain.lower()}"


def header_recipients(data: bytes) -> list[str]:
    """Every To, Cc and Bcc address in `data`, in that order: whom Exchange would send it to."""
    head = Head.split(data)
    return [a.addr_spec for name in RECIPIENT_HEADERS for value in head.values(name)
            for g in parse_addresses(value) for a in g.addresses]


@dataclass(frozen=True)
class Restricted:
    """A message whose recipient fields name only envelope recipients, and what changed."""

    data: bytes
    unnamed: list[str] = field(default_factory=list)  # envelope recipients no field names
    removed: list[str] = field(default_factory=list)  # field addresses not in the envelope


def restrict_to_envelope(data: bytes, recipients: Sequence[str]) -> Restricted:
    """Remove from To/Cc/Bcc every address not in `recipients` (case-insensitively); list the
    recipients no such field names. Fields not edited keep their bytes (module docstring)."""
    head = Head.split(data)
    envelope = {_norm(r): r for r in recipients}
    named: set[str] = set()
    removed: list[str] = []
    for name in RECIPIENT_HEADERS:
        for i in head.index(name):
            groups = parse_addresses(head.value(head.fields[i]))
            addrs = [a.addr_spec for g in groups for a in g.addresses]
            named.update(_norm(a) for a in addrs if _norm(a) in envelope)
            outsiders = [a for a in addrs if _norm(a) not in envelope]
            if not outsiders:
                continue
            removed.extend(outsiders)
            kept: list[Address | Group] = []
            for g in groups:
                members = [a for a in g.addresses if _norm(a.addr_spec) in envelope]
                if g.display_name is not None:
                    if members:
                        kept.append(Group(g.display_name, members))
                else:
                    kept.extend(members)
            field_name = head.fields[i].split(b":", 1)[0].decode("ascii", "replace").strip()
            head.fields[i] = head.render(field_name, kept) if kept else b""
    head.fields = [f for f in head.fields if f]
    unnamed = [r for key, r in envelope.items() if key not in named]
    return Restricted(head.join(), unnamed, removed)


def add_bcc(data: bytes, addresses: Sequence[str]) -> bytes:
    """`data` with a Bcc field naming `addresses` after its other fields (none: unchanged)."""
    if not addresses:
        return data
    head = Head.split(data)
    head.fields.append(head.render("Bcc", [address(a) for a in addresses]))
    return head.join()


# -- which mailbox sends ------------------------------------------------------------------------


def fixed_mailbox(route: RouteConfig) -> str | None:
    """The route's fixed sending mailbox, or None when each sender sends from its own."""
    settings = route.settings
    mailbox = None if isinstance(settings, OutboxSettings) else settings.mailbox
    return mailbox if mailbox not in (None, "", "sender") else None


class Envelope(Protocol):
    """What mailbox_for reads of a message (relayd.delivery.base.OutboundMessage)."""

    @property
    def sender(self) -> str: ...

    @property
    def recipients(self) -> Sequence[str]: ...


def mailbox_for(route: RouteConfig, message: Envelope) -> str:
    """The mailbox a message is sent from: the route's fixed one, else the envelope sender's.

    A bounce (null sender) goes back to a sender of this route, so that sender's own mailbox
    sends it; with several recipients there is no one mailbox to choose.
    """
    mailbox = sending_mailbox(route, message.sender, message.recipients)
    if mailbox is None:
        raise PermanentDeliveryError(
            'a message with a null sender and several recipients has no mailbox to send from '
            'on a route with mailbox = "sender"', 550)
    return mailbox


def sending_mailbox(route: RouteConfig, sender: str, recipients: Sequence[str]) -> str | None:
    """mailbox_for's answer from the envelope alone; None where it has none."""
    fixed = fixed_mailbox(route)
    if fixed is not None:
        return fixed
    if sender:
        return sender
    return recipients[0] if len(recipients) == 1 else None
