#!/usr/bin/env bash
# `make chaos`: the proof that an accepted event is processed, in effect
# exactly once, whatever fails around it.
#
# Drives events at a steady rate through a release build of ingestd on
# loopback while it SIGKILLs and restarts ingestd twice, restarts RabbitMQ
# once (stop_app/start_app) and PostgreSQL once, raises a real memory alarm
# on RabbitMQ (its high watermark set to 0, then restored), which blocks
# every publisher, and blackholes PostgreSQL (ingestd reaches it through
# tests/blackhole_proxy.py, which then holds every byte and closes
# nothing). Then it waits for the backlog to drain and checks every event
# that got a 202, by id. It prints one summary line and exits non-zero if
# anything was lost or processed twice, or if /readyz never said the relay
# was blocked or PostgreSQL down. Run it alone: it restarts and alarms the
# shared services (and always leaves them running, the watermark restored).
#
# CHAOS_SMOKE=1 (`make chaos-smoke`, run by CI) does the same kills and
# restarts, a second apart, with 200 events/s offered for 20 s, in about a
# quarter of the time. Recoveries take seconds (the alarm is seen only
# when a batch's confirms time out), so the last faults may come after the
# load has ended; each fault's log line says whether it came under load.
set -euo pipefail
cd "$(dirname "$0")/.."
. tests/lib.sh

if [ "${CHAOS_SMOKE:-0}" = 1 ]; then
  : "${CHAOS_RATE:=200}" "${CHAOS_DURATION:=20}" "${CHAOS_STEP:=1}"
fi
DB_URL=${INGEST_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
PORT=${CHAOS_PORT:-5091}
RATE=${CHAOS_RATE:-1000}            # events per second offered
DURATION=${CHAOS_DURATION:-45}      # seconds of load: RATE * DURATION events
STEP=${CHAOS_STEP:-3}               # seconds between two faults
DRAIN_TIMEOUT=${CHAOS_DRAIN_TIMEOUT:-120}
NAME=chaos_$(date +%s)_$$
WORK=$(mktemp -d)
PG_VERSION=$(ls /etc/postgresql 2>/dev/null | sort -n | tail -n1)

# ingestd reaches PostgreSQL through a proxy that can play a vanished host
# (tests/blackhole_proxy.py); a short statement timeout keeps the bound on
# a silent server (it plus 5 s) short. The proxy never closes a connection
# caught in the blackhole, so the server keeps that session, and the row
# locks of a worker's transaction on it, until the idle-in-transaction
# limit ends it: a short one (above the 10 s confirm timeout) keeps the
# events behind those locks from waiting minutes.
PROXY_PORT=${CHAOS_PROXY_PORT:-5092}
PG_HOSTPORT=$(python3 -c "import sys, urllib.parse as u; p = u.urlparse(sys.argv[1]); print('%s:%d' % (p.hostname or '127.0.0.1', p.port or 5432))" "$DB_URL")
PROXIED_DB_URL=$(python3 -c "import sys, urllib.parse as u; p = u.urlparse(sys.argv[1]); print(p._replace(netloc=(p.username + '@' if p.username else '') + '127.0.0.1:' + sys.argv[2]).geturl())" "$DB_URL" "$PROXY_PORT")
export INGEST_DATABASE_URL=$PROXIED_DB_URL INGEST_DB_SCHEMA=$NAME INGEST_AMQP_PREFIX=$NAME
export INGEST_HTTP_ADDR=127.0.0.1:$PORT INGEST_RETRY_DELAYS=1s,2s INGEST_LOG=info
export INGEST_DB_STATEMENT_TIMEOUT=2s INGEST_DB_IDLE_IN_TRANSACTION_TIMEOUT=15s

cargo build --release --locked --bin ingestd --bin loadgen >&2
BIN=${CARGO_TARGET_DIR:-target}/release
PID=

psql_q() { PGOPTIONS="-c client_min_messages=warning" psql "$DB_URL" -v ON_ERROR_STOP=1 -Atq -c "$1"; }
now() { date +%s.%N; }
secs_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }
log() { echo "chaos: $*" >&2; }

start_ingestd() {
  "$BIN/ingestd" >>"$WORK/ingestd.log" 2>&1 &
  PID=$!
}

# Waits until /readyz answers 200 and prints how long that took since $1.
recovered() {
  local since=$1 deadline=$((SECONDS + 90))
  until curl -sf -o /dev/null "http://127.0.0.1:$PORT/readyz"; do
    if ((SECONDS > deadline)); then echo "never"; return; fi
    sleep 0.1
  done
  secs_since "$since"
}

# RabbitMQ's memory high watermark before the alarm phase, to restore.
WATERMARK=
services_up() {
  rabbitmqctl -q start_app >/dev/null 2>&1 || true
  if [ -n "$WATERMARK" ]; then
    rabbitmqctl -q set_vm_memory_high_watermark "$WATERMARK" >/dev/null 2>&1 || true
  fi
  if ! pg_isready -q -h 127.0.0.1; then
    pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" main start || true
  fi
}

