"""scrypt password hashes: format, verification, and the `relayd hash-password` command."""

from __future__ import annotations

import io
import re

import pytest

from relayd.auth import passwords
from relayd.auth.passwords import check_hash, hash_password, hash_password_cli, verify_password

# Small cost parameters keep the tests fast; the default cost is exercised once.
FAST = {"n": 2**10, "r": 8, "p": 1}


def test_default_hash_has_documented_format_and_verifies() -> None:
    stored = hash_password("correct horse")
    m = re.fullmatch(r"scrypt\$(\d+)\$(\d+)\$(\d+)\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)", stored)
    assert m, stored
    assert (int(m[1]), int(m[2]), int(m[3])) == (passwords.SCRYPT_N, passwords.SCRYPT_R,
                                                 passwords.SCRYPT_P)
    assert verify_password("correct horse", stored)
    assert not verify_password("correct horse ", stored)
    assert check_hash(stored) is None


def test_salt_makes_each_hash_different() -> None:
    assert hash_password("pw", **FAST) != hash_password("pw", **FAST)


def test_non_ascii_password() -> None:
    stored = hash_password("pässwörd–€", **FAST)
    assert verify_password("pässwörd–€", stored)
    assert not verify_password("passwort", stored)


@pytest.mark.parametrize("bad", [
    "",
    "plaintext",
    "scrypt$1024$8$1$c2FsdHNhbHQ",                       # missing hash
    "scrypt$1000$8$1$c2FsdHNhbHRzYWx0$" + "A" * 43,      # N not a power of two
    "scrypt$2097152$8$1$c2FsdHNhbHRzYWx0$" + "A" * 43,   # N too large: memory bomb
    "scrypt$1024$99$1$c2FsdHNhbHRzYWx0$" + "A" * 43,     # r too large
    "scrypt$1024$8$1$!!!!$" + "A" * 43,                  # not base64
    "scrypt$1024$8$1$c2FsdHNhbHRzYWx0$QUJD",             # hash too short
    "bcrypt$2b$12$abcdefghijklmnopqrstuv",
])
def test_malformed_hash_never_verifies_and_is_explained(bad: str) -> None:
    assert not verify_password("anything", bad)
    reason = check_hash(bad)
    assert reason
    assert bad[10:] not in reason or not bad[10:]   # the reason does not echo the hash


def test_overlong_password_refused() -> None:
    stored = hash_password("x" * 10, **FAST)
    assert not verify_password("x" * 5000, stored)


def _cli(stdin_text: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = hash_password_cli(io.StringIO(stdin_text), out, err)
    return rc, out.getvalue(), err.getvalue()


def test_cli_prints_only_the_hash() -> None:
    rc, out, err = _cli("s3cret pass\ns3cret pass\n")
    assert rc == 0
    assert err == ""
    lines = out.splitlines()
    assert len(lines) == 1
    assert verify_password("s3cret pass", lines[0])
    assert "s3cret" not in out


def test_cli_crlf_lines() -> None:
    rc, out, _ = _cli("pw1\r\npw1\r\n")
    assert rc == 0
    assert verify_password("pw1", out.strip())


def test_cli_mismatch_exits_1_without_echoing() -> None:
    rc, out, err = _cli("first-secret\nsecond-secret\n")
    assert rc == 1
    assert out == ""
    assert "differ" in err
    assert "secret" not in err.replace("relayd", "")


@pytest.mark.parametrize("text", ["", "only-once\n", "\n\n"])
def test_cli_missing_or_empty_exits_1(text: str) -> None:
    rc, out, err = _cli(text)
    assert rc == 1
    assert out == ""
    assert err.startswith("relayd hash-password: ")


def test_cli_too_long() -> None:
    pw = "y" * (passwords.MAX_PASSWORD_CHARS + 1)
    rc, out, err = _cli(f"{pw}\n{pw}\n")
    assert rc == 1
    assert out == ""
    assert "longer" in err
