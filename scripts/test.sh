#!/usr/bin/env bash
# The whole test suite: formatting and lints, unit/golden/flow tests, privileged netlink tests,
# end-to-end tests in network namespaces, the demo and the benchmark smoke run.
# Needs root (network namespaces, nftables); everything runs inside namespaces it creates.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
echo "== cargo fmt / clippy (house rules: Cargo.toml [workspace.lints], clippy.toml)"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -q -- -D warnings
echo "== cargo test (unit, golden, flows, architecture; no privileges)"
cargo build -q
cargo test --workspace -q
echo "== privileged tests (root; each in a fresh network namespace)"
cargo test --workspace -q -- --ignored
echo "== dependency policy (deny.toml)"
if ! cargo deny --version >/dev/null 2>&1; then
  echo "installing cargo-deny (once)"
  cargo install -q --locked cargo-deny
fi
cargo deny --log-level error check licenses bans sources
echo "== demo (the README's first command, as an end-to-end check)"
python3 integration/demo.py
if [ -f integration/bench/bench.py ]; then
  echo "== benchmark smoke run (figures are reported, not asserted)"
  cargo build -q --release --bin nftproxy
  python3 integration/bench/bench.py --smoke
  echo "== real-API benchmark smoke run: nftproxy and kube-proxy over a real kube-apiserver"
  echo "   (skips itself without etcd/kube-apiserver/kube-proxy binaries; see its --help)"
  python3 integration/bench/realapi.py --smoke
fi
echo "== end-to-end (namespaces cluster) and stand-in API server tests"
python3 -m pytest integration -q -p no:cacheprovider
echo "== real-node lane (real Kubernetes binaries; skips itself when they are not available)"
bash integration/realnode/run.sh
