#!/usr/bin/env bash
# relayd vs Postfix benchmark, one command:   sudo bench/run.sh [--runs 3] [--no-profile] ...
# Installs what is missing (postfix via apt, relayd into the project venv, py-spy into a separate
# venv), then runs bench/relay_vs_postfix.py under an overall time limit. Results: bench/results/.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
if [ "$(id -u)" != 0 ]; then
    echo "bench/run.sh: run as root (installs postfix, starts a throwaway Postfix instance)" >&2
    exit 2
fi
py=$root/.venv/bin/python
if [ ! -x "$py" ]; then
    python3 -m venv "$root/.venv"
fi
if [ ! -x "$root/.venv/bin/relayd" ]; then
    timeout 900 "$py" -m pip install -q -e "$root"
fi
# The script has its own --time-limit (default 1800 s) and cleans up on SIGTERM; this is the backstop.
exec timeout -k 60 2400 "$py" "$here/relay_vs_postfix.py" "$@"
