"""Drift repair, end to end: another process (`nft` run inside node-a's namespace) changes
node-a's `ip`/`ip6 nftproxy` tables, and the running agent puts back exactly what it had.

For each kind of outside change (flush a set, delete one map element, add a foreign element,
flush a chain, insert a foreign rule, delete the whole table, and one IPv6 case) the test proves:

* within 1 s both tables list exactly as before the change (counters and timeouts normalised);
  the measured repair latency is reported through `timings`;
* real traffic to the ClusterIP (TCP and UDP, from a pod) and to the LB IP (from outside) works
  afterwards;
* the agent logged a `ruleset drift` warning naming the set / chain / table that was changed,
  then `ruleset drift repaired`; /healthz is 200 again without `unrepairedDrift`;
* `nftproxy_ruleset_drift_total` on the metrics port went up.

Once (test_drift_emits_warning_event_on_node): the API server received a Warning Event with
reason NftproxyRulesetDrift about Node node-a.

Objects: Service d40 (dual-stack LoadBalancer, Cluster policy) with ClusterIPs 172.30.40.1 /
fd00:30::40, LB IP 192.0.2.140, NodePort 31400, endpoints a1 (node-a) and b1 (node-b).
"""

from __future__ import annotations

import re
import time

import pytest

import cluster as C
from cluster import endpoint, endpoint_slice, node_ip, service, svc_port, wait_until

CIP4, CIP6, LB = "172.30.40.1", "fd00:30::40", "192.0.2.140"
NODEPORT = 31400
FAMILIES = ("ip", "ip6")
REPAIR_BOUND = 1.0  # seconds: "repaired within 1 s" (the requirement)


def dual_stack(svc: dict, v6: str) -> dict:
    spec = svc["spec"]
    spec["clusterIPs"] = [spec["clusterIP"], v6]
    spec["ipFamilies"] = ["IPv4", "IPv6"]
    spec["ipFamilyPolicy"] = "RequireDualStack"
    return svc


def ok_reply(ns: C.Netns, proto: str, dst: str, port: int):
    def pred():
        r = ns.request(proto, dst, port, timeout=0.5)
        return r if r.ok else None
    return pred


def tables(ns: C.Netns) -> dict[str, str]:
    return {f: ns.nft_table(f) for f in FAMILIES}


def stable_tables(ns: C.Netns) -> dict[str, str]:
    """The tables once two listings 200 ms apart agree (the agent has settled)."""
    def settled():
        a = tables(ns)
        time.sleep(0.2)
        b = tables(ns)
        return a if a == b and all(a.values()) else None
    return wait_until(settled, 5, what="node-a's tables to settle")


def first_difference(a: str, b: str) -> str:
    al, bl = a.splitlines(), b.splitlines()
    for i, (x, y) in enumerate(zip(al, bl)):
        if x != y:
            return f"line {i + 1}: before {x.strip()!r}, now {y.strip()!r}"
    return f"before {len(al)} lines, now {len(bl)} lines"


@pytest.fixture
def drift_service(cluster, k8s):
    """Service d40 programmed and traffic flowing; returns node-a's settled tables."""
    ports = [svc_port("tcp", 80, "TCP", NODEPORT), svc_port("udp", 80, "UDP", NODEPORT)]
    k8s.apply(dual_stack(service("d40", ports, type="LoadBalancer", cluster_ip=CIP4,
                                 lb_ips=(LB,)), CIP6),
              endpoint_slice("d40", [endpoint("a1"), endpoint("b1")], ports),
              endpoint_slice("d40", [endpoint("a1", 6), endpoint("b1", 6)], ports, family=6))
    ca, ext = cluster.pod("ca"), cluster.ns("ext")
    wait_until(ok_reply(ca, "TCP", CIP4, 80), 5, what="d40 ClusterIP")
    wait_until(ok_reply(ca, "TCP", CIP6, 80), 5, what="d40 IPv6 ClusterIP")
    wait_until(ok_reply(ext, "TCP", LB, 80), 5, what="d40 LB IP")
    agent = cluster.agents["node-a"]
    assert agent.running(), "node-a's agent is not running"
    return stable_tables(agent.ns)


