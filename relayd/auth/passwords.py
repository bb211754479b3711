"""scrypt password hashes for [server.users]: make one (`relayd hash-password`), check one.

Format: ``scrypt$N$r$p$SALT$HASH`` with SALT and HASH in unpadded standard base64, e.g.
``scrypt$32768$8$1$q0V...$3m4...``. N, r and p are stored so that stronger parameters can be
chosen later without invalidating existing hashes.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from typing import TextIO

SCHEME = "scrypt"
SCRYPT_N = 2**15          # CPU/memory cost: 128 * N * r bytes = 32 MiB, about 50-100 ms
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
# Bounds on parameters read back from a hash, so a mistyped config cannot make each login
# allocate gigabytes or spin for minutes.
MAX_N = 2**20
MAX_R = 32
MAX_P = 16
MAX_MEMORY_BYTES = 1024 * 1024**2
MAX_PASSWORD_CHARS = 1024

_HASH_RE = re.compile(
    r"^scrypt\$(\d{1,8})\$(\d{1,3})\$(\d{1,3})\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)$")


@dataclass(frozen=True)
class _Parsed:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _memory(n: int, r: int, p: int) -> int:
    # OpenSSL needs 128*N*r for V plus 128*r*p for B and some slack.
    return 128 * n * r + 128 * r * p + 1024 * 1024


def _derive(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                          maxmem=_memory(n, r, p), dklen=length)


def _parse(stored: str) -> _Parsed:
    m = _HASH_RE.match(stored.strip())
    if not m:
        raise ValueError('must look like "scrypt$N$r$p$salt$hash" (make one with '
                         "`relayd hash-password`)")
    n, r, p = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if n < 2 or n & (n - 1) or n > MAX_N:
        raise ValueError(f"scrypt N must be a power of two between 2 and {MAX_N}")
    if not 1 <= r <= MAX_R or not 1 <= p <= MAX_P or _memory(n, r, p) > MAX_MEMORY_BYTES:
        raise ValueError("scrypt r or p out of range")
    try:
        salt, digest = _b64decode(m.group(4)), _b64decode(m.group(5))
    except (binascii.Error, ValueError):
        raise ValueError("salt or hash is not valid base64") from None
    if len(salt) < 8 or not 16 <= len(digest) <= 64:
        raise ValueError("salt or hash has the wrong length")
    return _Parsed(n, r, p, salt, digest)


def check_hash(stored: str) -> str | None:
    """Why `stored` is not a usable password hash, or None. For config validation."""
    try:
        _parse(stored)
    except ValueError as e:
        return str(e)
    return None


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R,
                  p: int = SCRYPT_P) -> str:
    """A new salted scrypt hash of `password` in the format above."""
    salt = os.urandom(SALT_BYTES)
    digest = _derive(password, salt, n, r, p, HASH_BYTES)
    return f"{SCHEME}${n}${r}${p}${_b64encode(salt)}${_b64encode(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """True when `password` matches `stored`. A malformed hash never matches.

    Takes tens of milliseconds of CPU on purpose: call it from a thread in async code.
    """
    try:
        parsed = _parse(stored)
    except ValueError:
        return False
    if len(password) > MAX_PASSWORD_CHARS:
        return False
    digest = _derive(password, parsed.salt, parsed.n, parsed.r, parsed.p, len(parsed.digest))
    return hmac.compare_digest(digest, parsed.digest)


def _strip_newline(line: str) -> str:
    if line.endswith("\r\n"):
        return line[:-2]
    if line.endswith("\n"):
        return line[:-1]
    return line


def hash_password_cli(stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """`relayd hash-password`: read a password twice, print only its hash. Exit 0, or 1."""
    try:
        if stdin.isatty():
            first = getpass.getpass("Password: ", stream=stderr)
            second = getpass.getpass("Again: ", stream=stderr)
        else:
            # Reading one character past the limit tells "too long" from "exactly at it".
            lines = [stdin.readline(MAX_PASSWORD_CHARS + 3) for _ in range(2)]
            if any(len(_strip_newline(line)) > MAX_PASSWORD_CHARS for line in lines):
                print(f"relayd hash-password: the password is longer than "
                      f"{MAX_PASSWORD_CHARS} characters", file=stderr)
                return 1
            if not lines[1]:
                print("relayd hash-password: give the password twice, on two lines",
                      file=stderr)
                return 1
            first, second = (_strip_newline(line) for line in lines)
    except (EOFError, KeyboardInterrupt):
        print("relayd hash-password: no password read", file=stderr)
        return 1
    if first != second:
        print("relayd hash-password: the two passwords differ", file=stderr)
        return 1
    if not first:
        print("relayd hash-password: the password is empty", file=stderr)
        return 1
    if len(first) > MAX_PASSWORD_CHARS:
        print(f"relayd hash-password: the password is longer than {MAX_PASSWORD_CHARS} "
              "characters", file=stderr)
        return 1
    print(hash_password(first), file=stdout)
    return 0
