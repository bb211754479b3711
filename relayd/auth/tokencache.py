"""Encrypted on-disk token caches for delegated sign-ins: one file per route and user, mode 0600."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from relayd.config import CREDENTIALS_ENV, Config
from relayd.errors import AuthenticationError
from relayd.platform import fs

CREDENTIAL_NAME = "token-key"  # systemd LoadCredential= name
MIN_KEY_BYTES = 16
TOKEN_SUFFIX = ".token"
STATE_SUFFIX = ".state"
LOCK_NAME = ".lock"
DPAPI_KEY_NAME = "token-key.dpapi"  # Windows, no key_file: the key, DPAPI-protected, in auth.path
_SAFE_RE = re.compile(r"^[A-Za-z0-9@._+-]{1,200}$")


def _safe(part: str) -> str:
    """A file-name-safe form of a route name or address; odd ones are hashed, not escaped."""
    part = part.lower()
    if _SAFE_RE.match(part) and not part.startswith("."):
        return part
    return "h-" + hashlib.sha256(part.encode()).hexdigest()[:32]


def key_path(config: Config) -> Path | None:
    """Where the cache key lives: auth.key_file, else the systemd credential, else (Windows)
    auth.path/token-key.dpapi, protected by DPAPI in machine scope, else nowhere."""
    if config.auth.key_file is not None:
        return config.auth.key_file
    cred_dir = os.environ.get(CREDENTIALS_ENV)
    if cred_dir:
        return Path(cred_dir) / CREDENTIAL_NAME
    if fs.DPAPI:
        return config.auth.path / DPAPI_KEY_NAME
    return None


def _derive(secret: bytes) -> Fernet:
    # Any random secret works as key material (a Fernet key, `systemd-creds` output, ...): HKDF
    # turns it into the 32 bytes Fernet needs.
    raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=b"relayd token cache v1").derive(secret)
    return Fernet(base64.urlsafe_b64encode(raw))


def load_key(config: Config, *, create: bool = False) -> Fernet:
    """The cache cipher. `create` makes a new key at auth.key_file when it does not exist yet
    (for `relayd auth login`); the daemon never creates one."""
    path = key_path(config)
    if path is None:
        raise AuthenticationError(
            f"no token cache key: set auth.key_file or the systemd credential {CREDENTIAL_NAME!r}")
    dpapi = config.auth.key_file is None and path.name == DPAPI_KEY_NAME
    if create and (config.auth.key_file is not None or dpapi) and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        material = secrets.token_urlsafe(32).encode() + b"\n"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | fs.O_BINARY, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(fs.protect(material) if dpapi else material)
            f.flush()
            os.fsync(f.fileno())
        fs.make_private(path)  # Windows: mode bits mean nothing there; the access list does
    try:
        secret = path.read_bytes()
        if dpapi:
            secret = fs.unprotect(secret)
        # utf-8-sig's mark: a key file written with Notepad or PowerShell 5.
        secret = secret.removeprefix(b"\xef\xbb\xbf").strip()
    except OSError as e:
        raise AuthenticationError(f"cannot read token cache key {path}: {e.strerror}") from None
    if len(secret) < MIN_KEY_BYTES:
        raise AuthenticationError(f"token cache key {path} is too short (at least "
                                  f"{MIN_KEY_BYTES} bytes)")
    return _derive(secret)


@dataclass(frozen=True)
class Stamp:
    """Identifies one version of a file; a rename by another process changes the inode."""

    ino: int
    mtime_ns: int
    size: int


@dataclass(frozen=True)
class StoredCache:
    route: str
    account: str
    cache: str  # msal SerializableTokenCache.serialize() output
    stamp: Stamp


class TokenStore:
    """The folder of encrypted token caches (auth.path) and their status sidecars."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.root = config.auth.path
        self._fernet: Fernet | None = None

    def fernet(self, *, create: bool = False) -> Fernet:
        if self._fernet is None:
            self._fernet = load_key(self.config, create=create)
        return self._fernet

    def path(self, route: str, account: str) -> Path:
        return self.root / f"{_safe(route)}--{_safe(account)}{TOKEN_SUFFIX}"

    def state_path(self, route: str, account: str) -> Path:
        return self.root / f"{_safe(route)}--{_safe(account)}{STATE_SUFFIX}"

    def exists(self, route: str, account: str) -> bool:
        return self.path(route, account).is_file()

    def stamp(self, route: str, account: str) -> Stamp | None:
        try:
            st = self.path(route, account).stat()
        except OSError:
            return None
        return Stamp(st.st_ino, st.st_mtime_ns, st.st_size)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One writer at a time across processes (daemon refreshing, `auth login` storing)."""
        self._ensure_root()
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fs.lock(fd)
            try:
                yield
            finally:
                fs.unlock(fd)
        finally:
            os.close(fd)

    def _ensure_root(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def load(self, route: str, account: str) -> StoredCache | None:
        """The cache for route/account, or None if nobody signed in. Raises AuthenticationError
        when the file cannot be decrypted (wrong key, corrupt)."""
        return self.load_file(self.path(route, account))

    def load_file(self, path: Path) -> StoredCache | None:
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                blob = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise AuthenticationError(f"cannot read token cache {path}: {e.strerror}") from None
        try:
            doc = json.loads(self.fernet().decrypt(blob))
            return StoredCache(str(doc["route"]), str(doc["account"]), str(doc["cache"]),
                               Stamp(st.st_ino, st.st_mtime_ns, st.st_size))
        except (InvalidToken, ValueError, KeyError, TypeError):
            raise AuthenticationError(f"token cache {path} cannot be decrypted with the "
                                      "configured key; run `relayd auth login` again") from None

    def save(self, route: str, account: str, cache: str) -> Stamp:
        """Encrypt and write atomically (temp, fsync, rename, fsync dir); call under locked()."""
        self._ensure_root()
        blob = self.fernet().encrypt(json.dumps(
            {"route": route, "account": account, "cache": cache}).encode())
        path = self.path(route, account)
        fs.write_atomic(path, blob, path.parent)
        st = path.stat()
        return Stamp(st.st_ino, st.st_mtime_ns, st.st_size)

    def remove(self, route: str, account: str) -> None:
        for p in (self.path(route, account), self.state_path(route, account)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def files(self, route: str) -> list[Path]:
        """The cache files stored for `route` (load_file() tells whose each one is)."""
        prefix = f"{_safe(route)}--"
        try:
            names = sorted(os.listdir(self.root))
        except OSError:
            return []
        return [self.root / n for n in names if n.startswith(prefix) and n.endswith(TOKEN_SUFFIX)]

    def write_state(self, route: str, account: str, **fields: Any) -> None:
        """Record the last outcome (error text, expiry) for `relayd auth status`. Never a token."""
        try:
            self._ensure_root()
            doc = {"route": route, "account": account, "at": time.time(), **fields}
            path = self.state_path(route, account)
            # Informative and cheap: its directory is not synced.
            fs.write_atomic(path, json.dumps(doc).encode(), path.parent, sync_dir=False)
        except OSError:
            pass  # status is informative; failing to record it must not fail a delivery

    def update_state(self, route: str, account: str, **fields: Any) -> None:
        """write_state keeping the fields not given (last refresh, sign-in time)."""
        doc = self.read_state(route, account)
        doc.pop("at", None)
        doc.pop("route", None)
        doc.pop("account", None)
        doc.update(fields)
        self.write_state(route, account, **doc)

    def read_state(self, route: str, account: str) -> dict[str, Any]:
        try:
            doc = json.loads(self.state_path(route, account).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}
