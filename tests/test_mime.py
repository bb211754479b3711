"""relayd.delivery.mime: raw header fields, the recipient policy and the sending mailbox."""

from __future__ import annotations

from pathlib import Path

import pytest
from mimeutil import CORPUS, corpus, parse

from relayd.config import GraphSettings, OAuthSettings, RouteConfig
from relayd.delivery import OutboundMessage
from relayd.delivery.mime import (
    Head,
    add_bcc,
    fixed_mailbox,
    header_recipients,
    mailbox_for,
    restrict_to_envelope,
)
from relayd.errors import PermanentDeliveryError

BODY = b"\r\nHello.\r\n"


def msg(*fields: bytes) -> bytes:
    return b"".join(f + b"\r\n" for f in fields) + BODY


# -- Head ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", corpus(), ids=[p.stem for p in corpus()])
def test_split_then_join_is_the_identity(path: Path) -> None:
    data = path.read_bytes()
    assert Head.split(data).join() == data


def test_split_unfolds_continuation_lines_into_their_field() -> None:
    data = msg(b"To: a@example.com,\r\n\tb@example.com", b"Subject: x")
    head = Head.split(data)
    assert head.fields == [b"To: a@example.com,\r\n\tb@example.com\r\n", b"Subject: x\r\n"]
    assert head.eol == b"\r\n" and head.body == BODY
    assert head.values("to") == ["a@example.com,\tb@example.com"]
    assert Head.name(head.fields[0]) == "to"


def test_split_takes_bare_lf_messages_and_header_only_ones() -> None:
    lf = Head.split(b"To: a@example.com\nSubject: x\n\nbody\n")
    assert lf.eol == b"\n" and lf.fields == [b"To: a@example.com\n", b"Subject: x\n"]
    assert lf.body == b"\nbody\n"
    only = Head.split(b"Subject: x\r\n")
    assert only.fields == [b"Subject: x\r\n"] and only.body == b""


def test_without_drops_named_fields_and_keeps_the_rest_byte_for_byte() -> None:
    data = msg(b"Bcc: x@example.com", b"To: a@example.com", b"BCC: y@\r\n example.com")
    assert Head.split(data).without({"bcc"}).join() == msg(b"To: a@example.com")


def test_value_decodes_utf8_and_keeps_undecodable_bytes() -> None:
    assert Head.value("To: Jürgen <jürgen@example.de>".encode()) == "Jürgen <jürgen@example.de>"
    raw = b"Subject: \xff"
    assert Head.value(raw).encode("utf-8", "surrogateescape") == b"\xff"


# -- header_recipients --------------------------------------------------------------------------


def test_header_recipients_in_to_cc_bcc_order_with_groups() -> None:
    data = msg(b"Bcc: hidden@example.org", b"Cc: Team: c1@example.com, c2@example.com;",
               b'To: "Smith, John @ Acme" <john@example.com>, b@example.com')
    assert header_recipients(data) == ["john@example.com", "b@example.com", "c1@example.com",
                                       "c2@example.com", "hidden@example.org"]


def test_header_recipients_of_a_corpus_message() -> None:
    data = (CORPUS / "03-rfc2047-subject.eml").read_bytes()
    assert header_recipients(data) == ["francois@example.fr", "yamada@example.jp"]


# -- the recipient policy -----------------------------------------------------------------------


def test_headers_naming_exactly_the_envelope_are_left_alone() -> None:
    data = msg(b"To: Bob <bob@example.com>", b"Cc: carol@example.com")
    r = restrict_to_envelope(data, ["Carol@Example.COM", "bob@example.com"])
    assert (r.data, r.unnamed, r.removed) == (data, [], [])


def test_envelope_only_recipients_are_unnamed_and_go_in_an_added_bcc() -> None:
    data = msg(b"To: bob@example.com", b"Subject: x")
    r = restrict_to_envelope(data, ["bob@example.com", "auditor@example.org"])
    assert r.data == data and r.unnamed == ["auditor@example.org"] and r.removed == []
    out = add_bcc(r.data, r.unnamed)
    assert out == msg(b"To: bob@example.com", b"Subject: x", b"Bcc: auditor@example.org")
    assert add_bcc(data, []) == data


