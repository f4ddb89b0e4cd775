"""How the agent receives its initial lists, against the stand-in API server in a namespace of
its own (the benchmark's single-node layout, at a small size):

test_streams_initial_lists:
  the API server serves streaming lists (watch + sendInitialEvents, as kube-apiserver 1.36
  does): the agent's log says each list was received `listing=Streaming` with every object,
  and every Service's ClusterIP and backends reach the kernel. The stand-in answers JSON to the
  agent's protobuf requests: the agent falls back to JSON for good and says so.

test_pages_when_the_api_refuses_to_stream:
  the API server answers a streaming list with 422 Invalid (kube-apiserver with the WatchList
  gate off, or older than 1.27): the agent says it pages from now on, receives every list
  `listing=Paging`, and programs the same rules. Without the fallback the watches would retry
  the refused request forever and nothing would be programmed.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "bench"))
import bench  # noqa: E402  (one node in a namespace: stand-in API server, agent, element polling)

SERVICES, ENDPOINTS = 60, 2


@pytest.fixture
def node(standin_node):
    return standin_node("ls", SERVICES, ENDPOINTS)


def run_agent(node) -> str:
    """Start the API server and the agent; wait for every Service's rules; the agent's log."""
    node.start_apiserver(30)
    t = node.start_agent()
    world = node.world
    node.wait_element(world.last_cip, t, 60)
    deadline = time.monotonic() + 30
    for i in range(world.n):
        cip = bench.ip(bench.SVC_BASE + i)
        while not (node.has_clusterip(cip) and node.has_backend(cip, len(world.eps[i]) - 1)):
            node.check_agent()
            assert time.monotonic() < deadline, f"Service {cip} never fully programmed"
            time.sleep(0.05)
    node.wait_synced(1, 30)
    with open(node.log.path) as f:
        return f.read()


def listed(log: str, resource: str) -> str:
    lines = [ln for ln in log.splitlines() if " list received" in ln and f'resource="{resource}"' in ln]
    assert lines, f"no `list received` line for {resource}:\n{log[-3000:]}"
    return lines[0]


def test_streams_initial_lists(node):
    log = run_agent(node)
    assert f"listing=Streaming objects={SERVICES}" in listed(log, "services")
    assert f"listing=Streaming objects={SERVICES}" in listed(log, "endpointslices")
    assert "does not stream initial lists" not in log
    # The stand-in answers in JSON only: the agent asked for protobuf first (as it does of
    # every API server) and reads JSON from then on, saying so once per kind.
    for kind in ("services", "endpointslices"):
        assert "encoding=Json" in listed(log, kind)
        assert any(f'resource="{kind}"' in ln and "does not answer in protobuf" in ln
                   for ln in log.splitlines()), log[-3000:]


def test_pages_when_the_api_refuses_to_stream(node):
    node.api_args = ["--no-streaming-lists"]
    log = run_agent(node)
    refusals = [ln for ln in log.splitlines() if "does not stream initial lists" in ln]
    assert any('resource="services"' in ln and "422" in ln for ln in refusals), log[-3000:]
    assert any('resource="endpointslices"' in ln for ln in refusals), log[-3000:]
    assert f"listing=Paging objects={SERVICES}" in listed(log, "services")
    assert f"listing=Paging objects={SERVICES}" in listed(log, "endpointslices")
