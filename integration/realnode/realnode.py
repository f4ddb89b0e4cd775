"""A one-node Kubernetes cluster from real binaries, in its own network namespace, for nftproxy.

Nothing touches the host's routes or ruleset: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, containerd and kubelet run inside the node namespace (``nsenter --net``: the
network namespace only, so that kubelet and containerd share the host's mount namespace and see
each other's mounts, which all lie under the run's work dir). kube-proxy is NOT run.

    ext  (outside client / router)             node  (the Kubernetes node)
      eth0 192.168.77.1/24  ───── veth ─────     eth0 192.168.77.2/24  (API server :6443)
      lo   203.0.113.5/32 (client address)       cni0 10.244.0.1/24 (bridge CNI, pods .2-.254)
      routes 10.244.0.0/16, 192.0.2.0/24         default via 192.168.77.1
             (LB IPs) via 192.168.77.2

Services 10.96.0.0/16 (``kubernetes`` = 10.96.0.1), NodePorts on 192.168.77.2, LB IPs 192.0.2.x
(set by the tests in ``status.loadBalancer``).

Images are built locally (no registry): a static pause binary, busybox-static with an httpd CGI
echo server, and nftproxy from the release binary on a bookworm-slim-like rootfs (the files of
Debian's libc6, libgcc-s1, libnftnl11 and libmnl0, the binary at /usr/local/bin/nftproxy,
ENTRYPOINT nftproxy), written as docker-archive tars and imported with ``ctr``.

``Node.destroy()`` (also from atexit / signal handlers in the caller) removes everything:
pods, processes, mounts under the work dir, CNI netns and result files, cgroups, namespaces.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CLIENT = os.path.join(HERE, "client.py")

NODE_NAME = "realnode"
NODE_IP = "192.168.77.2"
EXT_IP = "192.168.77.1"
CLIENT_IP = "203.0.113.5"
POD_SUBNET = "10.244.0.0/24"
POD_GW = "10.244.0.1"
SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SVC_IP = "10.96.0.1"
LB_NET = "192.0.2.0/24"
BINARIES = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet",
            "kubectl", "kube-proxy"]
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"
BUSYBOX_IMAGE = "nftproxy-test/busybox:1"
AGENT_IMAGE = "nftproxy:latest"  # exactly what deploy/daemonset.yaml names
KUBE_PROXY_IMAGE = "registry.k8s.io/kube-proxy:v1.36.2"  # what kubeadm 1.36 names
# The node tools both proxies' images ship (the Dockerfile's runtime stage; kube-proxy's
# distroless-iptables image has the same): nft, iptables in both back ends, ipset, ipvsadm,
# conntrack, ip. Taken from the host with their shared libraries.
NET_TOOLS = ["nft", "xtables-nft-multi", "xtables-legacy-multi", "ipset", "ipvsadm", "conntrack",
             "ip"]
NETNS_DIR = "/var/run/netns"


class Skip(Exception):
    """The lane cannot run here (no binaries, not root)."""


def sh(*args, check=True, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, timeout=timeout, text=True,
                          capture_output=True, **kw)


def find_k8s_dir() -> str:
    """Unpacked binaries: $NFTPROXY_K8S_DIR (a dir with the binaries or with the tarball), else
    ../shared/k8s relative to the checkout (tarball, unpacked + verified into /opt/nftproxy-k8s)."""
    cands = []
    if os.environ.get("NFTPROXY_K8S_DIR"):
        cands.append(os.environ["NFTPROXY_K8S_DIR"])
    cands.append(os.path.join(os.path.dirname(ROOT), "shared", "k8s"))
    for d in cands:
        if all(os.access(os.path.join(d, b), os.X_OK) for b in BINARIES):
            return d
        tars = sorted(f for f in os.listdir(d) if f.startswith("k8s-") and f.endswith(".tar.xz")) \
            if os.path.isdir(d) else []
        if tars:
            return unpack(os.path.join(d, tars[-1]), os.path.join(d, "BINARIES.sha256"))
    raise Skip("real-node lane: Kubernetes binaries not found in ../shared/k8s or $NFTPROXY_K8S_DIR")


def unpack(tarball: str, sums: str) -> str:
    dest = os.environ.get("NFTPROXY_K8S_UNPACK", "/opt/nftproxy-k8s")
    os.makedirs(dest, exist_ok=True)
    if os.path.exists(sums):
        ok = subprocess.run(["sha256sum", "--quiet", "-c", sums], cwd=dest,
                            capture_output=True).returncode == 0
    else:
        ok = all(os.path.exists(os.path.join(dest, b)) for b in BINARIES)
    if not ok:
        sh("tar", "-xJf", tarball, "-C", dest, timeout=600)
        if os.path.exists(sums):
            sh("sha256sum", "--quiet", "-c", sums, cwd=dest)
    return dest


# ---------------------------------------------------------------------------------------- images

def _tar_bytes(entries) -> bytes:
    """entries: (arcname, kind, value, mode) with kind 'dir' | 'file' (value = host path or
    bytes) | 'link' (value = target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        seen = set()
        for name, kind, value, mode in entries:
            name = name.lstrip("/")
            if name in seen or not name:
                continue
            seen.add(name)
            ti = tarfile.TarInfo(name)
            ti.uid = ti.gid = 0
            ti.mtime = 0
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, mode or 0o755
                t.addfile(ti)
            elif kind == "link":
                ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, value, 0o777
                t.addfile(ti)
            else:
                data = value if isinstance(value, bytes) else open(value, "rb").read()
                ti.size, ti.mode = len(data), mode or 0o644
                t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _parents(path: str):
    parts = path.strip("/").split("/")[:-1]
    for i in range(1, len(parts) + 1):
        yield ("/".join(parts[:i]), "dir", None, 0o755)


def docker_archive(out: str, ref: str, entries, entrypoint=None, cmd=None, env=None):
    full = []
    for e in entries:
        full.extend(_parents(e[0]))
        full.append(e)
    layer = _tar_bytes(full)
    diff = hashlib.sha256(layer).hexdigest()
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Entrypoint": entrypoint, "Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff}"]},
        "history": [{"created_by": "nftproxy integration/realnode"}],
    }
    cfg = json.dumps(config).encode()
    cfg_name = hashlib.sha256(cfg).hexdigest() + ".json"
    manifest = json.dumps([{"Config": cfg_name, "RepoTags": [ref], "Layers": [f"{diff}/layer.tar"]}])
    with tarfile.open(out, "w") as t:
        for name, data in ((cfg_name, cfg), (f"{diff}/layer.tar", layer),
                           ("manifest.json", manifest.encode())):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))


