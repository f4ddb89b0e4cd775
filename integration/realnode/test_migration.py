"""Migrating a running kube-proxy (nftables mode) to nftproxy, as the README's "Migrating from
kube-proxy" tells an operator, on a cluster of its own.

The cluster starts the way kubeadm leaves it: kube-proxy v1.36.2 as kubeadm's DaemonSet (same
manifest, arguments and mounts), its ConfigMap ``kube-system/kube-proxy`` (``config.conf`` with
``mode: nftables``, ``kubeconfig.conf`` naming the API server) and its RBAC. Traffic is checked
through kube-proxy first. Then, with three request streams running the whole time (outside -> LB
IP with ETP Cluster and Local, node -> ClusterIP), the README's side-by-side steps: copy the
ConfigMap to ``nftproxy-config``, apply ``deploy/rbac.yaml`` and ``deploy/daemonset.yaml``, wait
for the rollout, delete kube-proxy's DaemonSet and ConfigMap, ``nftproxy cleanup --kube-proxy``
from the nftproxy pod. No request may fail; afterwards kube-proxy's table is gone, nftproxy's
serves alone (a scale-up reaches the new pod), the client address is kept for ETP Local, and the
health-check and metrics ports are nftproxy's.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

import realnode as R
from conftest import cluster

sys.path.insert(0, os.path.dirname(R.HERE))  # integration/: kubeadm's file, shared
from kubeadm import kubeadm_config  # noqa: E402
from workload import (LB_CLUSTER, LB_LOCAL, NS, WHO, agent_logs, deploy_workload, echo_pods,
                      parse, wait_until)

KS = ("-n", "kube-system")

# kubeadm 1.36's kube-proxy ConfigMap (`kubeadm init` with podSubnet 10.244.0.0/16 and
# `mode: nftables`; tests/fixtures/kubeadm-config.conf). conntrack as kind writes it: a node in
# a network namespace cannot raise the global nf_conntrack_max, and 0 leaves the timeouts alone.
KUBEADM_CONFIG_CONF = kubeadm_config({
    "conntrack.maxPerCore": "0",
    "conntrack.tcpCloseWaitTimeout": "0s",
    "conntrack.tcpEstablishedTimeout": "0s",
})

KUBEADM_KUBECONFIG_CONF = f"""\
apiVersion: v1
kind: Config
clusters:
- cluster:
    certificate-authority: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt
    server: https://{R.NODE_IP}:6443
  name: default
contexts:
- context:
    cluster: default
    namespace: default
    user: default
  name: default
current-context: default
users:
- name: default
  user:
    tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token
"""


def kubeadm_kube_proxy(work: str) -> list[dict]:
    """kubeadm's kube-proxy addon (cmd/kubeadm/app/phases/addons/proxy/manifests.go). Only the
    two hostPaths differ: under the run's work dir instead of the host's /run/xtables.lock and
    /lib/modules (nothing outside the work dir is touched; this host has no /lib/modules)."""
    labels = {"k8s-app": "kube-proxy"}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "kube-proxy", "namespace": "kube-system"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "kubeadm:node-proxier"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "system:node-proxier"},
         "subjects": [{"kind": "ServiceAccount", "name": "kube-proxy",
                       "namespace": "kube-system"}]},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "kube-proxy", "namespace": "kube-system", "labels": {"app": "kube-proxy"}},
         "data": {"config.conf": KUBEADM_CONFIG_CONF, "kubeconfig.conf": KUBEADM_KUBECONFIG_CONF}},
        {"apiVersion": "apps/v1", "kind": "DaemonSet",
         "metadata": {"name": "kube-proxy", "namespace": "kube-system", "labels": labels},
         "spec": {
             "selector": {"matchLabels": labels},
             "updateStrategy": {"type": "RollingUpdate"},
             "template": {
                 "metadata": {"labels": labels},
                 "spec": {
                     "priorityClassName": "system-node-critical",
                     "containers": [{
                         "name": "kube-proxy", "image": R.KUBE_PROXY_IMAGE,
                         "imagePullPolicy": "IfNotPresent",
                         "command": ["/usr/local/bin/kube-proxy",
                                     "--config=/var/lib/kube-proxy/config.conf",
                                     "--hostname-override=$(NODE_NAME)"],
                         "securityContext": {"privileged": True},
                         "volumeMounts": [
                             {"mountPath": "/var/lib/kube-proxy", "name": "kube-proxy"},
                             {"mountPath": "/run/xtables.lock", "name": "xtables-lock"},
                             {"mountPath": "/lib/modules", "name": "lib-modules",
                              "readOnly": True}],
                         "env": [{"name": "NODE_NAME",
                                  "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                     }],
                     "hostNetwork": True,
                     "serviceAccountName": "kube-proxy",
                     "volumes": [
                         {"name": "kube-proxy", "configMap": {"name": "kube-proxy"}},
                         {"name": "xtables-lock",
                          "hostPath": {"path": f"{work}/xtables.lock", "type": "FileOrCreate"}},
                         {"name": "lib-modules", "hostPath": {"path": f"{work}/lib-modules",
                                                              "type": "DirectoryOrCreate"}}],
                     "tolerations": [{"operator": "Exists"}],
                     "nodeSelector": {"kubernetes.io/os": "linux"},
                 }}}},
    ]


def readme_block(needle: str) -> str:
    """The README's ```sh block that contains needle (so the test runs what users read)."""
    text = open(os.path.join(R.ROOT, "README.md")).read()
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        if needle in block:
            return "\n".join(line.strip() for line in block.split("\n"))
    raise AssertionError(f"README.md has no sh block with {needle!r}")


