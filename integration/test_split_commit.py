"""A cold start committed in pieces, by the real agent into a real kernel (own namespace, the
stand-in API server, the benchmark's single-node layout at a small size):

test_cold_start_in_pieces_programs_every_service:
  with `--max-transaction-elements 20` the first sync of 60 Services x 2 endpoints (~360
  element changes) goes to the kernel as many transactions (the agent's `synced` line counts
  them) and every Service's ClusterIP and every backend slot is there afterwards; a burst of
  endpoint changes after it commits in pieces too and lands whole.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "bench"))
import bench  # noqa: E402

SERVICES, ENDPOINTS, PIECE = 60, 2, 20


@pytest.fixture
def node(standin_node):
    return standin_node("sp", SERVICES, ENDPOINTS)


def all_programmed(node, deadline: float) -> None:
    world = node.world
    for i in range(world.n):
        cip = bench.ip(bench.SVC_BASE + i)
        while not (node.has_clusterip(cip)
                   and all(node.has_backend(cip, s) for s in range(len(world.eps[i])))):
            node.check_agent()
            assert time.monotonic() < deadline, f"Service {cip} never fully programmed"
            time.sleep(0.05)


def test_cold_start_in_pieces_programs_every_service(node):
    node.extra_args = ["--max-transaction-elements", str(PIECE)]
    node.start_apiserver(30)
    t = node.start_agent()
    node.wait_element(node.world.last_cip, t, 60)
    all_programmed(node, time.monotonic() + 30)
    first = node.wait_synced(1, 30)[0]
    assert first["kind"] == "full", first
    # ~360 element changes in pieces of about 20 (a Service's elements are never split).
    assert first["elements"] > 10 * PIECE, first
    assert first["transactions"] >= first["elements"] // (2 * PIECE), first
    # Every endpoint of every Service moves at once: one partial commit of many pieces.
    node.log.poll()
    n0 = len(node.log.synced)
    world = node.world
    objs = []
    for i in world.normal():
        world.eps[i] = [world.new_ip() for _ in world.eps[i]]
        objs.append(bench.slice_obj(i, world.eps[i]))
    node.apply(objs)
    want = {bench.ip(e) for i in world.normal() for e in world.eps[i]}
    deadline = time.monotonic() + 30
    while True:
        node.check_agent()
        listing = subprocess.run(
            ["ip", "netns", "exec", node.ns, "nft", "list", "map", "ip", "nftproxy",
             "ip-cluster-backends"], capture_output=True, text=True, check=True).stdout
        missing = [a for a in want if f"{a} . 8080" not in listing]
        if not missing:
            break
        assert time.monotonic() < deadline, f"{len(missing)} new endpoints never programmed"
        time.sleep(0.1)
    node.log.poll()
    later = node.log.synced[n0:]
    assert later and all(r["kind"] == "partial" for r in later), later
    assert any(r.get("transactions", 0) > 1 for r in later), later
    all_programmed(node, time.monotonic() + 30)