def _dpkg_files(pkg: str):
    out = sh("dpkg", "-L", pkg).stdout.split("\n")
    for p in out:
        if not p or p == "/." or p.startswith("/usr/share/doc") or p.startswith("/usr/share/lintian"):
            continue
        real = os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))
        if os.path.islink(real):
            yield (real, "link", os.readlink(real), 0)
        elif os.path.isdir(real):
            yield (real, "dir", None, 0o755)
        elif os.path.isfile(real):
            yield (real, "file", real, os.stat(real).st_mode & 0o7777)


def _file_entries(path: str):
    """A file as image entries, each symlink on the way and the file it ends at (a host with
    merged /usr: paths are stored under their real directory, the image's /lib, /bin and
    /sbin are links into usr/ as on the host)."""
    seen = set()
    while True:
        real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        if real in seen:
            return
        seen.add(real)
        if os.path.islink(real):
            target = os.readlink(real)
            yield (real, "link", target, 0)
            path = target if target.startswith("/") else os.path.join(os.path.dirname(real), target)
        else:
            yield (real, "file", real, os.stat(real).st_mode & 0o7777)
            return


def _with_libraries(paths):
    """The files and, transitively, the shared libraries ldd resolves for them."""
    todo, done, entries = list(paths), set(), []
    while todo:
        p = todo.pop()
        if p in done:
            continue
        done.add(p)
        entries += list(_file_entries(p))
        for line in sh("ldd", p, check=False).stdout.split("\n"):
            m = re.search(r"(/\S+) \(0x", line)
            if m:
                todo.append(m.group(1))
    return entries


