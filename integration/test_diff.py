"""`nftproxy diff` on a real node: the live tables in node-a's namespace against what the agent
would program now (objects listed from the API server, or read with -f), with node-a's agent
flags.

* On a synced node: exit 0, "no differences".
* With the agent paused (SIGSTOP) and outside changes made with `nft` (a map element deleted, a
  foreign element added, a foreign rule inserted): exit 1, the Service port heading
  (`e2e/x41:tcp/tcp`), the missing element (`- ...`), the extra element (`+ ...`) and the changed
  chain (`~ ip chain services: ...`) are printed. A slice change in the API that the paused agent
  has not applied shows up too. After SIGCONT the agent repairs everything: exit 0 again.
* `-f objects` equal to the API's objects: exit 0 (control); with one extra Service: exit 1
  naming it. An unreadable kubeconfig: exit 2.

Objects: Service x41 (ClusterIP 172.30.41.1, TCP+UDP port 80), endpoints b1, b2.
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest

import cluster as C
from cluster import endpoint, endpoint_slice, pod_ip, service, svc_port, wait_until

CIP = "172.30.41.1"
PORTS = [svc_port("tcp", 80, "TCP"), svc_port("udp", 80, "UDP")]


def show(p) -> str:
    return f"exit {p.returncode}\n--- stdout ---\n{p.stdout}\n--- stderr ---\n{p.stderr}"


@pytest.fixture
def x41(cluster, k8s):
    k8s.apply(service("x41", PORTS, cluster_ip=CIP),
              endpoint_slice("x41", [endpoint("b1"), endpoint("b2")], PORTS))
    ca = cluster.pod("ca")
    wait_until(lambda: ca.tcp_request(CIP, 80, timeout=0.5).ok, 5, what="x41 ClusterIP")
    agent = cluster.agents["node-a"]
    # synced: diff agrees (the agent may still be finishing the sync that made traffic work)
    wait_until(lambda: agent.diff().returncode == 0, 5, 0.1, what="`nftproxy diff` exit 0")
    return agent


@pytest.fixture
def paused(cluster):
    """Pause node-a's agent on demand; always resumed at the end (also on failure)."""
    agent = cluster.agents["node-a"]
    yield agent
    agent.resume()


def test_diff_equal_on_synced_node(cluster, k8s, x41):
    p = x41.diff()
    assert p.returncode == 0, show(p)
    assert "no differences" in p.stdout, show(p)


def _outside_changes(node: C.Netns) -> None:
    node.nft("delete", "element", "ip", "nftproxy", "ip-cluster-backends",
             "{", CIP, ".", "tcp", ".", "80", ".", "0", "}")
    node.nft("add", "element", "ip", "nftproxy", "clusterip", "{ 172.30.41.99 . tcp . 80 }")
    node.nft("insert", "rule", "ip", "nftproxy", "services", "ip daddr 172.30.41.98 drop")


def _resume_and_wait_equal(agent: C.Agent, timings, what: str) -> str:
    """SIGCONT; wait (bounded) for diff exit 0; return the agent's log since the resume."""
    mark = agent.log_mark()
    t0 = time.monotonic()
    agent.resume()
    p = wait_until(lambda: (lambda q: q if q.returncode == 0 else None)(agent.diff()), 2, 0.02,
                   what="`nftproxy diff` exit 0 after SIGCONT")
    took = time.monotonic() - t0
    assert "no differences" in p.stdout, show(p)
    timings(f"{what}: diff exit 0 again {took * 1000:.0f} ms after SIGCONT")
    # the repair is the delta, found as drift: no failed commit, no rebuild
    log = agent.log_since(mark)
    assert "ruleset drift" in log and "sync failed" not in log and 'kind="full"' not in log, \
        f"{what}: after SIGCONT the agent should find the drift and commit only the delta; log:\n{log}"
    return log


def test_diff_names_outside_changes_until_repaired(cluster, k8s, x41, paused, timings):
    agent = paused
    agent.pause()
    _outside_changes(agent.ns)
    p = agent.diff()
    assert p.returncode == 1, show(p)
    out = p.stdout
    # the Service port heading, then the missing backend of slot 0
    m = re.search(r"^\S*e2e/x41:tcp/tcp\S*\s*$(.*?)(?=^\S|\Z)", out, re.M | re.S | re.I)
    assert m, f"no heading for e2e/x41:tcp/tcp:\n{show(p)}"
    section = m.group(1)
    assert re.search(rf"^\s*- ip ip-cluster-backends\b.*{re.escape(CIP)} \. tcp \. 80 \. 0\b",
                     section, re.M), f"the deleted element is not listed under x41:tcp:\n{show(p)}"
    assert re.search(r"^\s*\+ ip clusterip\b.*172\.30\.41\.99", out, re.M), \
        f"the foreign element is not listed as extra:\n{show(p)}"
    assert re.search(r"^\s*~ ip chain services:", out, re.M), \
        f"the changed chain is not listed:\n{show(p)}"
    assert "e2e/x41:udp/udp" not in out.lower(), f"the untouched UDP port is listed:\n{show(p)}"

    _resume_and_wait_equal(agent, timings, "outside changes while paused")
    r = cluster.pod("ca").tcp_request(CIP, 80)
    assert r.ok and r.pod in ("b1", "b2"), f"after the repair: {r}"


