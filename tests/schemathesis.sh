#!/usr/bin/env bash
# Checks openapi.yaml against a live server with schemathesis: every check
# (`--checks all`), on generated valid and invalid requests, including the
# stateful phase that follows the links between operations.
#
# Builds the release binary, runs it with every role on loopback (a port
# it picks itself, its own schema and AMQP prefix, an API key), runs
# `schemathesis run` with that key and the settings in
# tests/schemathesis.toml, and removes the schema, queues and
# exchanges afterwards. Extra arguments go to `schemathesis run` (for
# example `--seed 42`). Needs `schemathesis` on PATH (`pip install
# schemathesis`), or its path in SCHEMATHESIS, and `psql` and `rabbitmqctl`
# for the clean-up. Exits with schemathesis's status.
set -euo pipefail
cd "$(dirname "$0")/.."

DB_URL=${INGEST_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
AMQP_URL=${INGEST_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
SCHEMATHESIS=${SCHEMATHESIS:-schemathesis}
NAME=schemathesis_$(date +%s)_$$
KEY=schemathesis-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
WORK=$(mktemp -d)
ROOT=$PWD
PID=

log() { echo "schemathesis.sh: $*" >&2; }

if ! command -v "$SCHEMATHESIS" >/dev/null 2>&1; then
  log "$SCHEMATHESIS not found; install it with: pip install schemathesis"
  exit 2
fi

cargo build --release --locked --bin ingestd >&2
BIN=${CARGO_TARGET_DIR:-target}/release/ingestd

cleanup() {
  if [ -n "$PID" ]; then
    kill -TERM "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  PGOPTIONS="-c client_min_messages=warning" \
    psql "$DB_URL" -Atq -c "DROP SCHEMA IF EXISTS $NAME CASCADE" || log "schema $NAME not dropped"
  local name
  for name in $(rabbitmqctl -q list_queues name 2>/dev/null | grep -F "$NAME." || true); do
    rabbitmqctl -q delete_queue "$name" >/dev/null || log "queue $name not deleted"
  done
  # rabbitmqctl has no command to delete an exchange; the broker's own
  # function does it (an exchange left behind is harmless, so only warn).
  for name in $(rabbitmqctl -q list_exchanges name 2>/dev/null | grep -F "$NAME." || true); do
    rabbitmqctl -q eval "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$name\">>), false, <<\"schemathesis.sh\">>)." \
      >/dev/null 2>&1 || log "exchange $name not deleted"
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

INGEST_HTTP_ADDR=127.0.0.1:0 INGEST_DATABASE_URL=$DB_URL INGEST_AMQP_URL=$AMQP_URL \
  INGEST_DB_SCHEMA=$NAME INGEST_AMQP_PREFIX=$NAME INGEST_API_KEYS=$KEY \
  "$BIN" >"$WORK/ingestd.log" 2>&1 &
PID=$!

# The server logs the address it bound; then it must be ready.
ADDR=
for _ in $(seq 1 300); do
  ADDR=$(sed -n 's/.*http: listening on \([0-9.:]*\).*/\1/p' "$WORK/ingestd.log" | head -n1)
  if [ -n "$ADDR" ] && curl -sf -o /dev/null "http://$ADDR/readyz"; then break; fi
  if ! kill -0 "$PID" 2>/dev/null; then
    log "ingestd exited:"; cat "$WORK/ingestd.log" >&2; exit 1
  fi
  ADDR=
  sleep 0.1
done
if [ -z "$ADDR" ]; then
  log "ingestd did not become ready:"; cat "$WORK/ingestd.log" >&2; exit 1
fi
log "ingestd at http://$ADDR, schema and prefix $NAME"

status=0
(cd "$WORK" && "$SCHEMATHESIS" --config-file "$ROOT/tests/schemathesis.toml" \
  run "$ROOT/openapi.yaml" --url "http://$ADDR" --checks all \
  -H "Authorization: Bearer $KEY" "$@") || status=$?
if [ "$status" -ne 0 ]; then
  log "ingestd's warnings and errors:"
  grep -v '\[INFO\]' "$WORK/ingestd.log" >&2 || true
fi
exit "$status"
