"""What differs between POSIX and Windows, behind one interface each: `fs` (durable writes,
replace, directory sync, locks, private secret files) and `proc` (stop and reload requests,
readiness, listener workers, self-kill for the crash tests). Nothing else in relayd asks which
platform it runs on."""

from __future__ import annotations

import os
import sys
from pathlib import Path

WINDOWS = sys.platform == "win32"

# Where relayd's files live when the config does not say (DESIGN.md, "Commands"): POSIX
# /etc/relayd and /var/lib/relayd; Windows one folder, %ProgramData%\relayd, for the config,
# the queue, tokens, journal, outbox and log.
if WINDOWS:
    _DATA = Path(os.environ.get("ProgramData") or r"C:\ProgramData") / "relayd"
    CONFIG_PATH = str(_DATA / "relayd.toml")
    STATE_DIR = _DATA
else:
    CONFIG_PATH = "/etc/relayd/relayd.toml"
    STATE_DIR = Path("/var/lib/relayd")
LOG_DIR = STATE_DIR / "log"  # the Windows service's log (POSIX: the journal of systemd)
