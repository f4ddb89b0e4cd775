"""The workload every real-node check uses, and small helpers (shared by the test modules)."""
from __future__ import annotations

import glob
import json
import re
import time

import realnode as R

NS = "rn"
LB_LOCAL, LB_CLUSTER = "192.0.2.10", "192.0.2.11"
WHO = "/cgi-bin/who"


def wait_until(what, fn, timeout=60, interval=0.5):
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout:
        try:
            last = fn()
            if last:
                return last
        except Exception as e:  # noqa: BLE001
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s: {what}; last: {last!r}")


def parse(body: str) -> dict:
    d = dict(kv.split("=", 1) for kv in body.split() if "=" in kv)
    if "peer" in d:  # busybox httpd listens on [::] and reports [::ffff:a.b.c.d]
        d["peer"] = d["peer"].strip("[]").removeprefix("::ffff:")
    return d


def svc(name, **spec):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS},
            "spec": {"selector": {"app": "echo"},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}], **spec}}


def pod_spec(cmd):
    return {"containers": [{"name": "c", "image": R.BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                            "command": cmd,
                            "env": [{"name": "POD_NAME",
                                     "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                            "readinessProbe": {"httpGet": {"path": "/index.html", "port": 8080},
                                               "periodSeconds": 1}
                            if "httpd" in cmd else None}],
            "terminationGracePeriodSeconds": 1, "enableServiceLinks": False}


def echo_pods(rn) -> set[str]:
    return {p["metadata"]["name"] for p in rn.kubectl_json("-n", NS, "get", "pods", "-l",
                                                         "app=echo")["items"]}


def node_addresses(rn) -> set[str]:
    out = rn.node_sh("ip", "-o", "-4", "addr", "show").stdout
    return set(re.findall(r"inet (\S+)/", out))


def in_client_pod(rn, script: str, timeout=60) -> str:
    return rn.kubectl("-n", NS, "exec", "client", "--", "sh", "-c", script, timeout=timeout)


def http_via_nc(ip: str, port: int, n: int) -> str:
    # busybox wget crashes in pods; nc speaks the HTTP request itself
    return (f'for i in $(seq {n}); do printf "GET {WHO} HTTP/1.0\\r\\n\\r\\n" | '
            f'nc -w 3 {ip} {port} | tail -n 1; echo; done')


def agent_logs(rn, app: str = "nftproxy") -> str:
    text = ""
    for f in sorted(glob.glob(f"{rn.work}/pod-logs/kube-system_{app}-*/{app}/*.log")):
        text += open(f, errors="replace").read()
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def deploy_workload(rn) -> dict:
    """Namespace rn: the echo Deployment (2), the client pod, Services echo (ClusterIP),
    echo-local and echo-cluster (LoadBalancer, ETP Local / Cluster, LB IPs patched in).
    Returns {"svc": {name: Service}, "client_ip": ...}."""
    t0 = time.monotonic()
    rn.kubectl("create", "namespace", NS)
    # the default ServiceAccount must exist before pods are admitted
    wait_until("default ServiceAccount", lambda: rn.kubectl("-n", NS, "get", "sa", "default",
                                                            check=False).find("default") >= 0)
    rn.apply({"apiVersion": "apps/v1", "kind": "Deployment",
              "metadata": {"name": "echo", "namespace": NS},
              "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "echo"}},
                       "template": {"metadata": {"labels": {"app": "echo"}},
                                    "spec": pod_spec(["httpd", "-f", "-p", "8080", "-h", "/www"])}}})
    rn.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client", "namespace": NS},
              "spec": pod_spec(["sleep", "100000"])})
    rn.apply(svc("echo"))
    rn.apply(svc("echo-local", type="LoadBalancer", externalTrafficPolicy="Local"))
    rn.apply(svc("echo-cluster", type="LoadBalancer", externalTrafficPolicy="Cluster"))
    for name, ip in (("echo-local", LB_LOCAL), ("echo-cluster", LB_CLUSTER)):
        rn.kubectl("-n", NS, "patch", "svc", name, "--subresource=status", "--type=merge", "-p",
                   json.dumps({"status": {"loadBalancer": {"ingress": [{"ip": ip}]}}}))
    rn.kubectl("-n", NS, "rollout", "status", "deploy/echo", "--timeout=90s", timeout=100)
    rn.kubectl("-n", NS, "wait", "--for=condition=Ready", "pod/client", "--timeout=60s", timeout=70)
    w = {"svc": {s["metadata"]["name"]: s for s in rn.kubectl_json("-n", NS, "get", "svc")["items"]},
         "client_ip": rn.kubectl_json("-n", NS, "get", "pod", "client")["status"]["podIP"]}
    rn.timed("workload: echo Deployment (2), client pod, 3 Services Ready", t0)
    return w
