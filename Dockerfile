# Multi-stage build: a Rust builder, then a minimal Debian runtime with libnftnl and libmnl, plus
# the nft, conntrack and iptables tools (`kubectl exec ds/nftproxy -- nft list ruleset`, and
# `nftproxy cleanup --kube-proxy` removing kube-proxy's iptables chains and IPVS leftovers).
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libnftnl-dev libmnl-dev pkg-config && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY src src
COPY benches benches
COPY nft-templates nft-templates
RUN cargo build --release --bin nftproxy

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libnftnl11 libmnl0 nftables conntrack iptables iproute2 ipvsadm ipset && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/nftproxy /usr/local/bin/nftproxy
# kubeadm's kube-proxy DaemonSet runs `command: [/usr/local/bin/kube-proxy, --config=...]`: with
# this name, setting that DaemonSet's image to nftproxy is the whole in-place swap.
RUN ln -s nftproxy /usr/local/bin/kube-proxy
ENTRYPOINT ["/usr/local/bin/nftproxy"]
