"""The Windows zip in a fresh Wine prefix: unpacked, installed by install.ps1's steps, and
`relayd check` and `relayd serve` work from the installed copy. Run by tests/windows/run.sh:
    python zip_install.py ZIP PREFIX
1. a new prefix (wineboot), the zip unpacked to C:\\dist 2. the installer, as install.ps1 runs
it (`python\\python.exe -m relayd.wininstall install --from C:\\dist\\relayd-VERSION`; Wine's
powershell.exe is a stub): program under %ProgramFiles%\\relayd, the sample config under
%ProgramData%\\relayd, the service registered and left stopped (the sample does not pass
`relayd check`), relayd on PATH 3. a working config (an outbox route): `relayd.cmd check`
exits 0; `relayd.cmd serve` takes a message from Linux's smtplib and writes the .eml 4. the
installer again (an upgrade): the config is kept 5. uninstall: the service is gone, the
config stays."""

from __future__ import annotations

import os
import smtplib
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

WAIT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def step(text: str) -> None:
    print(f"[windows zip] {text}", flush=True)


def main() -> int:
    zip_path, prefix = Path(sys.argv[1]), Path(sys.argv[2])
    env = {**os.environ, "WINEPREFIX": str(prefix), "WINEARCH": "win64",
           "WINEDEBUG": os.environ.get("WINEDEBUG", "-all")}
    env = {k: v for k, v in env.items() if not k.startswith("PIP_")}

    def wine(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        # stdout through a pipe: Wine 8 cannot give python.exe a regular file.
        return subprocess.run(["wine", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env, timeout=timeout)

    t0 = time.monotonic()
    subprocess.run(["wineboot", "--init"], env=env, stdout=subprocess.PIPE,
                   stderr=subprocess.STDOUT, check=True, timeout=180)
    # As wine-python.sh: no winedbg waiting forever on a crash.
    wine("reg", "delete", r"HKLM\Software\Microsoft\Windows NT\CurrentVersion\AeDebug",
         "/v", "Debugger", "/f")
    drive_c = prefix / "drive_c"
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(drive_c / "dist")
    [unpacked] = list((drive_c / "dist").iterdir())
    # Wine 8 lacks propsys.VariantToString, which _wmi (platform's WMI queries) calls.
    wmi = unpacked / "python" / "_wmi.pyd"
    if wmi.exists():
        wmi.rename(wmi.with_suffix(".pyd.disabled-for-wine"))
    step(f"fresh prefix, {zip_path.name} unpacked ({time.monotonic() - t0:.0f} s)")

    src = f"C:\\dist\\{unpacked.name}"
    done = wine(f"{src}\\python\\python.exe", "-m", "relayd.wininstall", "install", "--from", src,
                timeout=300)
    print(done.stdout.rstrip())
    assert done.returncode == 0, done.stdout
    program = drive_c / "Program Files" / "relayd"
    data = drive_c / "ProgramData" / "relayd"
    assert (program / "relayd.cmd").exists() and (program / "python" / "python.exe").exists()
    assert (data / "relayd.toml").exists()
    assert "stays stopped until `relayd check` accepts" in done.stdout, done.stdout
    assert wine("sc", "query", "relayd").returncode == 0
    path = wine("reg", "query",
                r"HKLM\SYSTEM\CurrentControlSet\Control\Session Manager\Environment",
                "/v", "Path")
    assert "relayd" in path.stdout, path.stdout
    step("installed: program, sample config, service (stopped: the sample fails check), PATH")
    # Wine starts "auto" services with every later wine command once the config is good
    # (tests/windows/README.md's pitfalls); Windows only at boot. Manual, for the steps below.
    # (Wine's sc has no `config`: the service's Start value, 3 = demand, in the registry.)
    manual = wine("reg", "add", r"HKLM\System\CurrentControlSet\Services\relayd", "/v",
                  "Start", "/t", "REG_DWORD", "/d", "3", "/f")
    assert manual.returncode == 0, manual.stdout

    relayd_cmd = r"C:\Program Files\relayd\relayd.cmd"
    port = free_port()
    config = data / "relayd.toml"
    config.write_text(f"""[server]
listen = ["127.0.0.1:{port}"]
hostname = "relay.test"

[routes.drafts]
senders = ["*"]
upstream = "outbox"
path = 'C:\\ProgramData\\relayd\\outbox'
""")
    checked = wine("cmd", "/c", relayd_cmd, "check")
    assert checked.returncode == 0 and "ok, 1 route(s)" in checked.stdout, checked.stdout
    step("relayd.cmd check: ok (the default config path, %ProgramData%\\relayd\\relayd.toml)")
    serve = subprocess.Popen(["wine", "cmd", "/c", relayd_cmd, "serve"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline and serve.poll() is None, "relayd serve"
            time.sleep(0.2)
        data_bytes = b"From: a@b.test\r\nTo: c@d.test\r\nSubject: zip\r\n\r\nfrom the zip\r\n"
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            assert client.sendmail("a@b.test", ["c@d.test"], data_bytes) == {}
        deadline = time.monotonic() + WAIT_S
        while not list((data / "outbox").glob("*.eml")):
            assert time.monotonic() < deadline, "the outbox file"
            time.sleep(0.2)
        [eml] = list((data / "outbox").glob("*.eml"))
        assert b"from the zip" in eml.read_bytes()
    finally:
        serve.kill()
        serve.wait(30)
        subprocess.run(["wineserver", "-k"], env=env)
        subprocess.run(["wineserver", "-w"], env=env)
    step("relayd.cmd serve: took a message from Linux and wrote it to the outbox")

    again = wine(f"{src}\\python\\python.exe", "-m", "relayd.wininstall", "install", "--from",
                 src, "--no-start", timeout=300)
    assert again.returncode == 0 and "(kept)" in again.stdout, again.stdout
    assert f"127.0.0.1:{port}" in config.read_text()
    step("installed again (upgrade): the config is kept")
    gone = wine(f"{src}\\python\\python.exe", "-m", "relayd.wininstall", "uninstall")
    assert gone.returncode == 0, gone.stdout
    assert wine("sc", "query", "relayd").returncode != 0
    assert config.exists() and not program.exists()
    step(f"uninstalled: service and program gone, config kept ({time.monotonic() - t0:.0f} s)")
    subprocess.run(["wineserver", "-k"], env=env)
    subprocess.run(["wineserver", "-w"], env=env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
