"""The file system as the spool, the token cache and the config use it, the same on POSIX and
on Windows: opening and closing spool files, durable replace, directory sync, durable writes
(`write_atomic`: a file in tmp/, fsynced, renamed into place, its directory synced: the one
place relayd does this), the exclusive lock, positional reads, and whether a secret file is
private.

Durability ("250 only after stable storage"), per platform:
- POSIX: write, fsync the file, rename it into place, fsync the directory. The rename lives in
  the directory, and only the directory's fsync puts that entry on disk.
- Windows (NTFS): `os.fsync` is FlushFileBuffers, which writes the file's data and its own
  metadata through to the disk. The rename is MoveFileExW(MOVEFILE_REPLACE_EXISTING |
  MOVEFILE_WRITE_THROUGH): NTFS journals a rename as a metadata transaction in its log, and
  write-through makes the call return only once that is on disk. A rename that returned is
  then durable, which is what the directory fsync is for on POSIX; Windows has no directory
  fsync (FlushFileBuffers takes a file or a volume, and a volume flush needs Administrator
  rights and flushes everything), so `sync_dir` does nothing there. Rejected: plain
  `os.replace` (MoveFileExW without write-through), which leaves the rename in the cached log.
  `os.replace`, not `os.rename`: Windows' rename refuses an existing target.

NTFS refuses to rename or delete a file that another handle holds open (Python opens files
without FILE_SHARE_DELETE), and Wine on ext4 and Linux do not, so neither can catch it. The
spool therefore closes every file before it renames or removes it, and with
RELAYD_CHECK_OPEN_FILES=1 in the environment this module keeps count of the files opened
through it and fails a `replace` or `unlink` of one still open (`OpenFileViolation`, also
kept in `violations` for the tests to assert on, since it may happen on a thread). On Windows,
a removal that meets another process's handle (a `relayd queue show --body` reading the
message) is tried again for up to SHARING_RETRY_S before it fails.

Secret files: on POSIX, readable by nobody but the owner (mode bits; the hint is chmod 600).
On Windows, the DACL may give read access only to SYSTEM, Administrators and the account
relayd runs as; the hint is icacls. The same DACL check (one function, `_dacl_problem`)
holds on Windows for the spool and token cache folders (`private_dir_problem`), with the
folder grant wininstall applies; on POSIX those folders are not checked.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol

from relayd.platform import WINDOWS

log = logging.getLogger(__name__)

CHECK_ENV = "RELAYD_CHECK_OPEN_FILES"
CHECK = os.environ.get(CHECK_ENV, "") == "1"
SHARING_RETRY_S = 2.0  # Windows: how long a removal waits for another process's handle
_SHARING_ERRORS = (32, 5)  # ERROR_SHARING_VIOLATION, ERROR_ACCESS_DENIED (delete pending)

PathLike = str | os.PathLike[str]
O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: os.open is in text mode (\n -> \r\n) without it


class OpenFileViolation(RuntimeError):
    """A rename or removal of a file this process still holds open (NTFS would refuse it)."""


violations: list[str] = []
_open_lock = threading.Lock()
_open_paths: dict[str, int] = {}  # normalized path -> handles open through this module
_fd_paths: dict[int, str] = {}


def _key(path: PathLike) -> str:
    return os.path.normcase(os.path.abspath(os.fspath(path)))


def _check(op: str, *paths: PathLike) -> None:
    with _open_lock:
        held = [os.fspath(p) for p in paths if _open_paths.get(_key(p))]
    if held:
        what = f"{op} of {', '.join(held)} while it is open (NTFS refuses this)"
        violations.append(what)
        raise OpenFileViolation(what)


def open_fd(path: PathLike, flags: int, mode: int = 0o600) -> int:
    """os.open, counted by the checker when it is on. Close with `close_fd`."""
    fd = os.open(path, flags | O_BINARY, mode)
    if CHECK:
        key = _key(path)
        with _open_lock:
            _open_paths[key] = _open_paths.get(key, 0) + 1
            _fd_paths[fd] = key
    return fd


def close_fd(fd: int) -> None:
    if CHECK:
        with _open_lock:
            key = _fd_paths.pop(fd, None)
            if key is not None:
                left = _open_paths.get(key, 1) - 1
                if left > 0:
                    _open_paths[key] = left
                else:
                    _open_paths.pop(key, None)
    os.close(fd)


@contextlib.contextmanager
def reading(path: PathLike) -> Iterator[IO[bytes]]:
    """A file open for reading in binary, counted by the checker, closed on exit."""
    fd = open_fd(path, os.O_RDONLY)
    f = os.fdopen(fd, "rb", closefd=False)
    try:
        yield f
    finally:
        f.close()
        close_fd(fd)


def pread(fd: int, size: int, offset: int) -> bytes:
    """A read at `offset`. Windows has no pread: a seek and a read, fine on a descriptor only
    its caller uses."""
    if not WINDOWS:
        return os.pread(fd, size, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, size)


if WINDOWS:
    import ctypes

    _MOVEFILE_REPLACE_EXISTING = 0x1
    _MOVEFILE_WRITE_THROUGH = 0x8

    def _move(src: str, dst: str) -> None:
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
        if not kernel32.MoveFileExW(src, dst,
                                    _MOVEFILE_REPLACE_EXISTING | _MOVEFILE_WRITE_THROUGH):
            code = ctypes.get_last_error()  # type: ignore[attr-defined]
            raise ctypes.WinError(code)  # type: ignore[attr-defined]
else:
    def _move(src: str, dst: str) -> None:
        os.replace(src, dst)


def replace(src: PathLike, dst: PathLike) -> None:
    """Rename `src` to `dst`, replacing a file there (atomic on both; see the docstring for
    what makes it durable)."""
    if CHECK:
        _check("rename", src, dst)
    _move(os.fspath(src), os.fspath(dst))


def unlink(path: PathLike) -> None:
    """Remove a file (FileNotFoundError if it is gone). On Windows another process's open
    handle is waited for, up to SHARING_RETRY_S."""
    if CHECK:
        _check("removal", path)
    if not WINDOWS:
        os.unlink(path)
        return
    deadline = time.monotonic() + SHARING_RETRY_S
    while True:
        try:
            os.unlink(path)
            return
        except PermissionError as e:
            if getattr(e, "winerror", None) not in _SHARING_ERRORS or \
                    time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def sync_dir(path: PathLike) -> None:
    """Make the renames into a directory durable: fsync the directory on POSIX; nothing on
    Windows, where the rename itself was written through (module docstring)."""
    if WINDOWS:
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- durable writes: a file in tmp/, fsynced, renamed into place ------------------------------


class SpareFiles(Protocol):
    """Where a file to reuse may come from instead of a new one (relayd.queue.spares)."""

    def take(self, name: str) -> tuple[int, str] | None: ...


_tmp_serial = itertools.count()


def tmp_name(tmp_dir: Path | str, name: str) -> str:
    """A name in tmp/ unique by process id and a counter (O_EXCL or a claim's rename would
    refuse a clash), not by random bytes, a system call a message."""
    return os.path.join(tmp_dir, f"{name}.{os.getpid()}.{next(_tmp_serial)}")


def create_tmp(tmp_dir: Path, name: str,
               spares: SpareFiles | None = None) -> tuple[int, str, bool]:
    """A file in tmp/ (mode 0600), open for writing, and whether it is a spare (which may be
    longer than what goes into it: seal cuts it) rather than a new, empty file. A spare when
    there is one. Paths are strings here: a Path a message is a few microseconds of pathlib
    each time."""
    if spares is not None:
        taken = spares.take(name)
        if taken is not None:
            return *taken, True
    tmp = tmp_name(tmp_dir, name)
    try:
        return open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), tmp, False
    except FileNotFoundError:
        if tmp_dir.exists():
            raise
        # Someone removed tmp/ while relayd runs: make it again rather than refuse every
        # message from now on.
        tmp_dir.mkdir(mode=0o700, exist_ok=True)
        log.warning("queue: %s was missing and has been made again", tmp_dir)
        return open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), tmp, False


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


_sync_dir = sync_dir  # write_atomic's keyword of that name hides it


def write_atomic(path: Path | str, data: bytes | Iterable[bytes], tmp_dir: Path, *,
                 sync_dir: bool = True, spares: SpareFiles | None = None) -> None:
    """Write (bytes, or chunks of them), fsync, rename into place (and fsync the directory
    unless the caller batches it)."""
    fd, tmp, spare = create_tmp(tmp_dir, os.path.basename(path), spares)
    length = 0
    try:
        for chunk in (data,) if isinstance(data, bytes) else data:
            write_all(fd, chunk)
            length += len(chunk)
    except BaseException:
        drop(fd, tmp)
        raise
    seal(fd, tmp, path, length if spare else None)
    if sync_dir:
        _sync_dir(os.path.dirname(path))


def seal(fd: int, tmp: str, path: Path | str, length: int | None) -> None:
    """Cut a tmp/ file to the `length` bytes written into it (a spare may have been longer;
    None: a new file, nothing to cut), fsync, close and rename it into place (its directory
    is the caller's to fsync); removed instead when that fails."""
    try:
        if length is not None:
            os.ftruncate(fd, length)
        os.fsync(fd)
    except BaseException:
        drop(fd, tmp)
        raise
    close_fd(fd)
    replace(tmp, path)


def drop(fd: int, tmp: str) -> None:
    """Close and remove a tmp/ file that will not be put in place."""
    close_fd(fd)
    with contextlib.suppress(OSError):
        unlink(tmp)



# -- the exclusive lock (queue's daemon lock, token cache writers) ----------------------------


_ERROR_LOCK_VIOLATION = 33
_ERROR_IO_PENDING = 997


def try_lock(fd: int) -> bool:
    """Take the exclusive lock on an open file without waiting; False if another holds it.
    POSIX: flock. Windows: LockFileEx on the file's first byte (held until unlock or close;
    msvcrt.locking was rejected: under Wine its failure carries no errno to tell "held"
    from a real error)."""
    if WINDOWS:
        import pywintypes
        import win32con
        import win32file

        try:
            win32file.LockFileEx(_handle(fd), win32con.LOCKFILE_EXCLUSIVE_LOCK
                                 | win32con.LOCKFILE_FAIL_IMMEDIATELY, 1, 0,
                                 pywintypes.OVERLAPPED())
        except pywintypes.error as e:
            if e.winerror in (_ERROR_LOCK_VIOLATION, _ERROR_IO_PENDING):
                return False
            raise OSError(e.winerror, e.strerror) from None
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def lock(fd: int, poll_s: float = 0.02) -> None:
    """Take the exclusive lock, waiting as long as it takes."""
    if not WINDOWS:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    while not try_lock(fd):
        time.sleep(poll_s)


def unlock(fd: int) -> None:
    """Release the lock before the file is closed (POSIX releases it on close anyway)."""
    if WINDOWS:
        import pywintypes
        import win32file

        with contextlib.suppress(pywintypes.error):
            win32file.UnlockFileEx(_handle(fd), 1, 0, pywintypes.OVERLAPPED())


def _handle(fd: int) -> int:
    import msvcrt

    return int(msvcrt.get_osfhandle(fd))  # type: ignore[attr-defined]


# -- secret files ------------------------------------------------------------------------------


def secret_problem(path: Path, st: os.stat_result) -> str | None:
    """Why `path` is not private enough to hold a secret, as one line ending in the command
    that fixes it; None when it is private."""
    if WINDOWS:
        return _dacl_problem(path)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"{path} is readable by group or others; chmod 600 it"
    return None


def private_dir_problem(path: Path) -> str | None:
    """Why the folder `path` (the spool, the token cache) is not private, as one line naming
    who can read it and ending in the icacls command that fixes it; None when it is private
    or does not exist. Windows only: on POSIX relayd creates these folders 0700, and an
    existing install is not refused for their mode."""
    if not WINDOWS or not path.is_dir():
        return None
    return _dacl_problem(path, folder=True)


DPAPI = WINDOWS  # the token cache's key may be protected by the system (protect/unprotect)


def protect(data: bytes) -> bytes:
    """Windows: DPAPI in machine scope (CryptProtectData with CRYPTPROTECT_LOCAL_MACHINE), so
    that the service account and an Administrator running `relayd auth login` on the same
    machine can both read it, and no other machine can; the file's access list keeps other
    local accounts out."""
    import win32crypt

    return bytes(win32crypt.CryptProtectData(data, "relayd token cache key", None, None,
                                             None, _CRYPTPROTECT_LOCAL_MACHINE))


def unprotect(blob: bytes) -> bytes:
    """protect's inverse; OSError when this machine cannot open it (copied from another)."""
    import pywintypes
    import win32crypt

    try:
        return bytes(win32crypt.CryptUnprotectData(blob, None, None, None, 0)[1])
    except pywintypes.error as e:
        raise OSError(e.winerror, f"DPAPI cannot open it: {e.strerror}") from None


_CRYPTPROTECT_LOCAL_MACHINE = 0x4


def make_private(path: PathLike) -> None:
    """Make a file readable by its owner only: POSIX mode 0600; Windows a protected DACL
    (no inherited entries) giving SYSTEM, Administrators and this process's account full
    control, what `icacls` with /inheritance:r would set."""
    if not WINDOWS:
        os.chmod(path, 0o600)
        return
    _set_dacl(path, everyone_reads=False)


def _set_dacl(path: PathLike, *, everyone_reads: bool) -> None:
    import ntsecuritycon
    import win32api
    import win32security

    token = win32security.OpenProcessToken(win32api.GetCurrentProcess(),
                                           win32security.TOKEN_QUERY)
    me = win32security.GetTokenInformation(token, win32security.TokenUser)[0]
    dacl = win32security.ACL()
    for sid in (me, *(win32security.ConvertStringSidToSid(s) for s in _TRUSTED_SIDS)):
        dacl.AddAccessAllowedAce(win32security.ACL_REVISION, ntsecuritycon.FILE_ALL_ACCESS, sid)
    if everyone_reads:
        dacl.AddAccessAllowedAce(win32security.ACL_REVISION, ntsecuritycon.FILE_GENERIC_READ,
                                 win32security.ConvertStringSidToSid("S-1-1-0"))
    win32security.SetNamedSecurityInfo(
        os.fspath(path), win32security.SE_FILE_OBJECT,
        win32security.DACL_SECURITY_INFORMATION
        | win32security.PROTECTED_DACL_SECURITY_INFORMATION, None, None, dacl, None)


def make_world_readable(path: PathLike) -> None:
    """The opposite, for tests of the refusal: POSIX 0644; Windows Everyone may read."""
    if not WINDOWS:
        os.chmod(path, 0o644)
        return
    _set_dacl(path, everyone_reads=True)


_READ_BITS = 0x1 | 0x80000000 | 0x10000000  # FILE_READ_DATA, GENERIC_READ, GENERIC_ALL
_TRUSTED_SIDS = ("S-1-5-18", "S-1-5-32-544")  # SYSTEM, Administrators
_ACCESS_ALLOWED = (0, 5)  # ACCESS_ALLOWED_ACE_TYPE, ACCESS_ALLOWED_OBJECT_ACE_TYPE


def _dacl_problem(path: Path, *, folder: bool = False) -> str | None:
    """Windows: the accounts other than SYSTEM, Administrators and relayd's own that the DACL
    of the file (or folder: listing it is reading it) lets read it, with the icacls command
    that fixes it: for a folder, wininstall's grant, inherited by what it holds. Entries that
    only pass on to the folder's contents (inherit-only) do not let anyone read the folder."""
    import win32api
    import win32security

    token = win32security.OpenProcessToken(win32api.GetCurrentProcess(),
                                           win32security.TOKEN_QUERY)
    me = win32security.GetTokenInformation(token, win32security.TokenUser)[0]
    if folder:
        fix = (f'icacls "{path}" /inheritance:r /grant:r SYSTEM:(OI)(CI)F '
               f'Administrators:(OI)(CI)F "{_account(me)}":(OI)(CI)M')
    else:
        fix = (f'icacls "{path}" /inheritance:r /grant:r SYSTEM:F Administrators:F '
               f'"{win32api.GetUserName()}":R')
    sd = win32security.GetFileSecurity(str(path), win32security.DACL_SECURITY_INFORMATION)
    dacl = sd.GetSecurityDescriptorDacl()
    if dacl is None:
        return f"{path} has no access list, so everyone can read it; {fix}"
    trusted = {win32security.ConvertSidToStringSid(me), *_TRUSTED_SIDS}
    readers: list[str] = []
    for i in range(dacl.GetAceCount()):
        ace: Any = dacl.GetAce(i)
        (ace_type, flags), mask, sid = ace[0], ace[1], ace[-1]
        if ace_type not in _ACCESS_ALLOWED or not mask & _READ_BITS or flags & _INHERIT_ONLY:
            continue
        if win32security.ConvertSidToStringSid(sid) in trusted:
            continue
        readers.append(_account(sid))
    if readers:
        return f"{path} is readable by {', '.join(sorted(set(readers)))}; {fix}"
    return None


_INHERIT_ONLY = 0x8  # INHERIT_ONLY_ACE


def _account(sid: Any) -> str:
    import win32security

    try:
        name, domain, _ = win32security.LookupAccountSid(None, sid)
    except Exception:  # an orphaned SID: show it as it is
        return str(win32security.ConvertSidToStringSid(sid))
    return f"{domain}\\{name}" if domain else str(name)
