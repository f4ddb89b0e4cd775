#!/usr/bin/env python3
"""Forwarding probe the benchmark runs in two namespaces on either side of the node (standard
library only): does a commit stall packets the node forwards?

  fwdprobe.py echo --port 9000
      TCP echo server on 0.0.0.0:PORT (one thread per connection). Prints READY.
  fwdprobe.py stream --dst IP --port 9000 --stop FILE --out FILE [--interval-ms 1]
      One established TCP connection; every interval a 32-byte message (sequence number and
      send time) is written and its echo awaited. Until FILE exists. Writes JSON to --out:
      {"t": [wall send times], "rtt_ms": [round trips]}.

ICMP is `ping -i 0.001 -D` run by the bench itself (a C program times it better than Python).
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


def echo(port: int) -> int:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(16)
    print("READY", flush=True)

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


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("echo")
    e.add_argument("--port", type=int, required=True)
    st = sub.add_parser("stream")
    st.add_argument("--dst", required=True)
    st.add_argument("--port", type=int, required=True)
    st.add_argument("--stop", required=True)
    st.add_argument("--out", required=True)
    st.add_argument("--interval-ms", type=float, default=1.0)
    a = ap.parse_args(argv)
    if a.cmd == "echo":
        return echo(a.port)
    return stream(a.dst, a.port, a.stop, a.out, a.interval_ms / 1000.0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
