"""Health ports and metrics of the real agent (DESIGN §2 "Health"), in the namespace cluster.

The prober runs in the router namespace (like a cloud load balancer's health checks) and reads
http://<node ip>:<healthCheckNodePort>/ of every node; /metrics is read inside a node namespace
on 127.0.0.1:10249.
"""

from __future__ import annotations

import json
import os
import time

import cluster as C
from cluster import endpoint, endpoint_slice, node_ip, parse_prometheus, service, svc_port, wait_until

HC_PORT = 32012


def probe(cluster: C.Cluster, node: str, port: int) -> dict:
    """One health check: status, parsed body and the relevant headers (or the error)."""
    try:
        status, headers, body = cluster.router.http_get(node_ip(node), port, "/", timeout=0.5)
    except OSError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    try:
        doc = json.loads(body)
    except ValueError:
        doc = {"unparsable": body.decode("utf-8", "replace")}
    return {"status": status, "body": doc,
            "weight": headers.get("x-load-balancing-endpoint-weight"),
            "content-type": headers.get("content-type"),
            "nosniff": headers.get("x-content-type-options")}


def expected(name: str, n: int) -> dict:
    return {"status": 200 if n else 503,
            "body": {"service": {"namespace": C.NS, "name": name}, "localEndpoints": n,
                     "serviceProxyHealthy": True},
            "weight": str(n), "content-type": "application/json", "nosniff": "nosniff"}


def test_health_check_node_port_follows_endpoint(cluster, k8s, timings):
    """ETP Local LB with healthCheckNodePort 32012; the single endpoint moves a1 (node-a) -> b1
    (node-b): both nodes' answers follow within a second."""
    ports = [svc_port("tcp", 80, node_port=31301)]
    k8s.apply(service("t13", ports, type="LoadBalancer", cluster_ip="172.30.13.1", etp="Local",
                      lb_ips=("192.0.2.131",), hc_port=HC_PORT),
              endpoint_slice("t13", [endpoint("a1")], ports))

    def state():
        return {n: probe(cluster, n, HC_PORT) for n in C.NODES}

    want_a = {"node-a": expected("t13", 1), "node-b": expected("t13", 0)}
    wait_until(lambda: state() == want_a, 5, what=f"health answers {want_a}")

    t0 = time.monotonic()
    k8s.apply(endpoint_slice("t13", [endpoint("b1")], ports))
    want_b = {"node-a": expected("t13", 0), "node-b": expected("t13", 1)}
    seen = []

    def moved():
        s = state()
        seen.append((round(time.monotonic() - t0, 3), s))
        return s == want_b
    try:
        wait_until(moved, 3, 0.01, what="health answers to follow the endpoint")
    finally:
        if seen and seen[-1][1] != want_b:
            print("last states seen:", seen[-3:])
    took = time.monotonic() - t0
    timings(f"healthCheckNodePort answers followed the endpoint in {took * 1000:.0f} ms")
    assert took < 1.0, f"health answers followed only after {took:.2f}s"
    # and the traffic follows the health checks: outside -> LB IP via node-b -> b1, client IP kept
    cluster.route_lb("192.0.2.131", "node-b")
    r = wait_until(lambda: (lambda r: r if r.ok else None)(
        cluster.ns("ext").tcp_request("192.0.2.131", 80, timeout=0.5)), 3, what="LB IP via node-b")
    assert r.pod == "b1" and r.peer == "203.0.113.5", r


def test_agent_livez_and_healthz(cluster, k8s):
    """/livez and /healthz on each agent's --healthz-bind-address answer 200 with a JSON body."""
    for node in C.NODES:
        for path in ("/livez", "/healthz"):
            status, headers, body = cluster.router.http_get(node_ip(node), 10256, path)
            assert status == 200, f"{node} {path}: {status} {body!r}"
            assert headers.get("content-type", "").startswith("application/json"), (node, path, headers)
            doc = json.loads(body)
            assert doc.get("healthy") is True, (node, path, doc)
            assert "lastUpdated" in doc and "currentTime" in doc, (node, path, doc)
            if path == "/healthz":
                assert doc.get("nodeEligible") is True, (node, path, doc)


def _counter(ns: C.Netns, name: str, labels: dict) -> tuple[float, str]:
    status, headers, body = ns.http_get("127.0.0.1", 10249, "/metrics")
    assert status == 200, (status, body[:200])
    text = body.decode()
    samples = parse_prometheus(text)  # raises on any malformed line
    assert samples, "no samples in /metrics"
    vals = [v for n, lb, v in samples if n == name and all(lb.get(k) == w for k, w in labels.items())]
    return (max(vals) if vals else 0.0), headers.get("content-type", "")


