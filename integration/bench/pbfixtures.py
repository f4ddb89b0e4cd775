#!/usr/bin/env python3
"""Capture what a real kube-apiserver sends for the same Services and EndpointSlices as JSON and
as protobuf, for the agent's protobuf decoding test (src/k8s/testdata/, read by
`k8s::protobuf::tests`): that test checks that every object decoded from protobuf equals the
one decoded from JSON, field by field, as the model reads them.

The objects cover every field the model reads in both its set and unset forms: every Service
type, single- and dual-stack in both orders, IPv6-only, both traffic policies, health check
NodePorts, session affinity with and without a timeout, external IPs, LoadBalancer source
ranges, classes, ingress IPs with ipMode and port status, hostnames, unallocated NodePorts,
unnamed ports, app protocols, trafficDistribution; slices of both address families with every
endpoint condition (set, unset, false), node names, zones, zone and node hints, unnamed ports,
the last-change-trigger-time annotation.

    sudo NFTPROXY_K8S_DIR=/path/to/k8s python3 integration/bench/pbfixtures.py [--out DIR]

Needs root (its own network namespace), etcd and kube-apiserver 1.36 (as realapi.py does).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import realapi  # noqa: E402
from realapi import API, PREFIX, REG, Node, World, realnode, say  # noqa: E402

NS = "pbfix"


def services() -> list[dict]:
    def svc(name, spec, status=None):
        o = {"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": name, "namespace": NS, "labels": {"app": name},
                          "annotations": {"note": "kept in JSON and protobuf alike"}},
             "spec": spec}
        if status:
            o["status"] = status
        return o
    tcp = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
    return [
        svc("plain", {"ports": [{"port": 53, "protocol": "UDP", "targetPort": "dns"}]}),
        svc("dual", {"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"],
                     "ports": tcp, "sessionAffinity": "ClientIP",
                     "internalTrafficPolicy": "Local", "trafficDistribution": "PreferClose"}),
        svc("dual6", {"ipFamilyPolicy": "PreferDualStack", "ipFamilies": ["IPv6", "IPv4"],
                      "ports": tcp, "sessionAffinity": "ClientIP",
                      "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
        svc("v6", {"ipFamilyPolicy": "SingleStack", "ipFamilies": ["IPv6"], "ports": tcp,
                   "externalIPs": ["2001:db8::7"]}),
        svc("np", {"type": "NodePort", "externalTrafficPolicy": "Local",
                   "ports": [{"name": "a", "port": 80, "protocol": "TCP", "appProtocol": "http"},
                             {"name": "b", "port": 81, "protocol": "SCTP"}]}),
        svc("lb", {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                   "loadBalancerSourceRanges": ["203.0.113.0/24", "2001:db8:c::/48"],
                   "allocateLoadBalancerNodePorts": False, "loadBalancerClass": "example.com/lb",
                   "ports": tcp, "externalIPs": ["198.51.100.1"],
                   "publishNotReadyAddresses": True},
            {"loadBalancer": {"ingress": [
                {"ip": "192.0.2.1", "ipMode": "Proxy",
                 "ports": [{"port": 80, "protocol": "TCP", "error": "Pending"}]},
                {"ip": "192.0.2.2", "ipMode": "VIP"},
                {"hostname": "lb.example.com"}]}}),
        svc("lb-cluster", {"type": "LoadBalancer", "ports": tcp}),
        svc("headless", {"clusterIP": "None", "ports": tcp}),
        svc("external-name", {"type": "ExternalName", "externalName": "example.com"}),
    ]


def slices() -> list[dict]:
    def sl(name, family, endpoints, ports, trigger=False):
        meta = {"name": name, "namespace": NS,
                "labels": {"kubernetes.io/service-name": "dual",
                           "endpointslice.kubernetes.io/managed-by": "pbfixtures"}}
        if trigger:
            meta["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time":
                                   "2026-12-06T22:00:00Z"}
        return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": meta,
                "addressType": family, "endpoints": endpoints, "ports": ports}
    return [
        sl("v4", "IPv4", [
            {"addresses": ["10.0.0.1"], "conditions": {"ready": True, "serving": True,
                                                       "terminating": False},
             "nodeName": "bench-node", "zone": "z1",
             "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "bench-node"}]}},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": False, "serving": True,
                                                       "terminating": True},
             "nodeName": "other"},
            {"addresses": ["10.0.0.3"], "conditions": {}},
            {"addresses": ["10.0.0.4"]},
        ], [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}], True),
        sl("v6", "IPv6", [
            {"addresses": ["fd00::1"], "conditions": {"ready": True}, "zone": ""},
        ], [{"name": "", "port": 8080, "protocol": "TCP"}]),
        sl("noports", "IPv4", [{"addresses": ["10.0.0.5"], "conditions": {"serving": False}}],
           []),
        sl("empty", "IPv4", [], [{"port": 53, "protocol": "UDP"}]),
    ]


def get(api: realapi.Api, path: str, accept: str) -> bytes:
    c = api.conn()
    c.request("GET", path, headers={"Accept": accept})
    r = c.getresponse()
    data = r.read()
    if r.status != 200:
        raise RuntimeError(f"GET {path} -> {r.status}: {data[:300]!r}")
    return data


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "src", "k8s", "testdata"))
    a = ap.parse_args()
    k8s = realnode.find_k8s_dir()
    # Dual-stack, so that Services of both families (in both orders) can be created.
    realapi.SERVICE_RANGE = f"{realapi.SERVICE_RANGE},fd00:30::/112"
    workdir = tempfile.mkdtemp(prefix="nftproxy-pbfixtures-")
    run_args = argparse.Namespace(services=0, endpoints=0, agent_args="", agent_args_b=None)
    run = realapi.RealRun(run_args, 1, k8s, workdir, "")
    node = Node(f"{PREFIX}pbf", World(0, 0, 0, 0), workdir, "")
    try:
        node.create()
        run.control_plane(node)
        api = run.api
        api.must("POST", "/api/v1/namespaces",
                 {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        for o in services():
            status = o.pop("status", None)
            created = api.must("POST", f"/api/v1/namespaces/{NS}/services", o)
            if status:
                created["status"] = status
                api.must("PUT", f"/api/v1/namespaces/{NS}/services/{o['metadata']['name']}"
                         "/status", created)
        for o in slices():
            api.must("POST", f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices", o)
        os.makedirs(a.out, exist_ok=True)
        for name, path in (("services", f"/api/v1/namespaces/{NS}/services"),
                           ("endpointslices",
                            f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices")):
            for ext, accept in (("json", "application/json"),
                                ("pb", "application/vnd.kubernetes.protobuf")):
                data = get(api, path, accept)
                with open(os.path.join(a.out, f"{name}.{ext}"), "wb") as f:
                    f.write(data)
                say(f"{name}.{ext}: {len(data)} bytes")
        say(f"fixtures written to {a.out} (from {API})")
        return 0
    finally:
        for p in getattr(run, "procs", []):
            REG.stop_proc(p)
        node.stop()
        REG.cleanup()


if __name__ == "__main__":
    sys.exit(main())
