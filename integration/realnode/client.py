"""Traffic client run inside a namespace (``nsenter --net=... python3 client.py MODE ...``).

    get URL [SRC]                 one HTTP GET -> {"status", "body"} or {"error"}
    many URL N [SRC]              N GETs, each a new connection -> {"answers": [...]}
    stream URL STOPFILE [SRC]     GETs back to back (new connection each, 1 s timeout) until
                                  STOPFILE exists -> {"ok", "failed", "errors", "seconds"}
    tcp HOST PORT                 TCP connect -> {"connected": bool, "error"}

SRC binds the client's source address (the outside namespace has 203.0.113.5 on lo).
"""
import http.client
import json
import os
import socket
import sys
import time
import urllib.parse


def get(url, src=None, timeout=3.0):
    u = urllib.parse.urlsplit(url)
    try:
        c = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout,
                                       source_address=(src, 0) if src else None)
        c.request("GET", u.path or "/")
        r = c.getresponse()
        body = r.read().decode(errors="replace").strip()
        c.close()
        return {"status": r.status, "body": body}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}


def main(argv):
    mode = argv[0]
    if mode == "get":
        print(json.dumps(get(argv[1], argv[2] if len(argv) > 2 else None)))
    elif mode == "many":
        src = argv[3] if len(argv) > 3 else None
        print(json.dumps({"answers": [get(argv[1], src) for _ in range(int(argv[2]))]}))
    elif mode == "stream":
        url, stop = argv[1], argv[2]
        src = argv[3] if len(argv) > 3 else None
        ok = failed = 0
        errors = []
        t0 = time.monotonic()
        while not os.path.exists(stop) and time.monotonic() - t0 < 600:
            a = get(url, src, timeout=1.0)
            if a.get("status") == 200:
                ok += 1
            else:
                failed += 1
                errors.append([round(time.monotonic() - t0, 3), a])
            time.sleep(0.02)
        print(json.dumps({"ok": ok, "failed": failed, "errors": errors[:50],
                          "seconds": round(time.monotonic() - t0, 2)}))
    elif mode == "tcp":
        try:
            socket.create_connection((argv[1], int(argv[2])), timeout=3).close()
            print(json.dumps({"connected": True}))
        except OSError as e:
            print(json.dumps({"connected": False, "error": str(e)}))


if __name__ == "__main__":
    main(sys.argv[1:])
