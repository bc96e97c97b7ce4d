#!/bin/sh
# Run deposium-submit as the owner of the output directory (the producer image's entrypoint).
#
# Why: the Parquet/JSONL files land in a host directory bind-mounted at /output. A fixed uid in the
# image (or in compose) matches nobody's host account: the files either cannot be written
# ("Permission denied: /output/....parts") or belong to a stranger. The container starts as root
# only long enough to read who owns /output, then drops to that uid/gid with setpriv (util-linux,
# present in every Debian image) before any input is read. A directory owned by root is one docker
# created because it did not exist on the host: it is handed to the image's own user (deposium,
# 10001:10001) rather than writing as root. Started as a non-root user (`--user`), it runs as given.
set -eu
if [ "$(id -u)" != 0 ]; then
  exec deposium-submit "$@"
fi
out=/output
uid=$(stat -c %u "$out")
gid=$(stat -c %g "$out")
if [ "$uid" = 0 ]; then
  if ! chown deposium:deposium "$out" 2>/dev/null; then
    echo "producer: $out is owned by root and cannot be handed to the deposium user; create the output directory on the host first (mkdir -p out)" >&2
    exit 73
  fi
  uid=$(id -u deposium)
  gid=$(id -g deposium)
fi
# HOME: root's is not writable by the uid we switch to.
HOME=/tmp exec setpriv --reuid="$uid" --regid="$gid" --clear-groups -- deposium-submit "$@"
