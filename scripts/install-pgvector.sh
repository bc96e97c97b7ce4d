#!/usr/bin/env bash
# Install the pgvector extension for this machine's PostgreSQL server, if it is missing.
#
# Why a build: Debian bookworm ships PostgreSQL 15 but packages pgvector only for
# PostgreSQL 17 (trixie). We fetch Debian's pgvector *source* package from trixie through a
# temporary apt configuration (its own source list, package lists and cache under a temp
# dir: the system's apt configuration and lists are never touched), then `make install` it
# against this server's pg_config. See /work/shared/NOTES.md, "PostgreSQL + pgvector here".
#
# Idempotent and fast when already installed (one file test). Exits 0 without doing
# anything when PostgreSQL itself is not installed (the tests then skip loudly).
# Usage: scripts/install-pgvector.sh [--check]   (--check: exit 1 if missing, install nothing)
set -euo pipefail

pg_config_for_server() {
  local v
  for v in $(ls -1 /usr/lib/postgresql 2>/dev/null | sort -rn); do
    if [ -x "/usr/lib/postgresql/$v/bin/postgres" ]; then
      echo "/usr/lib/postgresql/$v/bin/pg_config"
      return 0
    fi
  done
  return 1
}

if ! PGMAJOR_DIR=$(pg_config_for_server); then
  echo "install-pgvector: no PostgreSQL server under /usr/lib/postgresql; nothing to do" >&2
  exit 0
fi
PGVER=$(basename "$(dirname "$(dirname "$PGMAJOR_DIR")")")
SHAREDIR=/usr/share/postgresql/$PGVER
if [ -f "$SHAREDIR/extension/vector.control" ] && [ -f "/usr/lib/postgresql/$PGVER/lib/vector.so" ]; then
  exit 0
fi
if [ "${1:-}" = "--check" ]; then
  echo "install-pgvector: pgvector is not installed for PostgreSQL $PGVER" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-pgvector: pgvector is missing for PostgreSQL $PGVER and installing it needs root" >&2
  exit 1
fi

echo "install-pgvector: building pgvector for PostgreSQL $PGVER" >&2
export DEBIAN_FRONTEND=noninteractive
PGCONFIG=/usr/lib/postgresql/$PGVER/bin/pg_config
if [ ! -x "$PGCONFIG" ] || [ ! -f "/usr/include/postgresql/$PGVER/server/postgres.h" ]; then
  apt-get install -y -q "postgresql-server-dev-$PGVER" build-essential dpkg-dev >&2
  PGCONFIG=/usr/lib/postgresql/$PGVER/bin/pg_config
fi

WORK=$(mktemp -d /tmp/pgvector-build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/src"

# The machine's own Debian mirror (deb822 or one-line format), default deb.debian.org.
MIRROR=$(grep -hoE '^URIs:[[:space:]]*\S+/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null \
  | head -n1 | awk '{print $2}' || true)
if [ -z "$MIRROR" ]; then
  MIRROR=$(grep -hoE '^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?\S+/debian/?[[:space:]]' /etc/apt/sources.list 2>/dev/null \
    | head -n1 | awk '{print $NF}' || true)
fi
MIRROR=${MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
echo "deb-src [signed-by=$KEYRING] ${MIRROR%/} trixie main" >"$WORK/sources.list"

APT_TMP=(-o "Dir::Etc::SourceList=$WORK/sources.list" -o "Dir::Etc::SourceParts=$WORK/none"
         -o "Dir::State::Lists=$WORK/lists" -o "Dir::Cache=$WORK/cache"
         -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=")
mkdir -p "$WORK/none"
apt-get "${APT_TMP[@]}" update -q >&2
(cd "$WORK/src" && apt-get "${APT_TMP[@]}" source --download-only -q pgvector >&2)
(cd "$WORK/src" && dpkg-source -x --no-check ./*.dsc build >&2)

make -C "$WORK/src/build" PG_CONFIG="$PGCONFIG" OPTFLAGS="" -j"$(nproc)" >&2
make -C "$WORK/src/build" PG_CONFIG="$PGCONFIG" install >&2
test -f "$SHAREDIR/extension/vector.control"
echo "install-pgvector: installed pgvector $(sed -n "s/^default_version = '\(.*\)'/\1/p" \
  "$SHAREDIR/extension/vector.control") for PostgreSQL $PGVER" >&2
