#!/usr/bin/env bash
# `make cluster-chaos`: the proof that an accepted event is processed, in
# effect exactly once, when the nodes of a RabbitMQ cluster and a PostgreSQL
# primary fail under load.
#
# Starts, beside the shared RabbitMQ and PostgreSQL (which it never touches:
# other ports, other data directories, other node names), a 3-node RabbitMQ
# cluster and a PostgreSQL primary with a synchronous streaming standby, all
# on loopback, and runs a release build of ingestd as separate processes: 2
# api, 2 relay and 2 worker, with quorum queues, the three nodes in
# INGEST_AMQP_URL and both database hosts in INGEST_DATABASE_URL with
# target_session_attrs=read-write. One load generator per API offers events
# at a steady rate while it:
#   1. SIGKILLs the RabbitMQ node that leads the events queue;
#   2. stops a second node (stop_app) while the first is still down, so that
#      every queue loses its majority: publishes are not confirmed and rows
#      wait in the outbox; then starts it again;
#   3. starts the killed node again, which rejoins;
#   4. SIGKILLs the PostgreSQL primary, clears synchronous_standby_names on
#      the standby (a promoted standby with no standby of its own would block
#      every commit) and promotes it; ingestd finds it by itself;
#   5. SIGKILLs one ingestd process of each role, and starts each again.
# Then it waits for the backlog to drain and checks every event that got a
# 202, by id, on the promoted standby: processed once (processed_count = 1),
# none lost, the events queue and the outbox empty. It prints one summary
# line, with each fault's recovery time: how long until an event accepted
# after the fault was processed (for the RabbitMQ faults and the failover),
# until the node rejoined, and until the restarted process was connected
# again. It exits non-zero if anything was lost or processed twice, or the
# queues did not drain. It removes the cluster, the database servers and
# their data at the end, whatever happens. Run it alone: it needs most of
# the machine.
#
# CLUSTER_CHAOS_SMOKE=1 (`make cluster-chaos-smoke`) does the same faults
# with shorter pauses, 100 events/s offered for 75 s.
#
# Needs, as root: Debian's rabbitmq-server (the nodes run as the rabbitmq
# user, so that they and rabbitmqctl share its Erlang cookie, and register
# with the epmd the shared broker uses) and PostgreSQL's server binaries
# (run as the postgres user).
set -euo pipefail
cd "$(dirname "$0")/.."
. tests/lib.sh

if [ "${CLUSTER_CHAOS_SMOKE:-0}" = 1 ]; then
  : "${CLUSTER_CHAOS_RATE:=100}" "${CLUSTER_CHAOS_DURATION:=75}"
  : "${CLUSTER_CHAOS_STEP:=2}" "${CLUSTER_CHAOS_HOLD:=5}"
fi
RATE=${CLUSTER_CHAOS_RATE:-200}          # events per second offered, both APIs together
DURATION=${CLUSTER_CHAOS_DURATION:-120}  # seconds of load
STEP=${CLUSTER_CHAOS_STEP:-5}            # seconds between two faults
HOLD=${CLUSTER_CHAOS_HOLD:-15}           # seconds the queues stay without a majority
DRAIN_TIMEOUT=${CLUSTER_CHAOS_DRAIN_TIMEOUT:-180}
AMQP_PORT=${CLUSTER_CHAOS_AMQP_PORT:-5681}   # nodes on 5681, 5682, 5683
DIST_PORT=${CLUSTER_CHAOS_DIST_PORT:-25681}  # their Erlang distribution ports
PG_PORT=${CLUSTER_CHAOS_PG_PORT:-5441}       # primary; the standby on the next
API_PORT=${CLUSTER_CHAOS_API_PORT:-5691}     # api1; api2 on the next (not make bench's 5093)
PG_BIN=${CLUSTER_CHAOS_PG_BIN:-/usr/lib/postgresql/$(ls /usr/lib/postgresql 2>/dev/null | sort -n | tail -n1)/bin}
RABBIT_BIN=/usr/lib/rabbitmq/bin
NAME=cchaos_$(date +%s)_$$

