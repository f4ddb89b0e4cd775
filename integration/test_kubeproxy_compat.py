"""nftproxy started exactly as kubeadm's DaemonSet starts kube-proxy: no subcommand, `--config`
pointing at a KubeProxyConfiguration (the `config.conf` kubeadm keeps in ConfigMap
kube-system/kube-proxy, here with this cluster's values), `--hostname-override`. The agent must
take its settings from the file (cluster CIDR, kubeconfig, health and metrics addresses, sync
periods), pass traffic, let flags win over the file, and exit when the file changes (as
kube-proxy does, so the pod restarts with the new settings)."""

from __future__ import annotations

import os
import time

import pytest

import cluster as C
from cluster import endpoint, endpoint_slice, node_ip, service, svc_port, wait_until

CONFIG = """apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: {kubeconfig}
  qps: 0
clusterCIDR: {cluster_cidr}
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: {healthz}
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: 127.0.0.1:10249
mode: nftables
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 1s
  syncPeriod: 1m30s
nodePortAddresses: null
oomScoreAdj: -999
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"""


@pytest.fixture
def kubeadm_agent(cluster):
    a = cluster.agents["node-a"]
    path = os.path.join(cluster.workdir, "kube-proxy-config.conf")
    with open(path, "w") as f:
        f.write(CONFIG.format(kubeconfig=cluster.kubeconfig, cluster_cidr=C.CLUSTER_CIDR,
                              healthz=f"{node_ip('node-a')}:10256"))
    a.stop()
    # kubeadm's DaemonSet: `kube-proxy --config=/var/lib/kube-proxy/config.conf
    # --hostname-override=$(NODE_NAME)`, only the binary swapped.
    a.argv_override = [cluster.bin, f"--config={path}", "--hostname-override=node-a"]
    try:
        yield a, path
    finally:
        a.stop()
        a.argv_override = None
        a.restart_until_synced()


def test_started_like_kube_proxy_by_kubeadm(cluster, k8s, kubeadm_agent, timings):
    agent, path = kubeadm_agent
    took = agent.start(wait=True, timeout=20)
    timings(f"agent started with kube-proxy's kubeadm arguments: synced {took:.2f}s after start")
    log = agent.current_log()
    # The file's values are in force: the sync periods (1m30s, 1s) and the ignored sections.
    assert "configuration file: not used" in log and "iptables" in log, log[-3000:]
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
