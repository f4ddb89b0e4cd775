"""Privileged end-to-end tests: the real `nftproxy run` in network namespaces, real TCP/UDP.

Address plan and topology: cluster.py / README.md (pods 10.0.0.0/8 + fd00:10::/48, services
172.30.0.0/16 + fd00:30::/112, nodes 192.168.0.0/24 + fd00:168::/64, outside 203.0.113.0/24 +
2001:db8::/64, LB IPs 192.0.2.0/24 routed to node-a). Every pod answers
"pod=<name> peer=<source ip it saw>" on port 8080 (TCP and UDP).

Each test owns its objects (Service names tN, ClusterIPs 172.30.N.x, LB IPs 192.0.2.Nx,
NodePorts 30N0x/31N0x) and deletes them at the end. Waits poll traffic or the ruleset; a "drop"
is a timeout of 1 s with no ICMP error, a "reject" an error well under a second.
"""

from __future__ import annotations

import re
import time

import pytest

import cluster as C
from cluster import endpoint, endpoint_slice, node_ip, pod_ip, service, svc_port, wait_until

EXT = "203.0.113.5"
EXT2 = "203.0.113.200"
NODE_A = node_ip("node-a")
NODE_B = node_ip("node-b")
PROTOS = ("TCP", "UDP")


def tcp_udp(port: int, node_port: int | None = None) -> list[dict]:
    return [svc_port("tcp", port, "TCP", node_port), svc_port("udp", port, "UDP", node_port)]


def reaches(ns: C.Netns, dst: str, port: int, pod: str | None = None, proto: str = "TCP"):
    """A predicate for wait_until: a request answered (by `pod`, if given)."""
    def pred():
        r = ns.request(proto, dst, port, timeout=0.5)
        return r if r.ok and (pod is None or r.pod == pod) else None
    return pred


def check(ns: C.Netns, proto: str, dst: str, port: int, pod: str, peer: str, what: str):
    r = ns.request(proto, dst, port)
    assert r.ok and r.pod == pod and r.peer == peer, \
        f"{what}: {proto} {ns.short} -> {dst}:{port}: want pod={pod} peer={peer}, got {r}"
    return r


def check_dropped(ns: C.Netns, proto: str, dst: str, port: int, what: str):
    r = ns.request(proto, dst, port, timeout=1.0)
    assert r.outcome == "timeout", \
        f"{what}: {proto} {ns.short} -> {dst}:{port}: want a silent drop (timeout), got {r}"


def check_refused(ns: C.Netns, proto: str, dst: str, port: int, what: str):
    r = ns.request(proto, dst, port, timeout=2.0)
    assert r.outcome == "refused" and r.elapsed < 0.5, \
        f"{what}: {proto} {ns.short} -> {dst}:{port}: want refused within 0.5 s, got {r}"


# 1 -------------------------------------------------------------------------------------------
def test_local_policy_preserves_client_ip(cluster, k8s):
    """ETP Local, endpoint a1 on node-a; the LB IP is routed to node-a: the pod sees the real
    client IP through the LB IP and through node-a's NodePort, TCP and UDP."""
    ports = tcp_udp(80, 30101)
    k8s.apply(service("t1", ports, type="LoadBalancer", cluster_ip="172.30.1.1", etp="Local",
                      lb_ips=("192.0.2.11",), hc_port=32101),
              endpoint_slice("t1", [endpoint("a1")], ports))
    ext = cluster.ns("ext")
    wait_until(reaches(ext, "192.0.2.11", 80, "a1"), 5, what="t1 LB IP to answer")
    for proto in PROTOS:
        check(ext, proto, "192.0.2.11", 80, "a1", EXT, "Local LB IP")
        check(ext, proto, NODE_A, 30101, "a1", EXT, "Local NodePort")