log() { echo "cluster-chaos: $*" >&2; }
die() { log "$*"; exit 1; }
now() { date +%s.%N; }
secs_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

[ "$(id -u)" = 0 ] || die "run it as root: the nodes run as the rabbitmq user, PostgreSQL as postgres"
id rabbitmq >/dev/null 2>&1 || die "no rabbitmq user: install Debian's rabbitmq-server"
[ -x "$PG_BIN/initdb" ] || die "no PostgreSQL server binaries in $PG_BIN (set CLUSTER_CHAOS_PG_BIN)"
API_PORTS=("$API_PORT" $((API_PORT + 1)))
RABBIT_PORTS=("$AMQP_PORT" $((AMQP_PORT + 1)) $((AMQP_PORT + 2)))
PG_PORTS=("$PG_PORT" $((PG_PORT + 1)))
for p in "${API_PORTS[@]}" "${RABBIT_PORTS[@]}" "${PG_PORTS[@]}" "$DIST_PORT" $((DIST_PORT + 1)) $((DIST_PORT + 2)); do
  if port_open "$p"; then die "port $p is taken; set the CLUSTER_CHAOS_*_PORT variables"; fi
done

cargo build --release --locked --bin ingestd --bin loadgen >&2
BIN=$(pwd)/${CARGO_TARGET_DIR:-target}/release

WORK=$(mktemp -d)
# The rabbitmq and postgres users write their data directories inside.
chmod 755 "$WORK"
RABBIT_NODES=()
for i in 0 1 2; do RABBIT_NODES+=("cchaos$((i + 1))_$$@localhost"); done
declare -A PIDS=()
LOADERS=()

rabbit_dir() { echo "$WORK/rabbit$1"; }
# The pid of node $1 (an index), read from its pid file, if that process is
# still the node: its environment names it.
rabbit_pid() {
  local pid
  pid=$(head -n1 "$(rabbit_dir "$1")/mnesia/${RABBIT_NODES[$1]}.pid" 2>/dev/null) || return 1
  tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "RABBITMQ_NODENAME=${RABBIT_NODES[$1]}" || return 1
  echo "$pid"
}
# SIGKILLs node $1.
kill_rabbit() {
  local pid
  pid=$(rabbit_pid "$1") || die "node ${RABBIT_NODES[$1]} is not running"
  kill -9 "$pid"
  rm -f "$(rabbit_dir "$1")/mnesia/${RABBIT_NODES[$1]}.pid"
}
# rabbitmqctl against node $1 (an index) only, never the shared broker.
rctl() { local i=$1; shift; rabbitmqctl -n "${RABBIT_NODES[$i]}" -q "$@"; }

