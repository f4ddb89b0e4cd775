#!/usr/bin/env bash
# Real-node lane: a one-node Kubernetes cluster from real binaries (in network namespaces), nftproxy
# installed with `kubectl apply -k deploy/`, checked with real pods and Services. See README.md.
#
# Binaries: $NFTPROXY_K8S_DIR (unpacked binaries or the k8s-*.tar.xz), else ../shared/k8s relative
# to the checkout. Without them the lane is skipped (exit 0). Needs root; installs its packages.
# Extra arguments go to pytest (e.g. -k rolling, -x).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

have_k8s() {
  local d
  for d in "${NFTPROXY_K8S_DIR:-}" "$ROOT/../shared/k8s"; do
    [ -n "$d" ] || continue
    [ -x "$d/kubelet" ] && [ -x "$d/kube-apiserver" ] && return 0
    compgen -G "$d/k8s-*.tar.xz" >/dev/null && return 0
  done
  return 1
}
if ! have_k8s; then
  echo "SKIP: real-node lane: Kubernetes binaries not found in ../shared/k8s or \$NFTPROXY_K8S_DIR"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "SKIP: real-node lane: needs root (network namespaces, containerd, kubelet)"
  exit 0
fi

echo "== real-node lane: packages"
need=()
for p in containerd runc containernetworking-plugins busybox-static gcc libc6-dev openssl \
         iproute2 nftables iptables ipset ipvsadm conntrack util-linux xz-utils libnftnl11 libmnl0 \
         python3 python3-pytest; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need[@]}"
fi
python3 -m pytest --version >/dev/null 2>&1 || { echo "pytest missing for $(command -v python3)"; exit 1; }

export NFTPROXY_BIN="${NFTPROXY_BIN:-$ROOT/target/release/nftproxy}"
if [ ! -x "$NFTPROXY_BIN" ]; then
  echo "== real-node lane: building $NFTPROXY_BIN"
  export PATH="$HOME/.cargo/bin:$PATH"
  cargo build --release --bin nftproxy
fi

echo "== real-node lane: pytest (agent $NFTPROXY_BIN)"
exec python3 -m pytest integration/realnode -q -c integration/realnode/pytest.ini \
  --rootdir integration/realnode "$@"
