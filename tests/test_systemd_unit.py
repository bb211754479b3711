"""The shipped systemd unit: it verifies cleanly and its sandbox scores 2.0 or better.

systemd-analyze needs ExecStart's binary to exist, so each test checks a copy of the unit
whose ExecStart runs this interpreter (`python -m relayd`) instead of /usr/local/bin/relayd.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "relayd.service"
PORT25 = ROOT / "systemd" / "port25.conf"
SYSUSERS = ROOT / "systemd" / "relayd.sysusers"
INSTALLED_BINARY = "/usr/local/bin/relayd"
MAX_EXPOSURE = 2.0
ANALYZE = shutil.which("systemd-analyze")

needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def _unit_copy(tmp_path: Path, *, port25: bool = False) -> Path:
    text = UNIT.read_text()
    assert INSTALLED_BINARY in text
    unit = tmp_path / "relayd.service"
    unit.write_text(text.replace(INSTALLED_BINARY, f"{sys.executable} -m relayd"))
    if port25:
        dropin = tmp_path / "relayd.service.d"
        dropin.mkdir()
        # The example ships fully commented out; uncomment its directives as the docs say.
        lines = [re.sub(r"^#(\[Service\]|[A-Z][A-Za-z]*=)", r"\1", line)
                 for line in PORT25.read_text().splitlines()]
        (dropin / "port25.conf").write_text("\n".join(lines) + "\n")
    return unit


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60,
                          check=False)


def _exposure(unit: Path) -> float:
    result = _analyze("security", "--offline=true", "--no-pager", str(unit))
    assert result.returncode == 0, result.stderr
    m = re.search(r"Overall exposure level for relayd\.service: (\d+(?:\.\d+)?)", result.stdout)
    assert m, result.stdout[-2000:]
    return float(m.group(1))


def test_unit_declares_what_the_design_requires() -> None:
    text = UNIT.read_text()
    directives = dict(
        line.split("=", 1) for line in text.splitlines()
        if line and not line.startswith("#") and "=" in line
    )
    assert directives["Type"] == "notify"
    assert directives["NotifyAccess"] == "main"
    assert directives["ExecStart"] == f"{INSTALLED_BINARY} serve -c /etc/relayd/relayd.toml"
    assert directives["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert directives["StateDirectory"] == "relayd"
    assert directives["ConfigurationDirectory"] == "relayd"
    assert directives["User"] == "relayd"
    assert directives["CapabilityBoundingSet"] == ""
    assert directives["RestrictAddressFamilies"] == "AF_INET AF_INET6 AF_UNIX"
    assert directives["ProtectSystem"] == "strict"
    assert "WatchdogSec" in directives
    assert "LoadCredential=token-key:" in text
    # The port-25 drop-in is an example: nothing in it is active until uncommented.
    assert all(not line or line.startswith("#") for line in PORT25.read_text().splitlines())
    assert re.search(r"^u\s+relayd\s", SYSUSERS.read_text(), re.MULTILINE)


@needs_analyze
def test_unit_verifies(tmp_path: Path) -> None:
    unit = _unit_copy(tmp_path)
    result = _analyze("verify", "--man=no", str(unit))
    assert result.returncode == 0, result.stderr
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if "relayd" in line]
    assert problems == []


@needs_analyze
def test_exposure_score_at_most_2(tmp_path: Path) -> None:
    score = _exposure(_unit_copy(tmp_path))
    assert score <= MAX_EXPOSURE, f"systemd-analyze security exposure {score}"


@needs_analyze
def test_port25_dropin_verifies_and_stays_reasonable(tmp_path: Path) -> None:
    unit = _unit_copy(tmp_path, port25=True)
    result = _analyze("verify", "--man=no", str(unit))
    assert result.returncode == 0, result.stderr
    # Granting one capability costs a little exposure; it must not undo the sandbox.
    plain = tmp_path / "plain"
    plain.mkdir()
    assert _exposure(_unit_copy(plain)) < _exposure(unit) <= 2.5