def tables(node) -> str:
    return node.node_sh("nft", "list", "tables").stdout


@pytest.fixture(scope="module")
def kp():
    """A fresh cluster with kube-proxy installed as kubeadm installs it, and the workload."""
    with cluster() as node:
        t0 = time.monotonic()
        for obj in kubeadm_kube_proxy(node.work):
            node.apply(obj)
        node.kubectl(*KS, "rollout", "status", "ds/kube-proxy", "--timeout=120s", timeout=130)
        wait_until("kube-proxy's table", lambda: "table ip kube-proxy" in tables(node), 60)
        node.timed("kube-proxy (kubeadm's DaemonSet, nftables mode) running", t0)
        w = deploy_workload(node)
        yield node, w


def test_kube_proxy_serves_before_the_migration(kp):
    node, w = kp
    assert "nftproxy" not in tables(node)
    ip = w["svc"]["echo"]["spec"]["clusterIP"]

    def both():
        a = node.client(node.ns_node, "many", f"http://{ip}{WHO}", "16")["answers"]
        ok = all(x.get("status") == 200 for x in a)
        return a if ok and {parse(x["body"])["pod"] for x in a} == echo_pods(node) else None
    wait_until("node -> ClusterIP through kube-proxy reaches both endpoints", both, timeout=60)
    a = node.client(node.ns_ext, "many", f"http://{LB_LOCAL}{WHO}", "6", R.CLIENT_IP)["answers"]
    assert {parse(x["body"]).get("peer") for x in a} == {R.CLIENT_IP}, a