# 2 -------------------------------------------------------------------------------------------
def test_local_policy_without_local_endpoint(cluster, k8s):
    """ETP Local, endpoint a3 on node-a only. Outside traffic that arrives at node-b (LB IP
    re-routed there, or node-b's NodePort) is dropped silently; node-b's pods still reach the
    Service (short-circuit to all endpoints, pod IP kept)."""
    ports = tcp_udp(80, 30201)
    k8s.apply(service("t2", ports, type="LoadBalancer", cluster_ip="172.30.2.1", etp="Local",
                      lb_ips=("192.0.2.21",), hc_port=32201),
              endpoint_slice("t2", [endpoint("a3")], ports))
    ext, cb = cluster.ns("ext"), cluster.pod("cb")
    # node-a has programmed it once outside traffic works; node-b once it lists the LB IP among
    # the entries to drop (cb -> LB IP alone would prove nothing: without rules on node-b the
    # packet is routed on to node-a, which short-circuits it just as well)
    wait_until(reaches(ext, "192.0.2.21", 80, "a3"), 5, what="outside -> t2 LB IP via node-a")
    node_b = cluster.ns("node-b")
    wait_until(lambda: "192.0.2.21" in node_b.nft("list", "set", "ip", "nftproxy",
                                                   "no-endpoint-drop", check=False),
               5, what="node-b to list 192.0.2.21 in no-endpoint-drop")
    check(ext, "TCP", "192.0.2.21", 80, "a3", EXT, "LB IP via node-a (local endpoint)")

    cluster.route_lb("192.0.2.21", "node-b")
    for proto in PROTOS:
        check_dropped(ext, proto, "192.0.2.21", 80, "Local LB IP on node-b (no local endpoint)")
        check_dropped(ext, proto, NODE_B, 30201, "Local NodePort on node-b (no local endpoint)")
    for proto in PROTOS:
        cip = pod_ip("cb")
        check(cb, proto, "192.0.2.21", 80, "a3", cip, "node-b pod -> LB IP (short-circuit)")
        check(cb, proto, NODE_B, 30201, "a3", cip, "node-b pod -> its node's NodePort (short-circuit)")
        check(cb, proto, "172.30.2.1", 80, "a3", cip, "node-b pod -> ClusterIP")


# 3 -------------------------------------------------------------------------------------------
def test_cluster_policy_masquerades_to_remote_endpoint(cluster, k8s):
    """ETP Cluster, endpoint b1 on node-b, traffic arrives at node-a: the pod sees node-a's IP."""
    ports = tcp_udp(80, 30301)
    k8s.apply(service("t3", ports, type="LoadBalancer", cluster_ip="172.30.3.1",
                      lb_ips=("192.0.2.31",)),
              endpoint_slice("t3", [endpoint("b1")], ports))
    ext = cluster.ns("ext")
    wait_until(reaches(ext, "192.0.2.31", 80, "b1"), 5, what="t3 LB IP to answer")
    for proto in PROTOS:
        check(ext, proto, "192.0.2.31", 80, "b1", NODE_A, "Cluster LB IP via node-a")
        check(ext, proto, NODE_A, 30301, "b1", NODE_A, "Cluster NodePort on node-a")


# 4 -------------------------------------------------------------------------------------------
def test_pod_to_clusterip_keeps_pod_ip(cluster, k8s):
    """pod ca (node-a) -> ClusterIP: the endpoint sees 10.0.1.50, for an endpoint on the other
    node (routed) and on the same node (bridged replies, seen through br_netfilter)."""
    ports = tcp_udp(80)
    k8s.apply(service("t4", ports, cluster_ip="172.30.4.1"),
              endpoint_slice("t4", [endpoint("b1")], ports),
              service("t4same", ports, cluster_ip="172.30.4.2"),
              endpoint_slice("t4same", [endpoint("a1")], ports))
    ca = cluster.pod("ca")
    wait_until(reaches(ca, "172.30.4.1", 80, "b1"), 5, what="t4 ClusterIP")
    for proto in PROTOS:
        check(ca, proto, "172.30.4.1", 80, "b1", pod_ip("ca"), "pod -> ClusterIP, remote endpoint")
    if not cluster.br_netfilter:
        pytest.skip("br_netfilter not loaded on this host: same-node replies bypass conntrack")
    wait_until(reaches(ca, "172.30.4.2", 80, "a1"), 5, what="t4same ClusterIP")
    for proto in PROTOS:
        check(ca, proto, "172.30.4.2", 80, "a1", pod_ip("ca"), "pod -> ClusterIP, same-node endpoint")