def test_diff_shows_unapplied_api_change_and_drift(cluster, k8s, x41, paused, timings):
    """Paused agent, outside changes AND a slice change in the API that touches the same map
    element (b1, b2 <-> b3): diff shows what the agent would program now; after SIGCONT the
    agent repairs the drift and applies the change (only the delta, no failed commit). Which of
    the two pending inputs the agent handles first is up to it, so this runs 4 rounds."""
    agent = paused
    for rnd, (new, gone) in enumerate([(["b3"], "b1"), (["b1", "b2"], "b3")] * 2):
        agent.pause()
        _outside_changes(agent.ns)
        k8s.apply(endpoint_slice("x41", [endpoint(x) for x in new], PORTS))
        want = pod_ip(new[0])
        p = wait_until(lambda: (lambda q: q if re.search(
            rf"^\s*- ip ip-cluster-backends\b.*{re.escape(want)}", q.stdout, re.M) else None)(
            agent.diff()), 3, 0.1, what=f"diff to show the new endpoint {new[0]} as missing")
        assert p.returncode == 1, show(p)
        assert re.search(rf"^\s*\+ ip ip-cluster-backends\b.*{re.escape(pod_ip(gone))}",
                         p.stdout, re.M), show(p)
        _resume_and_wait_equal(agent, timings, f"round {rnd + 1}: outside changes + slice "
                                               f"change while paused")
        r = cluster.pod("ca").tcp_request(CIP, 80)
        assert r.ok and r.pod in new, f"round {rnd + 1} after the repair: {r}"


def _api_objects(cluster: C.Cluster) -> list[dict]:
    """Everything the agent lists, as one List (kind/apiVersion put back on each item)."""
    out = []
    for path, api_version, kind in (
            ("/api/v1/nodes", "v1", "Node"),
            ("/api/v1/services", "v1", "Service"),
            ("/apis/discovery.k8s.io/v1/endpointslices", "discovery.k8s.io/v1", "EndpointSlice"),
            ("/apis/networking.k8s.io/v1/servicecidrs", "networking.k8s.io/v1", "ServiceCIDR")):
        for item in cluster.api.get(path).get("items", []):
            item.setdefault("apiVersion", api_version)
            item.setdefault("kind", kind)
            out.append(item)
    return out


def _write(cluster: C.Cluster, name: str, objs: list[dict]) -> str:
    path = os.path.join(cluster.workdir, name)
    with open(path, "w") as f:
        json.dump({"apiVersion": "v1", "kind": "List", "items": objs}, f)
    return path


def test_diff_with_objects_file(cluster, k8s, x41):
    objs = _api_objects(cluster)
    assert any(o["kind"] == "Service" and o["metadata"]["name"] == "x41" for o in objs), objs
    same = _write(cluster, "diff-same.json", objs)
    p = x41.diff("-f", same)
    assert p.returncode == 0, f"-f with the API's own objects:\n{show(p)}"

    extra = objs + [service("x41b", [svc_port("tcp", 81, "TCP")], cluster_ip="172.30.41.2"),
                    endpoint_slice("x41b", [endpoint("b1")], [svc_port("tcp", 81, "TCP")])]
    more = _write(cluster, "diff-extra.json", extra)
    p = x41.diff("-f", more)
    assert p.returncode == 1, f"-f with an extra Service:\n{show(p)}"
    assert re.search(r"e2e/x41b:tcp/tcp", p.stdout, re.I), show(p)
    assert re.search(r"^\s*- ip clusterip\b.*172\.30\.41\.2 \. tcp \. 81", p.stdout, re.M), show(p)
    assert "e2e/x41:" not in p.stdout.lower(), f"the unchanged Service is listed:\n{show(p)}"


def test_diff_error_exit_2(cluster, k8s, x41):
    p = x41.diff(kubeconfig=os.path.join(cluster.workdir, "no-such-kubeconfig"))
    assert p.returncode == 2, show(p)
    assert p.stderr.strip(), f"no error message:\n{show(p)}"
    bad = os.path.join(cluster.workdir, "diff-bad.yaml")
    with open(bad, "w") as f:
        f.write("kind: [unclosed\n")
    p = x41.diff("-f", bad)
    assert p.returncode == 2, show(p)


def test_diff_ignores_backend_slot_order(cluster, k8s, x41):
    """A synced node whose backend slots were assigned over time (b1 first, a1 added later)
    holds the same Service as a fresh agent would (slots are only the random pick's index):
    `nftproxy diff` must say equal. Traffic proves both endpoints are programmed."""
    ports = [svc_port("tcp", 80, "TCP")]
    k8s.apply(service("x41s", ports, cluster_ip="172.30.41.3"),
              endpoint_slice("x41s", [endpoint("b1")], ports))
    ca = cluster.pod("ca")
    wait_until(lambda: ca.tcp_request("172.30.41.3", 80, timeout=0.5).pod == "b1", 5,
               what="x41s -> b1")
    k8s.apply(endpoint_slice("x41s", [endpoint("a1"), endpoint("b1")], ports))
    wait_until(lambda: {ca.tcp_request("172.30.41.3", 80, timeout=0.5).pod for _ in range(20)}
               == {"a1", "b1"}, 5, what="x41s -> a1 and b1")
    time.sleep(0.2)
    slots = x41.ns.nft("list", "map", "ip", "nftproxy", "ip-cluster-backends")
    p = x41.diff()
    assert p.returncode == 0, (f"diff on a synced node:\n{show(p)}\nkernel map:\n"
                               + "\n".join(line for line in slots.splitlines() if "172.30.41.3" in line))
