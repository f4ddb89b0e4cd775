"""A throw-away cluster made of network namespaces, for nftproxy's privileged end-to-end tests.

Address plan (upstream style; the same as tests/flows/cluster.yaml, used only inside these
namespaces):

    pods      10.0.0.0/8, fd00:10::/48    node-a 10.0.1.0/24 + fd00:10:0:1::/64 (bridge .254 / ::fe)
                                           node-b 10.0.2.0/24 + fd00:10:0:2::/64 (bridge .254 / ::fe)
              (fd00:10:1::/64 would lie OUTSIDE fd00:10::/48 -- its third group is 1 -- and the
              agent would rightly treat such pods as off-cluster sources and masquerade them)
    services  172.30.0.0/16, fd00:30::/112 (a ServiceCIDR object says so)
    node LAN  192.168.0.0/24, fd00:168::/64   router .1/::1, node-a .2/::2, node-b .3/::3
    outside   203.0.113.0/24, 2001:db8::/64   router .1/::1, client "ext" .5/::5,
                                               client "ext2" .200/::200
    LB IPs    192.0.2.0/24, routed by the router to node-a (tests may re-route single IPs)

Namespaces (all named <prefix><short>, prefix ``npt<pid>-`` unless given):

    router   bridges "lan" (node LAN) and "wan" (outside); runs the stand-in API server on
             192.168.0.1:6443; routes pod CIDRs to the nodes and LB IPs to node-a
    ext,ext2 outside clients on "wan", default route via the router
    node-a/b eth0 on "lan", bridge "cbr0" for pods; runs ``nftproxy run``
    pod-<n>  eth0 on its node's cbr0, default route via the bridge address; runs podserver.py

Nothing is created in the caller's network namespace: links are created inside the namespaces
(``ip -n``), the test process reaches the namespaces through sockets opened in a short-lived
thread that ``setns()``-ed into them, and every process runs under ``ip netns exec``.
``Cluster.destroy()`` (also run from ``atexit``) kills every process started and deletes every
namespace with the run's prefix.
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import errno
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
APISERVER = os.path.join(HERE, "apiserver", "apiserver.py")
PODSERVER = os.path.join(HERE, "podserver.py")
DEFAULT_BIN = os.path.join(ROOT, "target", "debug", "nftproxy")
NETNS_DIR = "/var/run/netns"

CLUSTER_CIDR = "10.0.0.0/8,fd00:10::/48"
SERVICE_CIDRS = ["172.30.0.0/16", "fd00:30::/112"]
POD_PORT = 8080
API_ADDR = ("192.168.0.1", 6443)
NS = "e2e"  # Kubernetes namespace of every test object

NODES = {
    # name: (index, LAN IPv4, LAN IPv6, zone)
    "node-a": (1, "192.168.0.2", "fd00:168::2", "z1"),
    "node-b": (2, "192.168.0.3", "fd00:168::3", "z2"),
}
# pod name -> (node, host part); IPs are 10.0.<node index>.<x> and fd00:10:0:<node index>::<x>
PODS = {
    "a1": ("node-a", 1), "a2": ("node-a", 2), "a3": ("node-a", 3), "ca": ("node-a", 50),
    "b1": ("node-b", 1), "b2": ("node-b", 2), "b3": ("node-b", 3), "cb": ("node-b", 50),
}
OUTSIDE = {"ext": ("203.0.113.5", "2001:db8::5"), "ext2": ("203.0.113.200", "2001:db8::200")}


def pod_ip(pod: str, family: int = 4) -> str:
    node, x = PODS[pod]
    n = NODES[node][0]
    # the IPv6 host part reuses the IPv4 digits: 10.0.1.50 <-> fd00:10:0:1::50
    return f"10.0.{n}.{x}" if family == 4 else f"fd00:10:0:{n}::{x}"


def node_ip(node: str, family: int = 4) -> str:
    return NODES[node][1] if family == 4 else NODES[node][2]


def bridge_ip(node: str, family: int = 4) -> str:
    n = NODES[node][0]
    return f"10.0.{n}.254" if family == 4 else f"fd00:10:0:{n}::fe"


# --------------------------------------------------------------------------
# small utilities

def wait_until(pred: Callable, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Poll pred() until it returns something truthy; return that. On timeout raise
    AssertionError naming `what` and the last value seen."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = pred()
        except Exception as e:  # keep polling; report the last error
            last = f"{type(e).__name__}: {e}"
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def run(argv: list[str], check: bool = True, input: str | None = None, timeout: float = 30
        ) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        extra = ("\ninput:\n" + input) if input else ""
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}{extra}")
    return p


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def in_netns(ns_name: str, fn: Callable):
    """Run fn() in a fresh thread that joined network namespace ns_name; return its result.

    setns(CLONE_NEWNET) changes only the calling thread, and that thread ends right after, so the
    test process itself never leaves its namespace. Sockets created inside stay bound to ns_name."""
    box: dict = {}

    def body():
        try:
            fd = os.open(os.path.join(NETNS_DIR, ns_name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, f"setns({ns_name}): {os.strerror(e)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=body, name=f"netns-{ns_name}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def family_of(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


@dataclasses.dataclass
class Reply:
    """The outcome of one request: ok (an answer line), refused, timeout, unreachable, error."""
    outcome: str
    elapsed: float
    pod: str | None = None
    peer: str | None = None
    line: str = ""
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def __str__(self):
        if self.ok:
            return f"ok pod={self.pod} peer={self.peer} ({self.elapsed * 1000:.0f} ms)"
        return f"{self.outcome} ({self.elapsed * 1000:.0f} ms{', ' + self.detail if self.detail else ''})"


_LINE = re.compile(r"pod=(\S+) peer=(\S+)")


def _parse_line(line: str, elapsed: float) -> Reply:
    m = _LINE.search(line)
    if not m:
        return Reply("error", elapsed, line=line, detail=f"bad answer {line!r}")
    return Reply("ok", elapsed, pod=m.group(1), peer=m.group(2), line=line.strip())


def _classify(e: BaseException, elapsed: float, when: str) -> Reply:
    if isinstance(e, ConnectionRefusedError):
        return Reply("refused", elapsed, detail=when)
    if isinstance(e, (socket.timeout, TimeoutError)):
        return Reply("timeout", elapsed, detail=when)
    if isinstance(e, ConnectionResetError):
        return Reply("reset", elapsed, detail=when)
    if isinstance(e, OSError) and e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return Reply("unreachable", elapsed, detail=f"{when}: {e.strerror}")
    return Reply("error", elapsed, detail=f"{when}: {type(e).__name__}: {e}")


# --------------------------------------------------------------------------
# Prometheus text format

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(\s+\S+)?$')
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')


def parse_prometheus(text: str) -> list[tuple[str, dict, float]]:
    """Parse Prometheus / OpenMetrics text exposition; raise ValueError on any malformed line."""
    samples = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if line == "# EOF" or len(parts) < 2 or parts[1] not in ("HELP", "TYPE", "UNIT"):
                continue
            if len(parts) < 3:
                raise ValueError(f"line {n}: bad metadata line {raw!r}")
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise ValueError(f"line {n}: bad sample line {raw!r}")
        name, lbl, value = m.group(1), m.group(2), m.group(3)
        labels = {}
        if lbl:
            body = lbl[1:-1]
            pos = 0
            while pos < len(body):
                lm = _LABEL.match(body, pos)
                if not lm:
                    raise ValueError(f"line {n}: bad labels {lbl!r}")
                labels[lm.group(1)] = bytes(lm.group(2), "utf-8").decode("unicode_escape")
                pos = lm.end()
        try:
            v = float(value)
        except ValueError:
            raise ValueError(f"line {n}: bad value {value!r}") from None
        samples.append((name, labels, v))
    return samples


# --------------------------------------------------------------------------
# network namespaces

class Netns:
    def __init__(self, cluster: "Cluster", short: str):
        self.cluster = cluster
        self.short = short
        self.name = cluster.prefix + short

    def __repr__(self):
        return f"Netns({self.name})"

    # -- commands --
    def exec(self, argv: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", self.name, *argv], check=check, timeout=timeout)

    def ip_batch(self, lines: list[str]) -> None:
        run(["ip", "-n", self.name, "-batch", "-"], input="\n".join(lines) + "\n")

    def sysctl(self, settings: dict) -> None:
        self.exec(["sysctl", "-q", "-w", *[f"{k}={v}" for k, v in settings.items()]])

    def nft(self, *args: str, check: bool = True) -> str:
        return self.exec(["nft", *args], check=check).stdout

    def nft_table(self, family: str = "ip", table: str = "nftproxy") -> str:
        """`nft list table` with what changes by itself normalised away: counter values and
        the countdown of timeout entries (affinity). "" when the table does not exist."""
        p = self.exec(["nft", "list", "table", family, table], check=False)
        if p.returncode != 0:
            return ""
        text = re.sub(r"counter packets \d+ bytes \d+", "counter", p.stdout)
        return re.sub(r" expires [0-9hms.]+", "", text)

    def conntrack(self, *args: str) -> str:
        p = self.exec(["conntrack", *args], check=False)
        return p.stdout + p.stderr

    def icmp_counters(self) -> str:
        """Non-zero Icmp/Icmp6 counters of /proc/net/snmp{,6} (OutRateLimit* show ICMP errors the
        kernel suppressed)."""
        out = []
        snmp = self.exec(["cat", "/proc/net/snmp"], check=False).stdout.splitlines()
        for head, vals in zip(snmp[::2], snmp[1::2]):
            if head.startswith("Icmp:"):
                out += [f"{k}={v}" for k, v in zip(head.split()[1:], vals.split()[1:]) if v != "0"]
        for line in self.exec(["cat", "/proc/net/snmp6"], check=False).stdout.splitlines():
            k, _, v = line.partition(" ")
            if k.startswith("Icmp6Out") and v.strip() != "0":
                out.append(f"{k}={v.strip()}")
        return " ".join(out)

    def popen(self, argv: list[str], log_path: str) -> subprocess.Popen:
        log = open(log_path, "ab")
        env = {**os.environ, "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
        try:
            p = subprocess.Popen(["ip", "netns", "exec", self.name, *argv], stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                 env=env)
        finally:
            log.close()
        self.cluster._procs.append(p)
        return p

    def pids(self) -> list[int]:
        p = run(["ip", "netns", "pids", self.name], check=False)
        return [int(x) for x in p.stdout.split()]

    # -- sockets --
    def socket(self, family: int, type: int) -> socket.socket:
        return in_netns(self.name, lambda: socket.socket(family, type))

    def tcp_request(self, dst: str, port: int, payload: str = "hello", timeout: float = 1.0) -> Reply:
        """Open a new TCP connection, send one line, read the answer line."""
        s = self.socket(family_of(dst), socket.SOCK_STREAM)
        s.settimeout(timeout)
        t0 = time.monotonic()
        try:
            try:
                s.connect((dst, port))
            except OSError as e:
                return _classify(e, time.monotonic() - t0, "connect")
            try:
                s.sendall(payload.encode() + b"\n")
                buf = b""
                while b"\n" not in buf:
                    data = s.recv(4096)
                    if not data:
                        return Reply("error", time.monotonic() - t0, detail=f"EOF after {buf!r}")
                    buf += data
            except OSError as e:
                return _classify(e, time.monotonic() - t0, "after connect")
            return _parse_line(buf.decode(), time.monotonic() - t0)
        finally:
            s.close()

    def udp_request(self, dst: str, port: int, payload: str = "hello", timeout: float = 1.0) -> Reply:
        """Send one datagram from a new connected socket (so ICMP errors are reported), wait for
        the answer."""
        s = self.socket(family_of(dst), socket.SOCK_DGRAM)
        s.settimeout(timeout)
        t0 = time.monotonic()
        try:
            try:
                s.connect((dst, port))
                s.send(payload.encode())
                data = s.recv(65535)
            except OSError as e:
                return _classify(e, time.monotonic() - t0, "recv")
            return _parse_line(data.decode(), time.monotonic() - t0)
        finally:
            s.close()

    def request(self, proto: str, dst: str, port: int, **kw) -> Reply:
        return (self.tcp_request if proto == "TCP" else self.udp_request)(dst, port, **kw)

    def tcp_connection(self, dst: str, port: int, timeout: float = 2.0) -> "TcpConn":
        return TcpConn(self, dst, port, timeout)

    def udp_flow(self, dst: str, port: int, interval: float = 0.1) -> "UdpFlow":
        return UdpFlow(self, dst, port, interval)

    def http_get(self, host: str, port: int, path: str = "/", method: str = "GET",
                 timeout: float = 2.0, body: bytes | None = None, headers: dict | None = None):
        """(status, {lowercased header: value}, body) of one HTTP request from this namespace."""
        ns = self

        class Conn(http.client.HTTPConnection):
            def connect(self):
                self.sock = ns.socket(family_of(self.host), socket.SOCK_STREAM)
                self.sock.settimeout(self.timeout)
                self.sock.connect((self.host, self.port))

        c = Conn(host, port, timeout=timeout)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()


class TcpConn:
    """One long-lived TCP connection: exchange() sends a line and reads the answer."""

    def __init__(self, ns: Netns, dst: str, port: int, timeout: float):
        self.sock = ns.socket(family_of(dst), socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect((dst, port))
        self.local = self.sock.getsockname()
        self.buf = b""

    def exchange(self, payload: str) -> Reply:
        t0 = time.monotonic()
        try:
            self.sock.sendall(payload.encode() + b"\n")
            while b"\n" not in self.buf:
                data = self.sock.recv(4096)
                if not data:
                    return Reply("error", time.monotonic() - t0, detail="connection closed")
                self.buf += data
        except OSError as e:
            return _classify(e, time.monotonic() - t0, "exchange")
        line, self.buf = self.buf.split(b"\n", 1)
        return _parse_line(line.decode(), time.monotonic() - t0)

    def close(self):
        self.sock.close()


class UdpFlow:
    """One UDP socket (fixed source port) sending a datagram every `interval` seconds from a
    background thread; records (send time, Reply) for each datagram."""

    def __init__(self, ns: Netns, dst: str, port: int, interval: float):
        self.sock = ns.socket(family_of(dst), socket.SOCK_DGRAM)
        self.sock.connect((dst, port))
        self.sock.settimeout(interval)
        self.local = self.sock.getsockname()
        self.interval = interval
        self.records: list[tuple[float, Reply]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        seq = 0
        while not self._stop.is_set():
            seq += 1
            t0 = time.monotonic()
            tag = f"seq{seq}"
            try:
                self.sock.send(tag.encode())
                rep = None
                while rep is None:
                    left = self.interval - (time.monotonic() - t0)
                    if left <= 0:
                        rep = Reply("timeout", time.monotonic() - t0)
                        break
                    self.sock.settimeout(left)
                    data = self.sock.recv(65535).decode()
                    if f"req={tag}" in data:  # ignore late answers to earlier datagrams
                        rep = _parse_line(data, time.monotonic() - t0)
            except OSError as e:
                rep = _classify(e, time.monotonic() - t0, "recv")
            self.records.append((t0, rep))
            left = self.interval - (time.monotonic() - t0)
            if left > 0:
                self._stop.wait(left)

    def since(self, t: float) -> list[tuple[float, Reply]]:
        return [(ts, r) for ts, r in list(self.records) if ts >= t]

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


# --------------------------------------------------------------------------
# API server access (through a socket in the router namespace)

class Api:
    def __init__(self, router: Netns):
        self.router = router

    def _call(self, method: str, path: str, doc=None) -> dict:
        body = json.dumps(doc).encode() if doc is not None else None
        status, _, data = self.router.http_get(API_ADDR[0], API_ADDR[1], path, method=method,
                                               body=body, timeout=10,
                                               headers={"Content-Type": "application/json"})
        res = json.loads(data) if data else {}
        if status >= 300:
            raise RuntimeError(f"{method} {path} -> {status}: {res}")
        return res

    def apply(self, *objs: dict) -> dict:
        return self._call("POST", "/control/apply", list(objs))

    def delete(self, kind: str, name: str, namespace: str | None = NS) -> dict:
        spec = {"kind": kind, "name": name}
        if namespace is not None:
            spec["namespace"] = namespace
        return self._call("POST", "/control/delete", spec)

    def get(self, path: str) -> dict:
        return self._call("GET", path)

    def events(self) -> list[dict]:
        return self._call("GET", "/control/events").get("items", [])


# --------------------------------------------------------------------------
# the node agent

class AgentSyncTimeout(RuntimeError):
    pass


class Agent:
    def __init__(self, cluster: "Cluster", node: str):
        self.cluster = cluster
        self.node = node
        self.ns = cluster.ns(node)
        self.log_path = os.path.join(cluster.workdir, f"agent-{node}.log")
        self.debug_socket = os.path.join(cluster.workdir, f"agent-{node}.sock")
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.started_at = 0.0
        self.extra_args: list[str] = []  # tests may add flags for the next start
        self.argv_override: list[str] | None = None  # tests may replace the whole command line

    @property
    def healthz(self) -> tuple[str, int]:
        return node_ip(self.node), 10256

    def argv(self) -> list[str]:
        if self.argv_override is not None:
            return self.argv_override
        return [self.cluster.bin, "run",
                "--kubeconfig", self.cluster.kubeconfig,
                "--hostname-override", self.node,
                "--cluster-cidr", CLUSTER_CIDR,
                "--healthz-bind-address", f"{node_ip(self.node)}:10256",
                "--metrics-bind-address", "127.0.0.1:10249",
                # One socket per agent (they share this host's file system).
                "--debug-socket", self.debug_socket,
                # A namespace is not a node: leave the conntrack sysctls alone.
                "--conntrack-max-per-core", "0",
                "--conntrack-tcp-timeout-established", "0",
                "--conntrack-tcp-timeout-close-wait", "0",
                "-v", os.environ.get("NFTPROXY_E2E_VERBOSITY", "1")] + self.extra_args

    def start(self, wait: bool = True, timeout: float = 30) -> float | None:
        """Start the agent; with wait, return the seconds until its first "synced" log line
        (AgentSyncTimeout after `timeout`, the process is left running)."""
        assert self.proc is None or self.proc.poll() is not None, "agent already running"
        self.starts += 1
        with open(self.log_path, "ab") as f:
            f.write(f"\n===== start #{self.starts} at {time.strftime('%H:%M:%S')}: "
                    f"{' '.join(self.argv())}\n".encode())
        self.started_at = time.monotonic()
        self.proc = self.ns.popen(self.argv(), self.log_path)
        if wait:
            return self.wait_synced(timeout)
        return None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def current_log(self) -> str:
        """The log of the current process (since the last start banner)."""
        text = self.log_text()
        return text[text.rfind("===== start #"):]

    def synced_count(self) -> int:
        """Number of "synced" lines written by the current process."""
        return sum(1 for line in self.current_log().splitlines() if " synced " in line)

    def wait_synced(self, timeout: float = 30) -> float:
        """Wait for the current process's first sync; return seconds since its start."""
        def ok():
            if self.proc.poll() is not None:
                raise AgentSyncTimeout(f"agent on {self.node} exited with {self.proc.returncode}"
                                       f"\n--- agent log ---\n{self.current_log()[-4000:]}")
            return self.synced_count() > 0
        deadline = time.monotonic() + timeout
        while not ok():
            if time.monotonic() >= deadline:
                raise AgentSyncTimeout(
                    f"agent on {self.node} (start #{self.starts}) has not synced "
                    f"{time.monotonic() - self.started_at:.1f}s after its start"
                    f"\n--- agent log ---\n{self.current_log()[-4000:]}")
            time.sleep(0.02)
        took = time.monotonic() - self.started_at
        wait_until(lambda: self.ns.nft("list", "table", "ip", "nftproxy", check=False).strip(), 10,
                   0.05, f"table ip nftproxy on {self.node}")
        return took

    def restart_until_synced(self, timeout: float = 10, attempts: int = 4) -> list[str]:
        """Make sure a synced agent runs (for set-up and recovery): (re)start it until its first
        sync comes within `timeout`. Returns a description of every failed attempt."""
        problems = []
        for _ in range(attempts):
            if not self.running():
                self.start(wait=False)
            try:
                if self.synced_count() == 0:
                    self.wait_synced(max(0.0, timeout - (time.monotonic() - self.started_at)))
                return problems
            except AgentSyncTimeout as e:
                problems.append(str(e))
                self.stop()
        raise AgentSyncTimeout(f"agent on {self.node} did not sync in {attempts} starts:\n"
                               + "\n".join(problems))

    def log_mark(self) -> int:
        return os.path.getsize(self.log_path)

    def log_since(self, mark: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(mark)
            return f.read().decode("utf-8", "replace")

    def metrics(self) -> list[tuple[str, dict, float]]:
        """The agent's /metrics (127.0.0.1:10249 inside the node), parsed."""
        status, _, body = self.ns.http_get("127.0.0.1", 10249, "/metrics", timeout=2)
        assert status == 200, f"/metrics on {self.node}: {status}"
        return parse_prometheus(body.decode())

    def metric(self, name: str) -> float:
        vals = [v for n, _, v in self.metrics() if n == name]
        assert vals, f"metric {name} not exported by the agent on {self.node}"
        return sum(vals)

    def healthz_status(self) -> tuple[int, dict]:
        """(status, JSON body) of the agent's /healthz."""
        host, port = self.healthz
        status, _, body = self.ns.http_get(host, port, "/healthz", timeout=2)
        return status, json.loads(body)

    def shaping_args(self) -> list[str]:
        """The flags that shape the ruleset (what `nftproxy diff` needs to compare with run)."""
        return ["--hostname-override", self.node, "--cluster-cidr", CLUSTER_CIDR]

    def diff(self, *extra: str, kubeconfig: str | None = None, ns: "Netns | None" = None
             ) -> subprocess.CompletedProcess:
        """`nftproxy diff` inside the node's namespace (or `ns`) with the agent's flags; reads
        from the API unless `-f FILE` is among `extra`."""
        argv = [self.cluster.bin, "diff", *self.shaping_args()]
        if "-f" not in extra:
            argv += ["--kubeconfig", kubeconfig or self.cluster.kubeconfig]
        return (ns or self.ns).exec(argv + list(extra), check=False)

    def pause(self) -> None:
        """SIGSTOP the agent process (`ip netns exec` execs it, so proc.pid is the agent)."""
        assert self.running(), f"agent on {self.node} not running"
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.running():
            os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        if sig != signal.SIGCONT:
            self.proc.send_signal(signal.SIGCONT)  # a paused agent must see the signal
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            raise RuntimeError(f"agent on {self.node} ignored signal {sig} for {timeout}s; killed")


# --------------------------------------------------------------------------
# the cluster

_LIVE: list["Cluster"] = []


def _destroy_all():
    for c in list(_LIVE):
        c.destroy()


atexit.register(_destroy_all)


def _prefix_alive(prefix: str) -> bool:
    m = re.fullmatch(r"npt(\d+)-", prefix)
    if not m:
        return True
    try:
        os.kill(int(m.group(1)), 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stale_namespaces() -> list[str]:
    """Namespaces left by earlier runs whose process is gone (e.g. killed with SIGKILL)."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        m = re.match(r"(npt\d+-)", n)
        if m and not _prefix_alive(m.group(1)):
            out.append(n)
    return out


class Cluster:
    def __init__(self, prefix: str | None = None, bin: str | None = None, workdir: str | None = None):
        self.prefix = prefix or f"npt{os.getpid()}-"
        if len(self.prefix) > 16:
            raise ValueError("prefix too long")
        self.workdir = workdir or tempfile.mkdtemp(prefix=f"nftproxy-e2e-{os.getpid()}-")
        self._procs: list[subprocess.Popen] = []
        self._namespaces: list[Netns] = []
        self._destroyed = False
        self.bin = self._pin_binary(bin or os.environ.get("NFTPROXY_BIN") or DEFAULT_BIN)
        self.kubeconfig = os.path.join(self.workdir, "kubeconfig")
        self.agents: dict[str, Agent] = {}
        self.pod_procs: dict[str, subprocess.Popen] = {}
        self.lb_routes: dict[str, str] = {}
        self.br_netfilter = False
        self.startup_problems: list[str] = []
        _LIVE.append(self)

    def _pin_binary(self, path: str) -> str:
        """Hard-link (else copy) the binary into the work dir: a rebuild during the run must
        not change the agent restarted by a test."""
        if not os.access(path, os.X_OK):
            raise FileNotFoundError(f"nftproxy binary {path} missing: run `cargo build` first")
        dst = os.path.join(self.workdir, "nftproxy")
        try:
            os.link(path, dst)
        except OSError:
            shutil.copy2(path, dst)
        return dst

    def namespaces(self) -> list[Netns]:
        return list(self._namespaces)

    def ns(self, short: str) -> Netns:
        for n in self._namespaces:
            if n.short == short:
                return n
        raise KeyError(short)

    @property
    def router(self) -> Netns:
        return self.ns("router")

    def pod(self, name: str) -> Netns:
        return self.ns(f"pod-{name}")

    def _add_ns(self, short: str) -> Netns:
        n = Netns(self, short)
        run(["ip", "netns", "add", n.name])
        self._namespaces.append(n)
        return n

    # ---------------------------------------------------------------- build
    def create(self) -> "Cluster":
        try:
            self._create_network()
            self._start_apiserver()
            self._start_pods()
            for node in NODES:
                self.agents[node] = Agent(self, node)
                self.agents[node].start(wait=False)
            for a in self.agents.values():
                # An agent that does not sync promptly is restarted (and the problem recorded for
                # test_agent_start_syncs_promptly) so the other tests can still run.
                self.startup_problems += a.restart_until_synced(timeout=10)
        except BaseException:
            self.destroy()
            raise
        return self

    def _create_network(self) -> None:
        # icmp ratelimit 0: tests assert that every rejected packet gets its ICMP error at once;
        # the kernel's per-destination limiter (burst 6, then 1/s) would otherwise eat some of
        # them, since all "outside" traffic comes from one client address.
        fwd = {"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1,
               "net.ipv6.conf.default.forwarding": 1,
               "net.ipv4.conf.all.rp_filter": 2, "net.ipv4.conf.default.rp_filter": 2,
               "net.ipv4.icmp_ratelimit": 0, "net.ipv6.icmp.ratelimit": 0}
        # br_netfilter is a host module; it is used if loaded, never loaded from here
        self.br_netfilter = os.path.isdir("/proc/sys/net/bridge")

        def brnf(v: int) -> dict:
            if not self.br_netfilter:
                return {}
            return {"net.bridge.bridge-nf-call-iptables": v, "net.bridge.bridge-nf-call-ip6tables": v}

        router = self._add_ns("router")
        router.sysctl({**fwd, **brnf(0)})
        lines = ["link set lo up",
                 "link add lan type bridge mcast_snooping 0", "link set lan up",
                 "addr add 192.168.0.1/24 dev lan", "addr add fd00:168::1/64 dev lan nodad",
                 "link add wan type bridge mcast_snooping 0", "link set wan up",
                 "addr add 203.0.113.1/24 dev wan", "addr add 2001:db8::1/64 dev wan nodad"]
        router.ip_batch(lines)

        # outside clients
        for short, (v4, v6) in OUTSIDE.items():
            c = self._add_ns(short)
            router.ip_batch([f"link add v-{short} type veth peer name eth0 netns {c.name}",
                             f"link set v-{short} master wan up"])
            c.ip_batch(["link set lo up", "link set eth0 up",
                        f"addr add {v4}/24 dev eth0", f"addr add {v6}/64 dev eth0 nodad",
                        "route add default via 203.0.113.1",
                        "route add ::/0 via 2001:db8::1"])

        # nodes and their pods
        router_routes = []
        for node, (idx, v4, v6, _) in NODES.items():
            n = self._add_ns(node)
            # Pods share a bridge, so pod -> Service -> same-node pod replies are bridged: they
            # must pass the node's conntrack (br_netfilter), as with the Kubernetes bridge CNI.
            n.sysctl({**fwd, **brnf(1)})
            router.ip_batch([f"link add v-{node} type veth peer name eth0 netns {n.name}",
                             f"link set v-{node} master lan up"])
            lines = ["link set lo up", "link set eth0 up",
                     f"addr add {v4}/24 dev eth0", f"addr add {v6}/64 dev eth0 nodad",
                     "link add cbr0 type bridge mcast_snooping 0", "link set cbr0 up",
                     f"addr add {bridge_ip(node)}/24 dev cbr0",
                     f"addr add {bridge_ip(node, 6)}/64 dev cbr0 nodad",
                     "route add default via 192.168.0.1",
                     "route add ::/0 via fd00:168::1"]
            for other, (oidx, ov4, ov6, _) in NODES.items():
                if other != node:
                    lines += [f"route add 10.0.{oidx}.0/24 via {ov4}",
                              f"route add fd00:10:0:{oidx}::/64 via {ov6}"]
            n.ip_batch(lines)
            router_routes += [f"route add 10.0.{idx}.0/24 via {v4}",
                              f"route add fd00:10:0:{idx}::/64 via {v6}"]
            for pod, (pnode, _) in PODS.items():
                if pnode != node:
                    continue
                p = self._add_ns(f"pod-{pod}")
                # hairpin on, as the bridge CNI plugin (hairpinMode) or kubelet's hairpin-veth
                # mode set it: a pod reaching itself through a Service is DNATed back to its own
                # address inside br_netfilter's prerouting, and then bridged out of the port it
                # came in on.
                n.ip_batch([f"link add vp-{pod} type veth peer name eth0 netns {p.name}",
                            f"link set vp-{pod} master cbr0 up",
                            f"link set vp-{pod} type bridge_slave hairpin on"])
                p.ip_batch(["link set lo up", "link set eth0 up",
                            f"addr add {pod_ip(pod)}/24 dev eth0",
                            f"addr add {pod_ip(pod, 6)}/64 dev eth0 nodad",
                            f"route add default via {bridge_ip(node)}",
                            f"route add ::/0 via {bridge_ip(node, 6)}"])
        router_routes.append(f"route add 192.0.2.0/24 via {node_ip('node-a')}")
        router.ip_batch(router_routes)

    def _start_apiserver(self) -> None:
        objs = []
        for node, (_, v4, v6, zone) in NODES.items():
            objs.append({"apiVersion": "v1", "kind": "Node",
                         "metadata": {"name": node, "labels": {
                             "kubernetes.io/hostname": node,
                             "topology.kubernetes.io/zone": zone}},
                         "status": {"addresses": [
                             {"type": "InternalIP", "address": v4},
                             {"type": "InternalIP", "address": v6},
                             {"type": "Hostname", "address": node}]}})
        objs.append({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
                     "metadata": {"name": "kubernetes"}, "spec": {"cidrs": SERVICE_CIDRS}})
        path = os.path.join(self.workdir, "objects.json")
        with open(path, "w") as f:
            json.dump({"apiVersion": "v1", "kind": "List", "items": objs}, f)
        log = os.path.join(self.workdir, "apiserver.log")
        self.apiserver_log = log
        self.apiserver = self.router.popen(
            [sys.executable, APISERVER, "--listen", f"{API_ADDR[0]}:{API_ADDR[1]}", "--objects", path,
             "--service-cluster-ip-range", SERVICE_CIDRS[0]], log)

        def listening():
            if self.apiserver.poll() is not None:
                raise RuntimeError(f"apiserver exited: {open(log).read()}")
            return "LISTENING" in open(log).read()
        wait_until(listening, 15, 0.05, "the API server")
        self.api = Api(self.router)
        with open(self.kubeconfig, "w") as f:
            f.write(f"""apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: http://{API_ADDR[0]}:{API_ADDR[1]}
users:
- name: e2e
  user: {{}}
contexts:
- name: e2e
  context:
    cluster: e2e
    user: e2e
current-context: e2e
""")

    def _start_pods(self) -> None:
        for pod in PODS:
            self.start_pod(pod)
        for pod in PODS:
            self.wait_pod(pod)

    def start_pod(self, pod: str) -> None:
        log = os.path.join(self.workdir, f"pod-{pod}.log")
        self.pod_procs[pod] = self.pod(pod).popen(
            [sys.executable, PODSERVER, "--name", pod, "--port", str(POD_PORT),
             "--listen", pod_ip(pod), "--listen", pod_ip(pod, 6)], log)

    def wait_pod(self, pod: str) -> None:
        log = os.path.join(self.workdir, f"pod-{pod}.log")

        def ready():
            if self.pod_procs[pod].poll() is not None:
                raise RuntimeError(f"pod {pod} exited: {open(log).read()}")
            return "READY" in open(log).read()
        wait_until(ready, 10, 0.02, f"pod {pod}")

    # ------------------------------------------------------------ operations
    def route_lb(self, ip: str, node: str) -> None:
        """Make the router send traffic for LB IP `ip` to `node` (like a load balancer choosing
        nodes); reset_lb_routes() restores the default (all of 192.0.2.0/24 to node-a)."""
        self.router.ip_batch([f"route replace {ip}/32 via {node_ip(node)}"])
        self.lb_routes[ip] = node

    def reset_lb_routes(self) -> None:
        for ip in list(self.lb_routes):
            self.router.ip_batch([f"route del {ip}/32"])
            del self.lb_routes[ip]

    def log_files(self) -> list[str]:
        return [a.log_path for a in self.agents.values()] + [self.apiserver_log]

    def log_marks(self) -> dict[str, int]:
        return {p: os.path.getsize(p) for p in self.log_files() if os.path.exists(p)}

    def logs_since(self, marks: dict[str, int], max_chars: int = 12000) -> dict[str, str]:
        out = {}
        for p in self.log_files():
            if not os.path.exists(p):
                continue
            with open(p, "rb") as f:
                f.seek(marks.get(p, 0))
                text = f.read().decode("utf-8", "replace")
            if len(text) > max_chars:
                text = "...\n" + text[-max_chars:]
            out[os.path.basename(p)] = text
        return out

    def diagnostics(self) -> str:
        """nft rulesets (abridged) and conntrack tables of the nodes, for failure reports."""
        parts = []
        for node in NODES:
            n = self.ns(node)
            try:
                rs = n.nft("list", "ruleset", check=False)
                lines = rs.splitlines()
                if len(lines) > 400:
                    rs = "\n".join(lines[:400]) + f"\n... ({len(lines) - 400} more lines)"
                parts.append(f"--- {node}: nft list ruleset ---\n{rs}")
                parts.append(f"--- {node}: conntrack -L ---\n{n.conntrack('-L')}")
                parts.append(f"--- {node}: ICMP counters ---\n{n.icmp_counters()}")
            except Exception as e:
                parts.append(f"--- {node}: {e}")
        return "\n".join(parts)

    # ---------------------------------------------------------------- destroy
    def destroy(self) -> None:
        """Kill every process started, then delete every namespace of this run. Idempotent."""
        if self._destroyed:
            return
        self._destroyed = True
        for p in self._procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 3
        for p in self._procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        names = [n.name for n in self._namespaces]
        try:
            names += [n for n in os.listdir(NETNS_DIR) if n.startswith(self.prefix) and n not in names]
        except FileNotFoundError:
            pass
        for name in names:
            # anything still running inside (e.g. started by hand while debugging)
            for pid in run(["ip", "netns", "pids", name], check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            run(["ip", "netns", "del", name], check=False)
        left = [n for n in os.listdir(NETNS_DIR) if n.startswith(self.prefix)] \
            if os.path.isdir(NETNS_DIR) else []
        if left:
            sys.stderr.write(f"cluster: namespaces left behind: {left}\n")
        try:  # the pinned binary would keep an old 190 MB inode alive in a kept work dir
            os.unlink(os.path.join(self.workdir, "nftproxy"))
        except OSError:
            pass
        if self in _LIVE:
            _LIVE.remove(self)

    def remove_workdir(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def stale_workdir_binaries() -> list[str]:
    """Pinned binaries in work dirs of earlier runs whose process is gone."""
    tmp = tempfile.gettempdir()
    out = []
    for d in os.listdir(tmp):
        m = re.fullmatch(r"nftproxy-e2e-(\d+)-\w+", d)
        if m and not _prefix_alive(f"npt{m.group(1)}-"):
            p = os.path.join(tmp, d, "nftproxy")
            if os.path.exists(p):
                out.append(p)
    return out


def delete_namespaces(names: list[str]) -> None:
    """Delete namespaces (by exact name) of dead earlier runs, killing what runs inside."""
    for name in names:
        for pid in run(["ip", "netns", "pids", name], check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        run(["ip", "netns", "del", name], check=False)


# --------------------------------------------------------------------------
# object builders (namespace "e2e")

def service(name: str, ports: list[dict], *, type: str = "ClusterIP", cluster_ip: str,
            etp: str | None = None, lb_ips: tuple = (), hc_port: int | None = None,
            affinity: bool = False, source_ranges: list | None = None, itp: str | None = None) -> dict:
    fam = "IPv6" if ":" in cluster_ip else "IPv4"
    spec = {"type": type, "clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ipFamilies": [fam],
            "ipFamilyPolicy": "SingleStack", "ports": ports}
    if etp:
        spec["externalTrafficPolicy"] = etp
    if itp:
        spec["internalTrafficPolicy"] = itp
    if hc_port:
        spec["healthCheckNodePort"] = hc_port
    if affinity:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": 10800}}
    if source_ranges:
        spec["loadBalancerSourceRanges"] = source_ranges
    obj = {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": NS, "name": name},
           "spec": spec}
    if lb_ips:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in lb_ips]}}
    return obj


def svc_port(name: str, port: int, protocol: str = "TCP", node_port: int | None = None,
             target: int = POD_PORT) -> dict:
    p = {"name": name, "port": port, "protocol": protocol, "targetPort": target}
    if node_port:
        p["nodePort"] = node_port
    return p


def endpoint(pod: str, family: int = 4, ready: bool | None = None, serving: bool | None = None,
             terminating: bool | None = None) -> dict:
    node = PODS[pod][0]
    e = {"addresses": [pod_ip(pod, family)], "nodeName": node,
         "targetRef": {"kind": "Pod", "namespace": NS, "name": pod}, "conditions": {}}
    for k, v in (("ready", ready if ready is not None else True), ("serving", serving),
                 ("terminating", terminating)):
        if v is not None:
            e["conditions"][k] = v
    return e


def endpoint_slice(service_name: str, endpoints: list[dict], ports: list[dict], family: int = 4,
                   name: str | None = None) -> dict:
    """ports: the Service's ports (name/protocol are copied; the port is the pod port)."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": NS, "name": name or f"{service_name}-ipv{family}",
                         "labels": {"kubernetes.io/service-name": service_name,
                                    "endpointslice.kubernetes.io/managed-by": "e2e"}},
            "addressType": "IPv4" if family == 4 else "IPv6",
            "ports": [{"name": p["name"], "port": POD_PORT, "protocol": p["protocol"]} for p in ports],
            "endpoints": endpoints}
