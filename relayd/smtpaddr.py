"""SMTP paths as the listener reads them: the plain `<local@domain>` form, what the parser
cannot read, and which addresses MAIL FROM and RCPT TO refuse (relayd.smtpd reads them,
relayd.listener refuses them)."""

from __future__ import annotations

import re

REPLY_BAD_SENDER_SYNTAX = "501 5.1.7 Bad sender address syntax"
REPLY_BAD_RCPT_SYNTAX = "501 5.1.3 Bad recipient address syntax"
REPLY_BAD_SENDER_UTF8 = "553 5.1.7 Sender address is not valid UTF-8"
REPLY_BAD_RCPT_UTF8 = "553 5.1.3 Recipient address is not valid UTF-8"
REPLY_NEED_SMTPUTF8 = "553 5.6.7 Must declare SMTPUTF8 to send a non-ASCII address"
# An addr-spec as SMTP carries it: no spaces, controls or angle brackets, one local@domain.
_SPECIALS = r"\s<>()\[\]\\,;:\"@\x00-\x1f\x7f"
_ATOM = rf"[^{_SPECIALS}]+"
_ATEXT = rf"[^{_SPECIALS}.]"  # one character of an atom, a dot excluded
_ADDRESS_RE = re.compile(rf"^{_ATOM}@{_ATOM}$")
# What nearly every client sends: `<local@domain>`, ASCII dot-atoms, no quotes, comments or
# literals.
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_PLAIN_PATH_RE = re.compile(rf"[ \t]*<({_DOT_ATOM}@{_DOT_ATOM})>[ \t]*(?![(])")


def valid_address(address: str) -> bool:
    if len(address) > 320 or not _ADDRESS_RE.match(address):
        return False
    local, domain = address.rsplit("@", 1)
    return bool(local) and len(local) <= 64 and "." not in (domain[0], domain[-1])


def plain_path(arg: str) -> tuple[str, str] | None:
    """(address, the rest of the line) for `<local@domain> PARAMS` in its plain form, as the
    email package's get_angle_addr reads it, without its token objects (about 20 us a call);
    None for anything else, which goes to the parser."""
    m = _PLAIN_PATH_RE.match(arg) if arg.isascii() else None
    if m is None or (m.end() < len(arg) and arg[m.end() - 1] not in " \t"):
        return None
    return m.group(1), arg[m.end():]


class _Unparsable(str):
    """What relayd.smtpd's _getaddr hands on for an address the email parser cannot read, so that
    MAIL and RCPT each refuse it with their own reply (aiosmtpd would answer 553 5.1.3 for
    both). A subclass, so no address a client sends can be mistaken for it."""


UNPARSABLE = _Unparsable("<unparsable>")


def address_refusal(address: str, smtputf8: bool, *, sender: bool) -> str | None:
    """Why MAIL FROM or RCPT TO refuses `address`, as its reply; None when it is acceptable.
    Invalid UTF-8 reaches here as lone surrogates (aiosmtpd decodes with surrogateescape);
    it would fail every delivery attempt for days, so it is refused now."""
    if isinstance(address, _Unparsable):
        return REPLY_BAD_SENDER_SYNTAX if sender else REPLY_BAD_RCPT_SYNTAX
    if not address.isascii():
        try:
            address.encode("utf-8")
        except UnicodeEncodeError:
            return REPLY_BAD_SENDER_UTF8 if sender else REPLY_BAD_RCPT_UTF8
        if not smtputf8:
            return REPLY_NEED_SMTPUTF8
    if not valid_address(address):
        return REPLY_BAD_SENDER_SYNTAX if sender else REPLY_BAD_RCPT_SYNTAX
    return None