# Starts node $1 (0, 1 or 2) in the background, as the rabbitmq user, with
# its own name, ports, data, logs and plugins (none). The system-wide
# rabbitmq.conf pins the listener to 5672, which a config file of its own
# replaces.
start_rabbit() {
  local i=$1 d; d=$(rabbit_dir "$1")
  mkdir -p "$d/mnesia" "$d/log"
  echo "[]." >"$d/enabled_plugins"
  echo "listeners.tcp.local = 127.0.0.1:${RABBIT_PORTS[$i]}" >"$d/rabbitmq.conf"
  chown -R rabbitmq:rabbitmq "$d"
  (cd "$d" && runuser -u rabbitmq -- env HOME=/var/lib/rabbitmq \
    RABBITMQ_NODENAME="${RABBIT_NODES[$i]}" RABBITMQ_NODE_PORT="${RABBIT_PORTS[$i]}" \
    RABBITMQ_DIST_PORT=$((DIST_PORT + i)) RABBITMQ_MNESIA_BASE="$d/mnesia" \
    RABBITMQ_LOG_BASE="$d/log" RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
    RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" ERL_CRASH_DUMP="$d/erl_crash.dump" \
    "$RABBIT_BIN/rabbitmq-server" >>"$d/stdout" 2>&1) &
}

# Waits until node $1 takes AMQP connections and has finished booting.
wait_rabbit() {
  local i=$1 deadline=$((SECONDS + 90))
  until port_open "${RABBIT_PORTS[$i]}"; do
    ((SECONDS < deadline)) || { tail -n 20 "$(rabbit_dir "$i")/stdout" >&2; die "node ${RABBIT_NODES[$i]} did not start"; }
    sleep 0.2
  done
  rctl "$i" await_startup >/dev/null
}

# The index of the node that leads the events queue, asked of node $1;
# nothing while it has none.
leader_of_events() {
  local leader i
  leader=$(rctl "$1" list_queues name leader --no-table-headers 2>/dev/null | awk -v q="$NAME.events" '$1 == q { print $2 }')
  for i in 0 1 2; do
    if [ "${RABBIT_NODES[$i]}" = "$leader" ]; then echo "$i"; fi
  done
}

# Messages in the events queue (ready and unacknowledged), asked of node $1.
events_queue_messages() {
  rctl "$1" list_queues name messages --no-table-headers | awk -v q="$NAME.events" '$1 == q { print $2 }'
}

PG_DIR=$WORK/pg
PRIMARY=$PG_DIR/primary
STANDBY=$PG_DIR/standby
pgrun() { local tool=$1; shift; runuser -u postgres -- "$PG_BIN/$tool" "$@"; }
psql_at() { PGCONNECT_TIMEOUT=2 psql -h 127.0.0.1 -p "$1" -U postgres -d postgres -v ON_ERROR_STOP=1 -Atq -c "$2"; }
# The primary, wherever it is: the same URL ingestd has.
DB_URL="postgres://postgres@127.0.0.1:${PG_PORTS[0]},127.0.0.1:${PG_PORTS[1]}/postgres?target_session_attrs=read-write"
psql_q() { PGCONNECT_TIMEOUT=2 PGOPTIONS="-c client_min_messages=warning" psql "$DB_URL" -v ON_ERROR_STOP=1 -Atq -c "$1"; }

start_pg() {
  mkdir -p "$PG_DIR"
  chown postgres "$PG_DIR"
  pgrun initdb -D "$PRIMARY" -A trust -U postgres --no-sync >/dev/null
  # In postgresql.conf, as an operator would set it: so the standby, cloned
  # from the primary, inherits synchronous_standby_names too.
  cat >>"$PRIMARY/postgresql.conf" <<EOF
port = ${PG_PORTS[0]}
listen_addresses = '127.0.0.1'
unix_socket_directories = '$PG_DIR'
max_connections = 200
synchronous_commit = on
synchronous_standby_names = '*'
EOF
  pgrun pg_ctl -D "$PRIMARY" -l "$PG_DIR/primary.log" -w start >/dev/null
  pgrun pg_basebackup -h 127.0.0.1 -p "${PG_PORTS[0]}" -U postgres -D "$STANDBY" -R -X stream
  echo "port = ${PG_PORTS[1]}" >>"$STANDBY/postgresql.conf"
  pgrun pg_ctl -D "$STANDBY" -l "$PG_DIR/standby.log" -w start >/dev/null
  local deadline=$((SECONDS + 30))
  until [ "$(psql_at "${PG_PORTS[0]}" "SELECT sync_state FROM pg_stat_replication" 2>/dev/null)" = sync ]; do
    ((SECONDS < deadline)) || die "the standby did not become synchronous"
    sleep 0.2
  done
}

# Starts ingestd process $1 (api1, relay2, ...) in the background, logging
# to its own file.
start_ingestd() {
  local name=$1 role=${1%[12]} n=${1: -1}
  if [ "$role" = api ]; then
    INGEST_HTTP_ADDR=127.0.0.1:${API_PORTS[$((n - 1))]} "$BIN/ingestd" api >>"$WORK/$name.log" 2>&1 &
  else
    "$BIN/ingestd" "$role" >>"$WORK/$name.log" 2>&1 &
  fi
  PIDS[$name]=$!
}

# Waits until the log of process $1 holds more than $2 lines matching $3.
wait_log() {
  local deadline=$((SECONDS + 90))
  until (($(grep -c "$3" "$WORK/$1.log" || true) > $2)); do
    ((SECONDS < deadline)) || { tail -n 20 "$WORK/$1.log" >&2; die "$1 did not log $3"; }
    kill -0 "${PIDS[$1]}" 2>/dev/null || { tail -n 20 "$WORK/$1.log" >&2; die "$1 exited"; }
    sleep 0.1
  done
}

# What the log of process $1 says when its broker connection is made.
connected_line() {
  case $1 in
    relay*) echo "relay: connected to" ;;
    worker*) echo "consumer: connected to" ;;
    *) echo "http: listening on" ;;
  esac
}
# How many times process $1 has said so.
connections() { grep -c "$(connected_line "$1")" "$WORK/$1.log" 2>/dev/null || true; }

