# The project's tasks. `just` lists them. CI runs `bash .ci/run`, which runs scripts/test.sh:
# the same steps as `fmt-check clippy test test-privileged deny` plus the demo, the benchmark
# smoke run and the end-to-end lanes.

default:
    @just --list

# Format everything.
fmt:
    cargo fmt --all

# Check formatting as CI does.
fmt-check:
    cargo fmt --all -- --check

# Lints as CI runs them (house rules: Cargo.toml [workspace.lints], clippy.toml).
clippy:
    cargo clippy --workspace --all-targets -- -D warnings

# Every test that needs no privileges (privileged ones are listed as ignored).
test:
    cargo test --workspace

# The privileged tests only: root, fresh network namespaces (nothing touches the host's rules).
test-privileged:
    cargo test --workspace -- --ignored

# End-to-end tests: the real binary in a namespace cluster against a stand-in API server (root).
e2e:
    cargo build --release --bin nftproxy
    python3 -m pytest integration -q -p no:cacheprovider

# The real-node lane (real Kubernetes binaries from $NFTPROXY_K8S_DIR or ../shared/k8s; root).
realnode:
    bash integration/realnode/run.sh

# Benchmarks that print figures: the pipeline in-process, then the whole agent in namespaces.
bench:
    cargo bench --bench pipeline
    cargo build --release --bin nftproxy
    python3 integration/bench/bench.py

# Rewrite the golden files after an intended change (review the diff before committing).
bless:
    BLESS=1 cargo test --test golden

# Dependency policy (deny.toml).
deny:
    cargo deny check licenses bans sources

# API docs of both crates.
doc:
    cargo doc --workspace --no-deps

# The whole suite, as CI runs it.
ci:
    bash .ci/run
