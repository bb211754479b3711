"""Compare two messages as MIME: headers, structure and decoded payloads, not bytes."""

from __future__ import annotations

import email.policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

from relayd.delivery.mime import Head

CORPUS = Path(__file__).parent / "corpus"


def parse(data: bytes) -> EmailMessage:
    msg = BytesParser(policy=email.policy.default).parsebytes(data)
    assert isinstance(msg, EmailMessage)
    return msg


def corpus() -> list[Path]:
    return sorted(CORPUS.glob("*.eml"))


def without_headers(data: bytes, names: set[str]) -> bytes:
    """The message with every field named in `names` (lower case) removed, bytes otherwise kept."""
    return Head.split(data).without(names).join()


def assert_mime_equivalent(sent: bytes, received: bytes, ignore: set[str] = frozenset()) -> None:
    """Same headers (decoded, in order), same tree of parts, same decoded content."""
    a, b = parse(sent), parse(received)
    _compare(a, b, ignore, "message")


def _headers(msg: EmailMessage, ignore: set[str]) -> list[tuple[str, str]]:
    return [(k.lower(), str(v)) for k, v in msg.items() if k.lower() not in ignore]


def _compare(a: EmailMessage, b: EmailMessage, ignore: set[str], where: str) -> None:
    assert _headers(a, ignore) == _headers(b, ignore), f"{where}: headers differ"
    assert a.get_content_type() == b.get_content_type(), f"{where}: content type differs"
    assert a.get_params() == b.get_params(), f"{where}: content-type parameters differ"
    assert a.is_multipart() == b.is_multipart(), f"{where}: structure differs"
    if a.get_content_type() == "message/rfc822":
        inner_a, inner_b = a.get_payload(0), b.get_payload(0)
        assert isinstance(inner_a, EmailMessage) and isinstance(inner_b, EmailMessage)
        _compare(inner_a, inner_b, set(), f"{where}.rfc822")
    elif a.is_multipart():
        pa, pb = list(a.iter_parts()), list(b.iter_parts())
        assert len(pa) == len(pb), f"{where}: number of parts differs"
        for i, (x, y) in enumerate(zip(pa, pb, strict=True)):
            assert isinstance(x, EmailMessage) and isinstance(y, EmailMessage)
            _compare(x, y, set(), f"{where}.{i}")
    else:
        assert a.get_payload(decode=True) == b.get_payload(decode=True), \
            f"{where}: decoded payload differs"
        if a.get_content_maintype() == "text":
            assert a.get_content() == b.get_content(), f"{where}: text differs"
