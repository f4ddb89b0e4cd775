"""Agent restarts on node-a: adoption of the tables left behind, and no traffic lost meanwhile.

test_restart_adopts_tables:
  node-a's agent is restarted (SIGTERM, start) with Services in place. The new process reads
  the tables back and logs `adopting the tables left by the previous agent; committing only the
  difference` (missing_elements=0 stale_elements=0), its first `synced` line is kind="partial"
  with a small ops count, `nft monitor` in node-a's namespace shows no table deleted or added,
  and the tables list as before. Then a slice changes (b1 -> b2) while the agent is stopped:
  the next start's adoption line counts that difference, its first commit is partial and small,
  and new connections go to b2.

test_restart_under_load:
  20 restarts of node-a's agent while an outside client (`ext`) keeps opening new TCP
  connections and sending UDP requests (fresh socket each) to an LB IP and to node-a's NodePort
  (Cluster policy, endpoints a1 on node-a and b1 on node-b), plus a long-lived UDP flow and three
  TCP connections held open across all restarts: zero failures. (The issue: 5 of 81 new TCP
  connections failed with EHOSTUNREACH in the second after a restart.)
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
import os

import pytest

import cluster as C
from cluster import endpoint, endpoint_slice, node_ip, pod_ip, service, svc_port, wait_until

ADOPT = "adopting the tables left by the previous agent"
_KV = re.compile(r'(\w+)=("[^"]*"|\S+)')


def fields(line: str) -> dict[str, str]:
    return {k: v.strip('"') for k, v in _KV.findall(line)}


def first_line(log: str, needle: str) -> str | None:
    return next((line for line in log.splitlines() if needle in line), None)


@pytest.fixture
def agent_a(cluster):
    a = cluster.agents["node-a"]
    yield a
    a.resume()
    if not a.running() or a.synced_count() == 0:
        a.restart_until_synced()


class NftMonitor:
    """`nft monitor` inside a namespace, output to a file; ready once it has seen a probe table
    of its own come and go."""

    def __init__(self, cluster: C.Cluster, ns: C.Netns, name: str):
        self.path = os.path.join(cluster.workdir, f"nft-monitor-{name}.log")
        # line-buffered: nft writes through stdio, block-buffered into a file otherwise
        self.proc = ns.popen(["stdbuf", "-oL", "nft", "monitor"], self.path)
        probe = "e2e_monitor_probe"
        def seen():
            ns.nft("add", "table", "ip", probe)
            ns.nft("delete", "table", "ip", probe)
            return probe in self.text()
        wait_until(seen, 5, 0.1, what="nft monitor to report")

    def text(self) -> str:
        with open(self.path, errors="replace") as f:
            return f.read()

    def mark(self) -> int:
        return len(self.text())

    def since(self, mark: int) -> str:
        return self.text()[mark:]

    def close(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(3)


@pytest.fixture
def monitor_a(cluster):
    m = NftMonitor(cluster, cluster.ns("node-a"), "node-a")
    yield m
    m.close()


def _restart(agent: C.Agent) -> tuple[float, str]:
    rc = agent.stop()
    assert rc == 0, f"agent exit code after SIGTERM: {rc}"
    took = agent.start(wait=True, timeout=15)
    return took, agent.current_log()


def test_restart_adopts_tables(cluster, k8s, agent_a, monitor_a, timings):
    ports = [svc_port("tcp", 80, "TCP"), svc_port("udp", 80, "UDP")]
    lbports = [svc_port("tcp", 80, "TCP", 31420)]
    k8s.apply(service("r42", ports, cluster_ip="172.30.42.1"),
              endpoint_slice("r42", [endpoint("b1")], ports),
              service("r42lb", lbports, type="LoadBalancer", cluster_ip="172.30.42.2",
                      lb_ips=("192.0.2.142",)),
              endpoint_slice("r42lb", [endpoint("a2"), endpoint("b2")], lbports))
    ca, ext = cluster.pod("ca"), cluster.ns("ext")
    wait_until(lambda: ca.tcp_request("172.30.42.1", 80, timeout=0.5).pod == "b1", 5,
               what="r42 ClusterIP")
    wait_until(lambda: ext.tcp_request("192.0.2.142", 80, timeout=0.5).ok, 5, what="r42lb LB IP")
    node = agent_a.ns
    wait_until(lambda: agent_a.diff().returncode == 0, 5, 0.1, what="node-a synced (diff 0)")
    before = {f: node.nft_table(f) for f in ("ip", "ip6")}

    # 1. nothing changed while down: adopt, commit (almost) nothing
    mark = monitor_a.mark()
    took, log = _restart(agent_a)
    adopt, synced = first_line(log, ADOPT), first_line(log, " synced ")
    assert adopt, f"no adoption line after a restart with tables in place:\n{log[-3000:]}"
    a, s = fields(adopt), fields(synced)
    timings(f"restart with nothing changed: synced {took:.2f}s after start; adoption "
            f"missing_elements={a.get('missing_elements')} stale_elements={a.get('stale_elements')}; "
            f"first commit kind={s.get('kind')} ops={s.get('ops')}")
    assert a.get("missing_elements") == "0" and a.get("stale_elements") == "0", adopt
    assert s.get("kind") == "partial", f"first sync after the restart: {synced}"
    assert int(s.get("ops", "999999")) <= 10, f"first commit after an unchanged restart: {synced}"
    mon = monitor_a.since(mark)
    assert not re.search(r"^(delete|add|flush) table ip6? nftproxy(?![-\w])", mon, re.M), \
        f"the restart deleted/recreated a table; nft monitor:\n{mon[:3000]}"
    assert {f: node.nft_table(f) for f in ("ip", "ip6")} == before, "tables changed by a restart"

    # 2. a slice changed while the agent was down: the first commit is only that difference
    agent_a.stop()
    k8s.apply(endpoint_slice("r42", [endpoint("b2")], ports))
    assert ca.tcp_request("172.30.42.1", 80).pod == "b1", "rules changed while the agent was down?"
    mark = monitor_a.mark()
    took = agent_a.start(wait=True, timeout=15)
    log = agent_a.current_log()
    adopt, synced = first_line(log, ADOPT), first_line(log, " synced ")
    assert adopt, f"no adoption line:\n{log[-3000:]}"
    a, s = fields(adopt), fields(synced)
    timings(f"restart after a slice change (b1 -> b2, TCP+UDP): synced {took:.2f}s after start; "
            f"adoption missing_elements={a.get('missing_elements')} "
            f"stale_elements={a.get('stale_elements')}; first commit kind={s.get('kind')} "
            f"ops={s.get('ops')} elements={s.get('elements')}")
    # b2 in, b1 out, for the TCP and the UDP port (backend map; hairpin/affinity sets untouched)
    assert int(a["missing_elements"]) >= 2 and int(a["stale_elements"]) >= 2, adopt
    assert s.get("kind") == "partial", f"first sync after the restart: {synced}"
    assert int(s.get("ops", "999999")) <= 10, f"first commit carries more than the change: {synced}"
    mon = monitor_a.since(mark)
    assert not re.search(r"^(delete|add|flush) table ip6? nftproxy(?![-\w])", mon, re.M), \
        f"the restart deleted/recreated a table; nft monitor:\n{mon[:3000]}"
    # the monitor is alive and saw the delta itself
    assert re.search(r"^(add|create) element ip nftproxy ip-cluster-backends .*10\.0\.2\.2", mon, re.M), \
        f"nft monitor did not see b2 being added:\n{mon[-3000:]}"
    for proto in ("TCP", "UDP"):
        r = ca.request(proto, "172.30.42.1", 80)
        assert r.ok and r.pod == "b2", f"{proto} after the restart: {r}"
    r = ext.tcp_request("192.0.2.142", 80)
    assert r.ok and r.pod in ("a2", "b2"), f"LB IP after the restart: {r}"
    p = agent_a.diff()
    assert p.returncode == 0, p.stdout + p.stderr


# --------------------------------------------------------------------------------------------

class Stream:
    """A thread sending one request after another (new TCP connection / fresh UDP socket each),
    recording (start time, Reply)."""

    def __init__(self, ns: C.Netns, proto: str, dst: str, port: int, gap: float = 0.01):
        self.what = f"{proto} {ns.short} -> {dst}:{port}"
        self.records: list[tuple[float, C.Reply]] = []
        self._stop = threading.Event()

        def loop():
            n = 0
            while not self._stop.is_set():
                n += 1
                t0 = time.monotonic()
                r = ns.request(proto, dst, port, payload=f"r{n}", timeout=1.0)
                self.records.append((t0, r))
                self._stop.wait(gap)
        self._thread = threading.Thread(target=loop, daemon=True, name=self.what)
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join(5)


# What in `nstat` says a packet met an error on its way (destination unreachable sent or
# received, no route, discards), not the neighbour discovery and MLD chatter of new links.
ERROR_COUNTERS = ("DestUnreach", "MsgInType3", "MsgOutType3", "TimeExcds", "MsgInType11",
                  "MsgOutType11", "NoRoutes", "AddrErrors", "Discards", "InErrors", "OutErrors")


def net_counters(cluster) -> dict[str, dict[str, int]]:
    """Per namespace, the ICMP and IP error counters (`nstat`, absolute, history untouched)."""
    out = {}
    for n in cluster.namespaces():
        r = n.exec(["nstat", "-asz"], check=False)
        vals = {}
        for line in r.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and any(w in parts[0] for w in ERROR_COUNTERS):
                vals[parts[0]] = int(parts[1])
        out[n.short] = vals
    return out


def net_report(cluster, before: dict[str, dict[str, int]], service_ip: str | None = None) -> str:
    """What changed in those counters since `before`, and every namespace's neighbour table:
    a request failing at once (EHOSTUNREACH in 0 ms) is an ICMP error or a neighbour entry in
    FAILED state somewhere on its path, not a rule (our rejects answer port-unreachable)."""
    after = net_counters(cluster)
    lines = []
    for ns, vals in after.items():
        moved = {k: v - before.get(ns, {}).get(k, 0) for k, v in vals.items()
                 if v != before.get(ns, {}).get(k, 0)}
        if moved:
            lines.append(f"  {ns}: " + ", ".join(f"{k} +{v}" for k, v in sorted(moved.items())))
    for n in cluster.namespaces():
        neigh = n.exec(["ip", "-s", "neigh", "show"], check=False).stdout.strip()
        bad = [l for l in neigh.splitlines() if "FAILED" in l or "INCOMPLETE" in l]
        if bad:
            lines.append(f"  {n.short} neighbours not reachable: " + "; ".join(bad))
    if service_ip:
        # Connections to the Service address that the node did not DNAT (the reply comes from
        # the address itself): a conntrack entry made before the address was programmed, which
        # a new connection with the same 4-tuple (a reused client port) would follow.
        for n in cluster.namespaces():
            r = n.exec(["conntrack", "-L", "-d", service_ip], check=False)
            plain = [l for l in r.stdout.splitlines() if f"src={service_ip} " in l]
            if plain:
                lines.append(f"  {n.short} conntrack entries to {service_ip} without DNAT: "
                             + "; ".join(plain[:5]) + (f" (+{len(plain) - 5})" if len(plain) > 5 else ""))
    return "counters that moved during the test, per namespace:\n" + ("\n".join(lines) or "  none")


def test_restart_under_load(cluster, k8s, agent_a, timings):
    ports = [svc_port("tcp", 80, "TCP", 31430), svc_port("udp", 80, "UDP", 31430)]
    LB = "192.0.2.143"
    k8s.apply(service("r43", ports, type="LoadBalancer", cluster_ip="172.30.43.1", lb_ips=(LB,)),
              endpoint_slice("r43", [endpoint("a1"), endpoint("b1")], ports))
    ext = cluster.ns("ext")
    NP = node_ip("node-a")
    for proto in ("TCP", "UDP"):
        for dst, port in ((LB, 80), (NP, 31430)):
            wait_until(lambda: ext.request(proto, dst, port, timeout=0.5).ok, 5,
                       what=f"{proto} {dst}:{port}")
    wait_until(lambda: agent_a.diff().returncode == 0, 5, 0.1, what="node-a synced (diff 0)")

    counters = net_counters(cluster)
    held = [ext.tcp_connection(LB, 80) for _ in range(3)]
    held_first = [c.exchange("open") for c in held]
    assert all(r.ok for r in held_first), [str(r) for r in held_first]
    flow = ext.udp_flow(LB, 80, interval=0.05)
    streams = [Stream(ext, "TCP", LB, 80), Stream(ext, "UDP", LB, 80),
               Stream(ext, "TCP", NP, 31430), Stream(ext, "UDP", NP, 31430)]
    events: list[tuple[int, float, float, float]] = []  # (restart, stop t, start t, synced t)
    held_fail, synced_took, first_commits = [], [], []
    t_begin = time.monotonic()
    try:
        time.sleep(0.3)
        for i in range(20):
            t_stop = time.monotonic()
            agent_a.stop()
            t_start = time.monotonic()
            took = agent_a.start(wait=True, timeout=15)
            events.append((i + 1, t_stop, t_start, time.monotonic()))
            synced_took.append(took)
            first_commits.append(first_line(agent_a.current_log(), " synced "))
            time.sleep(0.6)  # load runs on the freshly started agent
            for k, c in enumerate(held):
                r = c.exchange(f"restart{i + 1}")
                if not (r.ok and r.pod == held_first[k].pod):
                    held_fail.append(f"restart {i + 1}: held connection {k} ({c.local}): {r}")
        time.sleep(0.3)
    finally:
        for s in streams:
            s.stop()
        flow.stop()
        for c in held:
            c.close()
    t_end = time.monotonic()

    def phase(t: float) -> str:
        for n, ts, tst, tsy in events:
            if ts - 0.05 <= t < tst:
                return f"restart {n}: agent stopping/down (+{t - ts:.3f}s after SIGTERM)"
            if tst <= t < tsy:
                return f"restart {n}: started, not yet synced (+{t - tst:.3f}s after start)"
            if tsy <= t < tsy + 1.5:
                return f"restart {n}: +{t - tsy:.3f}s after its first sync"
        return "between restarts"

    failures, total = [], 0
    for s in streams:
        total += len(s.records)
        for t, r in s.records:
            if not r.ok:
                failures.append(f"{s.what} at +{t - t_begin:.3f}s [{phase(t)}]: {r}")
    flow_recs = flow.since(0)
    flow_fail = [f"UDP flow {flow.local} at +{t - t_begin:.3f}s [{phase(t)}]: {r}"
                 for t, r in flow_recs if not r.ok]
    ops = [fields(x).get("ops") if x else None for x in first_commits]
    kinds = {fields(x).get("kind") if x else None for x in first_commits}
    timings(f"20 restarts under load in {t_end - t_begin:.1f}s: {total} requests "
            f"({', '.join(f'{s.what}: {len(s.records)}' for s in streams)}), UDP flow "
            f"{len(flow_recs)} datagrams; restart -> synced "
            f"min {min(synced_took):.2f}s / max {max(synced_took):.2f}s; first commit kinds "
            f"{sorted(map(str, kinds))}, ops {ops}")
    problems = failures + flow_fail + held_fail
    if problems:
        pytest.fail(f"{len(problems)} failures during 20 restarts "
                    f"({len(failures)} of {total} new requests, {len(flow_fail)} UDP flow "
                    f"datagrams, {len(held_fail)} held TCP exchanges):\n"
                    + "\n".join(problems[:60]) + "\n" + net_report(cluster, counters, LB),
                    pytrace=False)


def test_restart_adopts_history_dependent_slots(cluster, k8s, agent_a, timings):
    """Backend slots assigned over time (b1 first, a1 added later: b1 keeps slot 0) are as good
    as any other order: a restarted agent adopts them with a partial commit of at most the
    slot swap (reported: whether it rewrites them at all)."""
    ports = [svc_port("tcp", 80, "TCP")]
    k8s.apply(service("r44", ports, cluster_ip="172.30.44.1"),
              endpoint_slice("r44", [endpoint("b1")], ports))
    ca = cluster.pod("ca")
    wait_until(lambda: ca.tcp_request("172.30.44.1", 80, timeout=0.5).pod == "b1", 5, what="r44")
    k8s.apply(endpoint_slice("r44", [endpoint("a1"), endpoint("b1")], ports))
    wait_until(lambda: {ca.tcp_request("172.30.44.1", 80, timeout=0.5).pod for _ in range(20)}
               == {"a1", "b1"}, 5, what="r44 -> a1 and b1")
    time.sleep(0.2)
    took, log = _restart(agent_a)
    adopt, synced = first_line(log, ADOPT), first_line(log, " synced ")
    assert adopt, f"no adoption line:\n{log[-3000:]}"
    a, s = fields(adopt), fields(synced)
    timings(f"restart with history-dependent slots: adoption missing_elements="
            f"{a.get('missing_elements')} stale_elements={a.get('stale_elements')}; first commit "
            f"kind={s.get('kind')} ops={s.get('ops')} elements={s.get('elements')}")
    # Seen with this build: missing_elements=2 stale_elements=2, ops=2 -- the new process plans
    # slots from scratch (a1 -> 0, b1 -> 1) and swaps both backends in one commit. Harmless for
    # traffic (atomic; conntrack keeps existing flows), so only a rebuild fails this test; the
    # counts are reported. (`nftproxy diff` has the same blind spot: test_diff.py.)
    assert s.get("kind") == "partial" and int(s.get("ops", "999999")) <= 4, \
        f"the restart rebuilt more than the slot order:\n{adopt}\n{synced}"
