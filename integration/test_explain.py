"""explain must never lie: for a table of flows covering DESIGN §2 (every entry point x policy x
local / remote / no endpoints x pod / node / outside source, hairpin, affinity, source ranges,
terminating fallback, unknown port, unallocated Service IP, IPv6), ask the live agent of the node
the packet enters (`nftproxy explain --json` over its debug socket), then send real TCP and UDP
connections and compare with what the kernel did:

* forward: every connection answered, by a predicted endpoint; every predicted endpoint reached
  (within 24 tries; with ClientIP affinity, exactly one); the source address each endpoint saw is
  the predicted one (`sourcesByEndpoint`); where explain says some endpoints cannot answer
  (`unreachableEndpoints`: a pod of another node short-circuited to an endpoint on a third
  host), connections fail exactly sometimes and the others reach the predicted endpoints;
* drop: a silent timeout; reject: refused at once; not-a-service: the Service table is not
  involved (checked by verdict only: nothing answers there).

`services` and `report` are checked against the same cluster: their client-IP verdicts agree
with explain's, and the Local Service without a local endpoint is flagged.
"""

from __future__ import annotations

import json
import subprocess

import pytest

import cluster as C
from cluster import endpoint, endpoint_slice, node_ip, pod_ip, service, svc_port, wait_until

EXT, EXT2 = "203.0.113.5", "203.0.113.200"
NODE_A, NODE_B = node_ip("node-a"), node_ip("node-b")


def both(port: int, node_port: int | None = None) -> list[dict]:
    return [svc_port("tcp", port, "TCP", node_port), svc_port("udp", port, "UDP", node_port)]


def objects() -> list[dict]:
    p = both
    return [
        service("x1", p(80), cluster_ip="172.30.40.1"),
        endpoint_slice("x1", [endpoint("a1"), endpoint("b1")], p(80)),
        service("x2", p(80, 31402), type="LoadBalancer", cluster_ip="172.30.40.2",
                lb_ips=("192.0.2.42",)),
        endpoint_slice("x2", [endpoint("b2")], p(80, 31402)),
        service("x3", p(80, 31403), type="LoadBalancer", cluster_ip="172.30.40.3",
                lb_ips=("192.0.2.43",), etp="Local", hc_port=32403),
        endpoint_slice("x3", [endpoint("a2"), endpoint("b3")], p(80, 31403)),
        service("x4", p(80, 31404), type="LoadBalancer", cluster_ip="172.30.40.4",
                lb_ips=("192.0.2.44",), etp="Local", hc_port=32404),
        endpoint_slice("x4", [endpoint("b1")], p(80, 31404)),
        service("x5", p(80, 31405), type="LoadBalancer", cluster_ip="172.30.40.5",
                lb_ips=("192.0.2.45",)),
        service("x6", p(80), cluster_ip="172.30.40.6", itp="Local"),
        endpoint_slice("x6", [endpoint("a1"), endpoint("b1")], p(80)),
        service("x7", p(80), cluster_ip="172.30.40.7", itp="Local"),
        endpoint_slice("x7", [endpoint("b1")], p(80)),
        service("x8", p(80, 31408), type="LoadBalancer", cluster_ip="172.30.40.8",
                lb_ips=("192.0.2.48",), source_ranges=["203.0.113.0/25"]),
        endpoint_slice("x8", [endpoint("b2")], p(80, 31408)),
        {**service("x9", p(80), cluster_ip="172.30.40.9"),
         "spec": {**service("x9", p(80), cluster_ip="172.30.40.9")["spec"],
                  "externalIPs": ["192.0.2.49"]}},
        endpoint_slice("x9", [endpoint("b3")], p(80)),
        service("x10", p(80), cluster_ip="172.30.40.10", affinity=True),
        endpoint_slice("x10", [endpoint("b1"), endpoint("b2"), endpoint("b3")], p(80)),
        service("x11", p(80), cluster_ip="172.30.40.11"),
        endpoint_slice("x11", [endpoint("b1", ready=False, serving=True, terminating=True),
                               endpoint("b2", ready=False, serving=False, terminating=True)],
                       p(80)),
        service("x12", p(80), cluster_ip="fd00:30::4012"),
        endpoint_slice("x12", [endpoint("b1", 6), endpoint("a3", 6)], p(80), family=6),
    ]