def check_traffic(cluster: C.Cluster, what: str) -> None:
    ca, ext = cluster.pod("ca"), cluster.ns("ext")
    for proto in ("TCP", "UDP"):
        for dst in (CIP4, CIP6):
            r = ca.request(proto, dst, 80)
            assert r.ok and r.pod in ("a1", "b1"), f"{what}: {proto} ca -> {dst}:80: {r}"
        r = ext.request(proto, LB, 80)
        assert r.ok and r.pod in ("a1", "b1"), f"{what}: {proto} ext -> {LB}:80: {r}"
        r = ext.request(proto, node_ip("node-a"), NODEPORT)
        assert r.ok and r.pod in ("a1", "b1"), f"{what}: {proto} ext -> NodePort {NODEPORT}: {r}"


# (id, nft arguments, regex the drift warning must match: what was changed)
CHANGES = [
    ("flush-set", ["flush", "set", "ip", "nftproxy", "clusterip"],
     r"ip set clusterip\b.*172\.30\.40\.1"),
    ("delete-element", ["delete", "element", "ip", "nftproxy", "ip-cluster-backends",
                        "{ 172.30.40.1 . tcp . 80 . 0 }"],
     r"ip (set|map) ip-cluster-backends\b.*172\.30\.40\.1"),
    ("add-foreign-element", ["add", "element", "ip", "nftproxy", "clusterip",
                             "{ 172.30.40.99 . tcp . 80 }"],
     r"ip set clusterip\b.*172\.30\.40\.99"),
    ("flush-chain", ["flush", "chain", "ip", "nftproxy", "services"],
     r"ip chain services\b"),
    ("insert-rule", ["insert", "rule", "ip", "nftproxy", "services", "ip daddr", CIP4, "drop"],
     r"ip chain services\b"),
    ("delete-table", ["delete", "table", "ip", "nftproxy"],
     r"ip table\b"),
    ("ip6-flush-set", ["flush", "set", "ip6", "nftproxy", "clusterip"],
     r"ip6 set clusterip\b.*fd00:30::40"),
]


@pytest.mark.parametrize("nft_args,finding", [c[1:] for c in CHANGES], ids=[c[0] for c in CHANGES])
def test_outside_change_is_repaired(cluster, k8s, drift_service, timings, nft_args, finding):
    agent = cluster.agents["node-a"]
    node = agent.ns
    before = drift_service
    drift_before = agent.metric("nftproxy_ruleset_drift_total")
    mark = agent.log_mark()

    t0 = time.monotonic()
    node.nft(*nft_args)
    t_changed = time.monotonic()
    polls = []

    def restored():
        now = tables(node)
        polls.append(now)
        return now == before
    try:
        wait_until(restored, REPAIR_BOUND, 0.005, what="the tables to be restored")
    except AssertionError:
        last = polls[-1] if polls else {}
        diffs = {f: first_difference(before[f], last.get(f, "")) for f in FAMILIES
                 if last.get(f) != before[f]}
        pytest.fail(f"`nft {' '.join(nft_args)}` not repaired within {REPAIR_BOUND}s: {diffs}\n"
                    f"agent log since the change:\n{agent.log_since(mark)[-3000:]}", pytrace=False)
    took = time.monotonic() - t0
    timings(f"{' '.join(nft_args[:2])}: tables listed as before {took * 1000:.0f} ms after "
            f"starting `nft` (the nft process itself took {(t_changed - t0) * 1000:.0f} ms)")

    # the agent saw it, named it, and shows it repaired
    log = wait_until(lambda: (lambda t: t if "ruleset drift repaired" in t else None)(
        agent.log_since(mark)), 1, what="`ruleset drift repaired` in the agent log")
    warnings = [line for line in log.splitlines() if "WARN" in line and "ruleset drift" in line]
    assert warnings, f"no `ruleset drift` warning; log:\n{log}"
    assert any(re.search(finding, w) for w in warnings), \
        f"no drift warning matches {finding!r}:\n" + "\n".join(warnings)
    agent_ms = _agent_repair_ms(log)
    if agent_ms is not None:
        timings(f"{' '.join(nft_args[:2])}: agent log, drift warning -> repaired: {agent_ms:.1f} ms")

    check_traffic(cluster, f"after `nft {' '.join(nft_args)}` was repaired")
    status, body = wait_until(lambda: (lambda s: s if s[0] == 200 else None)(agent.healthz_status()),
                              1, what="/healthz 200 after the repair")
    assert "unrepairedDrift" not in body, body

    try:
        wait_until(lambda: agent.metric("nftproxy_ruleset_drift_total") > drift_before, 1, 0.05)
    except AssertionError:
        pytest.fail(f"nftproxy_ruleset_drift_total stayed at "
                    f"{agent.metric('nftproxy_ruleset_drift_total'):g} (was {drift_before:g} before "
                    f"the change) although the agent logged and repaired the drift", pytrace=False)


_TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:(\d\d\.\d+))Z")


def _agent_repair_ms(log: str) -> float | None:
    """From the first drift warning to `ruleset drift repaired`, by the log's own timestamps
    (same minute assumed; None otherwise)."""
    start = end = None
    for line in log.splitlines():
        m = _TS.match(line)
        if not m:
            continue
        if start is None and "WARN" in line and "ruleset drift" in line:
            start = m
        elif start is not None and "ruleset drift repaired" in line:
            end = m
            break
    if not (start and end) or start.group(1)[:16] != end.group(1)[:16]:
        return None
    return (float(end.group(2)) - float(start.group(2))) * 1000


def test_drift_emits_warning_event_on_node(cluster, k8s, drift_service):
    """One outside change -> a Warning Event, reason NftproxyRulesetDrift, regarding Node
    node-a, reaches the API server."""
    agent = cluster.agents["node-a"]

    def drift_events():
        out = []
        for e in cluster.api.events():
            ref = e.get("regarding") or e.get("involvedObject") or {}
            if (e.get("reason") == "NftproxyRulesetDrift" and ref.get("kind") == "Node"
                    and ref.get("name") == "node-a"):
                out.append(e)
        return out
    def occurrences(evs):
        # An event recorder publishes a repeated event once and then counts it in its series
        # (events.k8s.io/v1 `series.count`), as kubectl describe shows ("x5 over 2m").
        return sum(((e.get("series") or {}).get("count") or 1) for e in evs)

    seen = occurrences(drift_events())
    mark = agent.log_mark()
    agent.ns.nft("flush", "set", "ip", "nftproxy", "clusterip")
    wait_until(lambda: "ruleset drift repaired" in agent.log_since(mark), 1,
               what="the agent to repair the drift")
    try:
        evs = wait_until(lambda: (lambda e: e if occurrences(e) > seen else None)(drift_events()), 3,
                         0.05, what="a NftproxyRulesetDrift Event about Node node-a")
    except AssertionError:
        all_events = [(e.get("reason"), e.get("type"), (e.get("regarding") or {}).get("name"))
                      for e in cluster.api.events()]
        pytest.fail(f"no NftproxyRulesetDrift Event about Node node-a within 3 s of the repair; "
                    f"events in the API: {all_events}; requests: "
                    f"{cluster.api.get('/control/requests')}", pytrace=False)
    ev = evs[-1]
    assert ev.get("type") == "Warning", ev
    if not (ev.get("series") or {}).get("count"):
        # A new event names this drift; a repeat of an earlier one (another test's drift) is
        # counted in that event's series and keeps its first note, as the API's events do.
        assert "clusterip" in (ev.get("note") or ev.get("message") or ""), ev
    assert "clusterip" in agent.log_since(mark), "the log names this drift"