def net_tools():
    """NET_TOOLS with their libraries, iptables' extensions and its command names (the plain
    names on the nft back end, as Debian's alternatives and kube-proxy's image default)."""
    missing = [t for t in NET_TOOLS if not shutil.which(t)]
    if missing:
        raise RuntimeError(f"host tools missing for the images: {missing} (run.sh installs them)")
    paths = [shutil.which(t) for t in NET_TOOLS]
    ext = "/usr/lib/x86_64-linux-gnu/xtables"
    paths += [os.path.join(ext, f) for f in sorted(os.listdir(ext)) if f.endswith(".so")]
    entries = _with_libraries(paths)
    for v in ("iptables", "ip6tables"):
        for suffix in ("", "-save", "-restore"):
            for backend in ("nft", "legacy"):
                entries.append((f"usr/sbin/{v}-{backend}{suffix}", "link",
                                f"xtables-{backend}-multi", 0))
            entries.append((f"usr/sbin/{v}{suffix}", "link", "xtables-nft-multi", 0))
    return entries


def build_images(work: str, agent_bin: str, k8s_dir: str) -> dict[str, str]:
    """Writes the four docker-archive tars; returns {ref: path}."""
    out = {}
    usrmerge = [("bin", "link", "usr/bin", 0), ("sbin", "link", "usr/sbin", 0),
                ("lib", "link", "usr/lib", 0), ("lib64", "link", "usr/lib64", 0),
                ("tmp", "dir", None, 0o1777), ("etc", "dir", None, 0o755),
                ("proc", "dir", None, 0o755), ("sys", "dir", None, 0o755),
                ("dev", "dir", None, 0o755), ("usr/lib64", "dir", None, 0o755)]
    # pause: a static binary that sleeps until SIGTERM/SIGINT
    src = os.path.join(work, "pause.c")
    with open(src, "w") as f:
        f.write('#include <signal.h>\n#include <unistd.h>\n#include <sys/wait.h>\n'
                'static void h(int s){(void)s;_exit(0);}\n'
                'static void r(int s){(void)s;while(waitpid(-1,0,WNOHANG)>0);}\n'
                'int main(void){signal(SIGINT,h);signal(SIGTERM,h);signal(SIGCHLD,r);'
                'for(;;)pause();}\n')
    sh("gcc", "-static", "-O2", "-o", os.path.join(work, "pause"), src)
    out[PAUSE_IMAGE] = os.path.join(work, "pause.tar")
    docker_archive(out[PAUSE_IMAGE], PAUSE_IMAGE,
                   [("pause", "file", os.path.join(work, "pause"), 0o755)], entrypoint=["/pause"])
    # busybox: every applet as a symlink; /www/cgi-bin/who answers "pod=<name> peer=<client IP>"
    applets = sh("/bin/busybox", "--list").stdout.split()
    entries = [("usr", "dir", None, 0o755), ("usr/bin", "dir", None, 0o755)] + usrmerge
    entries.append(("usr/bin/busybox", "file", "/bin/busybox", 0o755))
    entries += [(f"usr/bin/{a}", "link", "busybox", 0) for a in applets if a != "busybox"]
    entries.append(("www/cgi-bin/who", "file",
                    b'#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n"\n'
                    b'echo "pod=$POD_NAME peer=$REMOTE_ADDR"\n', 0o755))
    entries.append(("www/index.html", "file", b"ok\n", 0o644))
    out[BUSYBOX_IMAGE] = os.path.join(work, "busybox.tar")
    docker_archive(out[BUSYBOX_IMAGE], BUSYBOX_IMAGE, entries, cmd=["/bin/sh"])
    # nftproxy: the Dockerfile's runtime stage (bookworm-slim + libnftnl11 + libmnl0)
    entries = [("usr", "dir", None, 0o755), ("usr/local/bin", "dir", None, 0o755)] + usrmerge
    for pkg in ("libc6", "libgcc-s1", "libnftnl11", "libmnl0"):
        entries += list(_dpkg_files(pkg))
    entries.append(("etc/os-release", "file", "/etc/os-release", 0o644))
    tools = net_tools()
    entries += tools
    entries.append(("usr/local/bin/nftproxy", "file", agent_bin, 0o755))
    entries.append(("usr/local/bin/kube-proxy", "link", "nftproxy", 0))  # as the Dockerfile
    out[AGENT_IMAGE] = os.path.join(work, "nftproxy.tar")
    docker_archive(out[AGENT_IMAGE], AGENT_IMAGE, entries, entrypoint=["/usr/local/bin/nftproxy"])
    # kube-proxy: its static binary where kubeadm's DaemonSet runs it, the same tools
    entries = [("usr", "dir", None, 0o755), ("usr/local/bin", "dir", None, 0o755)] + usrmerge
    entries += tools
    entries.append(("etc/os-release", "file", "/etc/os-release", 0o644))
    entries.append(("usr/local/bin/kube-proxy", "file", os.path.join(k8s_dir, "kube-proxy"), 0o755))
    out[KUBE_PROXY_IMAGE] = os.path.join(work, "kube-proxy.tar")
    docker_archive(out[KUBE_PROXY_IMAGE], KUBE_PROXY_IMAGE, entries)
    return out


