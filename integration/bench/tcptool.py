#!/usr/bin/env python3
"""TCP helpers the benchmark runs inside its network namespaces (standard library only).

  tcptool.py serve --port 8080
      Accept forever on 0.0.0.0:PORT; answer each connection with the local address it reached
      (so a client behind DNAT can tell which endpoint it got) and close. Prints READY.
  tcptool.py connect --dst IP --port 80 --count N [--warmup K]
      N sequential connects; times the connect() (the TCP handshake through the DNAT path)
      only, then reads the answer. Prints one JSON object: {"us": [...], "errors": n,
      "peers": {addr: count}, "first_error": str|null}.
  tcptool.py echo --port 9000
      The forwarding probe's server: echo every connection's bytes (a thread each). READY.
  tcptool.py stream --dst IP --port 9000 --stop FILE --out FILE [--interval-ms 1]
      The forwarding probe's client: one established connection; every interval a 32-byte
      message (sequence, send time) is written and its echo awaited, until FILE exists. Writes
      {"t": [wall send times], "rtt_ms": [round trips]} (and "error") as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import threading
import time


def listen(port: int) -> socket.socket:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(4096)
    print("READY", flush=True)
    return ls


def serve(port: int) -> int:
    ls = listen(port)
    while True:
        try:
            c, _ = ls.accept()
        except InterruptedError:
            continue
        try:
            c.sendall((c.getsockname()[0] + "\n").encode())
        except OSError:
            pass
        finally:
            c.close()


def connect(dst: str, port: int, count: int, warmup: int, timeout: float) -> int:
    us: list[float] = []
    peers: dict[str, int] = {}
    errors = 0
    first_error = None
    for i in range(warmup + count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            t0 = time.perf_counter_ns()
            s.connect((dst, port))
            t1 = time.perf_counter_ns()
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(64)
                if not chunk:
                    break
                data += chunk
            if i >= warmup:
                us.append((t1 - t0) / 1000.0)
                peer = data.decode(errors="replace").strip() or "?"
                peers[peer] = peers.get(peer, 0) + 1
        except OSError as e:
            if i >= warmup:
                errors += 1
                first_error = first_error or f"{type(e).__name__}: {e}"
        finally:
            s.close()
    print(json.dumps({"us": us, "errors": errors, "peers": peers, "first_error": first_error}))
    return 0


def echo(port: int) -> int:
    ls = listen(port)

    def serve(c: socket.socket) -> None:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                data = c.recv(4096)
                if not data:
                    return
                c.sendall(data)
        except OSError:
            return
        finally:
            c.close()

    while True:
        c, _ = ls.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


MSG = struct.Struct("!Qd16x")  # sequence, send time, padding: 32 bytes


def stream(dst: str, port: int, stop: str, out: str, interval: float) -> int:
    s = socket.create_connection((dst, port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(10)
    ts: list[float] = []
    rtts: list[float] = []
    seq = 0
    next_at = time.monotonic()
    try:
        while not os.path.exists(stop):
            t_wall = time.time()
            t0 = time.perf_counter()
            s.sendall(MSG.pack(seq, t_wall))
            got = b""
            while len(got) < MSG.size:
                chunk = s.recv(MSG.size - len(got))
                if not chunk:
                    raise ConnectionError("echo server closed the connection")
                got += chunk
            rtts.append((time.perf_counter() - t0) * 1000.0)
            ts.append(t_wall)
            seq += 1
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_at = time.monotonic()
    except OSError as e:
        with open(out, "w") as f:
            json.dump({"t": ts, "rtt_ms": rtts, "error": str(e)}, f)
        return 1
    with open(out, "w") as f:
        json.dump({"t": ts, "rtt_ms": rtts}, f)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, default=8080)
    c = sub.add_parser("connect")
    c.add_argument("--dst", required=True)
    c.add_argument("--port", type=int, default=80)
    c.add_argument("--count", type=int, default=100)
    c.add_argument("--warmup", type=int, default=5)
    c.add_argument("--timeout", type=float, default=2.0)
    e = sub.add_parser("echo")
    e.add_argument("--port", type=int, required=True)
    st = sub.add_parser("stream")
    st.add_argument("--dst", required=True)
    st.add_argument("--port", type=int, required=True)
    st.add_argument("--stop", required=True)
    st.add_argument("--out", required=True)
    st.add_argument("--interval-ms", type=float, default=1.0)
    a = ap.parse_args()
    if a.cmd == "serve":
        return serve(a.port)
    if a.cmd == "echo":
        return echo(a.port)
    if a.cmd == "stream":
        return stream(a.dst, a.port, a.stop, a.out, a.interval_ms / 1000.0)
    return connect(a.dst, a.port, a.count, a.warmup, a.timeout)


if __name__ == "__main__":
    sys.exit(main())
