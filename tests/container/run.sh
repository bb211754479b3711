#!/usr/bin/env bash
# The container image, built and run: the top-level Containerfile built with podman on a base
# made here from Debian packages, then run against a recording upstream on the host's loopback.
#
# Steps (each bounded by a timeout; containers, volume, secret and upstream removed on exit):
#  1. base: debootstrap a minimal Debian 12 (Python 3.11) and import it as
#     localhost/relayd-base:bookworm (kept between runs; RELAYD_REBUILD_BASE=1 makes it anew)
#  2. wheelhouse: the dependencies' wheels made on the host with the project venv's pip, because
#     build containers here cannot use PyPI (no container network; the host's TLS trust is not
#     in the image). The build gets them as --build-context wheelhouse=DIR and runs with
#     --network none, so it proves the image builds with no index at all.
#  3. build the Containerfile with --build-arg BASE=localhost/relayd-base:bookworm
#  4. the image's own config passes `relayd check`; every delivery agent imports
#  5. the image as shipped (its CMD, conf/container.toml), run as README says with published
#     ports: healthy; a client on the host must STARTTLS and log in as demo, and its message
#     lands in the outbox; SIGTERM exits 0
#  6. run it (--network host: its 127.0.0.1 is the host's) with a test config, the upstream's
#     password as a podman secret under /run/secrets, the state in a named volume
#  7. a message sent through it arrives upstream; /healthz is healthy
#  8. upstream stopped; a second message is accepted (250) and deferred
#  9. podman stop (SIGTERM): relayd drains and exits 0 within the timeout
# 10. a new container on the same volume, upstream back: the queued message arrives, once
# Figures: base, wheelhouse and build times, image size, start to banner.
#
# Needs root, podman and debootstrap (`apt-get install podman debootstrap runc`), and the
# project venv (.venv, as .ci/run makes it). Run: bash tests/container/run.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY="$ROOT/.venv/bin/python"
TOOL="$ROOT/tests/container/tool.py"
BASE_IMAGE=localhost/relayd-base:bookworm
IMAGE=localhost/relayd:test
MIRROR=${RELAYD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
TAG="relayd-test-$$"                 # names of everything this run makes
RELAYD_UID=10001                     # the image's relayd user (Containerfile)
STOP_TIMEOUT_S=45                    # above relayd's 30 s drain (service.SHUTDOWN_TIMEOUT_S)
PASSWORD=container-test-password     # the test's [server.users] login; not a real secret
UPSTREAM_PASSWORD=upstream-test-password

# No systemd as PID 1 here, so podman cannot add the timer that runs a HEALTHCHECK and says so
# on every run; `podman healthcheck run` (steps 5 and 7) runs the check itself.
pm() {  # SECONDS ARGS...: podman with a timeout, without that one complaint
    local t=$1; shift
    timeout "$t" podman "$@" 2> >(grep -v "unable to get systemd connection" >&2)
}
WORK=$(mktemp -d /tmp/relayd-container.XXXXXX)
UPSTREAM_PID=
cleanup() {
    local rc=$?
    set +e
    [ -n "$UPSTREAM_PID" ] && kill "$UPSTREAM_PID" 2>/dev/null && wait "$UPSTREAM_PID" 2>/dev/null
    for c in "$TAG-shipped" "$TAG-1" "$TAG-2"; do
        podman container exists "$c" 2>/dev/null && pm 60 rm -f -t 5 "$c" >/dev/null
    done
    for v in "$TAG-shipped" "$TAG"; do
        podman volume exists "$v" 2>/dev/null && pm 30 volume rm -f "$v" >/dev/null
    done
    podman secret rm "$TAG-upstream" >/dev/null 2>&1
    rm -rf "$WORK"
    # The plain closing line that CI reads, as a test runner's would be.
    [ "$rc" = 0 ] && echo "container: 1 passed, 0 failed" || echo "container: 0 passed, 1 failed"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { echo; echo "== $*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

[ "$(id -u)" = 0 ] || fail "run as root (debootstrap and rootful podman)"
for tool in podman debootstrap; do
    command -v "$tool" >/dev/null || fail "$tool is not installed (apt-get install podman debootstrap runc)"
done
[ -x "$PY" ] || fail "no project venv at $ROOT/.venv (python3 -m venv .venv && .venv/bin/pip install -e .)"

# This kind of machine: no CAP_SYS_RESOURCE, so podman's default rlimits (nofile 1048576, nproc
# 4194304 for root) cannot be set: keep them within ours. Hybrid cgroups (v1 with a v2 mount)
# are refused by crun, which podman prefers: use runc then.
nofile=$(ulimit -n)
nproc=$(ulimit -u); [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ] && nproc=32768
{
    echo "[containers]"
    echo "default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]"
    # This test uses host and no networks only, but podman sets up a backend anyway: the one
    # installed (apt's podman brings CNI without recommends, netavark with them).
    echo "[network]"
    if [ -x /usr/lib/podman/netavark ] || [ -x /usr/libexec/podman/netavark ]; then
        echo "network_backend = \"netavark\""
    else
        echo "network_backend = \"cni\""
    fi
    if [ -n "$(cat /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null)" ] \
            && command -v runc >/dev/null; then
        echo "[engine]"
        echo "runtime = \"runc\""
    fi
} > "$WORK/containers.conf"
export CONTAINERS_CONF="$WORK/containers.conf"
podman --version

step "1. base image $BASE_IMAGE from Debian packages"
if [ "${RELAYD_REBUILD_BASE:-0}" = 1 ] || ! podman image exists "$BASE_IMAGE"; then
    t=$(now)
    timeout 900 debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$WORK/rootfs" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
    rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
    podman image exists "$BASE_IMAGE" && pm 60 rmi "$BASE_IMAGE" >/dev/null
    tar -C "$WORK/rootfs" -c . | pm 300 import - "$BASE_IMAGE" >/dev/null
    rm -rf "$WORK/rootfs"
    echo "figure: base image made in $(since "$t") s (debootstrap + import)"
else
    echo "kept from an earlier run (RELAYD_REBUILD_BASE=1 to make it anew)"
fi
pm 60 run --rm --network none "$BASE_IMAGE" python3 --version

step "2. wheelhouse: the dependencies' wheels, made on the host"
t=$(now)
mkdir -p "$WORK/wheelhouse"
mapfile -t deps < <("$PY" -c 'import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' \
    "$ROOT/pyproject.toml")
# setuptools (and wheel, for older setuptools) so that the build stage can build relayd's own
# wheel from the tree in pip's build isolation without an index.
timeout 600 "$PY" -m pip wheel -q -w "$WORK/wheelhouse" "${deps[@]}" "setuptools>=68" wheel \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
echo "$(ls "$WORK/wheelhouse" | wc -l) wheels in $(since "$t") s"

step "3. podman build (--no-cache, --network none)"
podman image exists "$IMAGE" && pm 60 rmi "$IMAGE" >/dev/null   # the previous run's
t=$(now)
# --layers=false: no intermediate images left behind, and nothing cached across runs.
pm 900 build --no-cache --layers=false --format docker --network none \
    --build-context wheelhouse="$WORK/wheelhouse" --build-arg BASE="$BASE_IMAGE" \
    -t "$IMAGE" -f "$ROOT/Containerfile" "$ROOT" > "$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log"; fail "podman build"; }
build_s=$(since "$t")
grep -E "^\[[0-9]/[0-9]\] STEP|relayd-.*\.whl" "$WORK/build.log" | cut -c1-150
size=$(podman image inspect "$IMAGE" --format '{{.Size}}')
base_size=$(podman image inspect "$BASE_IMAGE" --format '{{.Size}}')
echo "figure: build $build_s s"
echo "figure: image size $((size / 1000000)) MB ($(((size - base_size) / 1000000)) MB above the base)"
[ "$(podman image inspect "$IMAGE" --format '{{.Config.User}}')" = relayd ] || fail "image user"
podman image inspect "$IMAGE" --format 'entrypoint {{.Config.Entrypoint}} cmd {{.Config.Cmd}} stopsignal {{.Config.StopSignal}} healthcheck {{.Config.Healthcheck.Test}}'

step "4. the image's own config; every delivery agent imports; no pip left"
pm 60 run --rm --network none "$IMAGE" check
pm 60 run --rm --network none --entrypoint python3 "$IMAGE" -c '
import importlib.util, os
import relayd.delivery.smtp, relayd.delivery.ews, relayd.delivery.graph, relayd.delivery.outbox
assert importlib.util.find_spec("pip") is None, "pip is in the image"
print("imports ok, uid", os.getuid())'

step "5. the image as shipped, run as README says: published ports, its CMD and config"
# The engine's own network, ports published on the host's loopback: a client on the host
# arrives from the bridge (off loopback), so it must STARTTLS and log in (demo / demo).
SHIPPED_SMTP=$("$PY" "$TOOL" free-port)
SHIPPED_METRICS=$("$PY" "$TOOL" free-port)
pm 30 volume create "$TAG-shipped" >/dev/null
t=$(now)
pm 60 run -d --name "$TAG-shipped" -p "127.0.0.1:$SHIPPED_SMTP:2525" \
    -p "127.0.0.1:$SHIPPED_METRICS:9125" -v "$TAG-shipped:/var/lib/relayd" \
    --stop-timeout "$STOP_TIMEOUT_S" --health-interval=disable "$IMAGE" >/dev/null
timeout 60 "$PY" "$TOOL" banner "$SHIPPED_SMTP" 50 >/dev/null \
    || { podman logs "$TAG-shipped"; fail "no banner from the shipped image"; }
echo "figure: start to banner $(since "$t") s ($TAG-shipped: podman run to the first 220 line)"
pm 30 healthcheck run "$TAG-shipped" 2>/dev/null && echo "healthcheck: healthy" \
    || fail "the shipped image's healthcheck"
timeout 30 "$PY" - "$SHIPPED_SMTP" "$SHIPPED_METRICS" <<'PYEOF'
import smtplib, ssl, sys, urllib.request
smtp, metrics = int(sys.argv[1]), int(sys.argv[2])
print("published /healthz:", urllib.request.urlopen(f"http://127.0.0.1:{metrics}/healthz",
                                                    timeout=5).read().decode().strip())
tls = ssl.create_default_context()
tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE  # the self-signed certificate
with smtplib.SMTP("127.0.0.1", smtp, timeout=20) as c:
    c.ehlo("client.test")
    assert not c.has_extn("auth"), "AUTH offered off loopback before STARTTLS"
    c.starttls(context=tls)
    c.ehlo("client.test")
    c.login("demo", "demo")
    refused = c.sendmail("app@example.test", ["bob@example.test"],
                         b"Subject: shipped\r\n\r\nhi\r\n")
assert not refused, refused
print("sent from the host: STARTTLS, login demo")
PYEOF
for _ in $(seq 100); do
    pm 30 exec "$TAG-shipped" sh -c 'ls /var/lib/relayd/outbox 2>/dev/null | grep -q "\.eml"' \
        && break
    sleep 0.1
done
pm 30 exec "$TAG-shipped" sh -c 'ls /var/lib/relayd/outbox | grep -q "\.eml"' \
    || fail "nothing in the shipped image's outbox"
pm 30 exec "$TAG-shipped" sh -c 'echo "in the outbox: $(ls /var/lib/relayd/outbox)"'
pm $((STOP_TIMEOUT_S + 15)) stop -t "$STOP_TIMEOUT_S" "$TAG-shipped" >/dev/null
[ "$(podman inspect "$TAG-shipped" --format '{{.State.ExitCode}}')" = 0 ] \
    || { podman logs "$TAG-shipped"; fail "the shipped image did not exit 0 on SIGTERM"; }
podman logs "$TAG-shipped" 2>&1 | cut -c1-160

step "6. run it with a recording upstream on the host's loopback"
SMTP_PORT=$("$PY" "$TOOL" free-port)
UPSTREAM_PORT=$("$PY" "$TOOL" free-port)
METRICS_PORT=$("$PY" "$TOOL" free-port)
start_upstream() {
    "$PY" "$TOOL" upstream "$UPSTREAM_PORT" "$WORK/upstream" relay "$UPSTREAM_PASSWORD" \
        >> "$WORK/upstream.log" 2>&1 &
    UPSTREAM_PID=$!
    for _ in $(seq 100); do
        grep -q "listening" "$WORK/upstream.log" 2>/dev/null && return 0
        sleep 0.1
    done
    fail "upstream did not start: $(cat "$WORK/upstream.log")"
}
stop_upstream() {
    kill "$UPSTREAM_PID"; timeout 20 tail --pid="$UPSTREAM_PID" -f /dev/null; UPSTREAM_PID=
}
start_upstream
# The image's config with the test's ports, a smtp route to the recorder and fast retries.
cat > "$WORK/relayd.toml" <<EOF
[server]
listen = ["127.0.0.1:$SMTP_PORT"]
hostname = "relayd.test"
allowed_clients = ["127.0.0.0/8"]
[server.users.app]
password_hash = "$("$PY" "$TOOL" hash "$PASSWORD")"
senders = ["*@business.test"]

[queue]
path = "/var/lib/relayd/queue"
retry_min = "2s"
retry_max = "4s"
[journal]
path = "/var/lib/relayd/journal"
[auth]
path = "/var/lib/relayd/tokens"
[metrics]
listen = "127.0.0.1:$METRICS_PORT"

[routes.upstream]
senders = ["*@business.test"]
upstream = "smtp"
host = "127.0.0.1"
port = $UPSTREAM_PORT
tls = "none"
username = "relay"
password_file = "/run/secrets/upstream-password"
EOF
chmod 644 "$WORK/relayd.toml"
printf '%s' "$UPSTREAM_PASSWORD" | podman secret create "$TAG-upstream" - >/dev/null
pm 30 volume create "$TAG" >/dev/null
run_relayd() {  # NAME: start a container on the volume; print seconds from run to 220 banner
    local t
    t=$(now)
    # --health-interval=disable: no systemd here to run the timer; step 6 runs the check itself.
    pm 60 run -d --name "$1" --network host \
        -v "$TAG:/var/lib/relayd" -v "$WORK/relayd.toml:/etc/relayd/relayd.toml:ro" \
        --secret "$TAG-upstream,target=upstream-password,uid=$RELAYD_UID,mode=0400" \
        -e RELAYD_HEALTH_URL="http://127.0.0.1:$METRICS_PORT/healthz" \
        --health-interval=disable --stop-timeout "$STOP_TIMEOUT_S" "$IMAGE" >/dev/null
    timeout 60 "$PY" "$TOOL" banner "$SMTP_PORT" 50 >/dev/null \
        || { podman logs "$1"; fail "no banner from $1"; }
    echo "figure: start to banner $(since "$t") s ($1: podman run to the first 220 line)"
}
run_relayd "$TAG-1"

step "7. a message through it arrives upstream; /healthz"
timeout 30 "$PY" "$TOOL" send "$SMTP_PORT" app "$PASSWORD" first
timeout 40 "$PY" "$TOOL" wait "$WORK/upstream" first 30
pm 30 healthcheck run "$TAG-1" 2>/dev/null && echo "healthcheck: healthy" \
    || fail "healthcheck: $(podman inspect "$TAG-1" --format '{{.State.Health.Status}}')"
pm 30 exec "$TAG-1" python3 -c 'import os; print("relayd runs as uid", os.getuid())'

step "8. upstream down: a second message is accepted and deferred"
stop_upstream
timeout 30 "$PY" "$TOOL" send "$SMTP_PORT" app "$PASSWORD" second
for _ in $(seq 200); do
    podman logs "$TAG-1" 2>&1 | grep -q "deferred" && break
    sleep 0.1
done
podman logs "$TAG-1" 2>&1 | grep -q "deferred" || fail "no deferral logged"
podman logs "$TAG-1" 2>&1 | grep "deferred" | head -1 | cut -c1-200

step "9. podman stop (SIGTERM): drains, exits 0"
t=$(now)
pm $((STOP_TIMEOUT_S + 15)) stop -t "$STOP_TIMEOUT_S" "$TAG-1" >/dev/null
echo "figure: stop took $(since "$t") s"
code=$(podman inspect "$TAG-1" --format '{{.State.ExitCode}}')
podman logs "$TAG-1" 2>&1 | grep -E "SIGTERM|relayd stopped" | cut -c1-160
[ "$code" = 0 ] || { podman logs "$TAG-1"; fail "exit code $code after SIGTERM"; }
podman logs "$TAG-1" 2>&1 | grep -q "relayd stopped" || fail "no 'relayd stopped' line"
echo "queued on the volume while stopped:"
pm 60 run --rm --network none -v "$TAG:/var/lib/relayd" \
    -v "$WORK/relayd.toml:/etc/relayd/relayd.toml:ro" \
    --secret "$TAG-upstream,target=upstream-password,uid=$RELAYD_UID,mode=0400" \
    "$IMAGE" queue list

step "10. a new container on the same volume, upstream back: the queued message arrives"
start_upstream
run_relayd "$TAG-2"
timeout 40 "$PY" "$TOOL" wait "$WORK/upstream" second 30
[ "$("$PY" "$TOOL" count "$WORK/upstream" first)" = 1 ] || fail "first delivered more than once"
[ "$("$PY" "$TOOL" count "$WORK/upstream" second)" = 1 ] || fail "second delivered more than once"
echo "upstream got each message once"
pm $((STOP_TIMEOUT_S + 15)) stop -t "$STOP_TIMEOUT_S" "$TAG-2" >/dev/null
[ "$(podman inspect "$TAG-2" --format '{{.State.ExitCode}}')" = 0 ] || fail "second exit code"

echo
echo "--- relayd's log, first container"
podman logs "$TAG-1" 2>&1 | cut -c1-200
echo "--- relayd's log, second container"
podman logs "$TAG-2" 2>&1 | cut -c1-200
echo "--- upstream's log"
cat "$WORK/upstream.log"
