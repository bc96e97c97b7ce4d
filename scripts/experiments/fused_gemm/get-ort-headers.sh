#!/usr/bin/env bash
# Print the include directory of ONNX Runtime's C/C++ headers, fetched once from Debian trixie's
# libonnxruntime-dev (1.21.0, ORT_API_VERSION 21, which onnxruntime 1.32 accepts) through a temporary
# apt configuration; the system's apt sources and lists are never touched. Usage: ORT_INCLUDE=$(bash get-ort-headers.sh)
set -euo pipefail
DEST=${DEPOSIUM_CACHE_DIR:-$HOME/.cache/deposium}/ort-headers
INC="$DEST/usr/include/onnxruntime"
if [ -f "$INC/onnxruntime_lite_custom_op.h" ]; then echo "$INC"; exit 0; fi
WORK=$(mktemp -d /tmp/ort-headers.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/none" "$WORK/dl"
MIRROR=$(grep -hoE '^URIs:[[:space:]]*\S+/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null \
  | head -n1 | awk '{print $2}' || true)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${MIRROR%/} trixie main" >"$WORK/sources.list"
APT=(-o "Dir::Etc::SourceList=$WORK/sources.list" -o "Dir::Etc::SourceParts=$WORK/none"
     -o "Dir::State::Lists=$WORK/lists" -o "Dir::Cache=$WORK/cache"
     -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=")
apt-get "${APT[@]}" update -q >&2
(cd "$WORK/dl" && apt-get "${APT[@]}" download -q libonnxruntime-dev >&2)
mkdir -p "$DEST"
dpkg-deb -x "$WORK"/dl/libonnxruntime-dev_*.deb "$DEST"
echo "$INC"
