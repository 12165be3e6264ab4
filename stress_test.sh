#!/usr/bin/env bash
# Load test of a running ingestd, and proof that nothing accepted was lost.
#
#   ./stress_test.sh [EVENTS] [CONCURRENCY] [BASE_URL]
#   defaults:        10000    32            http://localhost:5001
#
# Posts EVENTS events to /Ingestion/ingest at CONCURRENCY, records the id of
# every 202, then polls until each of them is processed (or failed) or
# STRESS_TIMEOUT seconds (default 120) pass. Uses the repository's load
# generator when it is built (target/release/loadgen) and falls back to
# curl with xargs -P. Exits non-zero if an accepted event is lost or the
# timeout passes.
set -euo pipefail

EVENTS=${1:-10000}
CONC=${2:-32}
BASE=${3:-http://localhost:5001}
BASE=${BASE%/}
export BASE
TIMEOUT=${STRESS_TIMEOUT:-120}
HERE=$(cd "$(dirname "$0")" && pwd)
LOADGEN=${LOADGEN:-$HERE/target/release/loadgen}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

command -v curl >/dev/null || { echo "stress: curl is required" >&2; exit 2; }
curl -sf -o /dev/null "$BASE/healthz" || { echo "stress: no ingestd answers at $BASE" >&2; exit 2; }

pct() { # percentile of the numbers in file $1 (one per line), p in [0, 100]
  sort -n "$1" | awk -v p="$2" '{ a[NR] = $1 } END {
    if (NR == 0) { print "n/a"; exit }
    i = int(p / 100 * NR + 0.999999); if (i < 1) i = 1; if (i > NR) i = NR; printf "%.2f", a[i] }'
}

started=$(date +%s.%N)
if [ -x "$LOADGEN" ]; then
  "$LOADGEN" --url "$BASE" --path /Ingestion/ingest --requests "$EVENTS" \
    --concurrency "$CONC" --ids-out "$WORK/ids" --json >"$WORK/load.json"
  read -r SENT ACCEPTED STATUSES THROUGHPUT P50 P95 P99 < <(python3 - "$WORK/load.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
rejected = {k: v for k, v in d["statuses"].items() if k != "202"}
if d["errors"]:
    rejected["connection errors"] = d["errors"]
l = d["latency_ms"]
print(d["sent"], d["accepted"], json.dumps(rejected, separators=(",", ":")) if rejected else "none",
      round(d["throughput_per_s"]), l["p50"], l.get("p95", l["p90"]), l["p99"])
PY
)
else
  echo "stress: $LOADGEN not built (make build); using curl" >&2
  post() { # one line per request: status, seconds, id (when accepted)
    local out id
    out=$(curl -s -o "$1.body" -w '%{http_code} %{time_total}' -X POST "$BASE/Ingestion/ingest" \
      -H 'Content-Type: application/json' -d "{\"payload\":\"stress $1\"}") || out="000 0"
    id=$(sed -n 's/.*"id":"\([0-9a-f-]*\)".*/\1/p' "$1.body" 2>/dev/null || true)
    rm -f "$1.body"
    echo "$out $id"
  }
  export -f post
  export BASE
  seq 1 "$EVENTS" | sed "s|^|$WORK/r|" | xargs -P "$CONC" -I{} bash -c 'post {}' >"$WORK/codes"
  awk '$1 == 202 && $3 != "" { print $3 }' "$WORK/codes" >"$WORK/ids"
  awk '{ printf "%.3f\n", $2 * 1000 }' "$WORK/codes" >"$WORK/lat"
  SENT=$(wc -l <"$WORK/codes")
  ACCEPTED=$(wc -l <"$WORK/ids")
  STATUSES=$(awk '$1 != 202 { c[$1]++ } END { s = ""; for (k in c) s = s (s ? "," : "") "\"" k "\":" c[k]; print s ? "{" s "}" : "none" }' "$WORK/codes")
  elapsed=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
  THROUGHPUT=$(awk -v n="$SENT" -v t="$elapsed" 'BEGIN { printf "%d", n / t }')
  P50=$(pct "$WORK/lat" 50); P95=$(pct "$WORK/lat" 95); P99=$(pct "$WORK/lat" 99)
fi
sent_done=$(date +%s.%N)

# Poll every accepted id until it leaves 'pending'. One curl fetches many
# ids over one keep-alive connection; the event's "status" is the last key
# of its JSON, just before the URL that -w appends.
sort -u "$WORK/ids" >"$WORK/todo"
: >"$WORK/processed"; : >"$WORK/failed"
deadline=$((SECONDS + TIMEOUT))
check_batch() {
  local urls=() id
  for id in "$@"; do urls+=("$BASE/v1/events/$id"); done
  curl -s -w '%{url_effective}\n' "${urls[@]}" |
    sed -u -n 's|.*"status":"\([a-z]*\)"}.*/v1/events/\([0-9a-f-]*\)$|\2 \1|p'
}
export -f check_batch
while [ -s "$WORK/todo" ] && ((SECONDS < deadline)); do
  xargs -P "$CONC" -n 200 bash -c 'check_batch "$@"' _ <"$WORK/todo" >"$WORK/round" || true
  awk '$2 == "processed" { print $1 }' "$WORK/round" >>"$WORK/processed"
  awk '$2 == "failed" { print $1 }' "$WORK/round" >>"$WORK/failed"
  awk '$2 == "processed" || $2 == "failed" { print $1 }' "$WORK/round" | sort -u >"$WORK/settled"
  comm -23 "$WORK/todo" "$WORK/settled" >"$WORK/todo.next"
  mv "$WORK/todo.next" "$WORK/todo"
  [ -s "$WORK/todo" ] && sleep 0.5
done
all_done=$(awk -v a="$sent_done" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
PROCESSED=$({ grep -E "^[0-9a-f-]{36}$" "$WORK/processed" || true; } | sort -u | wc -l)
FAILED=$({ grep -E "^[0-9a-f-]{36}$" "$WORK/failed" || true; } | sort -u | wc -l)
LOST=$(wc -l <"$WORK/todo")

echo "sent: $SENT  accepted: $ACCEPTED  rejected: $STATUSES  throughput: ${THROUGHPUT}/s"
echo "ingest latency ms: p50 $P50  p95 $P95  p99 $P99"
echo "all processed after: ${all_done}s  processed: $PROCESSED  failed: $FAILED  lost: $LOST"
if [ "$LOST" -gt 0 ]; then
  echo "stress: $LOST accepted events were not processed within ${TIMEOUT}s" >&2
  exit 1
fi