# ----------------------------------------------------------------------------------------- certs

def make_pki(d: str) -> None:
    os.makedirs(d, exist_ok=True)

    def run(*a):
        sh("openssl", *a, cwd=d)

    run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key")
    run("req", "-x509", "-new", "-key", "ca.key", "-days", "2", "-subj", "/CN=nftproxy-realnode-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature", "-out", "ca.crt")
    certs = {
        "apiserver": ("/CN=kube-apiserver", "serverAuth",
                      f"IP:{NODE_IP},IP:{KUBERNETES_SVC_IP},IP:127.0.0.1,DNS:kubernetes,"
                      "DNS:kubernetes.default,DNS:kubernetes.default.svc,"
                      "DNS:kubernetes.default.svc.cluster.local,DNS:localhost"),
        "admin": ("/O=system:masters/CN=kubernetes-admin", "clientAuth", None),
        "kubelet": (f"/O=system:nodes/CN=system:node:{NODE_NAME}", "clientAuth", None),
        "controller-manager": ("/CN=system:kube-controller-manager", "clientAuth", None),
        "scheduler": ("/CN=system:kube-scheduler", "clientAuth", None),
        "apiserver-kubelet-client": ("/O=system:masters/CN=kube-apiserver-kubelet-client",
                                     "clientAuth", None),
    }
    for name, (subj, eku, san) in certs.items():
        run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key")
        run("req", "-new", "-key", f"{name}.key", "-subj", subj, "-out", f"{name}.csr")
        ext = f"{name}.ext"
        with open(os.path.join(d, ext), "w") as f:
            f.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                    f"extendedKeyUsage={eku}\n" + (f"subjectAltName={san}\n" if san else ""))
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", f"{name}.crt")
    run("genrsa", "-out", "sa.key", "2048")
    run("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")


def kubeconfig(path: str, pki: str, user: str, server: str) -> None:
    with open(path, "w") as f:
        json.dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": server,
                                                   "certificate-authority": f"{pki}/ca.crt"}}],
            "users": [{"name": "u", "user": {"client-certificate": f"{pki}/{user}.crt",
                                             "client-key": f"{pki}/{user}.key"}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        }, f)


# ------------------------------------------------------------------------------------------ node

