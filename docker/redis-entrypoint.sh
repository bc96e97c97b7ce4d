#!/bin/sh
# Start redis-server for the deposium queue with its password read from the environment.
#
# Why a generated config file: `redis-server --requirepass SECRET` puts the secret on the process's
# command line, where `docker inspect` (Args) and any `ps` on the host show it. redis-server reads
# `requirepass` from a config file instead; this one is written at start into a private tmpfs
# (mode 0600) and never reaches an image layer or a volume.
# Why refuse: compose's `${REDIS_PASSWORD:?}` catches an empty password only; an unedited copy of
# .env.example would run the broker behind a password anyone can read in the repository.
# Usage (compose mounts this file; any image with redis-server): deposium-redis [redis-server options]
set -eu
if [ -z "${REDIS_PASSWORD:-}" ]; then
  echo "redis: refusing to start: set REDIS_PASSWORD in .env (e.g. openssl rand -hex 24)" >&2
  exit 64
fi
if printf '%s' "$REDIS_PASSWORD" | grep -Eqi 'change[-_]?me'; then
  echo "redis: refusing to start: REDIS_PASSWORD is the placeholder from .env.example; set REDIS_PASSWORD in .env to a secret of your own" >&2
  exit 64
fi
umask 077
conf=$(mktemp "${TMPDIR:-/tmp}/redis.XXXXXX")
# Inside double quotes redis's config parser unescapes \\ and \", so any password survives as typed.
escaped=$(printf '%s' "$REDIS_PASSWORD" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g')
cat > "$conf" <<CONF
dir /data
# Batches queued by producers (and their results) survive a restart, losing at most one second.
appendonly yes
appendfsync everysec
requirepass "$escaped"
CONF
unset REDIS_PASSWORD escaped
# An image's default command (`redis-server`) may arrive as the first argument: it is this script's job.
if [ "${1:-}" = redis-server ]; then
  shift
fi
exec redis-server "$conf" "$@"
