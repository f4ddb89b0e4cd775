#!/usr/bin/env python3
"""A "pod" for the nftproxy end-to-end tests: one process serving TCP and UDP on one port.

Every request is answered with one line naming this pod and the client address it saw:

    pod=<name> peer=<client ip> req=<the request, stripped>

* TCP: each received line gets one answer line on the same connection (so a long-lived
  connection can exchange data at any time, e.g. across an agent restart).
* UDP: each datagram gets one answer datagram.

Binds only to the addresses given with --listen (the pod's own addresses). Standard library only.
Prints ``READY`` on stdout once every socket is bound.

    python3 podserver.py --name a1 --port 8080 --listen 10.0.1.1 --listen fd00:10:1::1
"""

from __future__ import annotations

import argparse
import selectors
import signal
import socket
import sys
import threading


def answer(name: str, peer: str, req: bytes) -> bytes:
    text = req.decode("utf-8", "replace").strip().replace("\n", " ")
    return f"pod={name} peer={peer} req={text}\n".encode()


def serve_tcp_conn(name: str, conn: socket.socket, peer: str) -> None:
    buf = b""
    try:
        while True:
            data = conn.recv(4096)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                conn.sendall(answer(name, peer, line))
    except OSError:
        pass
    finally:
        conn.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--listen", action="append", required=True, help="address to bind (repeatable)")
    args = ap.parse_args(argv)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sel = selectors.DefaultSelector()
    for addr in args.listen:
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        t = socket.socket(fam, socket.SOCK_STREAM)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        t.bind((addr, args.port))
        t.listen(128)
        sel.register(t, selectors.EVENT_READ, "tcp")
        u = socket.socket(fam, socket.SOCK_DGRAM)
        if fam == socket.AF_INET6:
            u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        u.bind((addr, args.port))
        sel.register(u, selectors.EVENT_READ, "udp")
    print("READY", flush=True)

    while True:
        for key, _ in sel.select():
            s = key.fileobj
            if key.data == "tcp":
                try:
                    conn, peer = s.accept()
                except OSError:
                    continue
                threading.Thread(target=serve_tcp_conn, args=(args.name, conn, peer[0]),
                                 daemon=True).start()
            else:
                try:
                    data, peer = s.recvfrom(65535)
                    s.sendto(answer(args.name, peer[0], data), peer)
                except OSError:
                    continue


if __name__ == "__main__":
    sys.exit(main())
