#!/usr/bin/env python3
"""TCP helpers the benchmark runs inside its network namespaces (standard library only).

  tcptool.py serve --port 8080
      Accept forever on 0.0.0.0:PORT; answer each connection with the local address it reached
      (so a client behind DNAT can tell which endpoint it got) and close. Prints READY.
  tcptool.py connect --dst IP --port 80 --count N [--warmup K]
      N sequential connects; times the connect() (the TCP handshake through the DNAT path)
      only, then reads the answer. Prints one JSON object: {"us": [...], "errors": n,
      "peers": {addr: count}, "first_error": str|null}.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time


def serve(port: int) -> int:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(4096)
    print("READY", flush=True)
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
    a = ap.parse_args()
    if a.cmd == "serve":
        return serve(a.port)
    return connect(a.dst, a.port, a.count, a.warmup, a.timeout)


if __name__ == "__main__":
    sys.exit(main())
