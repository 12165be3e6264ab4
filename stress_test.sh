#!/usr/bin/env bash
# Load test of a running ingestd, and proof that nothing accepted was lost.
#
#   ./stress_test.sh [EVENTS] [CONCURRENCY] [BASE_URL]
#   defaults:        10000    32            http://localhost:5001
#
# The repository's load generator (src/bin/loadgen.rs) posts EVENTS events to
# /Ingestion/ingest at CONCURRENCY and keeps the id of every 202. Then its
# --check-ids mode asks GET /v1/events/<id> about each of them, again and
# again for those still pending, until every one is processed or failed or
# STRESS_TIMEOUT seconds (default 120) pass. Both read the server's JSON with
# a JSON parser.
#
# Exit status: 0 when every accepted event was processed or failed; 1 when
# one was still pending at the timeout, unknown to the server (lost), never
# answered, or when the load itself failed; 2 when the test cannot run.
#
# STRESS_API_KEY, or else the first key of INGEST_API_KEYS, is sent as the
# bearer token. LOADGEN may name a loadgen binary; otherwise it is built here
# with cargo (a no-op when it is up to date).
set -euo pipefail

EVENTS=${1:-10000}
CONC=${2:-32}
BASE=${3:-http://localhost:5001}
TIMEOUT=${STRESS_TIMEOUT:-120}
HERE=$(cd "$(dirname "$0")" && pwd)

die() { echo "stress: $*" >&2; exit 2; }
whole() { [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a whole number above 0, not '$2'"; }
whole EVENTS "$EVENTS"
whole CONCURRENCY "$CONC"
whole STRESS_TIMEOUT "$TIMEOUT"

if [ -z "${LOADGEN:-}" ]; then
  LOADGEN=${CARGO_TARGET_DIR:-$HERE/target}/release/loadgen
  if command -v cargo >/dev/null; then
    cargo build --release --locked --quiet --manifest-path "$HERE/Cargo.toml" --bin loadgen >&2 ||
      die "cannot build the load generator (cargo build --release --bin loadgen)"
  elif [ ! -x "$LOADGEN" ]; then
    die "$LOADGEN is not built and cargo is not installed to build it; set LOADGEN to a loadgen binary"
  fi
fi
[ -x "$LOADGEN" ] || die "$LOADGEN is not an executable load generator"

# The server accepts a comma-separated list and trims spaces around each key.
if [ -z "${STRESS_API_KEY:-}" ] && [ -n "${INGEST_API_KEYS:-}" ]; then
  STRESS_API_KEY=${INGEST_API_KEYS%%,*}
  STRESS_API_KEY=${STRESS_API_KEY//[[:space:]]/}
fi
# Through the environment, so that the key does not show in ps.
if [ -n "${STRESS_API_KEY:-}" ]; then export LOADGEN_API_KEY=$STRESS_API_KEY; fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "stress: $EVENTS events at concurrency $CONC to $BASE"
sent=0
"$LOADGEN" --url "$BASE" --path /Ingestion/ingest --requests "$EVENTS" \
  --concurrency "$CONC" --ids-out "$WORK/ids" || sent=$?
# 2 is a bad argument, such as a URL the generator cannot use.
[ "$sent" -ne 2 ] || exit 2
# A failed load (nothing accepted, or 202s without an id) still gets its
# accepted events checked: they are owed processing all the same.
if [ ! -s "$WORK/ids" ]; then
  echo "stress: FAIL: no event was accepted (after 401s, set STRESS_API_KEY)" >&2
  exit 1
fi

checked=0
"$LOADGEN" --url "$BASE" --check-ids "$WORK/ids" --deadline "${TIMEOUT}s" \
  --concurrency "$CONC" || checked=$?
[ "$checked" -ne 2 ] || exit 2

if [ "$sent" -ne 0 ]; then
  echo "stress: FAIL: the load did not run cleanly (see above)" >&2
  exit 1
fi
if [ "$checked" -ne 0 ]; then
  echo "stress: FAIL: accepted events are pending, lost or unanswered after up to ${TIMEOUT}s (see above)" >&2
  exit 1
fi
echo "stress: ok: every accepted event was processed or failed"
