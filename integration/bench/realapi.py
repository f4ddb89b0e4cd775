#!/usr/bin/env python3
"""nftproxy against a REAL kube-apiserver, with upstream kube-proxy (nftables mode) side by side
in the same run (issue 14's real-API mode of the benchmark).

    python3 integration/bench/realapi.py --services 10000 [--endpoints 5] [--repeat 3]
    python3 integration/bench/realapi.py --table     # 10k, 50k, 100k x 5, 5k x 250, 45k x 1: 3 runs each (median)
    python3 integration/bench/realapi.py --smoke     # 300 Services, one run: CI

Binaries: etcd, kube-apiserver and kube-proxy from $NFTPROXY_K8S_DIR (a directory holding them,
or holding a k8s-*.tar.xz as ../shared/k8s does), else ../shared/k8s next to the checkout. When
none is at hand the script says so and exits 0 without measuring: `bench.py` (the stand-in API
server) stays the default benchmark. Needs root, `ip`, `nft`, `openssl` and a release build.

One size, in a fresh network namespace ``nfb<pid>-r<n>n`` laid out as bench.py's (the same
objects, addresses and agent flags):
  1. etcd and kube-apiserver 1.36 start inside the namespace (127.0.0.1:2379 / :6443, client
     certificates, RBAC); the Node, the Services and their EndpointSlices are created through
     the API (16 parallel clients; no controllers run, so nothing else writes). This happens
     once per size; each of the --repeat runs below starts from an empty kernel (both proxies'
     tables deleted);
  2. nftproxy: cold start (exec -> the last Service's clusterip element, polled every 10 ms over
     netlink), where it went (exec -> "initial ... lists received" log line -> first `synced`
     line) and the RSS at each point, peak and settled RSS, then --samples endpoint
     replacements (PUT of one slice -> the new backend element announced by the kernel) and
     new Services (POST of the Service, then of its slice -> its clusterip and backend
     elements; timed from the slice's write); then nftproxy stops (its table stays);
  3. kube-proxy --proxy-mode=nftables with the same kubeconfig, node name and cluster CIDR (up to
     --kube-proxy-max-services): cold start (exec -> the last Service's `service-ips` element of
     table ip kube-proxy), peak and settled RSS, --kube-proxy-samples endpoint replacements (->
     the new endpoint in a new anonymous DNAT map of its Service chain, or a new
     `endpoint-…__IP/PORT` chain) and new Services (-> its `service-ips` element).
Everything runs on this machine's two cores in turn, never two proxies at once. Timing targets
are reported, never asserted; exit status 1 only on a functional failure (rules never appear,
a process dies), 2 on a setup error.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import copy
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "integration", "realnode"))
import bench  # noqa: E402  (namespaces, objects, element polling, the agent's log)
from bench import (CLUSTER_CIDR, KNS, NODE, REG, SERVICE_RANGE, Functional, Monitor, Node,  # noqa: E402
                   World, ip, pct, say)
from cluster import in_netns  # noqa: E402
from nlpoll import (NFNL_SUBSYS_NFTABLES, _attrs, key_ip_proto_port,  # noqa: E402
                    monitor_socket)
import realnode  # noqa: E402  (binaries, certificates, kubeconfigs of the real-node lane)

API = "127.0.0.1:6443"
NFT_MSG_NEWCHAIN = 3
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME = 1, 3
KP_HEALTHZ, KP_METRICS = "127.0.0.1:10266", "127.0.0.1:10259"
PREFIX = bench.PREFIX  # bench.py's stale-namespace sweep removes what a killed run left


# --------------------------------------------------------------------------
# the API, over TLS with the admin client certificate, from inside the namespace

class Etcd:
    """etcd's JSON gateway (v3), inside the namespace."""

    def __init__(self, ns: str):
        self.ns = ns

    def post(self, path: str, body: dict) -> dict:
        c = http.client.HTTPConnection("127.0.0.1", 2379, timeout=120)
        c.sock = in_netns(self.ns, lambda: socket.create_connection(("127.0.0.1", 2379), timeout=120))
        try:
            c.request("POST", path, body=json.dumps(body).encode(),
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            data = json.loads(r.read() or b"{}")
            if r.status != 200 or "error" in data or "code" in data:
                raise Functional(f"etcd {path} -> {r.status}: {str(data)[:300]}")
            return data
        finally:
            c.close()

    def exists(self, key: str) -> bool:
        res = self.post("/v3/kv/range", {"key": base64.b64encode(key.encode()).decode(),
                                         "count_only": True})
        return int(res.get("count", 0)) > 0

    def put_all(self, kvs: list[tuple[str, bytes]]) -> None:
        """One transaction (etcd allows 128 operations in one by default)."""
        self.post("/v3/kv/txn", {"success": [
            {"requestPut": {"key": base64.b64encode(k.encode()).decode(),
                            "value": base64.b64encode(v).decode()}} for k, v in kvs]})


class Api:
    def __init__(self, ns: str, pki: str):
        self.ns = ns
        self.ctx = ssl.create_default_context(cafile=os.path.join(pki, "ca.crt"))
        self.ctx.load_cert_chain(os.path.join(pki, "admin.crt"), os.path.join(pki, "admin.key"))
        self.local = threading.local()

    def conn(self, fresh: bool = False) -> http.client.HTTPSConnection:
        c = getattr(self.local, "c", None)
        if c is None or fresh:
            if c is not None:
                c.close()
            host, port = API.split(":")
            c = http.client.HTTPSConnection(host, int(port), context=self.ctx, timeout=120)
            raw = in_netns(self.ns, lambda: socket.create_connection((host, int(port)), timeout=120))
            # http.client sends headers and body in two writes: without this, Nagle and the
            # server's delayed ACK add 40 ms to every write we time
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.sock = self.ctx.wrap_socket(raw, server_hostname=host)
            self.local.c = c
        return c

    def call(self, method: str, path: str, obj: dict | None = None) -> tuple[int, dict]:
        body = json.dumps(obj, separators=(",", ":")).encode() if obj is not None else None
        for attempt in (0, 1):
            c = self.conn(fresh=attempt > 0)
            try:
                c.request(method, path, body=body, headers={"Content-Type": "application/json"})
                r = c.getresponse()
                data = r.read()
                try:
                    return r.status, (json.loads(data) if data else {})
                except ValueError:  # /readyz and some errors answer in plain text
                    return r.status, {"text": data.decode(errors="replace")}
            except (OSError, http.client.HTTPException):
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def must(self, method: str, path: str, obj: dict | None = None) -> dict:
        status, res = self.call(method, path, obj)
        if status >= 300:
            raise Functional(f"{method} {path} -> {status}: {str(res)[:400]}")
        return res


def path_of(obj: dict, named: bool = False) -> str:
    kind, meta = obj["kind"], obj["metadata"]
    group = {"Service": "/api/v1", "Node": "/api/v1", "Namespace": "/api/v1",
             "EndpointSlice": "/apis/discovery.k8s.io/v1"}[kind]
    plural = {"Service": "services", "Node": "nodes", "Namespace": "namespaces",
              "EndpointSlice": "endpointslices"}[kind]
    ns = f"/namespaces/{meta['namespace']}" if "namespace" in meta else ""
    return f"{group}{ns}/{plural}" + (f"/{meta['name']}" if named else "")


# --------------------------------------------------------------------------
# new chains in a namespace (kube-proxy programs an endpoint as a chain, not an element)

class ChainWatch:
    def __init__(self, ns: str):
        self.sock = in_netns(ns, monitor_socket)
        self.sock.settimeout(0.5)
        self.lock = threading.Lock()
        self.seen: list[tuple[float, str]] = []
        self.stopped = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        want = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN
        while not self.stopped:
            try:
                buf = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError:
                continue  # ENOBUFS: notifications were dropped; later ones still count
            t = time.monotonic()
            off = 0
            while off + 20 <= len(buf):
                ln, typ = struct.unpack_from("=IH", buf, off)
                if ln < 16:
                    break
                if typ == want:
                    for atyp, s, e in _attrs(buf, off + 20, min(off + ln, len(buf))):
                        if atyp == NFTA_CHAIN_NAME:
                            with self.lock:
                                self.seen.append((t, buf[s:e].rstrip(b"\0").decode(errors="replace")))
                off += (ln + 3) & ~3

    def wait(self, needle: str, t0: float, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for t, name in self.seen:
                    if t >= t0 and needle in name:
                        return t
            time.sleep(0.005)
        return None

    def stop(self):
        self.stopped = True
        self.thread.join(2)
        self.sock.close()


def post_service(api: Api, objs: list[dict]) -> tuple[float, float]:
    """POST the Service, then its slice. Returns (time before the first write, time before the
    last): a real API server takes one etcd round trip per object, so the figure runs from the
    write that completes the Service (its endpoints) to the kernel."""
    t_first = t_last = time.monotonic()
    for o in objs:
        t_last = time.monotonic()
        api.must("POST", path_of(o), o)
    return t_first, t_last


def wait_endpoint(mon: Monitor, chains: ChainWatch, ep: str, t0: float, timeout: float) -> float | None:
    """First time after t0 that `ep` is the value of an element of any anonymous map, or is
    named by a new chain (kube-proxy's `endpoint-…__IP/PORT`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with mon.lock:
            times = [t for (set_name, kind, addr), ts in mon.seen.items()
                     if kind == "v" and addr == ep and set_name.startswith("__")
                     for t in ts if t >= t0]
        with chains.lock:
            times += [t for t, name in chains.seen if t >= t0 and f"__{ep}/" in name]
        if times:
            return min(times)
        time.sleep(0.005)
    return None


# --------------------------------------------------------------------------
# one run

def rss(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) / 1024.0
    return out


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RealRun:
    def __init__(self, a, idx: int, k8s: str, workdir: str, binary: str,
                 binary_b: str | None = None):
        self.a, self.idx, self.k8s, self.bin = a, idx, k8s, binary
        self.bin_b = binary_b or binary
        self.n, self.e = a.services, a.endpoints
        self.scale = max(1.0, self.n * self.e / 5000.0)
        self.r: dict = self.fresh()
        self.workdir = workdir
        self.rng = __import__("random").Random(7000 + idx)

    def fresh(self) -> dict:
        return {"services": self.n, "endpoints": self.e, "failures": [], "notes": [],
                "nftproxy": {}, "kube-proxy": {}}

    def go(self) -> list[dict]:
        """Set the API server up once, then measure both proxies --repeat times over it, each
        cold start into an empty kernel (both tables deleted before)."""
        world = World(self.n, self.e, 0, 0)
        self.world = world
        node = Node(f"{PREFIX}r{self.idx}n", world, self.workdir, self.bin)
        node.extra_args = self.a.agent_args.split() if self.a.agent_args else []
        self.node = node
        out = [self.r]
        try:
            say(f"size {self.n} Services x {self.e} endpoints, real API server, namespace {node.ns}")
            node.create()
            self.control_plane(node)
            self.load(world)
            self.quiet()
            for rep in range(self.a.repeat):
                if rep:
                    self.r = self.fresh()
                    out.append(self.r)
                say(f" run {rep + 1} of {self.a.repeat}")
                for fam in ("ip", "ip6"):
                    for table in ("nftproxy", "kube-proxy"):
                        bench.run(["ip", "netns", "exec", node.ns, "nft", "delete", "table", fam,
                                   table], 30, check=False)
                node.log = bench.AgentLog(os.path.join(node.dir, f"agent-{rep + 1}.log"))
                self.nftproxy(node, world)
                if self.a.agent_args_b is not None or self.a.bin_b:
                    # the same cold start with other flags or another build, over the same
                    # server and objects
                    for fam in ("ip", "ip6"):
                        bench.run(["ip", "netns", "exec", node.ns, "nft", "delete", "table", fam,
                                   "nftproxy"], 30, check=False)
                    args_b = self.a.agent_args if self.a.agent_args_b is None else self.a.agent_args_b
                    node.extra_args = args_b.split() if args_b else []
                    node.bin = self.bin_b
                    node.log = bench.AgentLog(os.path.join(node.dir, f"agent-{rep + 1}-b.log"))
                    say(f"  nftproxy B ({self.a.bin_b or self.a.bin}, args {args_b!r}):")
                    self.nftproxy(node, world, "nftproxy-b")
                    node.extra_args = self.a.agent_args.split() if self.a.agent_args else []
                    node.bin = self.bin
                if self.n <= self.a.kube_proxy_max_services:
                    self.kube_proxy(node, world, rep + 1)
                else:
                    self.r["notes"].append(f"kube-proxy not run above "
                                           f"{self.a.kube_proxy_max_services} Services "
                                           f"(--kube-proxy-max-services)")
        except (Functional, OSError, RuntimeError, ValueError, http.client.HTTPException) as e:
            self.r["failures"].append(str(e))
            say(f"FUNCTIONAL FAILURE {e}")
        finally:
            for p in getattr(self, "procs", []):
                REG.stop_proc(p)
            node.stop()
        return out

    # -- control plane --
    def control_plane(self, node: Node) -> None:
        d, k = node.dir, self.k8s
        pki = os.path.join(d, "pki")
        realnode.make_pki(pki)
        self.pki = pki
        realnode.kubeconfig(os.path.join(d, "kubeconfig"), pki, "admin", f"https://{API}")
        self.procs = []
        t0 = time.monotonic()
        self.procs.append(node.popen([
            f"{k}/etcd", "--name=default", f"--data-dir={d}/etcd",
            "--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
            "--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
            "--initial-cluster=default=http://127.0.0.1:2380", "--quota-backend-bytes=8589934592",
            # a benchmark's store: losing it on a crash costs nothing
            "--unsafe-no-fsync", "--log-level=warn"], os.path.join(d, "etcd.log")))
        self.procs.append(node.popen([
            f"{k}/kube-apiserver", "--etcd-servers=http://127.0.0.1:2379",
            f"--advertise-address={bench.NODE_IP}", "--bind-address=127.0.0.1", "--secure-port=6443",
            f"--service-cluster-ip-range={SERVICE_RANGE}",
            f"--tls-cert-file={pki}/apiserver.crt", f"--tls-private-key-file={pki}/apiserver.key",
            f"--client-ca-file={pki}/ca.crt", f"--service-account-key-file={pki}/sa.pub",
            f"--service-account-signing-key-file={pki}/sa.key",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--authorization-mode=RBAC", "--profiling=false", f"--cert-dir={d}/apiserver-certs",
            "-v=1"], os.path.join(d, "apiserver.log")))
        self.api = Api(node.ns, pki)

        def ready():
            for p in self.procs:
                if p.poll() is not None:
                    raise Functional(f"{p.args[4]} exited ({p.returncode}); logs in {d}")
            try:
                st, _ = self.api.call("GET", "/readyz")
                return st == 200
            except (OSError, http.client.HTTPException):
                return False
        bench.wait_for(ready, 120, 0.3, "kube-apiserver /readyz")
        self.r["control_plane_s"] = time.monotonic() - t0
        say(f"  etcd + kube-apiserver ready in {self.r['control_plane_s']:.1f}s")

    def load(self, world: World) -> None:
        t0 = time.monotonic()
        api = self.api
        api.must("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                "metadata": {"name": KNS}})
        objs = [o for o in world.objects() if o["kind"] in ("Node", "Service", "EndpointSlice")]
        node_obj = objs[0]
        status = node_obj.pop("status")
        created = api.must("POST", path_of(node_obj), node_obj)
        created["status"] = status
        api.must("PUT", path_of(node_obj, True) + "/status", created)

        def create(o):
            api.must("POST", path_of(o), o)
        rest = objs[1:]
        how = "through the API"
        if self.a.loader == "etcd" or (self.a.loader == "auto" and world.n >= 5000):
            rest = self.load_etcd(rest)
            how = "into etcd (templates created through the API)"
        with concurrent.futures.ThreadPoolExecutor(16) as ex:
            for f in concurrent.futures.as_completed([ex.submit(create, o) for o in rest]):
                f.result()
        self.r["load_s"] = time.monotonic() - t0
        self.r["loader"] = how
        say(f"  {len(objs)} objects created {how} in {self.r['load_s']:.1f}s "
            f"({len(objs) / self.r['load_s']:.0f}/s)")

    def quiet(self, limit: float = 600.0) -> None:
        """Wait until etcd and kube-apiserver are idle (under 15% of a core over 2 s; idle, they
        use 8-10% with periodic bursts): after a bulk load the API server works for minutes (100,000 Services: its first list served
        took 31 s, the third 7.5 s), and a cold start measured meanwhile measures that."""
        t0 = time.monotonic()
        tick = os.sysconf("SC_CLK_TCK")

        def cpu() -> float:
            total = 0
            for p in self.procs[:2]:
                with open(f"/proc/{p.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            return total / tick
        busy = 0.0
        while time.monotonic() - t0 < limit:
            before = cpu()
            time.sleep(2.0)
            busy = (cpu() - before) / 2.0
            if busy < 0.15:
                break
        self.r["server_quiet_s"] = time.monotonic() - t0
        say(f"  API server and etcd idle after {self.r['server_quiet_s']:.0f} s "
            f"(last 2 s: {busy * 100:.0f}% of a core)")

    def load_etcd(self, objs: list[dict]) -> list[dict]:
        """Write Services, their ClusterIPs' IPAddress objects and EndpointSlices straight into
        etcd, in the form the API server stores them; returns what is left to create through the
        API. kube-apiserver creates ~250 objects/s on this machine at first and ~40/s at 50,000
        Services (its CPU is the limit), so 100,000 objects took 41 min; etcd takes them in
        seconds. One Service and its slice are created through the API first and read back:
        every other object is that template with its own name, addresses, ports and endpoints
        (so defaults and field order are the server's). The API server's watch cache reads them
        from etcd like any write; the object count is checked through the API afterwards."""
        api = self.api
        svcs = [o for o in objs if o["kind"] == "Service"]
        slices = [o for o in objs if o["kind"] == "EndpointSlice"]
        others = [o for o in objs if o["kind"] not in ("Service", "EndpointSlice")]
        if not svcs or not slices:
            return objs
        first_svc = svcs[0]
        first_slices = [o for o in slices
                        if o["metadata"]["labels"]["kubernetes.io/service-name"]
                        == first_svc["metadata"]["name"]]
        for o in [first_svc, *first_slices]:
            api.must("POST", path_of(o), o)
        t_svc = api.must("GET", path_of(first_svc, True))
        t_slice = api.must("GET", path_of(first_slices[0], True))
        cip = t_svc["spec"]["clusterIP"]
        t_ip = api.must("GET", f"/apis/networking.k8s.io/v1/ipaddresses/{cip}")
        for t in (t_svc, t_slice, t_ip):
            t["metadata"].pop("resourceVersion", None)
        ns = first_svc["metadata"]["namespace"]
        etcd = Etcd(self.node.ns)
        # The API server's keys: checked on the templates before anything is written.
        keys = {"Service": f"/registry/services/specs/{ns}/",
                "EndpointSlice": f"/registry/endpointslices/{ns}/",
                "IPAddress": "/registry/ipaddresses/"}
        for k, name in ((keys["Service"], first_svc["metadata"]["name"]),
                        (keys["EndpointSlice"], first_slices[0]["metadata"]["name"]),
                        (keys["IPAddress"], cip)):
            if not etcd.exists(k + name):
                say(f"  etcd has no key {k + name}: creating everything through the API")
                return [o for o in objs if o is not first_svc and o not in first_slices]
        done = {id(first_svc)} | {id(o) for o in first_slices}

        def stamp(t: dict, o: dict | None) -> dict:
            x = copy.deepcopy(t)
            m = x["metadata"]
            m["uid"] = str(uuid.uuid4())
            if o is not None:
                m["name"] = o["metadata"]["name"]
                m["labels"] = o["metadata"].get("labels", {})
            return x

        kvs: list[tuple[str, bytes]] = []
        for o in svcs:
            if id(o) in done:
                continue
            x = stamp(t_svc, o)
            x["spec"].update(o["spec"])
            kvs.append((keys["Service"] + o["metadata"]["name"], json.dumps(x).encode()))
            ip = stamp(t_ip, None)
            ip["metadata"]["name"] = o["spec"]["clusterIP"]
            ip["spec"]["parentRef"]["name"] = o["metadata"]["name"]
            kvs.append((keys["IPAddress"] + o["spec"]["clusterIP"], json.dumps(ip).encode()))
        for o in slices:
            if id(o) in done:
                continue
            x = stamp(t_slice, o)
            for f in ("addressType", "ports", "endpoints"):
                x[f] = o[f]
            kvs.append((keys["EndpointSlice"] + o["metadata"]["name"], json.dumps(x).encode()))
        batches = [kvs[i:i + 100] for i in range(0, len(kvs), 100)]
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            for f in concurrent.futures.as_completed([ex.submit(etcd.put_all, b) for b in batches]):
                f.result()
        # Every object visible through the API (its watch cache has caught up).
        for path, want in ((f"/api/v1/namespaces/{ns}/services", len(svcs)),
                           (f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
                            len(slices))):
            def seen(path=path, want=want):
                res = api.must("GET", path + "?limit=1")
                got = len(res.get("items", [])) + res["metadata"].get("remainingItemCount", 0)
                return got >= want
            bench.wait_for(seen, 120, 0.5, f"{want} objects at {path}")
        return others

    # -- the two proxies --
    def settle(self, proc, log: bench.AgentLog | None, fig: dict) -> None:
        """Quiet for 2 s (no new synced line / RSS change under 1%), at most 60 s."""
        time.sleep(1.0)
        deadline = time.monotonic() + 60
        last = (-1, 0.0)
        last_t = time.monotonic()
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise Functional(f"{proc.args[4]} exited ({proc.returncode})")
            n = 0
            if log is not None:
                log.poll()
                n = len(log.synced)
            m = rss(proc.pid)["VmRSS"]
            if n != last[0] or abs(m - last[1]) > 0.01 * max(m, 1):
                last, last_t = (n, m), time.monotonic()
            elif time.monotonic() - last_t >= 2.0:
                break
            time.sleep(0.2)
        st = rss(proc.pid)
        fig["rss_mib"], fig["hwm_mib"] = st["VmRSS"], st["VmHWM"]
        fig["peak_ratio"] = st["VmHWM"] / st["VmRSS"]

    def nftproxy(self, node: Node, world: World, key: str = "nftproxy") -> None:
        fig = self.r.setdefault(key, {})
        t_start = node.start_agent()
        wall = time.time()
        line = bench.RssTimeline(node.agent.pid)
        t_seen, _ = node.wait_element(world.last_cip, t_start, 120 + 2 * self.scale)
        fig["cold_s"] = t_seen - t_start
        recs = node.wait_synced(1, 60 * self.scale)
        # CPU the agent used up to its first full sync: the figure two builds compare best
        # (the cold start's wall time also follows the API server, which shares the cores)
        fig["cpu_s"] = proc_cpu_s(node.agent.pid)
        lg = node.log
        if lg.lists_ts:
            fig["lists_s"] = lg.lists_ts - wall
            if recs[0].get("ts"):
                fig["compute_commit_s"] = recs[0]["ts"] - lg.lists_ts
        fig["first_apply_ms"] = recs[0].get("apply_ms")
        # A real API server serves Services and EndpointSlices as protobuf: the agent reading
        # them as JSON without being asked to means its protobuf path failed and fell back.
        fig["encoding"] = {k: lg.encodings.get(k) for k in ("services", "endpointslices")}
        if "application/json" not in " ".join(node.extra_args) and \
                set(fig["encoding"].values()) != {"Protobuf"}:
            raise Functional(f"nftproxy read its lists as {fig['encoding']}, not protobuf")
        self.settle(node.agent, lg, fig)
        line.stop()
        fig["rss_profile"] = bench.rss_profile(line, lg)
        say(f"  nftproxy: cold start {fig['cold_s']:.3f}s (lists {fig.get('lists_s', 0):.3f}s "
            f"as {'/'.join(sorted(set(str(v) for v in fig['encoding'].values())))}, "
            f"then compute+commit {fig.get('compute_commit_s', 0):.3f}s, commit "
            f"{fig.get('first_apply_ms')} ms; agent CPU {fig['cpu_s']:.2f}s); RSS "
            f"{fig['rss_mib']:.1f} MiB, peak "
            f"{fig['hwm_mib']:.1f} MiB ({fig['peak_ratio']:.2f}x); RSS profile (MiB) "
            f"{fig['rss_profile']}")
        mon = Monitor(node.ns, os.path.join(node.dir, "monitor.err"))
        try:
            time.sleep(0.3)
            ep, svc = [], []
            for _ in range(self.a.samples):
                obj, new, t0 = self.replace_endpoint(world)
                got = mon.wait_all([("ip-cluster-backends", "v", new)], t0, 10 + self.scale)
                if got is None:
                    raise Functional(f"nftproxy: endpoint {new} never reached the kernel")
                ep.append((max(got.values()) - t0) * 1000)
                time.sleep(0.15)
            for _ in range(self.a.samples):
                objs, cip, eps = world.add_service()
                toks = [("clusterip", "k", cip)] + [("ip-cluster-backends", "v", e) for e in eps]
                t_first, t0 = post_service(self.api, objs)
                got = mon.wait_all(toks, t_first, 10 + self.scale)
                if got is None:
                    raise Functional(f"nftproxy: new Service {cip} never fully reached the kernel")
                svc.append((max(got.values()) - t0) * 1000)
                time.sleep(0.15)
        finally:
            mon.stop()
        fig["ep_p50"], fig["ep_p90"] = pct(ep, 50), pct(ep, 90)
        fig["svc_p50"], fig["svc_p90"] = pct(svc, 50), pct(svc, 90)
        fig["idle_cpu_pct"] = self.idle_cpu(node.agent.pid)
        say(f"  nftproxy: endpoint replaced p50 {fig['ep_p50']:.1f} ms, new Service p50 "
            f"{fig['svc_p50']:.1f} ms; idle CPU {fig['idle_cpu_pct']:.2f}%")
        REG.stop_proc(node.agent)
        node.agent = None

    def replace_endpoint(self, world: World) -> tuple[dict, str, float]:
        """PUT one Service's slice with one endpoint replaced: (slice, new address, time just
        before the write)."""
        i = self.rng.choice(world.normal())
        obj, new = world.replace(i, self.rng.randrange(world.e))
        t0 = time.monotonic()
        self.api.must("PUT", path_of(obj, True), obj)
        return obj, new, t0

    def idle_cpu(self, pid: int) -> float:
        def ticks():
            with open(f"/proc/{pid}/stat") as f:
                s = f.read()
            rest = s[s.rindex(")") + 2:].split()
            return int(rest[11]) + int(rest[12])
        c0, t0 = ticks(), time.monotonic()
        time.sleep(self.a.idle_seconds)
        return (ticks() - c0) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - t0) * 100

    def kube_proxy(self, node: Node, world: World, rep: int) -> None:
        fig = self.r["kube-proxy"]
        log = os.path.join(node.dir, f"kube-proxy-{rep}.log")
        t_start = time.monotonic()
        kp = node.popen([f"{self.k8s}/kube-proxy", "--proxy-mode=nftables",
                         f"--kubeconfig={node.dir}/kubeconfig", f"--hostname-override={NODE}",
                         f"--cluster-cidr={CLUSTER_CIDR}", "--conntrack-max-per-core=0",
                         f"--healthz-bind-address={KP_HEALTHZ}",
                         f"--metrics-bind-address={KP_METRICS}", "--v=1"], log)
        self.procs.append(kp)
        poller = bench.ElementPoller(in_netns(node.ns, bench.ElementPoller.new_socket))
        key = key_ip_proto_port(world.last_cip, "tcp", 80)
        deadline = t_start + self.a.kube_proxy_timeout
        while not poller.exists("kube-proxy", "service-ips", key):
            if kp.poll() is not None:
                raise Functional(f"kube-proxy exited ({kp.returncode}): see {log}")
            if time.monotonic() > deadline:
                poller.close()
                self.r["notes"].append(f"kube-proxy: no full ruleset after "
                                       f"{self.a.kube_proxy_timeout:.0f}s; not measured further")
                fig["cold_s"] = None
                return
            time.sleep(0.01)
        fig["cold_s"] = time.monotonic() - t_start
        poller.close()
        self.settle(kp, None, fig)
        say(f"  kube-proxy: cold start {fig['cold_s']:.3f}s; RSS {fig['rss_mib']:.1f} MiB, peak "
            f"{fig['hwm_mib']:.1f} MiB")
        mon = Monitor(node.ns, os.path.join(node.dir, "monitor-kp.err"))
        chains = ChainWatch(node.ns)
        timeout = max(30.0, 4 * fig["cold_s"])
        try:
            time.sleep(0.3)
            ep, svc = [], []
            for _ in range(self.a.kube_proxy_samples):
                obj, new, t0 = self.replace_endpoint(world)
                # kube-proxy 1.36 DNATs through an anonymous map in the Service's chain
                # (`dnat ip to numgen random mod N map { 0 : IP . PORT, ... }`) and only gives an
                # endpoint a chain of its own when it needs more (affinity, hairpin masquerade):
                # the new endpoint is an element of a new anonymous map, or a new chain
                t = wait_endpoint(mon, chains, new, t0, timeout)
                if t is None:
                    raise Functional(f"kube-proxy: {new} not in the kernel after {timeout:.0f}s")
                ep.append((t - t0) * 1000)
            for _ in range(self.a.kube_proxy_samples):
                objs, cip, _eps = world.add_service()
                tok = ("service-ips", "k", cip)
                t_first, t0 = post_service(self.api, objs)
                got = mon.wait_all([tok], t_first, timeout)
                if got is None:
                    raise Functional(f"kube-proxy: new Service {cip} not in service-ips after "
                                     f"{timeout:.0f}s")
                svc.append((got[tok] - t0) * 1000)
        finally:
            mon.stop()
            chains.stop()
        fig["ep_p50"], fig["ep_p90"] = pct(ep, 50), pct(ep, 90)
        fig["svc_p50"], fig["svc_p90"] = pct(svc, 50), pct(svc, 90)
        fig["idle_cpu_pct"] = self.idle_cpu(kp.pid)
        say(f"  kube-proxy: endpoint replaced p50 {fig['ep_p50']:.1f} ms, new Service p50 "
            f"{fig['svc_p50']:.1f} ms; idle CPU {fig['idle_cpu_pct']:.2f}%")
        REG.stop_proc(kp)


# --------------------------------------------------------------------------
# table

# Issue 14's targets per (Services, endpoints per Service).
TARGET = {(10000, 5): {"cold_s": 1.0}, (50000, 5): {"cold_s": 4.0, "hwm_mib": 300},
          (100000, 5): {"cold_s": 8.0}, (5000, 250): {"cold_s": 5.0}, (45000, 1): {"cold_s": 5.0}}
# `--table`: every shape of the table.
TABLE_SIZES = [(10000, 5), (50000, 5), (100000, 5), (5000, 250), (45000, 1)]
ROWS = [  # key, figure, format, target for every size
    ("cold_s", "cold start (exec -> full ruleset in the kernel)", "{:.3f} s", None),
    ("lists_s", "  initial lists received (nftproxy's log line)", "{:.3f} s", None),
    ("compute_commit_s", "  then compute + first commit", "{:.3f} s", None),
    ("ep_p50", "endpoint replaced p50 (API write -> kernel)", "{:.1f} ms", 10.0),
    ("svc_p50", "new Service p50 (its slice's write -> kernel)", "{:.1f} ms", 15.0),
    ("rss_mib", "RSS settled after cold start", "{:.1f} MiB", None),
    ("hwm_mib", "peak RSS (VmHWM)", "{:.1f} MiB", None),
    ("peak_ratio", "peak / settled RSS", "{:.2f}x", 1.3),
    ("idle_cpu_pct", "CPU when idle", "{:.2f}% of a core", None),
]


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def table(runs: list[dict]) -> list[tuple]:
    n, e = runs[0]["services"], runs[0]["endpoints"]
    rows = []
    for key, what, fmt, limit in ROWS:
        limit = TARGET.get((n, e), {}).get(key, limit)
        ours = med([r["nftproxy"].get(key) for r in runs])
        theirs = med([r["kube-proxy"].get(key) for r in runs])
        show = (lambda v: fmt.format(v) if v is not None else "n/a")
        ratio = f"{theirs / ours:.0f}x" if ours and theirs and key in (
            "cold_s", "ep_p50", "svc_p50") else ""
        verdict = "-" if limit is None or ours is None else ("PASS" if ours <= limit else "FAIL")
        rows.append((what, f"{n}x{e}", show(ours), show(theirs), ratio,
                     f"<= {limit}" if limit is not None else "-", verdict))
    fails = sum(len(r["failures"]) for r in runs)
    rows.append(("functional failures", f"{n}x{e}", str(fails), "", "", "0",
                 "PASS" if fails == 0 else "FAIL"))
    return rows


def print_table(rows: list[tuple]) -> None:
    hdr = ("figure", "N x E", "nftproxy", "kube-proxy", "kp/ours", "target", "verdict")
    w = [max(len(str(r[i])) for r in [hdr, *rows]) for i in range(len(hdr))]
    for r in [hdr, tuple("-" * x for x in w), *rows]:
        print("| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--endpoints", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=1, help="runs per size; figures are their median")
    ap.add_argument("--table", action="store_true",
                    help="10k, 50k and 100k x 5, 5k x 250 and 45k x 1, 3 runs each")
    ap.add_argument("--smoke", action="store_true", help="300 Services, few samples (CI)")
    ap.add_argument("--samples", type=int, default=20, help="nftproxy change samples of each kind")
    ap.add_argument("--kube-proxy-samples", type=int, default=5)
    ap.add_argument("--kube-proxy-max-services", type=int, default=10000,
                    help="run kube-proxy only up to this size (its 50k cold start takes minutes)")
    ap.add_argument("--kube-proxy-timeout", type=float, default=600.0)
    ap.add_argument("--idle-seconds", type=float, default=5.0)
    ap.add_argument("--agent-args", default="")
    ap.add_argument("--agent-args-b", default=None,
                    help="also measure nftproxy with these flags after each run, over the same "
                         "server (an A/B, e.g. \"--initial-lists paging\"); in the JSON as nftproxy-b")
    ap.add_argument("--bin", default=os.environ.get("NFTPROXY_BIN", bench.DEFAULT_BIN))
    ap.add_argument("--bin-b", default=None,
                    help="also measure this nftproxy build after each run, over the same server "
                         "(an A/B of two builds; with --agent-args-b, run with those flags)")
    ap.add_argument("--json", help="also write every raw figure to this file")
    ap.add_argument("--keep-workdir", action="store_true")
    ap.add_argument("--loader", choices=("auto", "api", "etcd"), default="auto",
                    help="how the objects get in: `api` creates each through kube-apiserver "
                    "(~40/s at 50k on 2 cores), `etcd` writes them into etcd from templates the "
                    "API server created (seconds); `auto`: etcd from 5,000 Services")
    a = ap.parse_args(argv)
    if a.smoke:
        a.services, a.samples, a.kube_proxy_samples, a.idle_seconds = 300, 5, 2, 2.0
    sizes = TABLE_SIZES if a.table else [(a.services, a.endpoints)]
    if a.table:
        a.repeat = max(a.repeat, 3)

    try:
        k8s = realnode.find_k8s_dir()
    except realnode.Skip as e:
        print(f"realapi.py: skipped, no real Kubernetes binaries ({e}); set NFTPROXY_K8S_DIR to "
              f"a directory with etcd, kube-apiserver and kube-proxy, or use bench.py",
              file=sys.stderr)
        return 0
    if os.geteuid() != 0:
        print("realapi.py needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    for tool in ("ip", "nft", "openssl"):
        if not shutil.which(tool):
            print(f"realapi.py needs `{tool}`", file=sys.stderr)
            return 2
    if not os.access(a.bin, os.X_OK):
        print(f"nftproxy binary {a.bin} missing: run `cargo build --release`", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, bench._on_signal)
    signal.signal(signal.SIGHUP, bench._on_signal)
    workdir = tempfile.mkdtemp(prefix=f"nftproxy-realapi-{os.getpid()}-")
    binary = os.path.join(workdir, "nftproxy")
    shutil.copy2(a.bin, binary)
    binary_b = None
    if a.bin_b:
        binary_b = os.path.join(workdir, "nftproxy-b")
        shutil.copy2(a.bin_b, binary_b)
    say(f"binaries {k8s}; nftproxy {a.bin}; work dir {workdir}; load average "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    raw, rows, failed, idx = [], [], False, 0
    try:
        bench.remove_stale_namespaces()
        for n, e in sizes:
            a.services, a.endpoints = n, e
            idx += 1
            runs = RealRun(a, idx, k8s, workdir, binary, binary_b).go()
            raw += runs
            failed |= any(r["failures"] for r in runs)
            rows += table(runs)
    except KeyboardInterrupt:
        failed = True
        return 130
    finally:
        REG.cleanup()
        if a.json:
            with open(a.json, "w") as f:
                json.dump(raw, f, indent=1, default=str)
        if rows:
            print(f"\n== real kube-apiserver 1.36: nftproxy and kube-proxy (nftables mode), "
                  f"{a.repeat} run(s) per size (median) ==")
            print_table(rows)
        if (a.agent_args_b is not None or a.bin_b) and raw:
            print(f"\n== A/B over the same servers: nftproxy (A: {a.bin}, {a.agent_args!r}) vs "
                  f"B ({a.bin_b or a.bin}, {a.agent_args_b!r}); medians, every run in brackets ==")
            for n, e in sorted({(r["services"], r["endpoints"]) for r in raw}):
                runs = [r for r in raw if (r["services"], r["endpoints"]) == (n, e)]
                for key, what in (("cold_s", "cold start (s)"), ("lists_s", "lists received (s)"),
                                  ("compute_commit_s", "then compute + commit (s)"),
                                  ("cpu_s", "agent CPU to the first sync (s)"),
                                  ("hwm_mib", "peak RSS (MiB)")):
                    for side in ("nftproxy", "nftproxy-b"):
                        vals = [r.get(side, {}).get(key) for r in runs]
                        vals = [v for v in vals if v is not None]
                        if vals:
                            print(f"  {n:>6}x{runs[0]['endpoints']} {what:28s} "
                                  f"{'A' if side == 'nftproxy' else 'B'}: {med(vals):.3f} "
                                  f"[{', '.join(f'{v:.3f}' for v in vals)}]")
        bench.finish(raw, bool(rows), failed, a.keep_workdir, workdir)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