# 5 -------------------------------------------------------------------------------------------
def test_hairpin(cluster, k8s):
    """a2 reaches its own Service whose only endpoint is a2: it works, and the source is
    masqueraded (to node-a's pod bridge address), not a2's own IP."""
    if not cluster.br_netfilter:
        pytest.skip("br_netfilter not loaded on this host: hairpin through a bridge needs it")
    ports = tcp_udp(80)
    k8s.apply(service("t5", ports, cluster_ip="172.30.5.1"),
              endpoint_slice("t5", [endpoint("a2")], ports))
    ca, a2 = cluster.pod("ca"), cluster.pod("a2")
    wait_until(reaches(ca, "172.30.5.1", 80, "a2"), 5, what="t5 ClusterIP from another pod")
    for proto in PROTOS:
        check(a2, proto, "172.30.5.1", 80, "a2", C.bridge_ip("node-a"), "hairpin")


# 6 -------------------------------------------------------------------------------------------
def test_no_endpoints_rejects_at_once(cluster, k8s):
    """A Service without endpoints: ClusterIP, LB IP and NodePort are refused (TCP RST / ICMP
    port unreachable) well under a second, TCP and UDP."""
    ports = tcp_udp(80, 30601)
    k8s.apply(service("t6", ports, type="LoadBalancer", cluster_ip="172.30.6.1",
                      lb_ips=("192.0.2.61",)))
    ca, ext = cluster.pod("ca"), cluster.ns("ext")
    wait_until(lambda: ca.tcp_request("172.30.6.1", 80, timeout=0.5).outcome == "refused", 5,
               what="t6 ClusterIP to be rejected")
    wait_until(lambda: ext.tcp_request(NODE_A, 30601, timeout=0.5).outcome == "refused", 5,
               what="t6 NodePort to be rejected")
    for proto in PROTOS:
        check_refused(ca, proto, "172.30.6.1", 80, "no endpoints, ClusterIP from a pod")
        check_refused(ext, proto, "192.0.2.61", 80, "no endpoints, LB IP from outside")
        check_refused(ext, proto, NODE_A, 30601, "no endpoints, NodePort from outside")


# 7 -------------------------------------------------------------------------------------------
def test_load_balancer_source_ranges(cluster, k8s):
    """loadBalancerSourceRanges 203.0.113.0/25: ext (.5) passes, ext2 (.200) is dropped at the
    LB IP; NodePorts are not guarded by the ranges."""
    ports = tcp_udp(80, 30701)
    k8s.apply(service("t7", ports, type="LoadBalancer", cluster_ip="172.30.7.1",
                      lb_ips=("192.0.2.71",), source_ranges=["203.0.113.0/25"]),
              endpoint_slice("t7", [endpoint("b2")], ports))
    ext, ext2 = cluster.ns("ext"), cluster.ns("ext2")
    wait_until(reaches(ext, "192.0.2.71", 80, "b2"), 5, what="t7 LB IP from inside the range")
    for proto in PROTOS:
        check(ext, proto, "192.0.2.71", 80, "b2", NODE_A, "source inside the range")
        check_dropped(ext2, proto, "192.0.2.71", 80, "source outside the range")
        check(ext2, proto, NODE_A, 30701, "b2", NODE_A, "NodePort is not guarded by source ranges")


