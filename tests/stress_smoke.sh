#!/usr/bin/env bash
# `make stress-smoke`: ./stress_test.sh against a real all-in-one ingestd, so
# that the script keeps telling the truth about the server as it is today.
#
# Builds release ingestd and loadgen, starts ingestd (every role) on a free
# loopback port with its own schema and AMQP prefix, waits for /readyz, runs
# ./stress_test.sh with STRESS_SMOKE_EVENTS (default 2000) events at
# concurrency 32, then stops ingestd with SIGTERM and expects a clean exit.
# The schema, queues and exchanges are removed whatever happens. Needs
# PostgreSQL (INGEST_TEST_DATABASE_URL) and RabbitMQ (INGEST_TEST_AMQP_URL,
# default vhost) as the test suite does.
set -euo pipefail
cd "$(dirname "$0")/.."
. tests/lib.sh

DB_URL=${INGEST_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
AMQP_URL=${INGEST_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
EVENTS=${STRESS_SMOKE_EVENTS:-2000}
NAME=stress_$(date +%s)_$$
WORK=$(mktemp -d)
PID=

cleanup() {
  if [ -n "$PID" ]; then
    kill -9 "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  remove_run "$DB_URL" "$NAME"
  rm -rf "$WORK"
}
trap cleanup EXIT

cargo build --release --locked --bin ingestd --bin loadgen >&2
BIN=${CARGO_TARGET_DIR:-target}/release

INGEST_DATABASE_URL=$DB_URL INGEST_AMQP_URL=$AMQP_URL INGEST_DB_SCHEMA=$NAME \
  INGEST_AMQP_PREFIX=$NAME INGEST_HTTP_ADDR=127.0.0.1:0 INGEST_LOG=info \
  "$BIN/ingestd" >"$WORK/ingestd.log" 2>&1 &
PID=$!
ADDR=$(listening_addr "$WORK/ingestd.log" "$PID")
wait_ready "http://$ADDR"

status=0
./stress_test.sh "$EVENTS" 32 "http://$ADDR" || status=$?

kill -TERM "$PID"
stopped=0
wait "$PID" || stopped=$?
PID=
if [ "$stopped" -ne 0 ]; then
  echo "stress-smoke: ingestd exited with status $stopped after SIGTERM; its log:" >&2
  tail -n 40 "$WORK/ingestd.log" >&2
  exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "stress-smoke: ingestd's log:" >&2
  tail -n 40 "$WORK/ingestd.log" >&2
fi
exit "$status"
