#!/usr/bin/env python3
"""A TCP proxy that can play a vanished host, for `make chaos`.

    blackhole_proxy.py LISTEN_PORT TARGET_HOST:TARGET_PORT

Forwards every connection to the target. SIGUSR1 turns the blackhole on:
from then on no byte is delivered either way, nothing is closed, open
connections stay dead for good, and new connections are accepted and held
the same way. SIGUSR2 turns it off: new connections go through again.
"""
import signal
import socket
import sys
import threading

listen_port = int(sys.argv[1])
host, port = sys.argv[2].rsplit(":", 1)
target = (host, int(port))
state = {"generation": 0, "blackhole": False}
lock = threading.Lock()


def forwards(generation):
    with lock:
        return not state["blackhole"] and state["generation"] == generation


def pipe(src, dst, generation):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            if forwards(generation):
                dst.sendall(data)
    except OSError:
        pass
    if forwards(generation):
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def hold(conn):
    try:
        while conn.recv(65536):
            pass
    except OSError:
        pass


def on(_sig, _frame):
    with lock:
        state["blackhole"] = True
        state["generation"] += 1


def off(_sig, _frame):
    with lock:
        state["blackhole"] = False


signal.signal(signal.SIGUSR1, on)
signal.signal(signal.SIGUSR2, off)
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", listen_port))
server.listen(512)
print("blackhole_proxy: listening on 127.0.0.1:%d" % listen_port, flush=True)
while True:
    try:
        client, _ = server.accept()
    except InterruptedError:
        continue
    with lock:
        blackhole, generation = state["blackhole"], state["generation"]
    if blackhole:
        threading.Thread(target=hold, args=(client,), daemon=True).start()
        continue
    try:
        upstream = socket.create_connection(target, timeout=5)
        upstream.settimeout(None)
    except OSError:
        client.close()
        continue
    threading.Thread(target=pipe, args=(client, upstream, generation), daemon=True).start()
    threading.Thread(target=pipe, args=(upstream, client, generation), daemon=True).start()