# 8 -------------------------------------------------------------------------------------------
def test_session_affinity_client_ip(cluster, k8s):
    """sessionAffinity ClientIP, 3 endpoints: 12 new connections from one client all land on
    one pod. Control: the same endpoints without affinity spread over all 3."""
    ports = tcp_udp(80)
    eps = [endpoint("b1"), endpoint("b2"), endpoint("b3")]
    k8s.apply(service("t8", ports, cluster_ip="172.30.8.1", affinity=True),
              endpoint_slice("t8", eps, ports),
              service("t8spread", ports, cluster_ip="172.30.8.2"),
              endpoint_slice("t8spread", eps, ports))
    ca = cluster.pod("ca")
    wait_until(reaches(ca, "172.30.8.1", 80), 5, what="t8 ClusterIP")
    wait_until(reaches(ca, "172.30.8.2", 80), 5, what="t8spread ClusterIP")
    spread = {ca.tcp_request("172.30.8.2", 80).pod for _ in range(30)}
    assert spread == {"b1", "b2", "b3"}, f"without affinity 30 connections reached {spread}"
    for proto in PROTOS:
        replies = [ca.request(proto, "172.30.8.1", 80) for _ in range(12)]
        pods = {r.pod for r in replies}
        assert all(r.ok for r in replies) and len(pods) == 1, \
            f"{proto} with ClientIP affinity: " + ", ".join(map(str, replies))


# 9 -------------------------------------------------------------------------------------------
def test_udp_flow_follows_endpoint_removal(cluster, k8s, timings):
    """One UDP socket sends a datagram every 100 ms to a ClusterIP with endpoints b1, b2. When
    the endpoint the flow is pinned to leaves the slice (its pod keeps running and would keep
    answering), stale conntrack entries are deleted and the flow moves to the other endpoint
    within about a second."""
    ports = [svc_port("dns", 53, "UDP")]
    k8s.apply(service("t9", ports, cluster_ip="172.30.9.1"),
              endpoint_slice("t9", [endpoint("b1"), endpoint("b2")], ports))
    ca = cluster.pod("ca")
    wait_until(reaches(ca, "172.30.9.1", 53, proto="UDP"), 5, what="t9 ClusterIP (UDP)")
    flow = ca.udp_flow("172.30.9.1", 53, interval=0.1)
    try:
        wait_until(lambda: len([r for _, r in flow.since(0) if r.ok]) >= 5, 5,
                   what="the UDP flow to get answers")
        first = [r for _, r in flow.since(0) if r.ok]
        old = first[-1].pod
        assert {r.pod for r in first} == {old}, f"flow not pinned: {[str(r) for r in first]}"
        new = "b2" if old == "b1" else "b1"
        t0 = time.monotonic()
        k8s.apply(endpoint_slice("t9", [endpoint(new)], ports))
        try:
            wait_until(lambda: any(r.pod == new for _, r in flow.since(t0)), 3,
                       what=f"the flow to move from {old} to {new}")
        except AssertionError:
            recs = ", ".join(f"+{ts - t0:.2f}s {r}" for ts, r in flow.since(t0 - 0.3))
            ct = cluster.ns("node-a").conntrack("-L", "-p", "udp")
            pytest.fail(f"UDP flow {flow.local} -> 172.30.9.1:53 stayed on removed endpoint {old} "
                        f"for 3 s after the slice change.\nrecords: {recs}\n"
                        f"node-a conntrack -L -p udp:\n{ct}", pytrace=False)
        moved = min(ts for ts, r in flow.since(t0) if r.pod == new) - t0
        time.sleep(0.5)
        after = [r for ts, r in flow.since(t0 + moved)]
        timings(f"UDP flow moved {old} -> {new} {moved:.2f}s after the slice change")
        assert moved < 1.5, f"the flow moved only after {moved:.2f}s"
        assert all(r.ok and r.pod == new for r in after), \
            f"after moving: {', '.join(map(str, after))}"
    finally:
        flow.stop()