def test_an_outsider_is_removed_from_its_field_only() -> None:
    """1. To names bob and carol, Cc dave 2. the envelope is bob and dave 3. carol leaves To
    (display names kept), Cc and every other field keep their bytes."""
    data = msg(b"From: a@example.com", b'To: "Bob B." <bob@example.com>,\r\n carol@example.com',
               b"Cc: dave@example.com", b"Subject: x")
    r = restrict_to_envelope(data, ["bob@example.com", "dave@example.com"])
    assert r.removed == ["carol@example.com"] and r.unnamed == []
    assert r.data == msg(b"From: a@example.com", b'To: "Bob B." <bob@example.com>',
                         b"Cc: dave@example.com", b"Subject: x")
    assert header_recipients(r.data) == ["bob@example.com", "dave@example.com"]


def test_a_field_naming_only_outsiders_is_removed_and_its_recipient_goes_bcc() -> None:
    data = msg(b"To: root", b"Bcc: old@example.com", b"Subject: cron")
    r = restrict_to_envelope(data, ["root@host.example.com"])
    assert r.data == msg(b"Subject: cron")
    assert r.removed == ["root", "old@example.com"]
    assert r.unnamed == ["root@host.example.com"]


def test_groups_keep_their_name_while_a_member_remains() -> None:
    data = msg(b"To: Team: a@example.com, b@example.com;, Other: c@example.com;")
    r = restrict_to_envelope(data, ["a@example.com"])
    assert r.data == msg(b"To: Team: a@example.com;")
    assert r.removed == ["b@example.com", "c@example.com"]


def test_utf8_addresses_survive_an_edit() -> None:
    data = msg("To: Jürgen <jürgen@example.de>, x@example.com".encode())
    r = restrict_to_envelope(data, ["jürgen@example.de"])
    assert r.data == msg("To: Jürgen <jürgen@example.de>".encode())
    assert add_bcc(r.data, ["ö@example.de"]).endswith("Bcc: ö@example.de\r\n".encode() + BODY)


def test_an_edited_field_keeps_the_messages_line_endings() -> None:
    data = b"To: a@example.com, b@example.com\nSubject: x\n\nbody\n"
    r = restrict_to_envelope(data, ["a@example.com", "z@example.com"])
    out = add_bcc(r.data, r.unnamed)
    assert out == b"To: a@example.com\nSubject: x\nBcc: z@example.com\n\nbody\n"
    assert parse(out)["bcc"] == "z@example.com"


# -- which mailbox sends ------------------------------------------------------------------------


def outbound(sender: str, *recipients: str) -> OutboundMessage:
    return OutboundMessage("Q1", sender, list(recipients), b"")


def route(mailbox: str | None) -> RouteConfig:
    return RouteConfig("m365", ("*@business.com",),
                       GraphSettings(OAuthSettings("app-id"), mailbox=mailbox))  # type: ignore[arg-type]


@pytest.mark.parametrize(("mailbox", "fixed"), [(None, None), ("sender", None), ("", None),
                                                ("shared@business.com", "shared@business.com")])
def test_fixed_mailbox(mailbox: str | None, fixed: str | None) -> None:
    assert fixed_mailbox(route(mailbox)) == fixed


def test_mailbox_is_the_fixed_one_else_the_sender() -> None:
    fixed, per_sender = route("shared@business.com"), route("sender")
    msg_ = outbound("alice@business.com", "bob@example.com", "carol@example.com")
    assert mailbox_for(fixed, msg_) == "shared@business.com"
    assert mailbox_for(per_sender, msg_) == "alice@business.com"


def test_a_bounce_is_sent_from_the_mailbox_it_returns_to() -> None:
    bounce = outbound("", "alice@business.com")
    assert mailbox_for(route("sender"), bounce) == "alice@business.com"
    assert mailbox_for(route(None), bounce) == "alice@business.com"


def test_a_null_sender_with_several_recipients_has_no_mailbox() -> None:
    with pytest.raises(PermanentDeliveryError) as e:
        mailbox_for(route("sender"), outbound("", "a@business.com", "b@business.com"))
    assert e.value.code == 550


def test_header_addresses_match_the_envelope_whatever_their_encoding() -> None:
    """Raw UTF-8, Unicode case, decomposed letters (NFD) and an IDNA domain each match."""
    from relayd.delivery.mime import restrict_to_envelope

    data = ("From: a@business.com\r\nTo: DANGLÜE@Email.com, user@münchen.de\r\n"
            "Cc: =?utf-8?q?J=C3=B6rg?= <jo\u0308rg@example.com>\r\n\r\nx\r\n").encode()
    r = restrict_to_envelope(data, ["danglüe@email.com", "user@xn--mnchen-3ya.de",
                                    "jörg@example.com"])
    assert r.removed == [] and r.unnamed == [] and r.data == data
