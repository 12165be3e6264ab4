# Shell helpers shared by the harnesses that run a release ingestd on
# loopback (tests/chaos.sh, tests/cluster_chaos.sh, tests/stress_smoke.sh).
# Source it; it defines functions only.

# Waits up to $3 seconds (default 30) for the ingestd of process $2 to log
# the address it listens on in log file $1, and prints that address. Fails,
# with the log, if the process exits or the time runs out.
listening_addr() {
  local log=$1 pid=$2 deadline=$((SECONDS + ${3:-30})) addr
  while ((SECONDS < deadline)); do
    addr=$(sed -n 's/.*http: listening on \([0-9.:]*\).*/\1/p' "$log" | head -n1)
    if [ -n "$addr" ]; then echo "$addr"; return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "ingestd did not start listening; its log:" >&2
  tail -n 40 "$log" >&2
  return 1
}

# Waits up to $2 seconds (default 90) for $1/readyz to answer 200.
wait_ready() {
  local base=$1 deadline=$((SECONDS + ${2:-90}))
  until curl -sf -o /dev/null "$base/readyz"; do
    if ((SECONDS >= deadline)); then
      echo "$base/readyz did not answer 200 within ${2:-90}s" >&2
      return 1
    fi
    sleep 0.1
  done
}

# Removes what a run with schema and AMQP prefix $2 left behind: the schema
# in database $1, and every queue and exchange named "$2.<something>" (the
# events queue and exchange, .dead, .dlx and the .delay.<ms>ms queues, for
# whatever retry schedule the run had). Best effort: it reports and goes on.
remove_run() {
  local db_url=$1 name=$2 q x
  PGOPTIONS="-c client_min_messages=warning" \
    psql "$db_url" -Atq -c "DROP SCHEMA IF EXISTS $name CASCADE" >/dev/null ||
    echo "cleanup: cannot drop schema $name" >&2
  for q in $(rabbitmqctl -q list_queues name 2>/dev/null | awk -v p="$name." 'index($0, p) == 1'); do
    rabbitmqctl -q delete_queue "$q" >/dev/null || echo "cleanup: cannot delete queue $q" >&2
  done
  # rabbitmqctl has no command to delete an exchange; the broker's own
  # function does it.
  for x in $(rabbitmqctl -q list_exchanges name 2>/dev/null | awk -v p="$name." 'index($0, p) == 1'); do
    rabbitmqctl -q eval "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$x\">>), false, <<\"cleanup\">>)." >/dev/null ||
      echo "cleanup: cannot delete exchange $x" >&2
  done
}

# Prints, for the ids in table $1.accepted (every 202 of a run), how many of
# their events are processed, failed, lost (missing or still pending) and
# processed more than once, space-separated. Uses the caller's psql_q.
accepted_outcome() {
  psql_q "
    SELECT count(*) FILTER (WHERE e.status = 'processed'),
           count(*) FILTER (WHERE e.status = 'failed'),
           count(*) FILTER (WHERE e.id IS NULL OR e.status = 'pending'),
           count(*) FILTER (WHERE e.processed_count > 1)
    FROM $1.accepted a LEFT JOIN $1.events e USING (id)" | tr '|' ' '
}