def test_udp_client_started_before_its_service_is_answered(cluster, k8s, timings):
    """An outside client sends a UDP datagram every 100 ms to a LoadBalancer address before its
    Service exists: node-a translates nothing yet, so its conntrack records an untranslated flow,
    which the client's own traffic keeps alive. When the Service comes with an endpoint, node-a
    deletes that entry (as kube-proxy does for UDP) and the flow is answered within about a
    second; without it the client stays unanswered for as long as it keeps sending."""
    LB = "192.0.2.91"
    ports = [svc_port("dns", 53, "UDP", 31091)]
    ext = cluster.ns("ext")
    flow = ext.udp_flow(LB, 53, interval=0.1)
    try:
        time.sleep(0.6)
        early = flow.since(0)
        assert early and not any(r.ok for _, r in early), [str(r) for _, r in early]
        t0 = time.monotonic()
        k8s.apply(service("t9b", ports, type="LoadBalancer", cluster_ip="172.30.91.1",
                          lb_ips=(LB,)),
                  endpoint_slice("t9b", [endpoint("a1")], ports))
        try:
            wait_until(lambda: any(r.ok for _, r in flow.since(t0)), 3,
                       what="the early UDP flow to be answered")
        except AssertionError:
            recs = ", ".join(f"+{ts - t0:.2f}s {r}" for ts, r in flow.since(t0))
            ct = cluster.ns("node-a").conntrack("-L", "-p", "udp")
            pytest.fail(f"UDP flow {flow.local} -> {LB}:53 started before its Service was not "
                        f"answered 3 s after the Service came.\nrecords: {recs}\n"
                        f"node-a conntrack -L -p udp:\n{ct}", pytrace=False)
        answered = min(ts for ts, r in flow.since(t0) if r.ok) - t0
        timings(f"UDP flow started before its Service answered {answered:.2f}s after the "
                f"Service and its slice were written")
    finally:
        flow.stop()


# 10 ------------------------------------------------------------------------------------------
def test_ipv6(cluster, k8s):
    """IPv6-only Service (ETP Cluster, endpoint b1): pod -> IPv6 ClusterIP keeps the pod IP;
    the outside client reaches the IPv6 NodePort on node-a and is masqueraded to fd00:168::2."""
    ports = tcp_udp(80, 31001)
    k8s.apply(service("t10", ports, type="NodePort", cluster_ip="fd00:30::10"),
              endpoint_slice("t10", [endpoint("b1", family=6)], ports, family=6))
    ca, ext = cluster.pod("ca"), cluster.ns("ext")
    node_a6 = node_ip("node-a", 6)
    wait_until(reaches(ca, "fd00:30::10", 80, "b1"), 5, what="t10 IPv6 ClusterIP")
    wait_until(reaches(ext, node_a6, 31001, "b1"), 5, what="t10 IPv6 NodePort")
    for proto in PROTOS:
        check(ca, proto, "fd00:30::10", 80, "b1", pod_ip("ca", 6), "pod -> IPv6 ClusterIP")
        check(ext, proto, node_a6, 31001, "b1", node_a6, "outside -> IPv6 NodePort (Cluster)")


# 11 ------------------------------------------------------------------------------------------
def test_changes_take_effect_within_a_second(cluster, k8s, timings):
    """Move a ClusterIP's single endpoint b1 -> b2 -> b3 -> b1; after each slice change, new
    connections reach the new endpoint in < 1 s, and no connection fails meanwhile."""
    ports = [svc_port("tcp", 80)]
    k8s.apply(service("t11", ports, cluster_ip="172.30.11.1"),
              endpoint_slice("t11", [endpoint("b1")], ports))
    ca = cluster.pod("ca")
    wait_until(reaches(ca, "172.30.11.1", 80, "b1"), 5, what="t11 ClusterIP")
    took = []
    for new in ("b2", "b3", "b1"):
        failures = []
        t0 = time.monotonic()
        k8s.apply(endpoint_slice("t11", [endpoint(new)], ports))
        while True:
            r = ca.tcp_request("172.30.11.1", 80, timeout=1.0)
            elapsed = time.monotonic() - t0
            if not r.ok:
                failures.append(f"+{elapsed:.3f}s {r}")
            if r.pod == new:
                break
            assert elapsed < 3, f"switch to {new} not seen after 3 s"
            time.sleep(0.005)
        took.append(elapsed)
        assert not failures, f"connections failed while switching to {new}: {failures}"
    timings("slice change -> traffic follows: " + ", ".join(f"{t * 1000:.0f} ms" for t in took))
    assert max(took) < 1.0, f"slowest change took {max(took):.2f}s"


