"""relayd.platform: the open-file checker, the secret-file check, the BOM and path forms of
config files, control/ requests for reload, `relayd reload` and `relayd service` elsewhere."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    Upstream,
    daemon,
    free_port,
    message,
    relayd_cli,
    send,
    smtp_route,
    wait_for,
    write_config,
)

from relayd.config import load_config
from relayd.errors import ConfigError
from relayd.platform import fs
from relayd.queue import Spool

POSIX_ONLY = pytest.mark.skipif(sys.platform == "win32", reason="POSIX mode bits")


@pytest.fixture
def checker(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The open-file checker on for one test; what it caught (and nothing left over)."""
    monkeypatch.setattr(fs, "CHECK", True)
    caught: list[str] = []
    before = len(fs.violations)
    yield caught
    caught.extend(fs.violations[before:])
    del fs.violations[before:]


def test_checker_fails_a_rename_or_removal_of_an_open_file(tmp_path: Path,
                                                            checker: list[str]) -> None:
    """1. a file open through relayd.platform.fs 2. rename and unlink refused (NTFS would)
    3. closed: both work."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x")
    fd = fs.open_fd(a, os.O_RDONLY)
    with pytest.raises(fs.OpenFileViolation, match="rename"):
        fs.replace(a, b)
    with pytest.raises(fs.OpenFileViolation, match="removal"):
        fs.unlink(a)
    b.write_bytes(b"y")
    with pytest.raises(fs.OpenFileViolation):
        fs.replace(b, a)  # onto an open file: NTFS refuses that too
    fs.close_fd(fd)
    fs.replace(a, b)
    assert b.read_bytes() == b"x"
    with fs.reading(b) as f:
        assert f.read() == b"x"
        with pytest.raises(fs.OpenFileViolation):
            fs.unlink(b)
    fs.unlink(b)
    assert not b.exists()
    assert len(fs.violations) >= 4  # each refusal is also kept for the conftest check


async def test_spool_round_trip_with_the_checker_on(tmp_path: Path,
                                                    checker: list[str]) -> None:
    """The spool's own life cycle (accept, spare reuse, state, remove, recover) renames and
    removes only closed files."""
    spool = Spool(tmp_path / "q", keep_spares=True)
    spool.create()
    spool.lock()
    try:
        for i in range(40):
            entry = await spool.store("a@x", ["b@y"], b"Subject: %d\r\n\r\nhi\r\n" % i)
            spool.save_state(entry)
            assert spool.read_data(entry).startswith(b"Subject:")
            spool.remove(entry.id, size=entry.file_size)
        draft = spool.draft("a@x", ["b@y"])
        draft.write(b"Subject: draft\r\n\r\nbody\r\n")
        kept = await spool.commit(draft)
        assert [e.id for e in spool.recover()] == [kept.id]
    finally:
        spool.close()
        spool.unlock()
    assert checker == []


@POSIX_ONLY
def test_secret_readable_by_others_names_the_fix(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("x")
    secret.chmod(0o644)
    assert fs.secret_problem(secret, secret.stat()) == \
        f"{secret} is readable by group or others; chmod 600 it"
    secret.chmod(0o600)
    assert fs.secret_problem(secret, secret.stat()) is None


def test_a_secret_readable_by_everyone_is_refused_naming_the_fix(tmp_path: Path) -> None:
    """chmod 644 (on Windows: an access list that lets Everyone read, which is what Wine makes
    of mode 644): `relayd check` refuses it in one line naming the command that fixes it,
    icacls on Windows, chmod 600 elsewhere."""
    secret = tmp_path / "pw"
    secret.write_text("s3cret")
    secret.chmod(0o644)
    route = smtp_route("staff", '["*@business.com"]', 25,
                       f'username = "u@business.com"\npassword_file = "{secret}"')
    cfg = write_config(tmp_path, route)
    done = relayd_cli("check", "-c", str(cfg))
    assert done.returncode == 2
    [line] = done.stdout.splitlines() + done.stderr.splitlines()
    assert line.startswith("routes.staff.password_file: ")
    if sys.platform == "win32":
        assert "readable by Everyone" in line and 'icacls "' in line
    else:
        assert line.endswith("chmod 600 it")
    assert "s3cret" not in line
    secret.chmod(0o600)
    assert relayd_cli("check", "-c", str(cfg)).returncode == 0


@pytest.mark.skipif(sys.platform != "win32", reason="Windows access lists (tests/windows/run.sh); "
                    "on POSIX relayd makes the folders 0700 and does not check existing ones")
def test_a_queue_folder_readable_by_everyone_is_refused_naming_the_fix(tmp_path: Path) -> None:
    """A spool folder whose access list lets Everyone read it (what Wine makes of mode 755):
    `relayd check` lists it and `relayd serve` refuses to start, each in one line naming
    `queue.path`, who can read it and the icacls command; the same folder private (700)
    passes."""
    queue, tokens = tmp_path / "queue", tmp_path / "tokens"
    queue.mkdir()
    tokens.mkdir()
    tokens.chmod(0o700)
    queue.chmod(0o755)
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', 25),
                       extra=f'[auth]\npath = "{tokens}"')
    shown = os.path.normpath(queue)  # relayd's own path text: backslashes
    for command in ("check", "serve"):
        done = relayd_cli(command, "-c", str(cfg))
        assert done.returncode == 2, (command, done.stderr)
        [line] = done.stderr.splitlines()
        assert line.startswith(f"queue.path: {shown} is readable by "), line
        assert "Everyone" in line and f'icacls "{shown}" /inheritance:r /grant:r ' in line
    queue.chmod(0o700)
    done = relayd_cli("check", "-c", str(cfg))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{cfg}: ok, ")


@pytest.mark.skipif(not fs.DPAPI, reason="DPAPI is Windows'")
def test_the_dpapi_protected_key_round_trips_a_token_cache(tmp_path: Path) -> None:
    """No auth.key_file on Windows: `auth login`'s store makes a key protected by DPAPI
    (machine scope) in auth.path; a second store (the daemon) reads the cache back with it;
    the key file holds no key material in the clear."""
    from relayd.auth.tokencache import DPAPI_KEY_NAME, TokenStore

    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', 25),
                       extra=f'[auth]\npath = "{tmp_path / "tokens"}"\n')
    config = load_config(cfg)
    writer = TokenStore(config)
    writer.fernet(create=True)
    with writer.locked():
        writer.save("staff", "a@business.com", '{"AccessToken": {}}')
    key = tmp_path / "tokens" / DPAPI_KEY_NAME
    blob = key.read_bytes()
    assert len(blob) > 64 and fs.unprotect(blob).strip() not in blob
    stored = TokenStore(load_config(cfg)).load("staff", "a@business.com")
    assert stored is not None and stored.cache == '{"AccessToken": {}}'


def test_config_and_secret_with_a_utf8_bom_and_windows_path_forms(tmp_path: Path) -> None:
    """Notepad's byte order mark in the config and in a secret file is accepted; a path as a
    TOML literal string with backslashes, or with forward slashes, reads the same file."""
    secret = tmp_path / "pw"
    secret.write_bytes(b"\xef\xbb\xbfs3cret\r\n")
    secret.chmod(0o600)
    route = smtp_route("staff", '["*@business.com"]', 25,
                       f"username = \"u@business.com\"\npassword_file = '{secret}'")
    cfg = write_config(tmp_path, route)
    cfg.write_bytes(b"\xef\xbb\xbf" + cfg.read_bytes())
    password = load_config(cfg).routes["staff"].smtp.password
    assert password is not None and password.reveal() == "s3cret"
    # A literal string keeps backslashes as they are: on Windows the separator, elsewhere
    # part of a file name.
    odd = tmp_path / "a\\b"
    if sys.platform == "win32":
        odd = tmp_path / "b"
    odd.write_text("x")
    odd.chmod(0o600)
    backslashed = os.path.normpath(odd) if sys.platform == "win32" else str(odd)
    assert "\\" in backslashed
    text = cfg.read_text(encoding="utf-8-sig").replace(f"'{secret}'", f"'{backslashed}'")
    cfg.write_text(text)
    password = load_config(cfg).routes["staff"].smtp.password
    assert password is not None and password.reveal() == "x"


def test_a_bad_utf8_config_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "relayd.toml"
    cfg.write_bytes(b"[server]\nhostname = \"\xff\"\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(cfg)


def test_reload_requests_are_not_taken_by_the_queue_manager(tmp_path: Path) -> None:
    """control/ holds `queue retry` requests and `relayd reload` requests side by side:
    each taker gets its own."""
    spool = Spool(tmp_path / "q")
    spool.create()
    spool.request("reload", "config")
    spool.request("retry", "all")
    assert spool.take_requests() == [("retry", "all")]
    assert spool.take_requests(("reload",)) == [("reload", "config")]
    assert os.listdir(spool.control_dir) == []


def test_service_elsewhere_names_systemd(tmp_path: Path) -> None:
    if sys.platform == "win32":
        pytest.skip("the Windows service is tested by tests/windows/run.sh")
    done = relayd_cli("service", "install", "-c", str(tmp_path / "relayd.toml"))
    assert done.returncode == 2
    assert "systemd" in done.stderr


def test_reload_without_a_daemon_fails(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', 25))
    done = relayd_cli("reload", "-c", str(cfg))
    assert done.returncode == 1
    assert "no relayd is running" in done.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="a `relayd serve` subprocess stopped "
                    "by SIGTERM; Windows: tests/windows/run.sh")
async def test_relayd_reload_applies_a_new_route_and_refuses_a_bad_config(
        tmp_path: Path, upstream: Upstream, upstream2: Upstream) -> None:
    """1. route to upstream 1 2. config moved to upstream 2, `relayd reload`: new mail goes
    there 3. a broken config: `relayd reload` exits 2 naming the key, the daemon is not
    asked and keeps the old config."""
    port = free_port()
    listen = f"127.0.0.1:{port}"
    cfg = write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream.port),
                       listen=listen)
    log = tmp_path / "relayd.log"
    async with daemon(cfg, port, log) as proc:
        await send(port, "a@business.com", ["x@example.com"], message(subject="one"))
        await wait_for(lambda: len(upstream.messages) == 1)
        write_config(tmp_path, smtp_route("staff", '["*@business.com"]', upstream2.port),
                     listen=listen)
        done = relayd_cli("reload", "-c", str(cfg))
        assert done.returncode == 0, done.stderr
        assert "taken by the running daemon" in done.stdout
        await wait_for(lambda: "reload: config applied" in log.read_text(), what="reload")
        assert "reload requested (relayd reload)" in log.read_text()
        await send(port, "a@business.com", ["x@example.com"], message(subject="two"))
        await wait_for(lambda: len(upstream2.messages) == 1, what="delivery on the new route")
        cfg.write_text(cfg.read_text() + "\n[routes.broken]\nupstream = 42\n")
        done = relayd_cli("reload", "-c", str(cfg))
        assert done.returncode == 2
        assert "routes.broken.upstream" in done.stdout + done.stderr
        await send(port, "a@business.com", ["x@example.com"], message(subject="three"))
        await wait_for(lambda: len(upstream2.messages) == 2, what="old config still works")
        assert proc.poll() is None
    assert log.read_text().count("reload: config applied") == 1