cleanup() {
  [ -n "${LOADER:-}" ] && kill "$LOADER" 2>/dev/null || true
  [ -n "${PROXY:-}" ] && kill "$PROXY" 2>/dev/null || true
  [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null || true
  services_up
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 && break; sleep 1; done
  remove_run "$DB_URL" "$NAME"
  rm -rf "$WORK"
}
trap cleanup EXIT

services_up
python3 tests/blackhole_proxy.py "$PROXY_PORT" "$PG_HOSTPORT" >>"$WORK/proxy.log" 2>&1 &
PROXY=$!
for _ in $(seq 1 50); do grep -q listening "$WORK/proxy.log" && break; sleep 0.1; done
start_ingestd
recovered "$(now)" >/dev/null

log "offering $RATE events/s for ${DURATION}s to schema $NAME"
"$BIN/loadgen" --url "http://127.0.0.1:$PORT" --rate "$RATE" --duration "${DURATION}s" \
  --concurrency 32 --timeout 30s --ids-out "$WORK/ids" --json >"$WORK/load.json" 2>"$WORK/load.err" &
LOADER=$!
step() { sleep "$1"; }
# Says whether a fault lands while the load generator still offers events.
load_state() { if kill -0 "$LOADER" 2>/dev/null; then echo "under load"; else echo "after the load"; fi; }
# SIGKILLs ingestd, starts it again (in this shell, so PID follows) and
# stores in the variable named $1 how long it took to be ready.
kill_and_restart() {
  kill -9 "$PID"; wait "$PID" 2>/dev/null || true
  local t; t=$(now)
  start_ingestd
  printf -v "$1" '%s' "$(recovered "$t")"
}

step "$(awk -v s="$STEP" 'BEGIN { print s + 1 }')"
log "SIGKILL ingestd, $(load_state)"
kill_and_restart R_KILL1

step "$STEP"
log "RabbitMQ stop_app, $(load_state)"
rabbitmqctl -q stop_app >/dev/null
step "$STEP"
t=$(now)
log "RabbitMQ start_app"
rabbitmqctl -q start_app >/dev/null
R_RABBIT=$(recovered "$t")

step "$STEP"
log "SIGKILL ingestd again, $(load_state)"
kill_and_restart R_KILL2

step "$STEP"
log "PostgreSQL restart, $(load_state)"
t=$(now)
pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" main restart
R_PG=$(recovered "$t")

# Waits until /readyz says $1 is $2 and prints how long that took since $3.
readyz_says() {
  local check=$1 want=$2 since=$3 deadline=$((SECONDS + 60))
  until curl -s "http://127.0.0.1:$PORT/readyz" | grep -q "\"$check\":\"$want\""; do
    if ((SECONDS > deadline)); then echo "never"; return; fi
    sleep 0.1
  done
  secs_since "$since"
}

# A memory alarm: RabbitMQ blocks every publisher until it clears. The relay
# must say "blocked", keep the rows in the outbox, and resume by itself;
# ingest goes on answering 202.
step "$STEP"
WATERMARK=$(rabbitmqctl -q eval 'vm_memory_monitor:get_vm_memory_high_watermark().' 2>/dev/null | tr -d '\r')
case "$WATERMARK" in
  0.*|1|1.0) ;;
  *) log "memory watermark $WATERMARK is not a fraction; restoring 0.4 after the alarm"; WATERMARK=0.4 ;;
esac
log "RabbitMQ memory alarm, $(load_state)"
t=$(now)
rabbitmqctl -q set_vm_memory_high_watermark 0 >/dev/null
R_BLOCKED=$(readyz_says broker_relay blocked "$t")
step "$STEP"
log "RabbitMQ memory alarm cleared"
t=$(now)
rabbitmqctl -q set_vm_memory_high_watermark "$WATERMARK" >/dev/null
R_ALARM=$(recovered "$t")

# A blackhole: PostgreSQL vanishes without closing anything.
step "$STEP"
log "PostgreSQL blackholed, $(load_state)"
kill -USR1 "$PROXY"
t=$(now)
R_DB_DOWN=$(readyz_says postgres down "$t")
step "$STEP"
log "PostgreSQL back from the blackhole"
kill -USR2 "$PROXY"
t=$(now)
R_BLACKHOLE=$(recovered "$t")

wait "$LOADER" || true
LOADER=
sort -u "$WORK/ids" >"$WORK/ids.sorted"
ACCEPTED=$(wc -l <"$WORK/ids.sorted")
SENT=$(sed -n 's/.*"sent":\([0-9]*\).*/\1/p' "$WORK/load.json")

LOAD_ERRORS=$(sed -n 's/.*"errors":\([0-9]*\).*/\1/p' "$WORK/load.json")
psql_q "CREATE TABLE $NAME.accepted (id uuid PRIMARY KEY)"
psql "$DB_URL" -v ON_ERROR_STOP=1 -q -c "\\copy $NAME.accepted FROM '$WORK/ids.sorted'"

t=$(now)
deadline=$((SECONDS + DRAIN_TIMEOUT))
pending() {
  psql_q "SELECT count(*) FROM $NAME.accepted a LEFT JOIN $NAME.events e USING (id)
          WHERE e.id IS NULL OR e.status = 'pending'"
}
while [ "$(pending)" != "0" ] && ((SECONDS < deadline)); do sleep 0.5; done
R_DRAIN=$(secs_since "$t")

read -r PROCESSED FAILED LOST TWICE < <(accepted_outcome "$NAME")

kill -TERM "$PID"; wait "$PID" || true; PID=

echo "chaos: sent=$SENT accepted=$ACCEPTED errors=$LOAD_ERRORS processed=$PROCESSED failed=$FAILED lost=$LOST processed_twice=$TWICE recovery: kill1=$R_KILL1 rabbitmq=$R_RABBIT kill2=$R_KILL2 postgres=$R_PG alarm_seen=$R_BLOCKED alarm=$R_ALARM blackhole_seen=$R_DB_DOWN blackhole=$R_BLACKHOLE drain=$R_DRAIN"
if [ "$LOST" != "0" ] || [ "$TWICE" != "0" ] || [ "$ACCEPTED" -lt 1 ] \
  || [ "$R_BLOCKED" = never ] || [ "$R_DB_DOWN" = never ]; then
  tail -n 40 "$WORK/ingestd.log" >&2
  exit 1
fi
