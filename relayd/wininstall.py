"""The Windows installer's steps (install.ps1 runs `python\\python.exe -m relayd.wininstall
install --from FOLDER`), in Python so that they are the same wherever they run: PowerShell on
Windows, and the tests under Wine, whose PowerShell is a stub.

install (also the upgrade):
  1. a running relayd service is stopped (it drains) before its files are replaced
  2. the unpacked folder is copied to %ProgramFiles%\\relayd (the program only; an upgrade
     replaces it)
  3. %ProgramData%\\relayd is made, readable only by SYSTEM, Administrators and the service's
     account NT SERVICE\\relayd (icacls; inherited by the queue, tokens, journal and log
     folders relayd makes under it); the sample config is put there as relayd.toml unless one
     exists: an upgrade keeps the config, queue and tokens
  4. the service is registered if it is not (`relayd service install`, delayed automatic)
  5. %ProgramFiles%\\relayd goes on the machine's PATH (relayd, relayd sendmail)
  6. `relayd check` of the config: when it passes, the service is started; otherwise it stays
     stopped and the installer says what to do
uninstall: the service and the program folder go, and the PATH entry; %ProgramData%\\relayd
(config, queue, tokens, journal, log) stays.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SERVICE = "relayd"
SAMPLE = "relayd.toml.sample"
ENV_KEY = r"SYSTEM\CurrentControlSet\Control\Session Manager\Environment"


def program_dir() -> Path:
    return Path(os.environ.get("ProgramFiles") or r"C:\Program Files") / "relayd"


def data_dir() -> Path:
    from relayd import platform

    return platform.STATE_DIR


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True)


def _relayd(target: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _run(str(target / "python" / "python.exe"), "-m", "relayd", *args)


def _service_state() -> str | None:
    """RUNNING, STOPPED, ... or None when there is no such service."""
    import win32service
    import win32serviceutil

    try:
        status = win32serviceutil.QueryServiceStatus(SERVICE)[1]
    except Exception:
        return None
    return "RUNNING" if status == win32service.SERVICE_RUNNING else "STOPPED"


def install(source: Path, *, start: bool = True) -> int:
    target, data = program_dir(), data_dir()
    state = _service_state()
    if state == "RUNNING":
        print(f"stopping the {SERVICE} service for the upgrade (it drains first)")
        _run("sc", "stop", SERVICE)
        _wait_stopped()
    if source.resolve() != target.resolve():
        if (target / "python").exists():
            try:
                shutil.rmtree(target / "python")
            except PermissionError as e:
                print(f"cannot replace {target}: {e.filename} is in use (stop relayd, close "
                      "its windows, and run the installer again)")
                return 1
        # copyfile, not copy2: Wine 8 lacks CopyFile2, which copy2 uses on 3.12+.
        shutil.copytree(source, target, dirs_exist_ok=True, copy_function=shutil.copyfile)
    print(f"program: {target}")
    data.mkdir(parents=True, exist_ok=True)
    acl = _run("icacls", str(data), "/inheritance:r", "/grant:r", "SYSTEM:(OI)(CI)F",
               "Administrators:(OI)(CI)F", f"NT SERVICE\\{SERVICE}:(OI)(CI)M")
    if acl.returncode != 0:
        print(f"warning: icacls {data}: {acl.stdout.strip() or acl.stderr.strip()}")
    config = data / "relayd.toml"
    if not config.exists():
        shutil.copyfile(target / SAMPLE, config)
        print(f"config: {config} (the sample: edit it)")
    else:
        print(f"config: {config} (kept)")
    if state is None:
        done = _relayd(target, "service", "install", "-c", str(config), "--name", SERVICE,
                       "--start", "auto")
        print(done.stdout.strip() or done.stderr.strip())
        if done.returncode != 0:
            return 1
    if _edit_path(target, add=True):
        print(f"PATH: {target} added (new windows see it)")
    checked = _relayd(target, "check", "-c", str(config))
    if checked.returncode != 0:
        print(f"the {SERVICE} service stays stopped until `relayd check` accepts "
              f"{config}:\n{checked.stdout}{checked.stderr}".rstrip())
        print(f"edit it, then: relayd check; sc start {SERVICE}")
        return 0
    if start:
        started = _run("sc", "start", SERVICE)
        print(f"service {SERVICE}: " + ("started" if started.returncode == 0
                                         else f"not started: {started.stdout.strip()}"))
    return 0


def _wait_stopped(timeout_s: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while _service_state() == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)


def _edit_path(target: Path, *, add: bool) -> bool:
    """Add `target` to the machine's PATH, or remove it; True when PATH changed."""
    winreg: Any = importlib.import_module("winreg")  # Windows only

    with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, ENV_KEY, 0,
                        winreg.KEY_READ | winreg.KEY_WRITE) as key:
        try:
            value, kind = winreg.QueryValueEx(key, "Path")
        except FileNotFoundError:
            value, kind = "", winreg.REG_EXPAND_SZ
        parts = [p for p in str(value).split(";") if p]
        keep = [p for p in parts
                if os.path.normcase(p.rstrip("\\")) != os.path.normcase(str(target))]
        if add == (len(keep) < len(parts)):
            return False  # already there (add) or not there (remove)
        winreg.SetValueEx(key, "Path", 0, kind, ";".join([*keep, str(target)] if add else keep))
        return True


def uninstall(*, keep_files: bool = False) -> int:
    """`keep_files`: the MSI's uninstall, which removes the program's files itself."""
    target = program_dir()
    if _service_state() is not None:
        from relayd.winservice import uninstall as remove_service

        if remove_service(SERVICE) != 0:
            return 1
    _edit_path(target, add=False)
    here = Path(sys.executable).resolve().parent.parent
    if keep_files:
        pass
    elif here == target.resolve():
        print(f"remove {target} by hand (this installer runs from it)")
    else:
        shutil.rmtree(target, ignore_errors=True)
    print(f"relayd removed; {data_dir()} (config, queue, tokens, journal, log) is kept")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="relayd.wininstall")
    sub = ap.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("install")
    i.add_argument("--from", dest="source", required=True, help="the unpacked zip's folder")
    i.add_argument("--no-start", action="store_true")
    u = sub.add_parser("uninstall")
    u.add_argument("--keep-files", action="store_true", help="the MSI removes them")
    args = ap.parse_args(argv)
    if args.cmd == "install":
        return install(Path(args.source), start=not args.no_start)
    return uninstall(keep_files=args.keep_files)


if __name__ == "__main__":
    sys.exit(main())