def test_side_by_side_migration_loses_no_request(kp):
    node, w = kp
    stop = os.path.join(node.work, "migration.stop")
    cip = w["svc"]["echo"]["spec"]["clusterIP"]
    streams = {
        "outside -> LB IP (Cluster)": (node.ns_ext, f"http://{LB_CLUSTER}{WHO}", R.CLIENT_IP),
        "outside -> LB IP (Local)": (node.ns_ext, f"http://{LB_LOCAL}{WHO}", R.CLIENT_IP),
        "node -> ClusterIP": (node.ns_node, f"http://{cip}{WHO}", None),
    }
    procs = {k: subprocess.Popen(node.nsexec(ns, "python3", R.CLIENT, "stream", url, stop,
                                             *([src] if src else [])),
                                 stdout=subprocess.PIPE, text=True)
             for k, (ns, url, src) in streams.items()}
    steps: list[tuple[str, float]] = []

    def step(label, t0):
        steps.append((label, round(time.monotonic() - t0, 2)))
        node.timed(f"migration: {label}", t0)

    try:
        time.sleep(1)
        # 1. the settings: kubeadm's ConfigMap, both keys, as nftproxy-config
        t0 = time.monotonic()
        # (the README's command itself, with `kubectl` pointing at this cluster)
        readme = readme_block("create configmap nftproxy-config")
        node.node_sh("sh", "-ec", f"kubectl() {{ {node.k8s}/kubectl "
                     f"--kubeconfig={node.admin_kc} \"$@\"; }}\n{readme}")
        copied = node.kubectl_json(*KS, "get", "cm", "nftproxy-config")["data"]
        assert copied["config.conf"].strip() == KUBEADM_CONFIG_CONF.strip()
        assert copied["kubeconfig.conf"].strip() == KUBEADM_KUBECONFIG_CONF.strip()
        # 2. nftproxy next to kube-proxy (README: rbac.yaml and daemonset.yaml, not the
        # kustomization, whose configmap.yaml would replace the copy)
        node.kubectl("apply", "-f", os.path.join(R.ROOT, "deploy", "rbac.yaml"), "-f",
                     os.path.join(R.ROOT, "deploy", "daemonset.yaml"))
        node.kubectl(*KS, "rollout", "status", "ds/nftproxy", "--timeout=120s", timeout=130)
        wait_until("nftproxy's table next to kube-proxy's",
                   lambda: "table ip nftproxy" in tables(node), 60)
        assert "table ip kube-proxy" in tables(node)
        step("nftproxy running next to kube-proxy", t0)
        time.sleep(2)
        # 3. kube-proxy's DaemonSet and ConfigMap go (kubeadm upgrade reinstalls it otherwise)
        t0 = time.monotonic()
        node.kubectl(*KS, "delete", "ds", "kube-proxy", "--wait=true", timeout=60)
        node.kubectl(*KS, "delete", "cm", "kube-proxy")
        wait_until("kube-proxy pod gone", lambda: not node.kubectl_json(
            *KS, "get", "pods", "-l", "k8s-app=kube-proxy")["items"], 60)
        step("kube-proxy DaemonSet and ConfigMap deleted", t0)
        time.sleep(2)
        # 4. its leftovers, from the nftproxy pod
        t0 = time.monotonic()
        out = node.kubectl(*KS, "exec", "ds/nftproxy", "--", "nftproxy", "cleanup",
                           "--kube-proxy")
        print("cleanup --kube-proxy:", out)
        assert "deleted 2 nftables table(s)" in out, out
        step("nftproxy cleanup --kube-proxy", t0)
        time.sleep(3)
    finally:
        open(stop, "w").close()
    results = {k: json.loads(p.communicate(timeout=30)[0]) for k, p in procs.items()}
    print(json.dumps({"steps": steps, "streams": results}, indent=1))
    for k, r in results.items():
        assert r["ok"] > 50 and r["failed"] == 0, (k, r)
    t = tables(node)
    assert "kube-proxy" not in t and "table ip nftproxy" in t, t


def test_nftproxy_alone_after_the_migration(kp):
    node, w = kp
    ks = KS
    assert not node.kubectl(*ks, "get", "cm", "kube-proxy", check=False).startswith("NAME")
    # a change reaches the kernel through nftproxy alone: the third replica answers
    node.kubectl("-n", NS, "scale", "deploy/echo", "--replicas=3")
    node.kubectl("-n", NS, "rollout", "status", "deploy/echo", "--timeout=90s", timeout=100)
    ip = w["svc"]["echo"]["spec"]["clusterIP"]

    def three():
        a = node.client(node.ns_node, "many", f"http://{ip}{WHO}", "24")["answers"]
        pods = {parse(x["body"]).get("pod") for x in a if x.get("status") == 200}
        return pods if pods == echo_pods(node) and len(pods) == 3 else None
    wait_until("all three replicas answer", three, 60)
    a = node.client(node.ns_ext, "many", f"http://{LB_LOCAL}{WHO}", "6", R.CLIENT_IP)["answers"]
    assert {parse(x["body"]).get("peer") for x in a} == {R.CLIENT_IP}, a
    # the ports kube-proxy held are nftproxy's now: metrics answer with nftproxy's own series,
    # the Local Service's health check counts the local endpoints
    port = w["svc"]["echo-local"]["spec"]["healthCheckNodePort"]

    def health():
        r = node.client(node.ns_ext, "get", f"http://{R.NODE_IP}:{port}/healthz")
        return r if r.get("status") == 200 and json.loads(r["body"]).get("localEndpoints") == 3 \
            else None
    wait_until("healthCheckNodePort answers 3 local endpoints", health, 30)
    m = wait_until("nftproxy's metrics on :10249", lambda: (lambda r: r if "nftproxy_" in r.get(
        "body", "") else None)(node.client(node.ns_node, "get", "http://127.0.0.1:10249/metrics")),
        30)
    assert "kubeproxy_sync_proxy_rules_last_timestamp_seconds" in m["body"]
    logs = agent_logs(node)
    assert "forbidden" not in logs.lower(), [x for x in logs.split("\n") if "orbidden" in x][:5]
    # it read kube-proxy's files: the kubeconfig's server, kubeadm's cluster CIDR
    assert f"https://{R.NODE_IP}:6443" in logs, logs[-3000:]
    pods = node.kubectl_json(*ks, "get", "pods", "-l", "k8s-app=nftproxy")["items"]
    for p in pods:
        for c in p["status"].get("containerStatuses", []):
            assert c["restartCount"] == 0, c