class Node:
    def __init__(self, k8s_dir: str, agent_bin: str, keep: bool = False):
        self.k8s = k8s_dir
        self.agent_bin = agent_bin
        self.keep = keep
        self.prefix = f"nprn{os.getpid()}-"
        self.ns_node = self.prefix + "node"
        self.ns_ext = self.prefix + "ext"
        self.work = tempfile.mkdtemp(prefix=f"nftproxy-realnode-{os.getpid()}-")
        self.logs = os.path.join(self.work, "logs")
        os.makedirs(self.logs)
        self.pki = os.path.join(self.work, "pki")
        self.admin_kc = os.path.join(self.work, "admin.kubeconfig")
        self.sock = os.path.join(self.work, "containerd", "containerd.sock")
        self.cgroup_root = f"/{self.prefix}kubelet"
        self.cni_name = f"{self.prefix}pods"
        self.procs: dict[str, subprocess.Popen] = {}
        self.timings: list[tuple[str, float]] = []
        self.netns_before = set(os.listdir(NETNS_DIR)) if os.path.isdir(NETNS_DIR) else set()
        # host directories that containerd / CNI create on first use: removed again if new
        self.new_host_dirs = [d for d in ("/run/containerd", "/var/lib/cni") if not os.path.exists(d)]
        self.destroyed = False

    # -- helpers
    def nsexec(self, ns: str, *args) -> list[str]:
        return ["nsenter", f"--net={NETNS_DIR}/{ns}", "--", *args]

    def node_sh(self, *args, check=True, timeout=60):
        return sh(*self.nsexec(self.ns_node, *args), check=check, timeout=timeout)

    def ext_sh(self, *args, check=True, timeout=60):
        return sh(*self.nsexec(self.ns_ext, *args), check=check, timeout=timeout)

    def kubectl(self, *args, check=True, timeout=120, input=None) -> str:
        cmd = self.nsexec(self.ns_node, f"{self.k8s}/kubectl", f"--kubeconfig={self.admin_kc}",
                          *args)
        p = subprocess.run(cmd, text=True, capture_output=True, timeout=timeout, input=input)
        if check and p.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: rc={p.returncode}\n{p.stdout}\n{p.stderr}")
        return p.stdout if check else (p.stdout + p.stderr)

    def kubectl_json(self, *args):
        return json.loads(self.kubectl(*args, "-o", "json"))

    def apply(self, obj) -> str:
        return self.kubectl("apply", "-f", "-", input=json.dumps(obj))

    def client(self, ns: str, *args, timeout=120) -> dict:
        """client.py in a namespace; returns its JSON answer."""
        p = subprocess.run(self.nsexec(ns, "python3", CLIENT, *args), text=True,
                           capture_output=True, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"client {args}: {p.stderr}")
        return json.loads(p.stdout)

    def start(self, name: str, args: list[str], ns: str | None = None, env=None):
        log = open(os.path.join(self.logs, f"{name}.log"), "w")
        cmd = self.nsexec(ns or self.ns_node, *args)
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            env={**os.environ, **(env or {})})

    def check_alive(self):
        for name, p in self.procs.items():
            if p.poll() is not None:
                tail = open(os.path.join(self.logs, f"{name}.log")).read()[-3000:]
                raise RuntimeError(f"{name} exited with {p.returncode}:\n{tail}")

    def wait(self, what: str, fn, timeout: float, interval: float = 0.3):
        t0 = time.monotonic()
        last = None
        while time.monotonic() - t0 < timeout:
            self.check_alive()
            try:
                v = fn()
                if v:
                    return v
            except Exception as e:  # noqa: BLE001 - reported on timeout
                last = e
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last})")

    def timed(self, label: str, t0: float):
        self.timings.append((label, time.monotonic() - t0))

    # -- setup
    def create(self):
        t0 = time.monotonic()
        self._network()
        make_pki(self.pki)
        images = build_images(self.work, self.agent_bin, self.k8s)
        self.timed("namespaces, certificates, 4 images written", t0)
        t1 = time.monotonic()
        self._control_plane()
        self.timed("control plane up (etcd, apiserver ready)", t1)
        t1 = time.monotonic()
        self._containerd(images)
        self.timed("containerd up, images imported", t1)
        t1 = time.monotonic()
        self._kubelet()
        self.timed("kubelet registered, node Ready", t1)
        self.timed("cluster up (total)", t0)

    def _network(self):
        os.makedirs(NETNS_DIR, exist_ok=True)
        for ns in (self.ns_node, self.ns_ext):
            sh("ip", "netns", "add", ns)
        n, e = self.ns_node, self.ns_ext
        sh("ip", "-n", e, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", n)
        for ns, addr in ((n, NODE_IP), (e, EXT_IP)):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", e, "addr", "add", f"{CLIENT_IP}/32", "dev", "lo")
        sh("ip", "-n", n, "route", "add", "default", "via", EXT_IP)
        sh("ip", "-n", e, "route", "add", "10.244.0.0/16", "via", NODE_IP)
        sh("ip", "-n", e, "route", "add", LB_NET, "via", NODE_IP)
        for ns in (n, e):
            sh(*self.nsexec(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"))
        with contextlib.suppress(subprocess.CalledProcessError):
            sh(*self.nsexec(n, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"))

    def _control_plane(self):
        k, w, pki = self.k8s, self.work, self.pki
        api = f"https://{NODE_IP}:6443"
        self.start("etcd", [f"{k}/etcd", "--name=default", f"--data-dir={w}/etcd",
                            "--listen-client-urls=http://127.0.0.1:2379",
                            "--advertise-client-urls=http://127.0.0.1:2379",
                            "--listen-peer-urls=http://127.0.0.1:2380",
                            "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                            "--initial-cluster=default=http://127.0.0.1:2380",
                            "--log-level=warn"])
        self.start("kube-apiserver", [
            f"{k}/kube-apiserver", "--etcd-servers=http://127.0.0.1:2379",
            f"--advertise-address={NODE_IP}", "--bind-address=0.0.0.0", "--secure-port=6443",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--tls-cert-file={pki}/apiserver.crt", f"--tls-private-key-file={pki}/apiserver.key",
            f"--client-ca-file={pki}/ca.crt",
            f"--service-account-key-file={pki}/sa.pub",
            f"--service-account-signing-key-file={pki}/sa.key",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--authorization-mode=Node,RBAC", "--allow-privileged=true",
            f"--kubelet-client-certificate={pki}/apiserver-kubelet-client.crt",
            f"--kubelet-client-key={pki}/apiserver-kubelet-client.key",
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            "--profiling=false", f"--cert-dir={w}/apiserver-certs", "-v=1"])
        for name in ("admin", "controller-manager", "scheduler", "kubelet"):
            kubeconfig(f"{w}/{name}.kubeconfig", pki, name, api)
        self.wait("kube-apiserver /readyz",
                  lambda: self.kubectl("get", "--raw=/readyz", check=False).strip() == "ok", 90)
        self.start("kube-controller-manager", [
            f"{k}/kube-controller-manager", f"--kubeconfig={w}/controller-manager.kubeconfig",
            f"--authentication-kubeconfig={w}/controller-manager.kubeconfig",
            f"--authorization-kubeconfig={w}/controller-manager.kubeconfig",
            f"--service-account-private-key-file={pki}/sa.key", f"--root-ca-file={pki}/ca.crt",
            "--use-service-account-credentials=true", "--leader-elect=false",
            "--bind-address=127.0.0.1", f"--service-cluster-ip-range={SERVICE_CIDR}",
            # Node pod CIDRs, as kubeadm's controller-manager allocates them: the agent's
            # detect-local mode NodeCIDR (the shipped ConfigMap) reads spec.podCIDRs.
            "--allocate-node-cidrs=true", "--cluster-cidr=10.244.0.0/16", "--node-cidr-mask-size=24",
            f"--cert-dir={w}/cm-certs", "-v=1"])
        self.start("kube-scheduler", [
            f"{k}/kube-scheduler", f"--kubeconfig={w}/scheduler.kubeconfig",
            f"--authentication-kubeconfig={w}/scheduler.kubeconfig",
            f"--authorization-kubeconfig={w}/scheduler.kubeconfig",
            "--leader-elect=false", "--bind-address=127.0.0.1", "-v=1"])

    def _containerd(self, images: dict[str, str]):
        w = self.work
        cdir = os.path.join(w, "containerd")
        cni_conf = os.path.join(w, "cni-conf")
        os.makedirs(cni_conf)
        with open(os.path.join(cni_conf, "10-pods.conflist"), "w") as f:
            json.dump({"cniVersion": "0.4.0", "name": self.cni_name, "plugins": [
                {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
                 "hairpinMode": True,
                 "ipam": {"type": "host-local", "dataDir": f"{w}/cni-ipam",
                          "ranges": [[{"subnet": POD_SUBNET, "gateway": POD_GW}]],
                          "routes": [{"dst": "0.0.0.0/0"}]}},
            ]}, f)
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        cfg = f"""version = 2
root = "{cdir}/root"
state = "{cdir}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{cdir}/opt"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni_conf}"
"""
        os.makedirs(cdir)
        with open(os.path.join(cdir, "config.toml"), "w") as f:
            f.write(cfg)
        self.start("containerd", ["containerd", f"--config={cdir}/config.toml"])
        self.wait("containerd socket", lambda: sh("ctr", "-a", self.sock, "version",
                                                  check=False).returncode == 0, 30)
        for ref, tar in images.items():
            sh("ctr", "-a", self.sock, "-n", "k8s.io", "images", "import", tar, timeout=300)

    def _kubelet(self):
        w = self.work
        for ctl in self._cgroup_controllers():  # kubelet wants its cgroupRoot to exist
            d = f"/sys/fs/cgroup/{ctl}{self.cgroup_root}"
            os.makedirs(d, exist_ok=True)
            if ctl.startswith("cpuset"):
                for k in ("cpuset.cpus", "cpuset.mems"):
                    with open(f"{d}/{k}", "w") as f:
                        f.write(open(f"/sys/fs/cgroup/{ctl}/{k}").read())
        with open(f"{w}/resolv.conf", "w") as f:
            f.write("# no DNS in the real-node lane\n")
        cfg = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "failCgroupV1": False, "cgroupDriver": "cgroupfs", "cgroupRoot": self.cgroup_root,
            "containerRuntimeEndpoint": f"unix://{self.sock}",
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                               "x509": {"clientCAFile": f"{self.pki}/ca.crt"}},
            "authorization": {"mode": "AlwaysAllow"},
            "podLogsDir": f"{w}/pod-logs", "resolvConf": f"{w}/resolv.conf",
            "failSwapOn": False, "clusterDomain": "cluster.local",
            "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "address": NODE_IP, "healthzBindAddress": "127.0.0.1",
            "serializeImagePulls": False, "syncFrequency": "10s",
            "fileCheckFrequency": "10s", "nodeStatusUpdateFrequency": "4s",
        }
        with open(f"{w}/kubelet.yaml", "w") as f:
            json.dump(cfg, f)
        self.start("kubelet", [f"{self.k8s}/kubelet", f"--config={w}/kubelet.yaml",
                               f"--kubeconfig={w}/kubelet.kubeconfig", f"--root-dir={w}/kubelet",
                               f"--cert-dir={w}/kubelet-pki", f"--hostname-override={NODE_NAME}",
                               f"--node-ip={NODE_IP}", "-v=1"])

        def ready():
            n = self.kubectl_json("get", "node", NODE_NAME)
            return any(c["type"] == "Ready" and c["status"] == "True"
                       for c in n["status"].get("conditions", []))
        self.wait("node Ready", ready, 120, 1)
        # the root CA ConfigMap that every projected service-account volume needs
        self.wait("kube-root-ca.crt in kube-system",
                  lambda: self.kubectl("-n", "kube-system", "get", "cm", "kube-root-ca.crt",
                                       check=False).find("kube-root-ca.crt") >= 0, 60)

    # -- clean-up
    def destroy(self):
        if self.destroyed:
            return
        self.destroyed = True
        errors = []

        def attempt(what, fn):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - clean-up goes on
                errors.append(f"{what}: {e}")

        alive = lambda n: n in self.procs and self.procs[n].poll() is None  # noqa: E731
        if alive("kube-apiserver") and alive("kubelet"):
            # let kubelet stop the pods the proper way (CNI DEL, sandbox netns removed)
            attempt("delete workloads", lambda: self.kubectl(
                "delete", "ds,deploy,rs,pod", "--all", "-A", "--grace-period=1", "--wait=false",
                check=False, timeout=30))
            attempt("wait pods gone", lambda: self.wait_no_tasks(30))
        for name in ("kubelet", "kube-scheduler", "kube-controller-manager", "kube-apiserver",
                     "etcd"):
            attempt(f"stop {name}", lambda n=name: self._stop(n))
        attempt("kill leftover containers", self._kill_tasks)
        attempt("stop containerd", lambda: self._stop("containerd"))
        attempt("kill shims", self._kill_shims)
        attempt("unmount", self._unmount)
        attempt("pod netns", self._pod_netns)
        attempt("cgroups", self._cgroups)
        for ns in (self.ns_node, self.ns_ext):
            attempt(f"netns {ns}", lambda ns=ns: sh("ip", "netns", "delete", ns, check=False))
        attempt("cni results", self._cni_results)
        for d in self.new_host_dirs:
            attempt(d, lambda d=d: shutil.rmtree(d, ignore_errors=True))
        if not self.keep:
            attempt("work dir", lambda: shutil.rmtree(self.work))
        if errors:
            print("realnode clean-up problems:\n  " + "\n  ".join(errors))

    def wait_no_tasks(self, timeout):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            out = sh("ctr", "-a", self.sock, "-n", "k8s.io", "tasks", "ls", "-q", check=False).stdout
            if not out.strip():
                return
            time.sleep(0.5)

    def _stop(self, name):
        p = self.procs.get(name)
        if not p or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)

    def _kill_tasks(self):
        if not (self.procs.get("containerd") and self.procs["containerd"].poll() is None):
            return
        ctr = ["ctr", "-a", self.sock, "-n", "k8s.io"]
        for t in sh(*ctr, "tasks", "ls", "-q", check=False).stdout.split():
            sh(*ctr, "tasks", "kill", "-s", "SIGKILL", t, check=False)
        time.sleep(0.5)
        for t in sh(*ctr, "tasks", "ls", "-q", check=False).stdout.split():
            sh(*ctr, "tasks", "delete", "-f", t, check=False)
        for c in sh(*ctr, "containers", "ls", "-q", check=False).stdout.split():
            sh(*ctr, "containers", "delete", c, check=False)

    def _pids_with(self, needle: str):
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if needle in cmd:
                yield int(pid)

    def _kill_shims(self):
        # shims started by OUR containerd carry our socket path on their command line; any
        # process left in our cgroup subtree is a container process of this run
        pids = set(self._pids_with(self.sock))
        for ctl in self._cgroup_controllers():
            base = f"/sys/fs/cgroup/{ctl}{self.cgroup_root}"
            for dirpath, _, _ in os.walk(base):
                with contextlib.suppress(OSError):
                    pids |= {int(x) for x in open(f"{dirpath}/cgroup.procs").read().split()}
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.3 if pids else 0)

    def _unmount(self):
        def mounts():
            res = []
            for line in open("/proc/self/mountinfo"):
                mp = line.split()[4].replace("\\040", " ")
                if mp.startswith(self.work + "/"):
                    res.append(mp)
            return res
        for _ in range(3):
            ms = mounts()
            if not ms:
                return
            for mp in sorted(ms, key=len, reverse=True):
                if subprocess.run(["umount", mp], capture_output=True).returncode != 0:
                    subprocess.run(["umount", "-l", mp], capture_output=True)
        left = mounts()
        if left:
            raise RuntimeError(f"still mounted: {left}")

    def _pod_netns(self):
        if not os.path.isdir(NETNS_DIR):
            return
        for ns in set(os.listdir(NETNS_DIR)) - self.netns_before:
            if ns.startswith("cni-"):
                p = os.path.join(NETNS_DIR, ns)
                subprocess.run(["umount", p], capture_output=True)
                with contextlib.suppress(OSError):
                    os.unlink(p)

    def _cgroup_controllers(self):
        base = "/sys/fs/cgroup"
        return [c for c in os.listdir(base)
                if os.path.isdir(os.path.join(base, c)) and not os.path.islink(os.path.join(base, c))]

    def _cgroups(self):
        for ctl in self._cgroup_controllers():
            base = f"/sys/fs/cgroup/{ctl}{self.cgroup_root}"
            if not os.path.isdir(base):
                continue
            for dirpath, _, _ in sorted(os.walk(base), key=lambda x: -len(x[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)

    def _cni_results(self):
        d = "/var/lib/cni/results"
        if os.path.isdir(d):
            for f in os.listdir(d):
                if f.startswith(self.cni_name + "-"):
                    os.unlink(os.path.join(d, f))


if __name__ == "__main__":
    # development: bring the node up, print how to reach it, keep it until Ctrl-C / SIGTERM
    import sys
    n = Node(find_k8s_dir(), sys.argv[1] if len(sys.argv) > 1 else "/work/nftproxy-release-bin",
             keep=True)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    try:
        n.create()
        for label, secs in n.timings:
            print(f"{secs:7.2f}s  {label}")
        print(f"work dir {n.work}\nkubectl: nsenter --net={NETNS_DIR}/{n.ns_node} -- "
              f"{n.k8s}/kubectl --kubeconfig={n.admin_kc}", flush=True)
        while True:
            time.sleep(3600)
    finally:
        n.destroy()
