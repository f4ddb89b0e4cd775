#!/usr/bin/env python3
"""nftproxy demo: a two-node cluster made of network namespaces (see cluster.py), nftproxy on each
node, and what a client's source IP looks like through a Local-policy and a Cluster-policy
LoadBalancer. Everything it creates is removed when it ends (also on failure or Ctrl-C).

Exit status: 0 when every observation is what Kubernetes' semantics promise, 1 otherwise, so CI
can run the demo as an end-to-end check.
"""

from __future__ import annotations

import json
import sys
import time

import cluster as C

NS_ = C.NS
LOCAL_LB, CLUSTER_LB = "192.0.2.10", "192.0.2.11"
HC_PORT = 32010
CLIENT = C.OUTSIDE["ext"][0]


def line(text: str = "") -> None:
    print(text, flush=True)


def wait(pred, timeout: float, what: str):
    return C.wait_until(pred, timeout, what=what)


def main() -> int:
    ok = True
    c = C.Cluster(prefix=f"demo{int(time.time()) % 100000}-")
    try:
        line("== building the demo cluster: router, 2 nodes, 8 pods, outside client, API server")
        c.create()
        ports_local = [C.svc_port("http", 80, node_port=30010)]
        ports_cluster = [C.svc_port("http", 80, node_port=30011)]
        c.api.apply(
            C.service("web-local", ports_local, type="LoadBalancer", cluster_ip="172.30.0.10", etp="Local",
                      lb_ips=(LOCAL_LB,), hc_port=HC_PORT),
            C.endpoint_slice("web-local", [C.endpoint("a1")], ports_local),
            C.service("web-cluster", ports_cluster, type="LoadBalancer", cluster_ip="172.30.0.11",
                      lb_ips=(CLUSTER_LB,)),
            C.endpoint_slice("web-cluster", [C.endpoint("b1")], ports_cluster),
        )
        ext = c.ns("ext")
        wait(lambda: ext.tcp_request(LOCAL_LB, 80).ok and ext.tcp_request(CLUSTER_LB, 80).ok, 10, "services programmed")

        line()
        line(f"== an outside client ({CLIENT}) calls both LoadBalancers; the LB sends to node-a (192.168.0.2)")
        line(f"{'Service':<34} {'answered by':<14} {'source IP the pod saw':<24} verdict")
        r1 = ext.tcp_request(LOCAL_LB, 80)
        good1 = r1.ok and r1.pod == "a1" and r1.peer == CLIENT
        line(f"{'web-local   (Local policy)':<34} {str(r1.pod):<14} {str(r1.peer):<24} {'client IP preserved' if good1 else 'WRONG: ' + str(r1)}")
        r2 = ext.tcp_request(CLUSTER_LB, 80)
        good2 = r2.ok and r2.pod == "b1" and r2.peer == C.node_ip("node-a")
        line(f"{'web-cluster (Cluster policy)':<34} {str(r2.pod):<14} {str(r2.peer):<24} {'SNAT to the node IP (endpoint on node-b)' if good2 else 'WRONG: ' + str(r2)}")
        ok &= good1 and good2

        line()
        line(f"== healthCheckNodePort {HC_PORT} of web-local, as a load balancer probes it")
        router = c.router
        answers = {}
        for node in C.NODES:
            status, headers, body = router.http_get(C.node_ip(node), HC_PORT)
            doc = json.loads(body)
            answers[node] = status
            line(f"{node} ({C.node_ip(node)}): HTTP {status}  localEndpoints={doc['localEndpoints']}  "
                 f"X-Load-Balancing-Endpoint-Weight={headers.get('x-load-balancing-endpoint-weight')}")
        ok &= answers == {"node-a": 200, "node-b": 503}

        line()
        line("== if the load balancer ignored the health check and sent web-local traffic to node-b:")
        c.route_lb(LOCAL_LB, "node-b")
        r3 = ext.tcp_request(LOCAL_LB, 80, timeout=1.0)
        dropped = r3.outcome == "timeout"
        line(f"outside client -> {LOCAL_LB} via node-b: {r3.outcome}  "
             f"({'dropped: node-b has no local endpoint, and Local policy never forwards elsewhere' if dropped else 'WRONG: ' + str(r3)})")
        r4 = c.pod("cb").tcp_request(LOCAL_LB, 80)
        short = r4.ok and r4.pod == "a1" and r4.peer == C.pod_ip("cb")
        line(f"a pod on node-b -> {LOCAL_LB}: {r4}  "
             f"({'pods are short-circuited to any endpoint, keeping their IP' if short else 'WRONG'})")
        ok &= dropped and short
        line("node-b counts such drops per Service (read every 10 s):")
        node_b = c.ns("node-b")
        metric = "nftproxy_no_local_endpoint_drops_packets_total"

        def drops() -> float:
            try:
                _, _, body = node_b.http_get("127.0.0.1", 10249, "/metrics")
            except OSError:
                return 0.0
            for name, labels, value in C.parse_prometheus(body.decode()):
                if name == metric and labels.get("service") == "web-local":
                    return value
            return 0.0

        try:
            wait(lambda: drops() > 0, 15, "drop counter")
            line(f'  {metric}{{namespace="{NS_}",service="web-local"}} {drops():.0f}')
        except Exception:
            line("  (counter not visible yet)")
            ok = False
        c.reset_lb_routes()

        line()
        line(f"== the rules node-a programmed for web-local (nftproxy render shows the same for any objects):")
        listing = c.ns("node-a").nft("list", "set", "ip", "nftproxy", "external-local")
        line("  " + " ".join(listing.split()))
        line()
        line("demo " + ("OK: every observation matches Kubernetes' semantics" if ok else "FAILED: see WRONG lines above"))
        return 0 if ok else 1
    finally:
        c.destroy()
        c.remove_workdir()
        line("demo cluster removed")


if __name__ == "__main__":
    sys.exit(main())