def test_in_place_image_swap_loses_no_request(kp):
    """The README's other way: kubeadm's kube-proxy DaemonSet keeps everything (command,
    arguments, ConfigMap, ServiceAccount with kubeadm's system:node-proxier binding, privileged)
    but its image becomes nftproxy's. kube-proxy is put back first, as kubeadm had it."""
    node, w = kp
    node.kubectl(*KS, "delete", "ds", "nftproxy", "--wait=true", timeout=60)
    wait_until("nftproxy pod gone", lambda: not node.kubectl_json(
        *KS, "get", "pods", "-l", "k8s-app=nftproxy")["items"], 60)
    node.node_sh("nft", "delete", "table", "ip", "nftproxy")
    for obj in kubeadm_kube_proxy(node.work):
        node.apply(obj)
    node.kubectl(*KS, "rollout", "status", "ds/kube-proxy", "--timeout=120s", timeout=130)
    cip = w["svc"]["echo"]["spec"]["clusterIP"]

    def served():
        a = node.client(node.ns_node, "many", f"http://{cip}{WHO}", "12")["answers"]
        return all(x.get("status") == 200 for x in a) and "nftproxy" not in tables(node)
    wait_until("kube-proxy alone serves again", served, 60)

    stop = os.path.join(node.work, "inplace.stop")
    streams = {
        "outside -> LB IP (Local)": (node.ns_ext, f"http://{LB_LOCAL}{WHO}", R.CLIENT_IP),
        "node -> ClusterIP": (node.ns_node, f"http://{cip}{WHO}", None),
    }
    procs = {k: subprocess.Popen(node.nsexec(ns, "python3", R.CLIENT, "stream", url, stop,
                                             *([src] if src else [])),
                                 stdout=subprocess.PIPE, text=True)
             for k, (ns, url, src) in streams.items()}
    # The streams' error offsets count from here (to read them against the agent's log).
    streams_started = time.strftime("%H:%M:%S", time.gmtime())
    try:
        time.sleep(1)
        t0 = time.monotonic()
        node.kubectl(*KS, "set", "image", "ds/kube-proxy", f"kube-proxy={R.AGENT_IMAGE}")
        node.kubectl(*KS, "rollout", "status", "ds/kube-proxy", "--timeout=120s", timeout=130)
        wait_until("nftproxy's table", lambda: "table ip nftproxy" in tables(node), 60)
        node.timed("in place: set image -> nftproxy programs", t0)
        out = node.kubectl(*KS, "exec", "ds/kube-proxy", "--", "nftproxy", "cleanup",
                           "--kube-proxy")
        assert "deleted 2 nftables table(s)" in out, out
        time.sleep(3)
    finally:
        open(stop, "w").close()
    results = {k: json.loads(p.communicate(timeout=30)[0]) for k, p in procs.items()}
    print(json.dumps(results, indent=1))
    logs = agent_logs(node, app="kube-proxy")
    for k, r in results.items():
        assert r["ok"] > 30 and r["failed"] == 0, (k, r, f"streams started {streams_started} UTC",
                                                   logs[-6000:])
    t = tables(node)
    assert "kube-proxy" not in t and "table ip nftproxy" in t, t
    assert "nftables" in logs and "forbidden" not in logs.lower(), \
        [x for x in logs.split("\n") if "orbidden" in x][:5] or logs[-2000:]
    for p in node.kubectl_json(*KS, "get", "pods", "-l", "k8s-app=kube-proxy")["items"]:
        for c in p["status"].get("containerStatuses", []):
            assert c["image"].endswith(R.AGENT_IMAGE) and c["restartCount"] == 0, c
