"""The MSI (windows/build-msi.sh) under Wine's msiexec, in a fresh prefix. Run by
tests/windows/run.sh:   python msi_install.py MSI PREFIX
1. `msiexec /i relayd.msi /qn`: the program under %ProgramFiles%\\relayd, the sample config
under %ProgramData%\\relayd, the service registered 2. a working config: `relayd.cmd check`
exits 0 3. `msiexec /x /qn`: the service and the program are gone, the config stays."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def step(text: str) -> None:
    print(f"[windows msi] {text}", flush=True)


def main() -> int:
    msi, prefix = Path(sys.argv[1]), Path(sys.argv[2])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(WINEPREFIX=str(prefix), WINEARCH="win64",
               WINEDEBUG=os.environ.get("WINEDEBUG", "-all"))

    def wine(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["wine", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env, timeout=timeout)

    t0 = time.monotonic()
    subprocess.run(["wineboot", "--init"], env=env, stdout=subprocess.PIPE,
                   stderr=subprocess.STDOUT, check=True, timeout=180)
    wine("reg", "delete", r"HKLM\Software\Microsoft\Windows NT\CurrentVersion\AeDebug",
         "/v", "Debugger", "/f")
    win_msi = "Z:" + str(msi).replace("/", "\\")
    try:
        done = wine("msiexec", "/i", win_msi, "/qn")
        print(done.stdout.rstrip())
        assert done.returncode == 0, done.stdout
        drive_c = prefix / "drive_c"
        program, data = drive_c / "Program Files" / "relayd", drive_c / "ProgramData" / "relayd"
        assert (program / "relayd.cmd").exists() and (program / "python" / "python.exe").exists()
        assert (data / "relayd.toml").exists()
        assert wine("sc", "query", "relayd").returncode == 0
        # Wine 8 lacks propsys.VariantToString, which _wmi (platform's WMI queries) calls.
        wmi = program / "python" / "_wmi.pyd"
        if wmi.exists():
            wmi.rename(wmi.with_suffix(".pyd.disabled-for-wine"))
        # Wine starts "auto" services with every later wine command; Windows only at boot.
        wine("reg", "add", r"HKLM\System\CurrentControlSet\Services\relayd", "/v", "Start",
             "/t", "REG_DWORD", "/d", "3", "/f")
        step("msiexec /i: program, sample config, service")
        (data / "relayd.toml").write_text("""[server]
listen = ["127.0.0.1:2525"]

[routes.drafts]
senders = ["*"]
upstream = "outbox"
path = 'C:\\ProgramData\\relayd\\outbox'
""")
        checked = wine("cmd", "/c", r"C:\Program Files\relayd\relayd.cmd", "check")
        assert checked.returncode == 0 and "ok, 1 route(s)" in checked.stdout, checked.stdout
        step("relayd.cmd check from the MSI's files: ok")
        gone = wine("msiexec", "/x", win_msi, "/qn")
        assert gone.returncode == 0, gone.stdout
        assert wine("sc", "query", "relayd").returncode != 0
        assert not (program / "python" / "python.exe").exists()
        assert (data / "relayd.toml").exists()
        step(f"msiexec /x: service and program gone, config kept ({time.monotonic() - t0:.0f} s)")
    finally:
        subprocess.run(["wineserver", "-k"], env=env)
        subprocess.run(["wineserver", "-w"], env=env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
