#!/usr/bin/env bash
# `make bench`: every figure of BENCHMARKS.md, measured in one run on this
# machine, printed as a table and written as JSON (target/bench.json).
#
#   1. pgbench: the two-row transaction (event + outbox) at the API's
#      concurrency: the ceiling for one transaction per request.
#   2. ingest: 202s per second at that concurrency, and the ratio to (1);
#      then batches of 100 events per request (API role alone) against
#      pgbench writing 100 events and outbox rows per transaction.
#   3. end to end: the highest offered rate at which processing keeps up.
#   4. latency ingest -> processed at fixed rates: p50, p99, p99.9.
#   5. relay: rows published per second, against a raw publish loop of
#      bare messages and one of the relay's own messages (their CloudEvents
#      and trace headers cost the broker per message).
#   6. peak RSS of ingestd and the size of the stripped binary.
#   7. open endpoints over a large outbox (a broker outage): /metrics and
#      /v1/stats answer times, and ingest latency alone and beside 8
#      scrapers of /metrics.
#   8. memory: peak RSS of `ingestd api` with its default memory budget
#      while 64 clients post maximum-size batches (1,000 events of 5 KB,
#      about 5 MB each) back to back.
#   9. the cost of an event: CPU microseconds per event of PostgreSQL,
#      RabbitMQ, ingestd and the load generator (tests/proc_cpu.py, from
#      /proc accounting, before and after, over the events processed), and
#      the rows and index scans per event from PostgreSQL's statistics, for
#      single events and batches of 100 offered in open loop over 16
#      connections end to end, the API alone (single events, concurrency
#      64, against pgbench) and the relay alone (from step 5).
#  10. the edge features on the ingest path: the API alone taking batches
#      of 100, as is, gzip-compressed (Content-Encoding) and under a rate
#      limit (INGEST_RATE_LIMIT) that never refuses: events per second and
#      ingestd's CPU per event, each against the plain run.
#
# BENCH_SMOKE=1 runs every step for a second or two, to keep the harness
# working in CI; its figures mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