# 12 ------------------------------------------------------------------------------------------
def _normalised_table(ns: C.Netns, family: str) -> str:
    text = ns.nft("list", "table", family, "nftproxy")
    text = re.sub(r"counter packets \d+ bytes \d+", "counter", text)
    return re.sub(r" expires [0-9hms]+", "", text)  # affinity entries count down


@pytest.fixture
def agent_a(cluster):
    a = cluster.agents["node-a"]
    yield a
    if not a.running() or a.synced_count() == 0:
        a.restart_until_synced()


def test_agent_restart_keeps_connections(cluster, k8s, agent_a, timings):
    """Established TCP connections through node-a (pod -> ClusterIP, outside -> LB IP under
    Cluster policy) survive SIGTERM + restart of node-a's agent; while it is down the rules stay
    (table unchanged, new connections work)."""
    k8s.apply(service("t12", [svc_port("tcp", 80)], cluster_ip="172.30.12.1"),
              endpoint_slice("t12", [endpoint("b1")], [svc_port("tcp", 80)]),
              service("t12lb", [svc_port("tcp", 80, node_port=31201)], type="LoadBalancer",
                      cluster_ip="172.30.12.2", lb_ips=("192.0.2.121",)),
              endpoint_slice("t12lb", [endpoint("b2")], [svc_port("tcp", 80)]))
    ca, ext = cluster.pod("ca"), cluster.ns("ext")
    wait_until(reaches(ca, "172.30.12.1", 80, "b1"), 5, what="t12 ClusterIP")
    wait_until(reaches(ext, "192.0.2.121", 80, "b2"), 5, what="t12lb LB IP")
    conns = {"pod -> ClusterIP": (ca.tcp_connection("172.30.12.1", 80), "b1", pod_ip("ca")),
             "outside -> LB IP": (ext.tcp_connection("192.0.2.121", 80), "b2", NODE_A)}

    def exchange_all(phase):
        for what, (conn, pod, peer) in conns.items():
            r = conn.exchange(f"{phase}")
            assert r.ok and r.pod == pod and r.peer == peer, \
                f"{what} ({conn.local}) {phase}: want pod={pod} peer={peer}, got {r}"

    try:
        exchange_all("before")
        tables = {f: _normalised_table(agent_a.ns, f) for f in ("ip", "ip6")}
        t0 = time.monotonic()
        rc = agent_a.stop()
        timings(f"agent exited {time.monotonic() - t0:.2f}s after SIGTERM with code {rc}")
        assert rc == 0, f"agent exit code after SIGTERM: {rc}"
        for f, before in tables.items():
            assert _normalised_table(agent_a.ns, f) == before, f"table {f} nftproxy changed on exit"
        exchange_all("agent-down")
        check(ca, "TCP", "172.30.12.1", 80, "b1", pod_ip("ca"), "new connection while agent down")
        check(ext, "TCP", "192.0.2.121", 80, "b2", NODE_A, "new connection while agent down")

        agent_a.start(wait=False)
        try:
            took, not_synced = agent_a.wait_synced(35), ""
            timings(f"restarted agent synced after {took:.2f}s")
        except C.AgentSyncTimeout as e:
            took, not_synced = None, str(e)
        exchange_all("after-restart")
        check(ca, "TCP", "172.30.12.1", 80, "b1", pod_ip("ca"), "new connection after restart")
        check(ext, "TCP", "192.0.2.121", 80, "b2", NODE_A, "new connection after restart")
        assert took is not None, f"the restarted agent never programmed anything: {not_synced}"
        time.sleep(0.3)  # anything the new process does right after its first sync
        exchange_all("after-restart-2")
    finally:
        for conn, _, _ in conns.values():
            conn.close()
    # the new process follows changes
    k8s.apply(endpoint_slice("t12", [endpoint("b3")], [svc_port("tcp", 80)]))
    wait_until(reaches(ca, "172.30.12.1", 80, "b3"), 1.0, what="a slice change after the restart")
    assert took < 5, (f"the restarted agent synced (programmed changes) only {took:.1f}s after "
                      f"its start; log:\n{agent_a.current_log()[-3000:]}")


