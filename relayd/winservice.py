"""relayd as a Windows service: `relayd service install|uninstall`, and the service process.

The service runs `python.exe -m relayd _service --name NAME -c FILE` (registered with
CreateService: no pythonservice.exe host to copy, and the command line says which config it
reads). That process hands itself to the service control manager (pywin32's
servicemanager), and runs `relayd serve`'s code on the dispatcher's thread. pywin32's
ServiceFramework is used because it is the maintained binding of the service API; NSSM/WinSW
wrappers were rejected because they know nothing of draining.

- Start: START_PENDING until relayd listens (relayd.platform.proc's readiness hook), then
  RUNNING, so `sc start` and dependent services see a relay that takes mail.
- Stop (`sc stop`, Services console, shutdown): STOP_PENDING with a wait hint a little over
  relayd.service.SHUTDOWN_TIMEOUT_S, and the same draining stop as SIGTERM (proc.Requests).
- Account: the virtual account `NT SERVICE\\NAME` (its own SID for the ACLs of
  %ProgramData%\\relayd); delayed automatic start (`--start auto`) or manual; recovery:
  restart after 5 s, 30 s, 60 s on failure.
- Log: %ProgramData%\\relayd\\log\\relayd.log, rotated at LOG_MAX_BYTES, LOG_BACKUPS kept;
  start, stop and every ERROR line also go to the Windows Event Log (source NAME).
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from relayd import loop as relayd_loop
from relayd import platform
from relayd.errors import ConfigError, RelayError
from relayd.logsetup import setup_logging
from relayd.platform import proc

log = logging.getLogger(__name__)

LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5
STOP_WAIT_HINT_MS = 40_000  # SHUTDOWN_TIMEOUT_S (30 s) of draining, and the rest of the stop
START_WAIT_HINT_MS = 60_000  # recovery of a large queue happens after RUNNING; binding is quick
RESTART_DELAYS_MS = (5_000, 30_000, 60_000)
RESET_PERIOD_S = 86_400


def _command_line(name: str, config: str) -> str:
    return f'"{sys.executable}" -m relayd _service --name "{name}" -c "{config}"'


def install(config: str, name: str, start: str) -> int:
    """Register the service (stopped). 0, or 1 with one line saying why not."""
    import win32service

    scm = win32service.OpenSCManager(None, None, win32service.SC_MANAGER_ALL_ACCESS)
    try:
        try:
            handle = win32service.CreateService(
                scm, name, f"relayd SMTP relay ({name})", win32service.SERVICE_ALL_ACCESS,
                win32service.SERVICE_WIN32_OWN_PROCESS,
                win32service.SERVICE_AUTO_START if start == "auto"
                else win32service.SERVICE_DEMAND_START,
                win32service.SERVICE_ERROR_NORMAL, _command_line(name, config), None, 0,
                None, f"NT SERVICE\\{name}", None)
        except Exception as e:  # pywintypes.error: exists already, no rights
            print(f"relayd service install: {_why(e)}", file=sys.stderr)
            return 1
        try:
            _configure(handle, start)
        finally:
            win32service.CloseServiceHandle(handle)
        _event_source(name, add=True)
    finally:
        win32service.CloseServiceHandle(scm)
    print(f"service {name} installed ({start} start, account NT SERVICE\\{name}); it runs "
          f"relayd serve -c {config}; start it with: sc start {name}")
    return 0


def _configure(handle: Any, start: str) -> None:
    """Description, delayed start and recovery: each one line of warning if refused (Wine
    implements only some of ChangeServiceConfig2)."""
    import win32service

    settings: list[tuple[int, Any]] = [
        (win32service.SERVICE_CONFIG_DESCRIPTION,
         "Accepts mail from local applications and delivers it through Microsoft 365, "
         "Exchange or Gmail (relayd)."),
        (win32service.SERVICE_CONFIG_FAILURE_ACTIONS, {
            "ResetPeriod": RESET_PERIOD_S, "RebootMsg": None, "Command": None,
            "Actions": [(win32service.SC_ACTION_RESTART, ms) for ms in RESTART_DELAYS_MS]}),
    ]
    if start == "auto":
        settings.append((win32service.SERVICE_CONFIG_DELAYED_AUTO_START_INFO, True))
    for level, value in settings:
        try:
            win32service.ChangeServiceConfig2(handle, level, value)
        except Exception as e:
            print(f"warning: service setting {level} not applied: {_why(e)}", file=sys.stderr)


def _event_source(name: str, *, add: bool) -> None:
    """The Event Log source NAME, with servicemanager's message texts (without them the Event
    Viewer shows "the description cannot be found")."""
    import servicemanager
    import win32evtlogutil

    try:
        if add:
            win32evtlogutil.AddSourceToRegistry(name, servicemanager.__file__)
        else:
            win32evtlogutil.RemoveSourceFromRegistry(name)
    except Exception as e:
        print(f"warning: Event Log source {name}: {_why(e)}", file=sys.stderr)


def uninstall(name: str) -> int:
    import win32service
    import win32serviceutil

    try:
        status = win32serviceutil.QueryServiceStatus(name)[1]
    except Exception as e:
        print(f"relayd service uninstall: {_why(e)}", file=sys.stderr)
        return 1
    if status != win32service.SERVICE_STOPPED:
        try:  # it drains; one still starting cannot be told to stop, and is removed anyway
            win32serviceutil.StopService(name)
            win32serviceutil.WaitForServiceStatus(name, win32service.SERVICE_STOPPED,
                                                  STOP_WAIT_HINT_MS // 1000)
        except Exception as e:
            print(f"warning: service {name} not stopped: {_why(e)}", file=sys.stderr)
    try:
        win32serviceutil.RemoveService(name)
    except Exception as e:
        print(f"relayd service uninstall: {_why(e)}", file=sys.stderr)
        return 1
    _event_source(name, add=False)
    print(f"service {name} removed (config, queue and tokens are kept)")
    return 0


def _why(e: BaseException) -> str:
    strerror = getattr(e, "strerror", None)
    return str(strerror or e)


def service_main(argv: Sequence[str]) -> int:
    """`relayd _service`: what the service control manager starts. Not for people."""
    import argparse

    import servicemanager

    ap = argparse.ArgumentParser(prog="relayd _service")
    ap.add_argument("--name", default="relayd")
    ap.add_argument("-c", "--config", required=True)
    args = ap.parse_args(list(argv))
    cls = _service_class(args.name, args.config)
    servicemanager.Initialize(args.name, servicemanager.__file__)
    servicemanager.PrepareToHostSingle(cls)
    servicemanager.StartServiceCtrlDispatcher()
    return 0


def _service_class(name: str, config: str) -> type:
    import servicemanager
    import win32service
    import win32serviceutil

    class RelaydService(win32serviceutil.ServiceFramework):  # type: ignore[misc]
        _svc_name_ = name
        _svc_display_name_ = f"relayd SMTP relay ({name})"

        def __init__(self, args: Any) -> None:
            super().__init__(args)
            self.stop_asked = threading.Event()

        def SvcStop(self) -> None:  # noqa: N802 (pywin32's name)
            self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING,
                                     waitHint=STOP_WAIT_HINT_MS)
            self.stop_asked.set()
            # The daemon's loop may still be starting: wait for it a moment.
            deadline = time.monotonic() + START_WAIT_HINT_MS / 1000
            while time.monotonic() < deadline:
                current = proc.Requests.current
                if current is not None:
                    current.stop("service stop")
                    return
                time.sleep(0.1)

        def SvcRun(self) -> None:  # noqa: N802
            # pywin32's SvcRun reports RUNNING before the work starts: RUNNING comes from
            # the readiness hook instead, once relayd listens.
            self.ReportServiceStatus(win32service.SERVICE_START_PENDING,
                                     waitHint=START_WAIT_HINT_MS)
            self.SvcDoRun()
            # As pywin32's own: the host reports STOPPED once this returns.
            self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING)

        def SvcDoRun(self) -> None:  # noqa: N802
            code = run_service(config, self)
            servicemanager.LogInfoMsg(f"{name}: stopped (exit {code})")

    return RelaydService


def run_service(config: str, svc: Any) -> int:
    """The daemon inside the service: logs to the file and the Event Log, readiness to the
    service manager, and `relayd serve`'s code."""
    import servicemanager
    import win32service

    setup_logging("info")
    platform.LOG_DIR.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handler = logging.handlers.RotatingFileHandler(
        platform.LOG_DIR / "relayd.log", maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS,
        encoding="utf-8")
    handler.setFormatter(root.handlers[0].formatter)
    root.handlers[:] = [handler, _EventLogHandler()]

    started = False

    def status(state: str, text: str) -> None:
        nonlocal started
        if state == "ready" and not started:  # later ones follow a reload
            started = True
            svc.ReportServiceStatus(win32service.SERVICE_RUNNING)
            servicemanager.LogInfoMsg(f"relayd started: {text}" if text else "relayd started")

    proc.set_status_hook(status)
    try:
        # Imported here: `relayd service install` needs none of the daemon (its imports reach
        # cryptography and the providers, which under Wine 8 the zip's test cannot all load).
        from relayd.app import serve

        return relayd_loop.run(serve(config))
    except ConfigError as e:
        for problem in e.problems:
            log.error("config: %s", problem)
        return 2
    except (RelayError, OSError) as e:
        log.error("relayd: %s", e)
        return 1
    finally:
        proc.set_status_hook(None)
        handler.close()


class _EventLogHandler(logging.Handler):
    """ERROR lines (and worse) to the Windows Event Log, under the service's name."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)

    def emit(self, record: logging.LogRecord) -> None:
        import servicemanager

        try:
            servicemanager.LogErrorMsg(self.format(record))
        except Exception:
            self.handleError(record)
