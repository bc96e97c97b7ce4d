#!/bin/sh
# Start Flower for the deposium Celery app, but never without authentication.
#
# Why refuse instead of warn: Flower shows every task's arguments (the paragraphs being
# embedded) and can revoke tasks and shut workers down; an unauthenticated Flower on a public
# port is a data leak and a kill switch. Credentials come only from the environment:
#   FLOWER_BASIC_AUTH=user:password[,user2:password2]      (Flower reads it natively), or
#   FLOWER_AUTH=<email regex> + FLOWER_AUTH_PROVIDER + FLOWER_OAUTH2_* for OAuth.
# Flower 2.2 still serves /metrics and /healthcheck without credentials: keep the port private
# (compose binds it to 127.0.0.1; on Railway scrape it over the private network).
set -eu
if [ -z "${FLOWER_BASIC_AUTH:-}" ] && [ -z "${FLOWER_AUTH:-}" ]; then
  echo "flower: refusing to start: set FLOWER_BASIC_AUTH=user:password (or FLOWER_AUTH for OAuth)" >&2
  exit 64
fi
# The publicly known passwords of .env.example (`admin:change-me-flower`) protect nothing.
if printf '%s' "${FLOWER_BASIC_AUTH:-}" | grep -Eqi 'change[-_]?me'; then
  echo "flower: refusing to start: FLOWER_BASIC_AUTH holds the placeholder password from .env.example; set FLOWER_BASIC_AUTH=user:password in .env to a secret of your own" >&2
  exit 64
fi
# Railway injects PORT; compose and plain docker use 5555.
exec celery -A deposium.worker.celery_app flower --address="${FLOWER_ADDRESS:-0.0.0.0}" --port="${PORT:-5555}" "$@"
