"""pytest glue for the real-node lane (see README.md and realnode.py).

``cluster()``: a fresh one-node cluster without a proxy (``test_migration.py`` installs
kube-proxy the kubeadm way on one, then migrates it to nftproxy).

``rn`` (session): the one-node cluster with nftproxy installed the README's way
(ConfigMap kube-system/nftproxy with apiServer, then ``kubectl apply -k deploy/``) and the
DaemonSet Ready; always destroyed at the end (finalizer; atexit and SIGTERM/SIGHUP backstops).
Timings are printed in the terminal summary.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import realnode as R  # noqa: E402

TIMINGS: list[tuple[str, float]] = []
NOTES: list[str] = []


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, _interrupt)


def agent_bin() -> str:
    b = os.environ.get("NFTPROXY_BIN") or os.path.join(R.ROOT, "target", "release", "nftproxy")
    if not os.access(b, os.X_OK):
        pytest.fail(f"agent binary {b} missing (run.sh builds it; or set NFTPROXY_BIN)",
                    pytrace=False)
    return b


@contextlib.contextmanager
def cluster():
    """A fresh one-node cluster without any proxy; destroyed afterwards (kept with
    NFTPROXY_REALNODE_KEEP=1 or when it could not be built)."""
    if os.geteuid() != 0:
        pytest.skip("real-node lane needs root")
    try:
        k8s = R.find_k8s_dir()
    except R.Skip as e:
        pytest.skip(str(e))
    node = R.Node(k8s, agent_bin(), keep=os.environ.get("NFTPROXY_REALNODE_KEEP") == "1")
    atexit.register(node.destroy)
    failed = True
    try:
        node.create()
        failed = False
        yield node
    finally:
        TIMINGS.extend(node.timings)
        if failed or os.environ.get("NFTPROXY_REALNODE_KEEP") == "1":
            node.keep = True
            NOTES.append(f"work dir kept: {node.work} (logs/, pod-logs/)")
        node.destroy()


@pytest.fixture(scope="session")
def rn():
    with cluster() as node:
        t0 = time.monotonic()
        # what the README tells users: the API server's real address, then the manifests
        node.kubectl("-n", "kube-system", "create", "configmap", "nftproxy",
                     f"--from-literal=apiServer=https://{R.NODE_IP}:6443")
        node.kubectl("apply", "-k", os.path.join(R.ROOT, "deploy"))
        node.kubectl("-n", "kube-system", "rollout", "status", "ds/nftproxy", "--timeout=120s",
                     timeout=130)
        node.timed("nftproxy DaemonSet Ready (ConfigMap + apply -k deploy/ -> rollout status)", t0)
        yield node


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        TIMINGS.append((f"test {item.name} ({rep.outcome})", rep.duration))


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.section("real-node lane timings")
        for label, secs in TIMINGS:
            terminalreporter.write_line(f"{secs:8.2f}s  {label}")
    for n in NOTES:
        terminalreporter.write_line(n)