# (12b) ---------------------------------------------------------------------------------------
def test_agent_start_syncs_promptly(cluster, k8s, timings):
    """Up to six restarts of node-b's agent (and the two starts at set-up): each new process
    completes its first sync within 5 s (the API server answers its lists in milliseconds).
    Stops at the first slow start, after measuring how late its first sync comes."""
    k8s.apply(service("t12b", [svc_port("tcp", 80)], cluster_ip="172.30.12.3"),
              endpoint_slice("t12b", [endpoint("b1")], [svc_port("tcp", 80)]))
    agent = cluster.agents["node-b"]
    took, failures = [], list(cluster.startup_problems)
    try:
        for i in range(6):
            agent.stop()
            agent.start(wait=False)
            try:
                took.append(agent.wait_synced(5))
            except C.AgentSyncTimeout as e:
                failures.append(f"restart {i + 1}: {e}")
                # how late is it (--initial-sync-timeout is 30 s)? One case is evidence enough.
                try:
                    late = agent.wait_synced(28)
                    failures[-1] += f"\n(its first sync came {late:.1f}s after the start)"
                except C.AgentSyncTimeout:
                    failures[-1] += (f"\n(no sync {time.monotonic() - agent.started_at:.0f}s after the"
                                     f" start; log:\n{agent.current_log()[-2000:]})")
                break
    finally:
        if not agent.running() or agent.synced_count() == 0:
            agent.restart_until_synced()
    timings("agent start -> first sync: " + ", ".join(f"{t:.2f}s" for t in took))
    assert not failures, f"{len(failures)} slow starts:\n" + "\n\n".join(failures)


# API outages ----------------------------------------------------------------------------------
def test_api_outage_keeps_rules_and_recovers(cluster, k8s, timings):
    """The API server becomes unreachable: the programmed rules stay and keep serving; when it
    comes back the agent catches up. A compacted watch history (410 Gone) makes the agent relist
    and still apply later changes."""
    ports = [svc_port("tcp", 80, "TCP")]
    k8s.apply(service("t20", ports, cluster_ip="172.30.20.1"), endpoint_slice("t20", [endpoint("b1")], ports))
    ca = cluster.pod("ca")
    wait_until(reaches(ca, "172.30.20.1", 80, "b1"), 5, what="t20 programmed")
    api = cluster.api
    api._call("POST", "/control/pause", {"mode": "reset"})
    try:
        time.sleep(2)  # watches cut, reconnects failing with backoff
        check(ca, "TCP", "172.30.20.1", 80, "b1", pod_ip("ca"), "rules stay while the API is down")
    finally:
        api._call("POST", "/control/resume", {})
    k8s.apply(endpoint_slice("t20", [endpoint("b2")], ports))
    t0 = time.monotonic()
    wait_until(reaches(ca, "172.30.20.1", 80, "b2"), 15, what="change after the API came back")
    timings(f"change applied {time.monotonic() - t0:.2f}s after the API came back")
    api._call("POST", "/control/compact", {})
    k8s.apply(endpoint_slice("t20", [endpoint("b3")], ports))
    t0 = time.monotonic()
    wait_until(reaches(ca, "172.30.20.1", 80, "b3"), 15, what="change after 410 Gone and relist")
    timings(f"change applied {time.monotonic() - t0:.2f}s after a compaction (410, relist)")
    for a in cluster.agents.values():
        assert a.running(), f"agent {a.node} exited during the outage"
