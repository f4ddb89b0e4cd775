"""nftproxy started exactly as kubeadm's DaemonSet starts kube-proxy: no subcommand, `--config`
pointing at a KubeProxyConfiguration (the `config.conf` kubeadm keeps in ConfigMap
kube-system/kube-proxy, here with this cluster's values), `--hostname-override`. The agent must
take its settings from the file (cluster CIDR, kubeconfig, health and metrics addresses, sync
periods), pass traffic, let flags win over the file, and exit when the file changes (as
kube-proxy does, so the pod restarts with the new settings)."""

from __future__ import annotations

import json
import os
import time

import pytest

import cluster as C
from kubeadm import kubeadm_config
from cluster import endpoint, endpoint_slice, node_ip, service, svc_port, wait_until



@pytest.fixture
def kubeadm_agent(cluster):
    a = cluster.agents["node-a"]
    path = os.path.join(cluster.workdir, "kube-proxy-config.conf")
    with open(path, "w") as f:
        # kubeadm's file with what differs on this cluster (API access, pod CIDRs, where the
        # health server may listen in node-a's namespace) and values to see in force
        f.write(kubeadm_config({
            "clientConnection.kubeconfig": cluster.kubeconfig,
            "clusterCIDR": C.CLUSTER_CIDR,
            "healthzBindAddress": f"{node_ip('node-a')}:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            "nftables.syncPeriod": "1m30s",
            "oomScoreAdj": "-999",
        }))
    a.stop()
    # kubeadm's file asks for kube-proxy's conntrack defaults, which the agent sets in node-a's
    # network namespace (the timeouts are per namespace): put them back afterwards, so later
    # tests run with the namespace's own values.
    sysctls = [f"/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_{t}"
               for t in ("established", "close_wait")]
    saved = {f: a.ns.exec(["cat", f]).stdout.strip() for f in sysctls}
    # kubeadm's DaemonSet: `kube-proxy --config=/var/lib/kube-proxy/config.conf
    # --hostname-override=$(NODE_NAME)`, only the binary swapped.
    a.argv_override = [cluster.bin, f"--config={path}", "--hostname-override=node-a"]
    try:
        yield a, path
    finally:
        a.stop()
        for f, v in saved.items():
            a.ns.exec(["sh", "-c", f"echo {v} > {f}"])
        a.argv_override = None
        a.restart_until_synced()


def test_started_like_kube_proxy_by_kubeadm(cluster, k8s, kubeadm_agent, timings):
    agent, path = kubeadm_agent
    took = agent.start(wait=True, timeout=20)
    timings(f"agent started with kube-proxy's kubeadm arguments: synced {took:.2f}s after start")
    log = agent.current_log()
    # The file's values are in force: the sync periods (1m30s, 1s) and the ignored sections.
    assert "configuration file: not used" in log and "iptables" in log, log[-3000:]
    # kubeadm's file asks for kube-proxy's conntrack defaults: the timeouts are set (they belong
    # to the network namespace); the table size is global, and this namespace is not the node's.
    assert "conntrack table size not set: not in the node's network namespace" in log, log[-3000:]
    assert "nf_conntrack_tcp_timeout_close_wait" in log, log[-3000:]
    ports = [svc_port("tcp", 80, "TCP")]
    k8s.apply(service("kp1", ports, cluster_ip="172.30.43.1"),
              endpoint_slice("kp1", [endpoint("b1")], ports))
    ca = cluster.pod("ca")
    wait_until(lambda: ca.tcp_request("172.30.43.1", 80, timeout=0.5).pod == "b1", 5,
               what="a ClusterIP programmed by the agent configured from the file")
    # The pod's source stays its own (clusterCIDR from the file: pod traffic, no masquerade).
    rep = ca.tcp_request("172.30.43.1", 80)
    assert rep.peer == C.pod_ip("ca"), rep
    # Health on the file's healthzBindAddress.
    assert agent.healthz_status()[0] == 200


def test_the_agent_exits_when_its_config_file_changes(cluster, kubeadm_agent):
    agent, path = kubeadm_agent
    agent.start(wait=True, timeout=20)
    with open(path, "a") as f:
        f.write("# changed\n")
    t0 = time.monotonic()
    wait_until(lambda: not agent.running(), 10, 0.1, what="the agent to exit after the change")
    assert "configuration file" in agent.current_log()[-2000:] and "changed" in agent.current_log()[-2000:]
    assert time.monotonic() - t0 < 10