# (what, client namespace, node whose agent explains, via, dst, port, protocols)
FLOWS = [
    ("pod -> ClusterIP", "ca", "node-a", "pod", "172.30.40.1", 80, ("TCP", "UDP")),
    ("node -> ClusterIP", "node-a", "node-a", "node", "172.30.40.1", 80, ("TCP", "UDP")),
    ("outside -> LB IP, Cluster", "ext", "node-a", "outside", "192.0.2.42", 80, ("TCP", "UDP")),
    ("outside -> NodePort, Cluster", "ext", "node-a", "outside", NODE_A, 31402, ("TCP", "UDP")),
    ("pod -> LB IP, Cluster", "ca", "node-a", "pod", "192.0.2.42", 80, ("TCP",)),
    ("outside -> LB IP, Local", "ext", "node-a", "outside", "192.0.2.43", 80, ("TCP", "UDP")),
    ("outside -> NodePort, Local", "ext", "node-a", "outside", NODE_A, 31403, ("TCP", "UDP")),
    ("pod -> LB IP, Local (short-circuit)", "ca", "node-a", "pod", "192.0.2.43", 80, ("TCP",)),
    ("node -> LB IP, Local", "node-a", "node-a", "node", "192.0.2.43", 80, ("TCP",)),
    ("pod on node-b -> NodePort of node-a, Local", "cb", "node-a", "outside", NODE_A, 31403, ("TCP",)),
    ("outside -> LB IP, Local, no local endpoint", "ext", "node-a", "outside", "192.0.2.44", 80, ("TCP", "UDP")),
    ("outside -> NodePort, Local, no local endpoint", "ext", "node-a", "outside", NODE_A, 31404, ("TCP",)),
    ("pod -> LB IP, Local, no local endpoint", "ca", "node-a", "pod", "192.0.2.44", 80, ("TCP",)),
    ("outside -> LB IP, no endpoints", "ext", "node-a", "outside", "192.0.2.45", 80, ("TCP", "UDP")),
    ("outside -> NodePort, no endpoints", "ext", "node-a", "outside", NODE_A, 31405, ("TCP",)),
    ("pod -> ClusterIP, no endpoints", "ca", "node-a", "pod", "172.30.40.5", 80, ("TCP", "UDP")),
    ("pod -> ClusterIP, ITP Local", "ca", "node-a", "pod", "172.30.40.6", 80, ("TCP", "UDP")),
    ("pod -> ClusterIP, ITP Local, none here", "ca", "node-a", "pod", "172.30.40.7", 80, ("TCP",)),
    ("outside in range -> LB IP", "ext", "node-a", "outside", "192.0.2.48", 80, ("TCP",)),
    ("outside off range -> LB IP", "ext2", "node-a", "outside", "192.0.2.48", 80, ("TCP", "UDP")),
    ("outside off range -> NodePort", "ext2", "node-a", "outside", NODE_A, 31408, ("TCP",)),
    ("outside -> externalIP", "ext", "node-a", "outside", "192.0.2.49", 80, ("TCP",)),
    ("pod -> ClusterIP, affinity", "ca", "node-a", "pod", "172.30.40.10", 80, ("TCP",)),
    ("pod -> ClusterIP, terminating fallback", "ca", "node-a", "pod", "172.30.40.11", 80, ("TCP",)),
    ("pod -> ClusterIP, undefined port", "ca", "node-a", "pod", "172.30.40.1", 81, ("TCP",)),
    ("pod -> unallocated Service IP", "ca", "node-a", "pod", "172.30.40.250", 80, ("TCP",)),
    ("pod on node-b -> ClusterIP", "cb", "node-b", "pod", "172.30.40.1", 80, ("TCP",)),
    ("IPv6 pod -> ClusterIP", "ca", "node-a", "pod", "fd00:30::4012", 80, ("TCP", "UDP")),
    ("IPv6 node -> ClusterIP", "node-a", "node-a", "node", "fd00:30::4012", 80, ("TCP",)),
    ("hairpin: a1 -> its own ClusterIP", "a1", "node-a", "pod", "172.30.40.1", 80, ("TCP",)),
]


def client_ns(cluster, name: str):
    return cluster.pod(name) if name in C.PODS else cluster.ns(name)


def source_of(name: str, dst: str) -> str:
    v6 = ":" in dst
    if name in C.PODS:
        return pod_ip(name, 6 if v6 else 4)
    if name in C.NODES:
        return node_ip(name, 6 if v6 else 4)
    return C.OUTSIDE[name][1 if v6 else 0]