DB_URL=${INGEST_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
AMQP_URL=${INGEST_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
PORT=${BENCH_PORT:-5093}
CONC=${BENCH_CONCURRENCY:-64}
BATCH_CONC=${BENCH_BATCH_CONCURRENCY:-16}
NAME=bench_$(date +%s)_$$
OUT=${BENCH_OUT:-target/bench.json}
if [ "${BENCH_SMOKE:-0}" = 1 ]; then
  T=2; E2E_T=3; RATES="300"; LAT_RATES="200"; LAT_T=2; RELAY_N=2000; OPEN_ROWS=20000
  MEM_REQUESTS=16; COST_T=2; COST_SINGLE_RATE=300; COST_BATCH_RATE=10
else
  T=10; E2E_T=20; RATES="1000 2000 3000 4000 5000 6000 8000 10000"; LAT_RATES="1000 5000"; LAT_T=15; RELAY_N=50000
  OPEN_ROWS=1000000
  MEM_REQUESTS=384; COST_T=20
  # The loads of the comparison with an async peer: 6,000 single events/s
  # and 150 batches of 100 a second (15,000 events/s).
  COST_SINGLE_RATE=${BENCH_COST_SINGLE_RATE:-6000}; COST_BATCH_RATE=${BENCH_COST_BATCH_RATE:-150}
fi
# Each of the 8 scrapers of step 7 asks this often per second.
SCRAPE_RATE=${BENCH_SCRAPE_RATE:-4}
WORK=$(mktemp -d)
PID=

log() { echo "bench: $*" >&2; }
sql() { PGOPTIONS="-c client_min_messages=warning" psql "$DB_URL" -v ON_ERROR_STOP=1 -Atq -c "SET search_path TO $NAME; $1"; }
json_get() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval("d"+sys.argv[2]))' "$@"; }

cleanup() {
  [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null || true
  psql "$DB_URL" -Atq -c "DROP SCHEMA IF EXISTS $NAME CASCADE" >/dev/null 2>&1 || true
  for q in events dead delay.1000ms; do rabbitmqctl -q delete_queue "$NAME.$q" >/dev/null 2>&1 || true; done
  for q in events dead; do rabbitmqctl -q delete_queue "${NAME}_raw.$q" >/dev/null 2>&1 || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

cargo build --release --locked --bin ingestd --bin loadgen --example raw_publish >&2
BIN=target/release

export INGEST_DATABASE_URL=$DB_URL INGEST_AMQP_URL=$AMQP_URL INGEST_DB_SCHEMA=$NAME
export INGEST_AMQP_PREFIX=$NAME INGEST_HTTP_ADDR=127.0.0.1:$PORT INGEST_RETRY_DELAYS=1s
export INGEST_LOG=warn

start() { # role
  "$BIN/ingestd" "$@" >>"$WORK/ingestd.log" 2>&1 &
  PID=$!
  for _ in $(seq 1 100); do
    if [ "${1:-}" = relay ] || curl -sf -o /dev/null "http://127.0.0.1:$PORT/readyz"; then return; fi
    sleep 0.1
  done
  log "ingestd did not become ready"; tail "$WORK/ingestd.log" >&2; exit 1
}
stop() { kill -TERM "$PID"; wait "$PID" || true; PID=; }
peak_rss_mb() { awk '/VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/$PID/status"; }
pending() { sql "SELECT count(*) FROM events WHERE status = 'pending'"; }
reset() { sql "TRUNCATE events, outbox"; }
pgbench_tps() { # script, clients: runs it for $T seconds, prints tx/s
  PGOPTIONS="-c search_path=$NAME" pgbench -n -M prepared -c "$2" -j 2 -T "$T" \
    -f "$1" "$DB_URL" >"$1.out" 2>&1
  sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$1.out" | head -n1
}
load() { # out, args...
  local out=$1; shift
  "$BIN/loadgen" --url "http://127.0.0.1:$PORT" --json "$@" >"$out"
}

"$BIN/ingestd" migrate

# 1. pgbench, the same two rows per transaction.
cat >"$WORK/tx.sql" <<'SQL'
\set r random(1, 9223372036854775807)
BEGIN;
INSERT INTO events (id, payload) VALUES (md5(:r::text)::uuid, '{"n": 1, "pad": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}');
INSERT INTO outbox (event_id) VALUES (md5(:r::text)::uuid);
END;
SQL
log "pgbench: $CONC clients, ${T}s"
PG_TPS=$(pgbench_tps "$WORK/tx.sql" "$CONC")
reset

# 2b. Batches: pgbench with 100 events per transaction, then the API alone
#     taking 100 events per request.
cat >"$WORK/batch.sql" <<'SQL'
BEGIN;
WITH e AS (INSERT INTO events (id, payload)
           SELECT gen_random_uuid(), '{"n": 1, "pad": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}'
           FROM generate_series(1, 100) RETURNING id)
INSERT INTO outbox (event_id) SELECT id FROM e;
END;
SQL
log "pgbench: 100 events per tx, $BATCH_CONC clients, ${T}s"
PG_BATCH_TPS=$(pgbench_tps "$WORK/batch.sql" "$BATCH_CONC")
reset
start api
log "batch ingest: 100 events per request, concurrency $BATCH_CONC, ${T}s"
load "$WORK/batch.json" --path /v1/events --batch 100 --concurrency "$BATCH_CONC" \
  --duration "${T}s" --payload-bytes 100
stop
reset

# 2. Ingest, closed loop, with relay and workers running in the same process.
start
log "ingest: closed loop, concurrency $CONC, ${T}s"
load "$WORK/ingest.json" --concurrency "$CONC" --duration "${T}s" --payload-bytes 100
INGEST=$(json_get "$WORK/ingest.json" '["throughput_per_s"]')

# 3. End to end: offered rate against what gets processed.
wait_drained() { # timeout seconds
  local deadline=$((SECONDS + $1))
  while [ "$(pending)" != 0 ] && ((SECONDS < deadline)); do sleep 0.5; done
}
wait_drained 120
E2E_BEST=0
E2E_ROWS=""
for rate in $RATES; do
  reset
  log "end to end: offering $rate/s for ${E2E_T}s"
  load "$WORK/e2e.json" --rate "$rate" --concurrency "$CONC" --duration "${E2E_T}s"
  accepted=$(json_get "$WORK/e2e.json" '["accepted"]')
  backlog=$(pending)
  # Keeping up: nearly all offered events accepted, and what is left
  # unprocessed when the load stops is under half a second of traffic.
  ok=$(python3 -c "print(int($accepted >= 0.95 * $rate * $E2E_T and $backlog <= $rate / 2))")
  E2E_ROWS="$E2E_ROWS $rate:$accepted:$backlog:$ok"
  wait_drained 180
  if [ "$ok" = 1 ]; then E2E_BEST=$rate; else break; fi
done

# 4. Latency from ingest to processed at fixed rates.
LAT=""
for rate in $LAT_RATES; do
  reset
  log "latency: $rate/s for ${LAT_T}s"
  load "$WORK/lat.json" --rate "$rate" --concurrency "$CONC" --duration "${LAT_T}s"
  wait_drained 120
  LAT="$LAT $rate:$(sql "SELECT round((percentile_cont(0.5) WITHIN GROUP (ORDER BY ms))::numeric, 2) || ':' ||
      round((percentile_cont(0.99) WITHIN GROUP (ORDER BY ms))::numeric, 2) || ':' ||
      round((percentile_cont(0.999) WITHIN GROUP (ORDER BY ms))::numeric, 2)
    FROM (SELECT extract(epoch FROM processed_at - created_at) * 1000 AS ms
          FROM events WHERE status = 'processed') l")"
done
RSS=$(peak_rss_mb)
stop

# 5. Relay alone on a preloaded outbox, then a raw publish loop.
reset
sql "INSERT INTO events (id, payload) SELECT gen_random_uuid(), '{\"n\":1,\"pad\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}'
     FROM generate_series(1, $RELAY_N); INSERT INTO outbox (event_id) SELECT id FROM events;"
rabbitmqctl -q purge_queue "$NAME.events" >/dev/null
log "relay: $RELAY_N rows"
# The first snapshot names no process: ingestd has used nothing yet.
python3 tests/proc_cpu.py snapshot >"$WORK/relay.cpu0"
t0=$(date +%s.%N)
start relay
while [ "$(sql 'SELECT count(*) FROM outbox')" != 0 ]; do sleep 0.05; done
t1=$(date +%s.%N)
python3 tests/proc_cpu.py snapshot "$PID" >"$WORK/relay.cpu1"
stop
RELAY=$(python3 -c "print(round($RELAY_N / ($t1 - $t0)))")
rabbitmqctl -q purge_queue "$NAME.events" >/dev/null
"$BIN/examples/raw_publish" "$AMQP_URL" "${NAME}_raw" "$RELAY_N" 500 bare >"$WORK/raw.json"
RAW=$(json_get "$WORK/raw.json" '["per_second"]')
"$BIN/examples/raw_publish" "$AMQP_URL" "${NAME}_raw" "$RELAY_N" 500 relay >"$WORK/raw_relay.json"
RAW_RELAY=$(json_get "$WORK/raw_relay.json" '["per_second"]')

# 6. Binary size, stripped.
cp "$BIN/ingestd" "$WORK/ingestd.stripped"
strip "$WORK/ingestd.stripped"
SIZE=$(python3 -c "import os; print(round(os.path.getsize('$WORK/ingestd.stripped') / 1048576, 2))")

# 7. Open endpoints over $OPEN_ROWS outbox rows, as a broker outage leaves
#    them (the API role alone: nothing drains the outbox).
cat >"$WORK/scrape.py" <<'PY'
"""scrape.py PORT THREADS SECONDS PATH RATE: THREADS keep-alive clients GET
PATH, each at most RATE times a second, for SECONDS; with THREADS 0, times
SECONDS sequential requests on fresh connections. Prints JSON."""
import http.client, json, statistics, sys, threading, time
port, threads, seconds, path, rate = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], float(sys.argv[5])
def get(conn):
    t0 = time.perf_counter()
    conn.request("GET", path)
    r = conn.getresponse()
    r.read()
    assert r.status == 200, r.status
    return (time.perf_counter() - t0) * 1000
if threads == 0:
    ms = []
    for _ in range(int(seconds)):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        ms.append(get(c))
        c.close()
    print(json.dumps({"median_ms": round(statistics.median(ms), 2), "max_ms": round(max(ms), 2)}))
    sys.exit(0)
stop, lat = time.time() + seconds, [[] for _ in range(threads)]
def run(i):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    while time.time() < stop:
        lat[i].append(get(c))
        time.sleep(max(0.0, 1 / rate - lat[i][-1] / 1000))
ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
ms = sorted(x for l in lat for x in l)
print(json.dumps({"per_s": round(len(ms) / seconds, 1), "median_ms": round(statistics.median(ms), 2),
                  "p99_ms": round(ms[int(len(ms) * 0.99)], 2)}))
PY
reset
log "open endpoints: $OPEN_ROWS outbox rows"
sql "INSERT INTO events (id, payload) SELECT gen_random_uuid(), '{\"n\":1}' FROM generate_series(1, $OPEN_ROWS);
     INSERT INTO outbox (event_id) SELECT id FROM events; ANALYZE events; ANALYZE outbox;"
start api
python3 "$WORK/scrape.py" "$PORT" 0 15 /metrics 0 >"$WORK/scrape-metrics.json"
python3 "$WORK/scrape.py" "$PORT" 0 15 /v1/stats 0 >"$WORK/scrape-stats.json"
load "$WORK/open-alone.json" --path /v1/events --concurrency "$CONC" --duration "${T}s"
python3 "$WORK/scrape.py" "$PORT" 8 "$((T + 1))" /metrics "$SCRAPE_RATE" >"$WORK/scrapers.json" &
SCRAPERS=$!
load "$WORK/open-beside.json" --path /v1/events --concurrency "$CONC" --duration "${T}s"
wait "$SCRAPERS"
stop

# 9. The cost of an event. Each run starts on empty tables, snapshots the
#    CPU of every process class and PostgreSQL's statistics, offers its
#    load, waits until every event is processed (the API alone: until the
#    load ends), snapshots again, and stops ingestd, whose backends then
#    flush their statistics.
pg_stats() { # one JSON object: row counters per table, scans per index, transactions
  sql "SELECT json_build_object(
         'tables', (SELECT json_object_agg(relname, json_build_object('ins', n_tup_ins, 'upd', n_tup_upd,
                      'hot_upd', n_tup_hot_upd, 'del', n_tup_del))
                    FROM pg_stat_user_tables WHERE schemaname = '$NAME'),
         'indexes', (SELECT json_object_agg(indexrelname, idx_scan)
                     FROM pg_stat_user_indexes WHERE schemaname = '$NAME'),
         'xacts', (SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()))"
}
cost() { # scenario, role ("" for all), loadgen args...
  local scenario=$1 role=$2 t0 t1
  shift 2
  reset
  pg_stats >"$WORK/cost-$scenario.stats0"
  python3 tests/proc_cpu.py snapshot >"$WORK/cost-$scenario.cpu0"
  # shellcheck disable=SC2086 # an empty role means all of them
  start $role
  t0=$(date +%s.%N)
  log "cost: $scenario"
  /usr/bin/time -f "%U %S" -o "$WORK/cost-$scenario.loadgen" \
    "$BIN/loadgen" --url "http://127.0.0.1:$PORT" --json "$@" >"$WORK/cost-$scenario.json"
  [ -z "$role" ] && wait_drained 180
  t1=$(date +%s.%N)
  python3 tests/proc_cpu.py snapshot "$PID" >"$WORK/cost-$scenario.cpu1"
  sql "SELECT count(*) FILTER (WHERE status = 'processed'), count(*) FROM events" >"$WORK/cost-$scenario.events"
  echo "$t0 $t1" >"$WORK/cost-$scenario.time"
  stop
  pg_stats >"$WORK/cost-$scenario.stats1"
}
cost single "" --rate "$COST_SINGLE_RATE" --concurrency 16 --duration "${COST_T}s" --payload-bytes 100
cost batch "" --path /v1/events --batch 100 --rate "$COST_BATCH_RATE" --concurrency 16 \
  --duration "${COST_T}s" --payload-bytes 100
cost api api --concurrency "$CONC" --duration "${T}s" --payload-bytes 100
# 10. What the edge features cost on the ingest path: the API alone taking
#     batches of 100 in closed loop, as is, gzip-compressed, and under a
#     rate limit too high to refuse anything (every request still takes
#     its bucket's lock twice).
EDGE=(--path /v1/events --batch 100 --concurrency "$BATCH_CONC" --duration "${T}s" --payload-bytes 100)
cost edge_plain api "${EDGE[@]}"
cost edge_gzip api "${EDGE[@]}" --gzip
INGEST_RATE_LIMIT=1000000000/s cost edge_limited api "${EDGE[@]}"

# 8. Peak RSS under maximum-size batches, with the default memory budget.
reset
log "memory: 64 clients posting 5 MB batches"
start api
load "$WORK/mem.json" --path /v1/events --concurrency 64 --requests "$MEM_REQUESTS" \
  --batch 1000 --payload-bytes 5000 --timeout 60s
MEM_RSS=$(peak_rss_mb)
stop

mkdir -p "$(dirname "$OUT")"
python3 - "$OUT" "$WORK" <<PY
import json, sys, platform, os
out, work = sys.argv[1], sys.argv[2]
ingest = json.load(open(f"{work}/ingest.json"))
pg = float("$PG_TPS")
batch = json.load(open(f"{work}/batch.json"))
pg_batch_events = float("$PG_BATCH_TPS") * 100
batch_events = batch["accepted"] * 100 / batch["elapsed_s"]
e2e = [dict(zip(["rate", "accepted", "backlog", "kept_up"], map(int, r.split(":")))) for r in "$E2E_ROWS".split()]
lat = [dict(zip(["rate", "p50_ms", "p99_ms", "p999_ms"], [int(x.split(":")[0])] + [float(v) for v in x.split(":")[1:]])) for x in "$LAT".split()]
res = {
    "smoke": "${BENCH_SMOKE:-0}" == "1",
    "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
    "concurrency": $CONC,
    "pgbench_tx_per_s": pg,
    "ingest_per_s": ingest["throughput_per_s"],
    "ingest_latency_ms": ingest["latency_ms"],
    "ingest_ratio_to_pgbench": round(ingest["throughput_per_s"] / pg, 2) if pg else None,
    "batch_concurrency": $BATCH_CONC,
    "pgbench_batch_events_per_s": round(pg_batch_events),
    "batch_ingest_events_per_s": round(batch_events),
    "batch_ingest_latency_ms": batch["latency_ms"],
    "batch_ratio_to_pgbench": round(batch_events / pg_batch_events, 2) if pg_batch_events else None,
    "end_to_end": e2e,
    "end_to_end_sustained_per_s": $E2E_BEST,
    "ingest_to_processed": lat,
    "relay_per_s": $RELAY,
    "raw_publish_per_s": $RAW,
    "relay_ratio_to_raw": round($RELAY / $RAW, 2),
    "raw_publish_relay_messages_per_s": $RAW_RELAY,
    "relay_ratio_to_raw_relay_messages": round($RELAY / $RAW_RELAY, 2),
    "peak_rss_mb": $RSS,
    "big_batches": dict({k: json.load(open(f"{work}/mem.json"))[k] for k in ("statuses", "errors")}, peak_rss_mb=$MEM_RSS, clients=64, batch=1000, payload_bytes=5000),
    "stripped_binary_mb": $SIZE,
    "open_endpoints": {
        "outbox_rows": $OPEN_ROWS,
        "metrics_scrape_ms": json.load(open(f"{work}/scrape-metrics.json")),
        "stats_ms": json.load(open(f"{work}/scrape-stats.json")),
        "ingest_alone": {k: json.load(open(f"{work}/open-alone.json"))[k] for k in ("throughput_per_s", "latency_ms")},
        "ingest_beside_scrapers": {k: json.load(open(f"{work}/open-beside.json"))[k] for k in ("throughput_per_s", "latency_ms")},
        "scrapers": dict(json.load(open(f"{work}/scrapers.json")), threads=8, rate_each_per_s=$SCRAPE_RATE),
    },
}
def delta(a, b):
    """b - a for nested dicts of numbers."""
    if isinstance(b, dict):
        return {k: delta((a or {}).get(k), v) for k, v in b.items()}
    return (b or 0) - (a or 0)
def cpu_us(name, events, loadgen=True):
    c0 = json.load(open(f"{work}/{name}.cpu0"))
    c1 = json.load(open(f"{work}/{name}.cpu1"))
    us = {k: round((c1[k] - c0[k]) * 1e6 / events, 1) for k in c1}
    if loadgen:
        u, s_ = open(f"{work}/{name}.loadgen").read().split()
        us["loadgen"] = round((float(u) + float(s_)) * 1e6 / events, 1)
    us["server"] = round(us["postgresql"] + us["rabbitmq"] + us["ingestd"], 1)
    return us
costs = {}
EDGES = ("edge_plain", "edge_gzip", "edge_limited")
for name in ("single", "batch", "api") + EDGES:
    alone = name == "api" or name in EDGES
    processed, total = map(int, open(f"{work}/cost-{name}.events").read().strip().split("|"))
    events = total if alone else processed
    t0, t1 = map(float, open(f"{work}/cost-{name}.time").read().split())
    st = delta(json.load(open(f"{work}/cost-{name}.stats0")), json.load(open(f"{work}/cost-{name}.stats1")))
    per = lambda n: round(n / events, 2) if events else None
    load_out = json.load(open(f"{work}/cost-{name}.json"))
    costs[name] = {
        "events": events,
        "pending_left": total - processed if not alone else None,
        "events_per_s": round(events / (t1 - t0)),
        "latency_ms": load_out["latency_ms"],
        "cpu_us_per_event": cpu_us(f"cost-{name}", events),
        "rows_per_event": {t: {k: per(v) for k, v in c.items()} for t, c in (st["tables"] or {}).items()},
        "index_scans_per_event": {i: per(v) for i, v in (st["indexes"] or {}).items()},
        "transactions_per_event": per(st["xacts"]),
    }
costs["single"]["offered_per_s"] = $COST_SINGLE_RATE
costs["batch"]["offered_per_s"] = $COST_BATCH_RATE * 100
costs["api"]["ratio_to_pgbench"] = round(costs["api"]["events_per_s"] / pg, 2) if pg else None
plain = costs["edge_plain"]
for name in EDGES[1:]:
    c = costs[name]
    c["events_per_s_ratio_to_plain"] = round(c["events_per_s"] / plain["events_per_s"], 2) if plain["events_per_s"] else None
    c["ingestd_us_per_event_over_plain"] = round(c["cpu_us_per_event"]["ingestd"] - plain["cpu_us_per_event"]["ingestd"], 1)
costs["relay"] = {"events": $RELAY_N, "events_per_s": $RELAY, "cpu_us_per_event": cpu_us("relay", $RELAY_N, loadgen=False)}
res["costs"] = costs
json.dump(res, open(out, "w"), indent=2)
rows = [
    ("pgbench, event+outbox per tx, %d clients" % res["concurrency"], "%.0f tx/s" % pg),
    ("ingest 202s, concurrency %d" % res["concurrency"], "%.0f/s (%.2fx pgbench)" % (res["ingest_per_s"], res["ingest_ratio_to_pgbench"] or 0)),
    ("ingest latency p50 / p99 / p99.9", "%.2f / %.2f / %.2f ms" % (ingest["latency_ms"]["p50"], ingest["latency_ms"]["p99"], ingest["latency_ms"]["p99_9"])),
    ("pgbench, 100 events+outbox per tx, %d clients" % res["batch_concurrency"], "%.0f events/s" % pg_batch_events),
    ("batch ingest, 100 per request, %d clients (api role)" % res["batch_concurrency"], "%.0f events/s (%.2fx pgbench)" % (batch_events, res["batch_ratio_to_pgbench"] or 0)),
    ("batch request latency p50 / p99", "%.2f / %.2f ms" % (batch["latency_ms"]["p50"], batch["latency_ms"]["p99"])),
    ("end to end sustained", "%d events/s" % res["end_to_end_sustained_per_s"]),
]
for e in e2e:
    rows.append(("  offered %d/s" % e["rate"], "accepted %d, backlog %d, %s" % (e["accepted"], e["backlog"], "kept up" if e["kept_up"] else "fell behind")))
for l in lat:
    rows.append(("ingest->processed at %d/s p50/p99/p99.9" % l["rate"], "%.2f / %.2f / %.2f ms" % (l["p50_ms"], l["p99_ms"], l["p999_ms"])))
rows += [
    ("relay", "%d/s" % res["relay_per_s"]),
    ("raw publish loop (confirm per 500)", "%.0f/s (relay %.2fx)" % (res["raw_publish_per_s"], res["relay_ratio_to_raw"])),
    ("raw loop of the relay's messages", "%.0f/s (relay %.2fx)" % (res["raw_publish_relay_messages_per_s"], res["relay_ratio_to_raw_relay_messages"])),
    ("peak RSS of ingestd", "%.1f MB" % res["peak_rss_mb"]),
    ("stripped binary", "%.2f MB" % res["stripped_binary_mb"]),
]
o = res["open_endpoints"]
rows += [
    ("/metrics over %d outbox rows, median of 15" % o["outbox_rows"], "%.2f ms" % o["metrics_scrape_ms"]["median_ms"]),
    ("/v1/stats over the same, median of 15", "%.2f ms" % o["stats_ms"]["median_ms"]),
    ("peak RSS, api, default budget, 64 clients x 5 MB batches", "%.1f MB (answers %s)" % (res["big_batches"]["peak_rss_mb"], res["big_batches"]["statuses"])),
    ("ingest p50 / p99 there, alone", "%.2f / %.2f ms (%.0f/s)" % (o["ingest_alone"]["latency_ms"]["p50"], o["ingest_alone"]["latency_ms"]["p99"], o["ingest_alone"]["throughput_per_s"])),
    ("  beside 8 scrapers at %s/s each" % o["scrapers"]["rate_each_per_s"], "%.2f / %.2f ms (%.0f/s; %.1f scrapes/s, p99 %.2f ms)" % (o["ingest_beside_scrapers"]["latency_ms"]["p50"], o["ingest_beside_scrapers"]["latency_ms"]["p99"], o["ingest_beside_scrapers"]["throughput_per_s"], o["scrapers"]["per_s"], o["scrapers"]["p99_ms"])),
]
titles = {
    "single": "single events offered at %d/s, 16 connections, end to end" % costs["single"]["offered_per_s"],
    "batch": "batches of 100 offered at %d events/s, 16 connections, end to end" % costs["batch"]["offered_per_s"],
    "api": "api alone, single events, concurrency %d (%.2fx pgbench)" % ($CONC, costs["api"]["ratio_to_pgbench"] or 0),
    "relay": "relay alone, %d rows" % $RELAY_N,
    "edge_plain": "api alone, batches of 100, %d clients, closed loop" % $BATCH_CONC,
    "edge_gzip": "  the same, gzip-compressed",
    "edge_limited": "  the same, under a rate limit that refuses nothing",
}
for name, c in costs.items():
    u = c["cpu_us_per_event"]
    rows.append(("cost: " + titles[name], "%d events/s; CPU us/event: PostgreSQL %.1f, RabbitMQ %.1f, ingestd %.1f = %.1f%s" % (
        c["events_per_s"], u["postgresql"], u["rabbitmq"], u["ingestd"], u["server"],
        "; load generator %.1f" % u["loadgen"] if "loadgen" in u else "")))
    if name in EDGES[1:]:
        rows.append(("  against the plain run", "%.2fx the events/s; ingestd %+.1f us/event" % (
            c["events_per_s_ratio_to_plain"] or 0, c["ingestd_us_per_event_over_plain"])))
        continue
    if "rows_per_event" in c:
        r = c["rows_per_event"]
        rows.append(("  rows per event", "; ".join("%s %s" % (t, ", ".join("%s %.2f" % (k, v) for k, v in r[t].items() if v)) for t in ("events", "outbox") if t in r)
                     + "; %.2f transactions" % (c["transactions_per_event"] or 0)))
        rows.append(("  index scans per event", ", ".join("%s %.2f" % (i, v) for i, v in sorted(c["index_scans_per_event"].items()) if v)))
w = max(len(r[0]) for r in rows)
print("| %s | %s |" % ("measure".ljust(w), "result"))
print("|%s|%s|" % ("-" * (w + 2), "-" * 8))
for k, v in rows:
    print("| %s | %s |" % (k.ljust(w), v))
PY
log "written $OUT"
