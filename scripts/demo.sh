#!/usr/bin/env bash
# Install what is needed, build nftproxy, and run the demo cluster in network namespaces
# (two nodes, pods, a router, an outside client, a stand-in API server). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build -q --bin nftproxy
exec python3 integration/demo.py
