#!/usr/bin/env python3
"""CPU seconds used so far by each process class of a benchmark, from
/proc/<pid>/stat: `proc_cpu.py snapshot PID...` prints one JSON object.

- postgresql: every process named `postgres`, with its reaped children
  (the postmaster's cutime/cstime hold the backends that have exited, so
  connections that come and go are still counted);
- rabbitmq: every process of the user that runs the broker (beam.smp and
  its helpers), children included;
- ingestd: the PIDs given (the processes under test), children included.

Deltas of two snapshots, divided by the events processed in between, are
the cost table of `make bench`. Other clients of the shared services are
counted too: run the benchmark alone.
"""
import json
import os
import pwd
import sys

TICK = os.sysconf("SC_CLK_TCK")


def stat(pid):
    """(comm, uid, utime + stime + cutime + cstime in seconds) of pid."""
    with open(f"/proc/{pid}/stat") as f:
        raw = f.read()
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    # After ")": state is field 3 of stat(5), so utime (14) is index 11.
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    uid = os.stat(f"/proc/{pid}").st_uid
    return comm, uid, ticks / TICK


def snapshot(targets):
    try:
        rabbit_uid = pwd.getpwnam("rabbitmq").pw_uid
    except KeyError:
        rabbit_uid = None
    out = {"postgresql": 0.0, "rabbitmq": 0.0, "ingestd": 0.0}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm, uid, secs = stat(entry)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue  # gone since listdir
        if entry in targets:
            out["ingestd"] += secs
        elif comm == "postgres":
            out["postgresql"] += secs
        elif rabbit_uid is not None and uid == rabbit_uid:
            out["rabbitmq"] += secs
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "snapshot":
        sys.exit(__doc__)
    print(json.dumps(snapshot(set(sys.argv[2:]))))
