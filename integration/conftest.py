"""pytest glue for the privileged end-to-end tests (see README.md and cluster.py).

* ``cluster`` (session): the namespace cluster with both agents running; always destroyed at the
  end (fixture finalizer; ``atexit`` and SIGTERM/SIGHUP -> KeyboardInterrupt as backstops).
* ``k8s`` (per test): applies objects through the API server's control API and deletes them,
  and any LB route changes, when the test ends. It also marks the logs so that a failing test
  gets the agent/API server log lines written during it, plus nft rulesets and conntrack tables.
* ``timings``: measured latencies, printed in the terminal summary.
* ``standin_node``: makes the benchmark's single-node layout (stand-in API server, agent,
  element polling) in a namespace of its own, objects written, nothing started; removed after.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time

import pytest

import cluster as C

_MARKS = pytest.StashKey[dict]()
_TIMINGS: list[str] = []


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, _interrupt)


@pytest.fixture
def standin_node():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench"))
    import bench  # the benchmark's node: stand-in API server, agent, element polling

    made = []

    def make(short: str, services: int, endpoints: int):
        if os.geteuid() != 0:
            pytest.skip("needs root (network namespaces, nftables)")
        binary = os.environ.get("NFTPROXY_BIN", C.DEFAULT_BIN)
        if not os.access(binary, os.X_OK):
            pytest.fail(f"nftproxy binary {binary} missing: run `cargo build`", pytrace=False)
        workdir = tempfile.mkdtemp(prefix=f"nftproxy-{short}-")
        n = bench.Node(f"{bench.PREFIX}{short}", bench.World(services, endpoints, 0, 0),
                       workdir, binary)
        made.append((n, workdir))
        n.create()
        n.write_objects()
        return n

    try:
        yield make
    finally:
        for n, workdir in made:
            n.stop()
        bench.REG.cleanup()
        for _, workdir in made:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster(request):
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, nftables)")
    for tool in ("ip", "nft", "conntrack"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed")
    stale = C.stale_namespaces()  # of runs killed with SIGKILL
    if stale:
        C.delete_namespaces(stale)
    for p in C.stale_workdir_binaries():
        os.unlink(p)
    t0 = time.monotonic()
    try:
        c = C.Cluster()
    except FileNotFoundError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        c.create()
        _TIMINGS.append(f"cluster setup (namespaces, API server, 8 pods, 2 agents synced): "
                        f"{time.monotonic() - t0:.2f}s")
        yield c
    finally:
        c.destroy()
        if request.session.testsfailed or os.environ.get("NFTPROXY_E2E_KEEP"):
            _TIMINGS.append(f"logs kept in {c.workdir}")
        else:
            c.remove_workdir()


class K8s:
    def __init__(self, cluster: C.Cluster):
        self.cluster = cluster
        self.api = cluster.api
        self.created: list[tuple[str, str]] = []

    def apply(self, *objs: dict) -> dict:
        res = self.api.apply(*objs)
        for o in objs:
            key = (o["kind"], o["metadata"]["name"])
            if key not in self.created:
                self.created.append(key)
        return res

    def delete(self, kind: str, name: str) -> None:
        self.api.delete(kind, name)
        if (kind, name) in self.created:
            self.created.remove((kind, name))

    def cleanup(self) -> None:
        for kind, name in reversed(self.created):
            self.api.delete(kind, name)
        self.created.clear()


@pytest.fixture
def k8s(cluster, request):
    request.node.stash[_MARKS] = cluster.log_marks()
    k = K8s(cluster)
    yield k
    cluster.reset_lb_routes()
    k.cleanup()


@pytest.fixture
def timings(request):
    def record(text: str):
        _TIMINGS.append(f"{request.node.name}: {text}")
    return record


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when != "call" or not rep.failed or _MARKS not in item.stash:
        return
    c = item.funcargs.get("cluster")
    if c is None:
        return
    for name, text in c.logs_since(item.stash[_MARKS]).items():
        rep.sections.append((f"{name} (during this test)", text or "(nothing)"))
    try:
        rep.sections.append(("nft rulesets and conntrack tables at failure", c.diagnostics()))
    except Exception as e:  # diagnostics must never hide the failure
        rep.sections.append(("diagnostics failed", repr(e)))


def pytest_terminal_summary(terminalreporter):
    if _TIMINGS:
        terminalreporter.section("nftproxy e2e timings")
        for line in _TIMINGS:
            terminalreporter.write_line(line)
