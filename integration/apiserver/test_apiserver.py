"""Tests for the stand-in Kubernetes API server (integration/apiserver/apiserver.py).

Run: python3 -m pytest integration/apiserver -q   (add -s to see the timing figures)
Every server is a subprocess on 127.0.0.1 with an ephemeral port.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse

import pytest

APISERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "apiserver.py")


# --------------------------------------------------------------------------
# helpers

class Watch:
    """A streaming watch: iterate events (dicts); None once the stream ended."""

    def __init__(self, port: int, path: str, timeout: float = 5.0):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.conn.request("GET", path)
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.headers = dict(self.resp.getheaders())

    def next(self):
        line = self.resp.readline()
        if not line:
            return None
        assert line.endswith(b"\n"), line
        return json.loads(line)

    def take(self, n: int) -> list:
        out = []
        for _ in range(n):
            ev = self.next()
            assert ev is not None, f"stream ended after {out}"
            out.append(ev)
        return out

    def next_non_bookmark(self):
        while True:
            ev = self.next()
            if ev is None or ev["type"] != "BOOKMARK":
                return ev

    def close(self):
        self.conn.close()


class Server:
    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, APISERVER, "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = self.proc.stdout.readline().decode()
        assert line.startswith("LISTENING 127.0.0.1:"), (line, self.proc.stderr.read())
        self.port = int(line.strip().rsplit(":", 1)[1])

    def request(self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 60.0):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            raw = resp.read()
            try:
                payload = json.loads(raw) if raw else None
            except ValueError:
                payload = raw
            return resp.status, payload
        finally:
            conn.close()

    def get(self, path: str, **q):
        if q:
            path += "?" + urllib.parse.urlencode(q)
        return self.request("GET", path)

    def ok(self, method: str, path: str, body=None, **kw):
        status, payload = self.request(method, path, body, **kw)
        assert 200 <= status < 300, (status, payload)
        return payload

    def apply(self, objs):
        return self.ok("POST", "/control/apply", objs)

    def delete(self, spec):
        return self.ok("POST", "/control/delete", spec)

    def rv(self) -> int:
        return int(self.ok("GET", "/control/state")["resourceVersion"])

    def watch(self, path: str, timeout: float = 5.0, **q) -> Watch:
        q.setdefault("watch", "true")
        return Watch(self.port, path + "?" + urllib.parse.urlencode(q), timeout)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def make_server():
    servers = []

    def make(*args):
        s = Server(*args)
        servers.append(s)
        return s
    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def server(make_server):
    return make_server("--bookmark-interval", "0.2")


def svc(name, ns="default", labels=None, port=80, **spec):
    md = {"name": name, "namespace": ns}
    if labels is not None:
        md["labels"] = labels
    return {"apiVersion": "v1", "kind": "Service", "metadata": md,
            "spec": {"ports": [{"name": "http", "port": port, "protocol": "TCP"}], **spec}}


def slice_(name, service, ns="default", ip="10.0.0.1"):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


def node(name, labels=None):
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels or {}}}


def names(items):
    return [(i["metadata"].get("namespace", ""), i["metadata"]["name"]) for i in items]


# --------------------------------------------------------------------------
# list / get

def test_list_shape_and_metadata(server):
    res = server.apply([svc("a", "ns1"), svc("b", "ns1", clusterIP="None")])
    assert res["created"] == 2 and not res["errors"]
    lst = server.ok("GET", "/api/v1/services")
    assert lst["kind"] == "ServiceList" and lst["apiVersion"] == "v1"
    rv = int(lst["metadata"]["resourceVersion"])
    assert rv == server.rv()
    a, b = lst["items"]
    # like a real apiserver, items of a typed list carry no kind/apiVersion
    assert "kind" not in a and "apiVersion" not in a
    md = a["metadata"]
    assert md["uid"] and md["creationTimestamp"].endswith("Z") and md["generation"] == 1
    assert int(md["resourceVersion"]) < int(b["metadata"]["resourceVersion"]) <= rv
    # service defaulting: clusterIP allocation, targetPort, ...
    assert a["spec"]["clusterIP"].startswith("10.9") and a["spec"]["type"] == "ClusterIP"
    assert a["spec"]["ports"][0]["targetPort"] == 80
    assert b["spec"]["clusterIP"] == "None"
    # a single GET carries kind/apiVersion
    one = server.ok("GET", "/api/v1/namespaces/ns1/services/a")
    assert one["kind"] == "Service" and one["apiVersion"] == "v1" and one["metadata"]["uid"] == md["uid"]
    # not found -> Status
    status, st = server.get("/api/v1/namespaces/ns1/services/nope")
    assert status == 404 and st["kind"] == "Status" and st["reason"] == "NotFound" and st["code"] == 404
    # re-applying the same object is a no-op (no new resourceVersion)
    res = server.apply(svc("a", "ns1"))
    assert res["unchanged"] == 1 and int(res["resourceVersion"]) == rv
    # a real change bumps the resourceVersion and the generation, keeps uid and clusterIP
    server.apply(svc("a", "ns1", port=81))
    one2 = server.ok("GET", "/api/v1/namespaces/ns1/services/a")
    assert int(one2["metadata"]["resourceVersion"]) == rv + 1 and one2["metadata"]["generation"] == 2
    assert one2["metadata"]["uid"] == md["uid"] and one2["spec"]["clusterIP"] == a["spec"]["clusterIP"]


def test_list_pagination(server):
    objs = [svc(f"s{i:02d}", ns) for ns in ("alpha", "beta") for i in range(25)]
    server.apply(objs)
    seen, rvs, tok, pages = [], set(), None, 0
    while True:
        q = {"limit": 10}
        if tok:
            q["continue"] = tok
        page = server.ok("GET", "/api/v1/services?" + urllib.parse.urlencode(q))
        pages += 1
        assert len(page["items"]) <= 10
        seen += names(page["items"])
        rvs.add(page["metadata"]["resourceVersion"])
        tok = page["metadata"].get("continue")
        if not tok:
            break
        assert page["metadata"]["remainingItemCount"] == (50 if pages < 3 else 51) - len(seen)
        if pages == 2:
            server.apply(svc("zzz", "beta"))  # a change while paging does not change the list rv
    assert pages == 6 and len(rvs) == 1
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert len(seen) == 51  # objects created after the list rv may show up; watch replays them anyway
    # namespaced pagination stays in its namespace
    page = server.ok("GET", "/api/v1/namespaces/alpha/services?limit=20")
    assert len(page["items"]) == 20 and all(n == "alpha" for n, _ in names(page["items"]))
    page2 = server.ok("GET", "/api/v1/namespaces/alpha/services?limit=20&continue=" + page["metadata"]["continue"])
    assert len(page2["items"]) == 5 and "continue" not in page2["metadata"]
    # a bad token -> 400, a token from before a compaction -> 410
    status, st = server.get("/api/v1/services", limit=10, **{"continue": "garbage!"})
    assert status == 400 and st["kind"] == "Status"
    server.ok("POST", "/control/compact")
    status, st = server.get("/api/v1/services", limit=10, **{"continue": page["metadata"]["continue"]})
    assert status == 410 and st["reason"] == "Expired"


def test_label_selectors(server):
    server.apply([
        svc("plain", labels={"app": "web"}),
        svc("plain2", labels={"app": "db", "tier": "1"}),
        svc("headless", labels={"service.kubernetes.io/headless": "", "app": "web"}),
        svc("other-proxy", labels={"service.kubernetes.io/service-proxy-name": "foo"}),
        svc("nolabels"),
    ])

    def sel(s, path="/api/v1/services"):
        return sorted(n for _, n in names(server.ok("GET", path + "?" + urllib.parse.urlencode(
            {"labelSelector": s}))["items"]))

    assert sel("!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name") == [
        "nolabels", "plain", "plain2"]
    assert sel("app=web") == ["headless", "plain"]
    assert sel("app==web") == ["headless", "plain"]
    assert sel("app!=web") == ["nolabels", "other-proxy", "plain2"]
    assert sel("app") == ["headless", "plain", "plain2"]
    assert sel("app,!service.kubernetes.io/headless") == ["plain", "plain2"]
    assert sel("app in (web, db),tier") == ["plain2"]
    assert sel("app notin (web)") == ["nolabels", "other-proxy", "plain2"]
    assert sel("tier>0") == ["plain2"]
    assert sel("app=web", "/api/v1/namespaces/default/services") == ["headless", "plain"]
    assert sel("app=web", "/api/v1/namespaces/other/services") == []
    # selection with pagination
    page = server.ok("GET", "/api/v1/services?limit=1&labelSelector=app")
    assert len(page["items"]) == 1 and page["metadata"]["continue"]
    status, st = server.get("/api/v1/services", labelSelector="a b c")
    assert status == 400 and st["kind"] == "Status"


def test_field_selectors(server):
    server.apply([node("node-1"), node("node-2"), svc("a", "ns1"), svc("a", "ns2"), svc("b", "ns2")])
    lst = server.ok("GET", "/api/v1/nodes?fieldSelector=metadata.name%3Dnode-1")
    assert names(lst["items"]) == [("", "node-1")] and lst["kind"] == "NodeList"
    assert server.ok("GET", "/api/v1/nodes?fieldSelector=metadata.name%3Dnope")["items"] == []
    assert names(server.ok("GET", "/api/v1/nodes?fieldSelector=metadata.name!%3Dnode-1")["items"]) == [
        ("", "node-2")]
    assert names(server.ok("GET", "/api/v1/services?fieldSelector=metadata.namespace%3Dns2")["items"]) == [
        ("ns2", "a"), ("ns2", "b")]
    assert names(server.ok("GET", "/api/v1/services?fieldSelector=metadata.name%3Da")["items"]) == [
        ("ns1", "a"), ("ns2", "a")]
    assert names(server.ok("GET", "/api/v1/namespaces/ns2/services?fieldSelector=metadata.name%3Da")[
        "items"]) == [("ns2", "a")]
    one = server.ok("GET", "/api/v1/nodes/node-2")
    assert one["kind"] == "Node" and one["metadata"]["name"] == "node-2"
    # cluster-scoped resources have no namespaced paths
    status, _ = server.get("/api/v1/namespaces/default/nodes")
    assert status == 404


def test_api_crud_and_discovery(server):
    created = server.ok("POST", "/api/v1/namespaces/x/services", svc("c", "x"))
    assert created["kind"] == "Service" and created["metadata"]["namespace"] == "x"
    status, st = server.request("POST", "/api/v1/namespaces/x/services", svc("c", "x"))
    assert status == 409 and st["reason"] == "AlreadyExists"
    patched = server.ok("PATCH", "/api/v1/namespaces/x/services/c", {"metadata": {"labels": {"k": "v"}}},
                        headers={"Content-Type": "application/merge-patch+json"})
    assert patched["metadata"]["labels"] == {"k": "v"} and patched["spec"]["ports"]
    stale = dict(created)
    status, st = server.request("PUT", "/api/v1/namespaces/x/services/c", stale)
    assert status == 409 and st["reason"] == "Conflict"
    deleted = server.ok("DELETE", "/api/v1/namespaces/x/services/c")
    assert int(deleted["metadata"]["resourceVersion"]) > int(patched["metadata"]["resourceVersion"])
    status, _ = server.get("/api/v1/namespaces/x/services/c")
    assert status == 404
    assert any(r["name"] == "endpointslices" for r in server.ok("GET", "/apis/discovery.k8s.io/v1")["resources"])
    assert {g["name"] for g in server.ok("GET", "/apis")["groups"]} >= {"discovery.k8s.io", "networking.k8s.io"}


def test_servicecidrs_enabled_and_disabled(make_server):
    on = make_server()
    on.apply({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": {"name": "kubernetes"},
              "spec": {"cidrs": ["10.96.0.0/12"]}})
    lst = on.ok("GET", "/apis/networking.k8s.io/v1/servicecidrs")
    assert lst["kind"] == "ServiceCIDRList" and lst["apiVersion"] == "networking.k8s.io/v1"
    assert names(lst["items"]) == [("", "kubernetes")]

    off = make_server("--no-servicecidrs")
    for path in ("/apis/networking.k8s.io/v1/servicecidrs", "/apis/networking.k8s.io/v1/servicecidrs?watch=1",
                 "/apis/networking.k8s.io/v1/servicecidrs/kubernetes"):
        status, st = off.request("GET", path)
        assert status == 404 and st["kind"] == "Status" and st["reason"] == "NotFound" and st["code"] == 404
    status, _ = off.request("POST", "/control/apply", {"apiVersion": "networking.k8s.io/v1",
                                                       "kind": "ServiceCIDR", "metadata": {"name": "k"}})
    assert status == 422
    assert off.ok("GET", "/api/v1/services")["items"] == []


# --------------------------------------------------------------------------
# watch

def test_watch_replays_events_after_resource_version(server):
    server.apply([svc("a"), svc("b")])
    rv = int(server.ok("GET", "/api/v1/services")["metadata"]["resourceVersion"])
    server.apply(svc("a", port=90))
    server.apply(svc("c"))
    server.apply(slice_("a-1", "a"))  # other resources do not show up
    w = server.watch("/api/v1/services", resourceVersion=rv, timeoutSeconds=2)
    assert w.status == 200 and w.headers.get("Transfer-Encoding") == "chunked"
    e1, e2 = w.take(2)
    assert (e1["type"], e1["object"]["metadata"]["name"]) == ("MODIFIED", "a")
    assert (e2["type"], e2["object"]["metadata"]["name"]) == ("ADDED", "c")
    # watch objects carry kind/apiVersion
    assert e1["object"]["kind"] == "Service" and e1["object"]["apiVersion"] == "v1"
    assert int(e1["object"]["metadata"]["resourceVersion"]) > rv
    assert e1["object"]["spec"]["ports"][0]["port"] == 90
    # live events arrive too
    server.apply(svc("d"))
    e3 = w.next_non_bookmark()
    assert (e3["type"], e3["object"]["metadata"]["name"]) == ("ADDED", "d")
    # timeoutSeconds ends the stream cleanly
    t0 = time.monotonic()
    assert w.next_non_bookmark() is None
    assert time.monotonic() - t0 < 3
    w.close()
    # endpointslices replay from the same (global) resourceVersion
    w = server.watch("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices", resourceVersion=rv,
                     timeoutSeconds=1)
    ev = w.next_non_bookmark()
    assert ev["type"] == "ADDED" and ev["object"]["kind"] == "EndpointSlice"
    assert ev["object"]["apiVersion"] == "discovery.k8s.io/v1"
    w.close()


def test_watch_rv0_and_streaming_list(server):
    server.apply([svc("a"), svc("b"), svc("x", "other")])
    # resourceVersion=0 (or unset): synthetic ADDED events for the current state first
    w = server.watch("/api/v1/namespaces/default/services", resourceVersion="0", timeoutSeconds=1)
    evs = w.take(2)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in evs] == [("ADDED", "a"), ("ADDED", "b")]
    w.close()
    # streaming list: sendInitialEvents=true + resourceVersionMatch=NotOlderThan (what kube-runtime sends)
    w = server.watch("/api/v1/services", resourceVersion="0", sendInitialEvents="true",
                     resourceVersionMatch="NotOlderThan", allowWatchBookmarks="true", timeoutSeconds=3)
    evs = w.take(4)
    assert [e["type"] for e in evs] == ["ADDED", "ADDED", "ADDED", "BOOKMARK"]
    bm = evs[3]["object"]
    assert bm["kind"] == "Service" and bm["apiVersion"] == "v1"
    assert bm["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    assert int(bm["metadata"]["resourceVersion"]) == server.rv()
    server.apply(svc("e"))
    ev = w.next_non_bookmark()
    assert (ev["type"], ev["object"]["metadata"]["name"]) == ("ADDED", "e")
    w.close()


def test_streaming_lists_refused(make_server):
    """--no-streaming-lists answers as kube-apiserver with the WatchList gate off; plain
    watches and paged lists still work."""
    off = make_server("--no-streaming-lists")
    off.apply([svc("a")])
    status, st = off.request("GET", "/api/v1/services?watch=true&resourceVersion=0&sendInitialEvents=true"
                                    "&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true")
    assert status == 422 and st["kind"] == "Status" and st["reason"] == "Invalid" and st["code"] == 422
    assert "WatchList feature gate" in st["message"]
    assert names(off.ok("GET", "/api/v1/services?limit=1")["items"]) == [("default", "a")]
    w = off.watch("/api/v1/services", resourceVersion=str(off.rv()), timeoutSeconds=2)
    off.apply(svc("b"))
    ev = w.next_non_bookmark()
    assert (ev["type"], ev["object"]["metadata"]["name"]) == ("ADDED", "b")
    w.close()


def test_bookmarks(server):
    server.apply(svc("a"))
    rv = server.rv()
    w = server.watch("/api/v1/services", resourceVersion=rv, allowWatchBookmarks="true", timeoutSeconds=5)
    t0 = time.monotonic()
    ev = w.next()
    assert ev["type"] == "BOOKMARK" and time.monotonic() - t0 < 2
    assert ev["object"] == {"kind": "Service", "apiVersion": "v1", "metadata": {"resourceVersion": str(rv)}}
    # a bookmark's resourceVersion follows the global one (changes to other resources included)
    server.apply(node("n1"))
    while True:
        ev = w.next()
        if ev["type"] == "BOOKMARK" and int(ev["object"]["metadata"]["resourceVersion"]) == rv + 1:
            break
    w.close()
    # without allowWatchBookmarks there are none
    w = server.watch("/api/v1/services", resourceVersion=rv, timeoutSeconds=1)
    assert w.next() is None
    w.close()


def test_delete_events(server):
    server.apply([svc("a"), svc("b"), slice_("a-1", "a")])
    rv = server.rv()
    w = server.watch("/api/v1/services", resourceVersion=rv, timeoutSeconds=5)
    res = server.delete({"kind": "Service", "namespace": "default", "name": "a"})
    assert res["deleted"] == 1
    ev = w.next()
    assert ev["type"] == "DELETED" and ev["object"]["metadata"]["name"] == "a"
    assert ev["object"]["kind"] == "Service"
    # the DELETED object carries the deletion's resourceVersion
    assert int(ev["object"]["metadata"]["resourceVersion"]) == rv + 1 == server.rv()
    assert names(server.ok("GET", "/api/v1/services")["items"]) == [("default", "b")]
    # deleting a missing object is reported, not an error; lists of specs work
    res = server.delete([{"kind": "Service", "namespace": "default", "name": "a"},
                         {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                          "namespace": "default", "name": "a-1"}])
    assert res == {"deleted": 1, "notFound": 1, "errors": [], "resourceVersion": str(rv + 2)}
    # bulk delete of a kind
    server.apply([svc(f"x{i}") for i in range(3)])
    res = server.delete({"kind": "Service", "all": True})
    assert res["deleted"] == 4 and server.ok("GET", "/api/v1/services")["items"] == []
    w.close()


def test_watch_label_selector_transitions(server):
    server.apply([svc("a", labels={"app": "x"}), svc("b")])
    rv = server.rv()
    w = server.watch("/api/v1/services", resourceVersion=rv, timeoutSeconds=5,
                     labelSelector="!service.kubernetes.io/headless")
    server.apply(svc("a", labels={"app": "x", "service.kubernetes.io/headless": ""}))  # leaves selection
    ev = w.next()
    assert ev["type"] == "DELETED" and ev["object"]["metadata"]["name"] == "a"
    assert int(ev["object"]["metadata"]["resourceVersion"]) == rv + 1
    server.apply(svc("a", labels={"app": "x", "service.kubernetes.io/headless": "", "z": "1"}))  # invisible
    server.apply(svc("a", labels={"app": "x"}))  # comes back
    ev = w.next()
    assert ev["type"] == "ADDED" and ev["object"]["metadata"]["name"] == "a"
    assert int(ev["object"]["metadata"]["resourceVersion"]) == rv + 3
    w.close()
    # field selectors on watches (kube-proxy watches its own node this way)
    server.apply([node("n1"), node("n2")])
    w = server.watch("/api/v1/nodes", resourceVersion=rv, fieldSelector="metadata.name=n2", timeoutSeconds=2)
    ev = w.next()
    assert ev["type"] == "ADDED" and ev["object"]["metadata"]["name"] == "n2"
    server.apply(node("n1", {"a": "b"}))
    server.apply(node("n2", {"a": "b"}))
    ev = w.next()
    assert ev["type"] == "MODIFIED" and ev["object"]["metadata"]["name"] == "n2"
    w.close()


def test_410_after_compact(server):
    server.apply(svc("a"))
    rv = server.rv()
    w = server.watch("/api/v1/services", resourceVersion=rv, allowWatchBookmarks="true", timeoutSeconds=30)
    assert w.next()["type"] == "BOOKMARK"
    server.ok("POST", "/control/compact")
    # the open stream is closed (cleanly; the client reconnects from its last rv)
    t0 = time.monotonic()
    while (ev := w.next()) is not None:
        assert ev["type"] == "BOOKMARK"
    assert time.monotonic() - t0 < 3
    w.close()
    # reconnecting from the old position -> ERROR 410 Expired, then the stream ends
    w = server.watch("/api/v1/services", resourceVersion=rv, allowWatchBookmarks="true", timeoutSeconds=30)
    assert w.status == 200
    ev = w.next()
    assert ev == {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                              "status": "Failure", "message": "too old resource version",
                                              "reason": "Expired", "code": 410}}
    assert w.next() is None
    w.close()
    # a relist gives a position that works again
    rv2 = int(server.ok("GET", "/api/v1/services")["metadata"]["resourceVersion"])
    assert rv2 > rv
    w = server.watch("/api/v1/services", resourceVersion=rv2, timeoutSeconds=5)
    server.apply(svc("b"))
    ev = w.next()
    assert ev["type"] == "ADDED" and ev["object"]["metadata"]["name"] == "b"
    w.close()


def test_event_log_size_cap(make_server):
    s = make_server("--log-size", "10")
    rv = s.rv()
    s.apply([svc(f"s{i}") for i in range(20)])
    w = s.watch("/api/v1/services", resourceVersion=rv, timeoutSeconds=5)
    assert w.next()["object"]["code"] == 410
    w.close()


def test_pause_resume(server):
    server.apply(svc("a"))
    rv = server.rv()
    w = server.watch("/api/v1/services", resourceVersion=rv, allowWatchBookmarks="true", timeoutSeconds=30)
    assert w.next()["type"] == "BOOKMARK"
    server.ok("POST", "/control/pause")
    # the open watch is cut off abruptly (no terminating chunk)
    with pytest.raises((http.client.HTTPException, ConnectionError, socket.timeout)):
        while w.next() is not None:
            pass
    w.close()
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        server.request("GET", "/api/v1/services")
    assert server.ok("GET", "/control/state")["paused"] is True
    # control requests still work while paused
    server.apply(svc("b"))
    server.ok("POST", "/control/resume")
    assert len(server.ok("GET", "/api/v1/services")["items"]) == 2
    # watches resume from where they were
    w = server.watch("/api/v1/services", resourceVersion=rv, timeoutSeconds=5)
    ev = w.next()
    assert ev["type"] == "ADDED" and ev["object"]["metadata"]["name"] == "b"
    w.close()
    # 503 mode, with automatic resume
    server.ok("POST", "/control/pause", {"mode": "503", "seconds": 1})
    status, st = server.request("GET", "/api/v1/services")
    assert status == 503 and st["reason"] == "ServiceUnavailable"
    time.sleep(1.3)
    status, _ = server.request("GET", "/api/v1/services")
    assert status == 200


def test_events_post_and_patch(server):
    ev = {"apiVersion": "events.k8s.io/v1", "kind": "Event",
          "metadata": {"name": "node-1.17f0", "namespace": "default"},
          "eventTime": "2024-01-01T00:00:00.000000Z", "reason": "Synced", "action": "Sync",
          "note": "programmed 3 services", "type": "Normal", "reportingController": "nftproxy",
          "reportingInstance": "nftproxy-node-1",
          "regarding": {"kind": "Node", "name": "node-1", "apiVersion": "v1"}}
    # kube-runtime's Recorder leaves metadata.namespace empty for cluster-scoped objects; the path decides
    body = json.loads(json.dumps(ev))
    del body["metadata"]["namespace"]
    created = server.ok("POST", "/apis/events.k8s.io/v1/namespaces/default/events", body)
    assert created["metadata"]["namespace"] == "default" and created["kind"] == "Event"
    status, _ = server.request("POST", "/apis/events.k8s.io/v1/namespaces/default/events", body)
    assert status == 409
    patched = server.ok("PATCH", "/apis/events.k8s.io/v1/namespaces/default/events/node-1.17f0",
                        {"series": {"count": 2, "lastObservedTime": "2024-01-01T00:00:01.000000Z"}},
                        headers={"Content-Type": "application/merge-patch+json"})
    assert patched["series"]["count"] == 2 and patched["note"] == "programmed 3 services"
    status, _ = server.request("PATCH", "/apis/events.k8s.io/v1/namespaces/default/events/missing", {"a": 1},
                               headers={"Content-Type": "application/merge-patch+json"})
    assert status == 404
    core = {"apiVersion": "v1", "kind": "Event", "metadata": {"generateName": "svc-"},
            "involvedObject": {"kind": "Service", "name": "a", "namespace": "ns"}, "reason": "Bad",
            "message": "m", "type": "Warning"}
    c = server.ok("POST", "/api/v1/namespaces/ns/events", core)
    assert c["metadata"]["name"].startswith("svc-")
    got = server.ok("GET", "/control/events")["items"]
    assert [(e["apiVersion"], e["metadata"]["name"]) for e in got] == [
        ("events.k8s.io/v1", "node-1.17f0"), ("v1", c["metadata"]["name"])]
    assert got[0]["series"]["count"] == 2
    lst = server.ok("GET", "/apis/events.k8s.io/v1/events")
    assert lst["kind"] == "EventList" and len(lst["items"]) == 1
    assert len(server.ok("GET", "/api/v1/namespaces/ns/events")["items"]) == 1


def test_request_counters(server):
    server.ok("GET", "/api/v1/services")
    server.ok("GET", "/api/v1/services?limit=5")
    w = server.watch("/api/v1/services", resourceVersion="1", timeoutSeconds=1)
    while w.next() is not None:
        pass
    w.close()
    server.ok("GET", "/apis/discovery.k8s.io/v1/endpointslices")
    server.ok("GET", "/api/v1/nodes?fieldSelector=metadata.name%3Dx")
    counts = server.ok("GET", "/control/requests")
    assert counts["services"] == {"list": 2, "watch": 1}
    assert counts["endpointslices.discovery.k8s.io"] == {"list": 1}
    assert counts["nodes"] == {"list": 1}
    assert server.ok("POST", "/control/requests/reset")["services"]["list"] == 2
    assert server.ok("GET", "/control/requests") == {}


def test_objects_file_preload(make_server, tmp_path):
    f = tmp_path / "objs.json"
    f.write_text(json.dumps({"apiVersion": "v1", "kind": "List",
                             "items": [svc("a"), slice_("a-1", "a"), node("n1")]}))
    s = make_server("--objects", str(f))
    assert names(s.ok("GET", "/api/v1/services")["items"]) == [("default", "a")]
    assert names(s.ok("GET", "/apis/discovery.k8s.io/v1/endpointslices")["items"]) == [("default", "a-1")]
    assert names(s.ok("GET", "/api/v1/nodes")["items"]) == [("", "n1")]


def test_keepalive_and_authorization_ignored(server):
    server.apply(svc("a"))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    for _ in range(3):
        conn.request("GET", "/api/v1/services", headers={"Authorization": "Bearer whatever"})
        resp = conn.getresponse()
        assert resp.status == 200 and len(json.loads(resp.read())["items"]) == 1
    conn.close()


# --------------------------------------------------------------------------
# scale

def test_bulk_50k_apply_and_list(make_server, capsys):
    s = make_server()
    n = 50_000
    objs = []
    for i in range(n):
        ns = f"ns{i % 50}"
        labels = {"app": f"app{i % 7}"}
        if i % 10 == 0:
            labels["service.kubernetes.io/headless"] = ""
        objs.append(svc(f"svc-{i}", ns, labels=labels))
        objs.append(slice_(f"svc-{i}-abcde", f"svc-{i}", ns, ip=f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"))
    body = json.dumps(objs).encode()
    del objs
    t0 = time.perf_counter()
    res = s.ok("POST", "/control/apply", body, timeout=300)
    t_apply = time.perf_counter() - t0
    assert res["created"] == 2 * n and not res["errors"]

    t0 = time.perf_counter()
    status, lst = s.request("GET", "/api/v1/services")
    t_list = time.perf_counter() - t0
    assert status == 200 and len(lst["items"]) == n
    del lst

    # the same, measured without client-side JSON parsing
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
    t0 = time.perf_counter()
    conn.request("GET", "/api/v1/services")
    raw = conn.getresponse().read()
    t_list_raw = time.perf_counter() - t0
    size_mb = len(raw) / 1e6
    del raw

    t0 = time.perf_counter()
    conn.request("GET", "/api/v1/services?" + urllib.parse.urlencode(
        {"labelSelector": "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"}))
    raw = conn.getresponse().read()
    t_list_sel = time.perf_counter() - t0
    sel = json.loads(raw)
    del raw
    assert len(sel["items"]) == n - n // 10
    del sel

    # kube-runtime's default: pages of 500
    t0 = time.perf_counter()
    tok, count, pages = None, 0, 0
    while True:
        q = {"limit": 500}
        if tok:
            q["continue"] = tok
        conn.request("GET", "/apis/discovery.k8s.io/v1/endpointslices?" + urllib.parse.urlencode(q))
        page = json.loads(conn.getresponse().read())
        count += len(page["items"])
        pages += 1
        tok = page["metadata"].get("continue")
        if not tok:
            break
    t_paged = time.perf_counter() - t0
    assert count == n and pages == 100

    # streaming list of everything
    rv = s.rv()
    t0 = time.perf_counter()
    w = s.watch("/api/v1/services", timeout=60, resourceVersion="0", sendInitialEvents="true",
                resourceVersionMatch="NotOlderThan", allowWatchBookmarks="true", timeoutSeconds=60)
    got = 0
    while True:
        line = w.resp.readline()
        if b'"BOOKMARK"' in line:
            break
        got += 1
    t_stream = time.perf_counter() - t0
    w.close()
    assert got == n
    conn.close()

    with capsys.disabled():
        print(f"\n[apiserver bench] apply {2 * n} objects: {t_apply:.2f}s; "
              f"list {n} services: {t_list_raw * 1000:.0f} ms raw ({size_mb:.1f} MB), "
              f"{t_list * 1000:.0f} ms incl. client json parse; "
              f"with kube-proxy label selector: {t_list_sel * 1000:.0f} ms raw; "
              f"{pages} pages of 500 endpointslices: {t_paged * 1000:.0f} ms; "
              f"streaming list: {t_stream * 1000:.0f} ms (rv {rv})")
    assert t_list_raw < 1.0, f"listing {n} services took {t_list_raw:.2f}s"
    assert t_list_sel < 1.5, f"listing {n} services with a selector took {t_list_sel:.2f}s"


def test_watch_variants_and_cleanup(server):
    server.apply([svc("a"), svc("b")])
    rv = server.rv()
    # watch on a single object path, and the legacy /watch/ prefix
    w1 = server.watch("/api/v1/namespaces/default/services/b", resourceVersion=rv, timeoutSeconds=5)
    w2 = Watch(server.port, f"/api/v1/watch/namespaces/default/services?resourceVersion={rv}&timeoutSeconds=5")
    server.apply([svc("a", port=1), svc("b", port=2)])
    ev = w1.next()
    assert (ev["type"], ev["object"]["metadata"]["name"]) == ("MODIFIED", "b")
    assert [e["object"]["metadata"]["name"] for e in w2.take(2)] == ["a", "b"]
    assert server.ok("GET", "/control/state")["openWatches"] == 2
    # clients that go away are noticed even when nothing is written to them
    w1.close()
    w2.close()
    deadline = time.monotonic() + 5
    while server.ok("GET", "/control/state")["openWatches"] != 0:
        assert time.monotonic() < deadline, "watch threads did not notice closed clients"
        time.sleep(0.1)
    # close-watches ends streams cleanly without compacting: resuming replays
    w = server.watch("/api/v1/services", resourceVersion=rv, timeoutSeconds=30)
    w.take(2)
    server.ok("POST", "/control/close-watches")
    assert w.next() is None
    w.close()
    w = server.watch("/api/v1/services", resourceVersion=rv, timeoutSeconds=1)
    assert [e["type"] for e in w.take(2)] == ["MODIFIED", "MODIFIED"]
    w.close()