def test_a_bad_config_file_is_a_clear_error(cluster, kubeadm_agent):
    agent, path = kubeadm_agent
    with open(path, "w") as f:
        f.write("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
                "mode: ipvs\n")
    agent.start(wait=False)
    wait_until(lambda: not agent.running(), 10, 0.1, what="the agent to refuse the file")
    log = agent.current_log()
    assert "mode" in log and "nftables" in log and path in log, log[-2000:]


# What the kubernetes-mixin "Kubernetes / Proxy" dashboard and its alerts query, plus what
# kube-proxy (nftables mode) registers from its start (pkg/proxy/metrics/metrics.go).
KUBE_PROXY_SERIES = [
    "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
    "kubeproxy_sync_proxy_rules_duration_seconds_count",
    "kubeproxy_network_programming_duration_seconds_bucket",
    "kubeproxy_network_programming_duration_seconds_count",
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
    "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
    "kubeproxy_sync_proxy_rules_endpoint_changes_total",
    "kubeproxy_sync_proxy_rules_service_changes_pending",
    "kubeproxy_sync_proxy_rules_service_changes_total",
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
    "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
    "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total",
    "kubeproxy_proxy_healthz_total",
    "kubeproxy_proxy_livez_total",
    "rest_client_requests_total",
    "rest_client_request_duration_seconds_bucket",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_start_time_seconds",
]


def test_kube_proxy_metrics_proxy_mode_configz_and_start_event(cluster, k8s, kubeadm_agent):
    agent, _ = kubeadm_agent
    started = time.time()
    agent.start(wait=True, timeout=20)
    samples = agent.metrics()
    names = {n for n, _, _ in samples}
    missing = [n for n in KUBE_PROXY_SERIES if n not in names]
    assert not missing, f"kube-proxy metrics missing: {missing}"
    by = lambda name: [(l, v) for n, l, v in samples if n == name]
    # The sync histogram has kube-proxy's buckets (1 ms doubling to 16.384 s), and a sync ran.
    les = sorted(float(l["le"]) for l, _ in by("kubeproxy_sync_proxy_rules_duration_seconds_bucket")
                 if l["le"] != "+Inf")
    assert les[0] == 0.001 and les[-1] == 16.384 and len(les) == 15, les
    assert sum(v for _, v in by("kubeproxy_sync_proxy_rules_duration_seconds_count")) >= 1
    # Counters exist from the start, labelled as kube-proxy labels them.
    assert {l["traffic_policy"] for l, _ in by("kubeproxy_sync_proxy_rules_no_local_endpoints_total")} \
        == {"internal", "external"}
    assert {l["code"] for l, _ in by("kubeproxy_proxy_healthz_total")} >= {"200", "503"}
    # The API client's requests, by code, host and method (the dashboard's request rate panel).
    reqs = by("rest_client_requests_total")
    assert any(l.get("method") == "GET" and l.get("code") == "200" and l.get("host") for l, _ in reqs), reqs
    assert sum(v for _, v in by("process_resident_memory_bytes")) > 1 << 20
    assert abs(sum(v for _, v in by("process_start_time_seconds")) - started) < 30
    # A Service change is counted and the last sync time moves.
    before = agent.metric("kubeproxy_sync_proxy_rules_service_changes_total")
    ports = [svc_port("tcp", 80, "TCP")]
    k8s.apply(service("kpm", ports, cluster_ip="172.30.43.2"),
              endpoint_slice("kpm", [endpoint("b1")], ports))
    wait_until(lambda: agent.metric("kubeproxy_sync_proxy_rules_service_changes_total") > before, 5,
               what="the Service change counted")
    agent.healthz_status()
    assert agent.metric("kubeproxy_proxy_healthz_total") >= 1
    # /proxyMode and /configz on the metrics port, as kube-proxy serves them.
    status, headers, body = agent.ns.http_get("127.0.0.1", 10249, "/proxyMode")
    assert (status, body) == (200, b"nftables"), (status, body)
    assert headers["content-type"].startswith("text/plain")
    status, headers, body = agent.ns.http_get("127.0.0.1", 10249, "/configz")
    assert status == 200 and headers["content-type"] == "application/json", (status, headers)
    conf = json.loads(body)["kubeproxy.config.k8s.io"]
    assert conf["mode"] == "nftables" and conf["hostnameOverride"] == "node-a", conf
    assert conf["clusterCIDR"] == C.CLUSTER_CIDR and conf["nftables"]["syncPeriod"] == "1m30s", conf
    # The Normal event kube-proxy emits on its Node at start.
    def starting():
        return [e for e in cluster.api.events()
                if e.get("reason") == "Starting" and e.get("type") == "Normal"
                and (e.get("regarding") or {}).get("name") == "node-a"
                and e.get("action") == "StartKubeProxy"]
    wait_until(starting, 5, what="a Normal Starting event on the Node")
