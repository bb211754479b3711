#!/usr/bin/env bash
# Build relayd-VERSION-x64.msi from the zip (windows/build-zip.sh) with Debian's wixl.
# Usage: bash windows/build-msi.sh ZIP [OUT_DIR]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ZIP=$(realpath "$1")
OUT=$(realpath -m "${2:-$(dirname "$ZIP")}")
command -v wixl >/dev/null || { echo "build-msi.sh: wixl is not installed (apt-get install wixl)" >&2; exit 1; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 -m zipfile -e "$ZIP" "$WORK/stage"
SRC=$(echo "$WORK"/stage/relayd-*)
VERSION=${SRC##*/relayd-}
(cd "$WORK" && find "stage/${SRC##*/}" -type f | sort | wixl-heat -p "stage/${SRC##*/}/" \
    --component-group CG.files --directory-ref INSTALLDIR --var var.SourceDir --win64 > files.wxs)
PYFILE=$(grep -o 'File Id="[^"]*" KeyPath="yes" Source="$(var.SourceDir)/python/python.exe"' \
    "$WORK/files.wxs" | sed 's/File Id="\([^"]*\)".*/\1/')
mkdir -p "$OUT"
(cd "$WORK" && wixl -a x64 -D "Version=$VERSION" -D "SourceDir=stage/${SRC##*/}" -D Win64=yes \
    -D "PythonFileId=$PYFILE" -o "$OUT/relayd-$VERSION-x64.msi" "$ROOT/windows/relayd.wxs" \
    files.wxs 2>&1 | { grep -v "has no property named" || true; })
echo "$OUT/relayd-$VERSION-x64.msi ($(du -h "$OUT/relayd-$VERSION-x64.msi" | cut -f1))"
