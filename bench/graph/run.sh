#!/usr/bin/env bash
# SMTP -> Graph sendMail: relayd vs smtp-oauth-relay and SMTP2Graph on one fake Graph.
#   bench/graph/run.sh [graph_bench.py options]     e.g. --runs 1 --targets relayd,sor
# Fetches the peers at the commits below into $GRAPH_BENCH_DIR (default /var/tmp/graph-bench),
# patches smtp-oauth-relay's fixed URLs (sor-fake-urls.patch), installs its requirements into
# its own venv, runs `npm ci` and the webpack build of SMTP2Graph, then runs graph_bench.py
# under a time limit. A peer that cannot be prepared is left out (the reason is printed) and
# the rest still runs. Results: bench/results/graph-<stamp>.md / .json (graph-latest.*).
# GIT_SOURCE_SOR / GIT_SOURCE_S2G: a local clone or bare git dir to use instead of GitHub.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
SOR_COMMIT=85bc48d65ac94f0b9f2dae2abf1efc9144e0b088   # JustinIven/smtp-oauth-relay
S2G_COMMIT=60efb2467faf0554a839b65fb37ca200a607ee68   # SMTP2Graph/SMTP2Graph (v1.1.4)
dir=${GRAPH_BENCH_DIR:-/var/tmp/graph-bench}
tools=/var/tmp/relayd-bench-tools
mkdir -p "$dir" "$tools"
py=$root/.venv/bin/python
[ -x "$py" ] || python3 -m venv "$root/.venv"
[ -x "$root/.venv/bin/relayd" ] || timeout 900 "$py" -m pip install -q -e "$root[test]"

# export COMMIT of REPO (GitHub name) from SOURCE (clone or bare dir; fetched when absent) to DEST
export_at() {
    local repo=$1 commit=$2 source=$3 dest=$4
    if [ -z "$source" ]; then
        source=$dir/git-$(basename "$repo")
        if [ ! -d "$source" ]; then
            timeout 300 git clone -q --bare "https://github.com/$repo" "$source" || return 1
        fi
    fi
    rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
    git --git-dir="$( [ -d "$source/.git" ] && echo "$source/.git" || echo "$source")" \
        archive "$commit" | tar -x -C "$dest.tmp" || return 1
    rm -rf "$dest" && mv "$dest.tmp" "$dest"
    echo "$commit" > "$dest/.bench-commit"
}

targets=relayd
# smtp-oauth-relay: Python; token and Graph URLs fixed in src/main.py -> two-line patch
if [ "$(cat "$dir/sor/.bench-commit" 2>/dev/null)" != "$SOR_COMMIT" ] || \
        [ ! -f "$dir/sor/.bench-patched" ]; then
    if export_at JustinIven/smtp-oauth-relay "$SOR_COMMIT" "${GIT_SOURCE_SOR:-}" "$dir/sor" &&
            (cd "$dir/sor" && patch -s -p1 < "$here/sor-fake-urls.patch"); then
        touch "$dir/sor/.bench-patched"
    else
        echo "graph bench: smtp-oauth-relay unavailable (fetch or patch failed); left out" >&2
    fi
fi
if [ -f "$dir/sor/.bench-patched" ]; then
    if [ ! -x "$tools/sor-venv/bin/python" ] || [ ! -f "$tools/sor-venv/.installed" ]; then
        python3 -m venv "$tools/sor-venv" &&
            timeout 900 "$tools/sor-venv/bin/pip" install -q -r "$dir/sor/requirements.txt" &&
            touch "$tools/sor-venv/.installed" ||
            echo "graph bench: smtp-oauth-relay's requirements did not install; left out" >&2
    fi
    [ -f "$tools/sor-venv/.installed" ] && targets=$targets,sor
fi
# SMTP2Graph: Node; npm ci + its production webpack build (dist/server.js)
if [ "$(cat "$dir/smtp2graph/.bench-commit" 2>/dev/null)" != "$S2G_COMMIT" ] || \
        [ ! -f "$dir/smtp2graph/dist/server.js" ]; then
    if ! command -v npm >/dev/null; then
        echo "graph bench: SMTP2Graph needs node and npm (apt-get install nodejs npm); left out" >&2
    elif export_at SMTP2Graph/SMTP2Graph "$S2G_COMMIT" "${GIT_SOURCE_S2G:-}" "$dir/smtp2graph"; then
        (cd "$dir/smtp2graph" && timeout 900 npm ci --no-audit --no-fund >/dev/null &&
            timeout 600 npx webpack --mode production >/dev/null) ||
            echo "graph bench: SMTP2Graph's npm ci / webpack build failed; left out" >&2
    fi
fi
[ -f "$dir/smtp2graph/dist/server.js" ] && targets=$targets,smtp2graph
case " $* " in *" --targets "*) extra=() ;; *) extra=(--targets "$targets") ;; esac
# graph_bench.py has its own --time-limit (2400 s) and stops its children on SIGTERM.
exec timeout -k 60 3000 "$py" "$here/graph_bench.py" --sor-dir "$dir/sor" \
    --sor-python "$tools/sor-venv/bin/python" --smtp2graph-dir "$dir/smtp2graph" \
    "${extra[@]}" "$@"