def explain(cluster, node: str, src: str, dst: str, port: int, proto: str, via: str) -> dict:
    to = f"[{dst}]:{port}" if ":" in dst else f"{dst}:{port}"
    out = subprocess.run([cluster.bin, "explain", "--socket", cluster.agents[node].debug_socket,
                          "--from", src, "--to", f"{to}/{proto.lower()}", "--via", via, "--json"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"explain failed: {out.stderr}"
    return json.loads(out.stdout)


def observe(ns, proto: str, dst: str, port: int, tries: int, want: set[str]) -> list:
    """Connections until every wanted endpoint answered (at most `tries`)."""
    replies = []
    seen = set()
    for _ in range(tries):
        r = ns.request(proto, dst, port, timeout=1.0)
        replies.append(r)
        if r.ok:
            seen.add(r.pod)
        if not r.ok or (want and {p for p in want} <= seen):
            break
    return replies


def endpoint_pod(ep: str) -> str:
    """'10.0.2.1:8080' / '[fd00:10:0:2::1]:8080' -> pod name."""
    ip = ep.rsplit(":", 1)[0].strip("[]")
    for pod in C.PODS:
        if ip in (pod_ip(pod, 4), pod_ip(pod, 6)):
            return pod
    raise AssertionError(f"endpoint {ep} is no pod")


@pytest.fixture(scope="module")
def explained(cluster):
    k8s_objs = objects()
    cluster.api.apply(*k8s_objs)
    ca = cluster.pod("ca")
    wait_until(lambda: ca.tcp_request("172.30.40.11", 80, timeout=0.5).ok, 10,
               what="x11 programmed")
    wait_until(lambda: ca.tcp_request("192.0.2.43", 80, timeout=0.5).ok, 10, what="x3 programmed")
    yield
    for o in k8s_objs:
        cluster.api.delete(o["kind"], o["metadata"]["name"])


def test_predictions_equal_what_the_kernel_did(cluster, explained):
    problems = []
    checked = 0
    for what, client, node, via, dst, port, protos in FLOWS:
        if what.startswith("hairpin") and not cluster.br_netfilter:
            continue  # hairpin through the bridge needs br_netfilter on this host
        ns = client_ns(cluster, client)
        src = source_of(client, dst)
        for proto in protos:
            e = explain(cluster, node, src, dst, port, proto, via)
            want_pods = {endpoint_pod(x) for x in e["endpoints"]}
            tries = 1 if e["verdict"] != "forward" else (24 if len(want_pods) > 1 else 3)
            replies = observe(ns, proto, dst, port, tries, want_pods)
            label = f"{what} [{proto} {src} -> {dst}:{port}, explained by {node}]"
            got = [str(r) for r in replies]
            checked += 1
            v = e["verdict"]
            if v == "forward" and e["unreachableEndpoints"]:
                # Connections that land on an unreachable endpoint fail; the others answer.
                want_ok = {endpoint_pod(x) for x in e["endpoints"]}
                replies = [ns.request(proto, dst, port, timeout=1.0) for _ in range(24)]
                seen = {r.pod for r in replies if r.ok}
                failed = [r for r in replies if not r.ok]
                if seen != want_ok or not failed:
                    problems.append(f"{label}: predicted answers from {want_ok} and failures "
                                    f"at {e['unreachableEndpoints']}, got {[str(r) for r in replies]}")
                elif any(r.peer != src for r in replies if r.ok):
                    problems.append(f"{label}: source not kept: {[str(r) for r in replies]}")
            elif v == "forward":
                bad = [r for r in replies if not r.ok]
                seen = {r.pod for r in replies if r.ok}
                if bad:
                    problems.append(f"{label}: predicted forward to {e['endpoints']}, got {got}")
                elif not seen <= want_pods:
                    problems.append(f"{label}: reached {seen}, predicted {want_pods}")
                elif "affinity" in what:
                    if len(seen) != 1:
                        problems.append(f"{label}: affinity, but reached {seen}")
                elif seen != want_pods:
                    problems.append(f"{label}: predicted {want_pods}, reached only {seen} "
                                    f"in {len(replies)} tries")
                for r in replies:
                    if not r.ok:
                        continue
                    ep = next(x for x in e["sourcesByEndpoint"] if endpoint_pod(x) == r.pod)
                    if e["sourcesByEndpoint"][ep] != r.peer:
                        problems.append(f"{label}: {r.pod} saw {r.peer}, predicted "
                                        f"{e['sourcesByEndpoint'][ep]}")
                        break
            elif v == "drop":
                if replies[0].outcome != "timeout":
                    problems.append(f"{label}: predicted drop, got {got}")
            elif v == "reject":
                if not (replies[0].outcome == "refused" and replies[0].elapsed < 0.5):
                    problems.append(f"{label}: predicted reject, got {got}")
            else:
                problems.append(f"{label}: predicted {v}: {json.dumps(e)[:400]}")
    assert checked >= 40, checked
    assert not problems, f"{len(problems)} of {checked} predictions wrong:\n" + "\n".join(problems)


def test_not_a_service_is_said(cluster, explained):
    e = explain(cluster, "node-a", pod_ip("ca"), "203.0.113.9", 443, "TCP", "pod")
    assert e["verdict"] == "not-a-service" and e["service"] is None, e
    assert e["steps"], e


def test_services_and_report_agree(cluster, explained):
    def run(*args):
        out = subprocess.run([cluster.bin, *args, "--socket", cluster.agents["node-a"].debug_socket,
                              "-o", "json"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)
    lines = {(x["name"], x["port"].split()[0], x["family"]): x for x in run("services", "-n", C.NS)}
    assert lines[("x3", "tcp", "IPv4")]["clientIpFromOutside"] == "kept"
    assert lines[("x2", "tcp", "IPv4")]["clientIpFromOutside"].startswith("replaced by")
    assert lines[("x4", "tcp", "IPv4")]["clientIpFromOutside"] == "dropped here: no local endpoint"
    assert lines[("x4", "tcp", "IPv4")]["healthCheck"] == "503 (0 local endpoints)"
    assert lines[("x3", "tcp", "IPv4")]["healthCheck"] == "200 (1 local endpoint)"
    assert lines[("x5", "tcp", "IPv4")]["clientIpFromOutside"] == "rejected: no endpoint"
    flagged = {x["name"] for x in run("services", "-n", C.NS, "--problems")}
    assert {"x4", "x5", "x7"} <= flagged and "x1" not in flagged, flagged
    # the agent counted the drops the flows above caused
    assert lines[("x4", "tcp", "IPv4")]["dropped"] is not None
    rows = run("report")
    by = {(r["service"], r["path"].split(" ")[0] + " " + r["path"].split(" ")[2]): r for r in rows}
    assert by[(f"{C.NS}/x3:tcp/tcp", "outside LB")]["clientIp"] == "kept"
    x4 = by[(f"{C.NS}/x4:tcp/tcp", "outside LB")]
    assert x4["clientIp"] == "dropped here: no local endpoint" and ":32404" in x4["flag"], x4
    x2u = by[(f"{C.NS}/x2:udp/udp", "outside LB")]
    assert "UDP" in (x2u["flag"] or ""), x2u
    # and the live ruleset is there, as applied
    out = subprocess.run(["curl", "-s", "--unix-socket", cluster.agents["node-a"].debug_socket,
                          "http://localhost/debug/ruleset"], capture_output=True, text=True)
    if out.returncode == 0:
        assert "172.30.40.1 . tcp . 80" in out.stdout, out.stdout[:500]


def test_without_the_agent_socket_api_and_kernel(cluster, explained):
    """No socket (an agent without --debug-socket, or run from the node's shell): the commands
    list the objects from the API and read this node's sets from its kernel, and say so."""
    node = cluster.ns("node-a")
    argv = ["--socket", "/nonexistent/debug.sock", "--kubeconfig", cluster.kubeconfig,
            "--hostname-override", "node-a", "--cluster-cidr", C.CLUSTER_CIDR]
    r = node.exec([cluster.bin, "explain", "--from", EXT, "--to", "192.0.2.43:80", "--json",
                   *argv], check=False)
    assert r.returncode == 0, r.stderr
    assert "the API's objects and the sets in this node's kernel" in r.stderr, r.stderr
    e = json.loads(r.stdout)
    assert e["verdict"] == "forward" and e["sourceSeenByEndpoint"] == EXT, e
    assert e["endpoints"] == [f"{pod_ip('a2')}:8080"], e
    r = node.exec([cluster.bin, "services", "-n", C.NS, "x4", "-o", "json", *argv], check=False)
    assert r.returncode == 0, r.stderr
    lines = json.loads(r.stdout)
    assert lines and all(x["clientIpFromOutside"] == "dropped here: no local endpoint"
                         for x in lines), lines