# Waits until process $1 is up: an API's /readyz answers 200; a relay's or
# a worker's broker connection is made, once more than the $2 its log
# already shows.
wait_ingestd() {
  local name=$1 seen=${2:-0}
  case $name in
    api*) wait_ready "http://127.0.0.1:${API_PORTS[$((${name: -1} - 1))]}" 90 ;;
    *) wait_log "$name" "$seen" "$(connected_line "$name")" ;;
  esac
}

# Prints how long it took, since $1, until an event accepted after $2 was
# processed: the whole pipeline working again.
pipeline_recovered() {
  local since=$1 after=$2 deadline=$((SECONDS + 120))
  until [ "$(psql_q "SELECT EXISTS (SELECT 1 FROM $NAME.events WHERE status = 'processed'
                     AND created_at > to_timestamp($after))" 2>/dev/null)" = t ]; do
    if ((SECONDS > deadline)); then echo never; return; fi
    sleep 0.2
  done
  secs_since "$since"
}

cleanup() {
  local pid i
  for pid in "${LOADERS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  for i in 0 1 2; do
    if pid=$(rabbit_pid "$i"); then kill -9 "$pid" 2>/dev/null || true; fi
  done
  for d in "$PRIMARY" "$STANDBY"; do
    if [ -f "$d/postmaster.pid" ]; then
      pgrun pg_ctl -D "$d" -m immediate stop >/dev/null 2>&1 || true
    fi
  done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

STARTED=$SECONDS
log "starting RabbitMQ nodes ${RABBIT_NODES[*]} on ports ${RABBIT_PORTS[*]}"
for i in 0 1 2; do start_rabbit "$i"; done
for i in 0 1 2; do wait_rabbit "$i"; done
for i in 1 2; do
  rctl "$i" stop_app >/dev/null
  rctl "$i" join_cluster "${RABBIT_NODES[0]}" >/dev/null
  rctl "$i" start_app >/dev/null
done
log "starting PostgreSQL: primary on ${PG_PORTS[0]}, synchronous standby on ${PG_PORTS[1]}"
start_pg

export INGEST_DATABASE_URL=$DB_URL
export INGEST_AMQP_URL="amqp://guest:guest@127.0.0.1:${RABBIT_PORTS[0]},127.0.0.1:${RABBIT_PORTS[1]},127.0.0.1:${RABBIT_PORTS[2]}/%2f?heartbeat=5"
export INGEST_QUEUE_TYPE=quorum INGEST_DB_SCHEMA=$NAME INGEST_AMQP_PREFIX=$NAME INGEST_LOG=info
export INGEST_RETRY_DELAYS=1s,2s INGEST_CONFIRM_TIMEOUT=5s INGEST_DB_TIMEOUT=2s
export INGEST_DB_STATEMENT_TIMEOUT=10s INGEST_DB_IDLE_IN_TRANSACTION_TIMEOUT=30s
export INGEST_DB_POOL_SIZE=8 INGEST_WORKERS=4 INGEST_HTTP_THREADS=8
# The first API creates the schema; the others start once it exists.
start_ingestd api1
wait_ingestd api1
for p in api2 relay1 relay2 worker1 worker2; do start_ingestd "$p"; done
for p in api2 relay1 relay2 worker1 worker2; do wait_ingestd "$p"; done
log "cluster and 6 ingestd processes up after $((SECONDS - STARTED))s; offering $RATE events/s for ${DURATION}s to schema $NAME"

for k in 0 1; do
  "$BIN/loadgen" --url "http://127.0.0.1:${API_PORTS[$k]}" --rate $((RATE / 2)) --duration "${DURATION}s" \
    --concurrency 16 --timeout 30s --ids-out "$WORK/ids$k" --json >"$WORK/load$k.json" 2>"$WORK/load$k.err" &
  LOADERS+=($!)
done
# Says whether a fault lands while the load generators still offer events.
load_state() { if kill -0 "${LOADERS[0]}" 2>/dev/null; then echo "under load"; else echo "after the load"; fi; }

sleep $((STEP + 2))

# 1. The node that leads the events queue dies; a follower takes over.
LEADER=$(leader_of_events 0)
[ -n "$LEADER" ] || die "$NAME.events has no leader"
log "SIGKILL ${RABBIT_NODES[$LEADER]}, leader of $NAME.events, $(load_state)"
t=$(now)
kill_rabbit "$LEADER"
R_LEADER=$(pipeline_recovered "$t" "$t")
ALIVE=$(((LEADER + 1) % 3))
NEW_LEADER=$(leader_of_events "$ALIVE")
log "events queue led by ${RABBIT_NODES[${NEW_LEADER:-$ALIVE}]:-?} after ${R_LEADER}"

# 2. A second node stops: one of three is left, and the queues have no
# majority. Publishes are not confirmed; the relays' batches time out and
# their rows stay in the outbox.
sleep "$STEP"
SECOND=$ALIVE
LAST=$(((LEADER + 2) % 3))
log "stop_app ${RABBIT_NODES[$SECOND]}: only ${RABBIT_NODES[$LAST]} left, no majority, $(load_state)"
rctl "$SECOND" stop_app >/dev/null
t_lost=$(now)
sleep "$HOLD"
OUTBOX_NO_MAJORITY=$(psql_q "SELECT count(*) FROM $NAME.outbox")
DURING=$(psql_q "SELECT count(*) FROM $NAME.events WHERE status = 'processed'
                 AND created_at > to_timestamp($t_lost) + interval '1 second'")
log "after ${HOLD}s without a majority: $OUTBOX_NO_MAJORITY rows wait in the outbox, $DURING accepted since were processed"
t=$(now)
rctl "$SECOND" start_app >/dev/null
R_QUORUM=$(pipeline_recovered "$t" "$t_lost")

# 3. The killed node comes back and rejoins.
sleep "$STEP"
log "restarting ${RABBIT_NODES[$LEADER]}, $(load_state)"
t=$(now)
start_rabbit "$LEADER"
wait_rabbit "$LEADER"
R_REJOIN=$(secs_since "$t")

# 4. The PostgreSQL primary dies. The standby, which has every commit that
# was acknowledged, is promoted; it inherited synchronous_standby_names,
# which is cleared first, or every commit would wait for a standby it does
# not have.
sleep "$STEP"
log "SIGKILL the PostgreSQL primary, $(load_state)"
t_pg=$(now)
kill -9 "$(head -n1 "$PRIMARY/postmaster.pid")"
# It stays dead: nothing may signal that pid again.
rm -f "$PRIMARY/postmaster.pid"
sleep $((STEP / 2 + 1))
psql_at "${PG_PORTS[1]}" "ALTER SYSTEM SET synchronous_standby_names = ''" >/dev/null
pgrun pg_ctl -D "$STANDBY" -w promote >/dev/null
psql_at "${PG_PORTS[1]}" "SELECT pg_reload_conf()" >/dev/null
t=$(now)
log "standby promoted $(secs_since "$t_pg") after the kill"
R_PG=$(pipeline_recovered "$t" "$t")
R_PG_KILL=$(secs_since "$t_pg")

# 5. One process of each role dies and is started again.
declare -A R_KILL=()
for name in api1 relay1 worker1; do
  sleep "$STEP"
  log "SIGKILL $name, $(load_state)"
  seen=$(connections "$name")
  kill -9 "${PIDS[$name]}"
  wait "${PIDS[$name]}" 2>/dev/null || true
  t=$(now)
  start_ingestd "$name"
  wait_ingestd "$name" "$seen"
  R_KILL[$name]=$(secs_since "$t")
done

log "faults done after $((SECONDS - STARTED))s, $(load_state); waiting for the load to end"
for pid in "${LOADERS[@]}"; do wait "$pid" || true; done
LOADERS=()
cat "$WORK/ids0" "$WORK/ids1" | sort -u >"$WORK/ids.sorted"
ACCEPTED=$(wc -l <"$WORK/ids.sorted")
field() { sed -n "s/.*\"$1\":\\([0-9]*\\).*/\\1/p" "$WORK/load0.json" "$WORK/load1.json" | awk '{ s += $1 } END { print s + 0 }'; }
SENT=$(field sent)
ERRORS=$(field errors)
psql_q "CREATE TABLE $NAME.accepted (id uuid PRIMARY KEY)"
PGCONNECT_TIMEOUT=2 psql "$DB_URL" -v ON_ERROR_STOP=1 -q -c "\\copy $NAME.accepted FROM '$WORK/ids.sorted'"

t=$(now)
deadline=$((SECONDS + DRAIN_TIMEOUT))
pending() {
  psql_q "SELECT count(*) FROM $NAME.accepted a LEFT JOIN $NAME.events e USING (id)
          WHERE e.id IS NULL OR e.status = 'pending'"
}
while [ "$(pending)" != 0 ] && ((SECONDS < deadline)); do sleep 0.5; done
# Drained: nothing left in the outbox, nothing in the events queue (late
# duplicates are delivered and skipped).
DRAINED=no
while ((SECONDS < deadline)); do
  if [ "$(psql_q "SELECT count(*) FROM $NAME.outbox")" = 0 ] && [ "$(events_queue_messages 0)" = 0 ]; then
    DRAINED=yes
    break
  fi
  sleep 1
done
R_DRAIN=$(secs_since "$t")
DEAD=$(rctl 0 list_queues name messages --no-table-headers | awk -v q="$NAME.dead" '$1 == q { print $2 }')

read -r PROCESSED FAILED LOST TWICE < <(accepted_outcome "$NAME")

# Why events failed, if any did: none should.
REASONS=$(psql_q "SELECT count(*) || ' ' || coalesce(last_error, '?') FROM $NAME.events
                  WHERE status = 'failed' GROUP BY last_error ORDER BY 1 DESC LIMIT 5")
if [ -n "${CLUSTER_CHAOS_LOGS:-}" ]; then
  mkdir -p "$CLUSTER_CHAOS_LOGS"
  cp "$WORK"/*.log "$WORK"/load*.err "$CLUSTER_CHAOS_LOGS"/ 2>/dev/null || true
fi

for name in "${!PIDS[@]}"; do kill -TERM "${PIDS[$name]}" 2>/dev/null || true; done
for name in "${!PIDS[@]}"; do wait "${PIDS[$name]}" 2>/dev/null || true; done
PIDS=()

echo "cluster-chaos: sent=$SENT accepted=$ACCEPTED errors=$ERRORS processed=$PROCESSED failed=$FAILED lost=$LOST processed_twice=$TWICE drained=$DRAINED dead_letters=${DEAD:-?} outbox_without_majority=$OUTBOX_NO_MAJORITY recovery: rabbitmq_leader_kill=$R_LEADER rabbitmq_majority_back=$R_QUORUM rabbitmq_rejoin=$R_REJOIN postgres_failover=$R_PG_KILL postgres_after_promotion=$R_PG api_kill=${R_KILL[api1]} relay_kill=${R_KILL[relay1]} worker_kill=${R_KILL[worker1]} drain=$R_DRAIN total=$((SECONDS - STARTED))s"
if [ "$LOST" != 0 ] || [ "$TWICE" != 0 ] || [ "$FAILED" != 0 ] || [ "$ACCEPTED" -lt 1 ] \
  || [ "$DRAINED" != yes ]; then
  [ -z "$REASONS" ] || log "failed events by reason: $REASONS"
  for name in api1 relay1 worker1; do tail -n 20 "$WORK/$name.log" >&2; done
  exit 1
fi