def test_metrics_count_local_policy_drops(cluster, k8s, timings):
    """/metrics parses as Prometheus text on both nodes, and
    nftproxy_no_local_endpoint_drops_packets_total{namespace,service} rises on node-a after
    outside clients hit the Local-policy NodePort there while the only endpoint is on node-b."""
    ports = [svc_port("tcp", 80, node_port=31302)]
    k8s.apply(service("t13m", ports, type="LoadBalancer", cluster_ip="172.30.13.2", etp="Local",
                      lb_ips=("192.0.2.132",), hc_port=32013),
              endpoint_slice("t13m", [endpoint("b3")], ports))
    node_a = cluster.ns("node-a")
    wait_until(lambda: "31302" in node_a.nft("list", "set", "ip", "nftproxy",
                                              "nodeport-no-endpoint-drop", check=False),
               5, what="node-a to list NodePort 31302 in nodeport-no-endpoint-drop")
    name = "nftproxy_no_local_endpoint_drops_packets_total"
    labels = {"namespace": C.NS, "service": "t13m"}
    _, ctype_b = _counter(cluster.ns("node-b"), name, labels)
    before, ctype = _counter(node_a, name, labels)
    assert ctype.startswith(("text/plain", "application/openmetrics-text")), ctype
    ext = cluster.ns("ext")
    for _ in range(5):
        r = ext.tcp_request(node_ip("node-a"), 31302, timeout=0.2)
        assert r.outcome == "timeout", f"Local NodePort on node-a without local endpoint: {r}"
    t0 = time.monotonic()
    after = wait_until(lambda: (lambda v: v if v > before else None)(_counter(node_a, name, labels)[0]),
                       20, 0.5, what=f"{name}{labels} on node-a to rise above {before}")
    timings(f"{name} rose {before:.0f} -> {after:.0f} after {time.monotonic() - t0:.1f}s")


def test_livez_fails_while_commits_fail_and_recovers(cluster, k8s, timings):
    """Commits fail on purpose (the agent's hidden --fault-inject-file seam) with --sync-period 2s:
    once an accepted change has waited more than 2x sync-period, /livez and /healthz answer 503;
    when commits work again the change is applied and both return to 200."""
    agent = cluster.agents["node-b"]
    fault = os.path.join(cluster.workdir, "fail-commits")
    ports = [C.svc_port("tcp", 80, "TCP")]
    k8s.apply(C.service("h9", ports, cluster_ip="172.30.9.1"), C.endpoint_slice("h9", [C.endpoint("b1")], ports))
    cb = cluster.pod("cb")

    def livez(path="/livez"):
        status, _, body = cluster.router.http_get(node_ip("node-b"), 10256, path)
        return status, json.loads(body)

    agent.stop()
    agent.extra_args = ["--sync-period", "2s", "--fault-inject-file", fault]
    try:
        agent.restart_until_synced()
        wait_until(lambda: cb.tcp_request("172.30.9.1", 80, timeout=0.5).pod == "b1", 5, what="h9 on node-b")
        open(fault, "w").close()
        k8s.apply(C.endpoint_slice("h9", [C.endpoint("b2")], ports))
        t0 = time.monotonic()
        wait_until(lambda: livez()[0] == 503, 10, what="/livez 503 while commits fail")
        failed_after = time.monotonic() - t0
        status, doc = livez("/healthz")
        assert status == 503 and doc["healthy"] is False, doc
        assert cb.tcp_request("172.30.9.1", 80).pod == "b1", "the old rules keep serving"
        os.unlink(fault)
        t1 = time.monotonic()
        wait_until(lambda: livez()[0] == 200 and livez("/healthz")[0] == 200, 10, what="/livez back to 200")
        wait_until(lambda: cb.tcp_request("172.30.9.1", 80, timeout=0.5).pod == "b2", 5, what="change applied")
        timings(f"/livez 503 {failed_after:.1f}s after a change could not be committed (2x sync-period = 4s); "
                f"200 again {time.monotonic() - t1:.1f}s after commits worked")
        assert 3.5 <= failed_after <= 8, failed_after
    finally:
        if os.path.exists(fault):
            os.unlink(fault)
        agent.stop()
        agent.extra_args = []
        agent.restart_until_synced()
