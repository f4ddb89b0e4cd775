//! Test helpers shared by the unit tests and `tests/`: the shared test cluster, and how a
//! privileged test checks for root and gets a network namespace of its own.

/// Privileged tests (`#[ignore]`d, so plain `cargo test` runs without root and lists them as
/// ignored) call this first: run on request without root, they fail with this message rather
/// than pass without testing anything.
pub fn require_root() {
    assert!(
        nftproxy_nl::os::is_root(),
        "privileged test: run as root (unshare, nftables, conntrack)"
    );
}

/// Run `f` on a thread of its own in a fresh network namespace. The namespace disappears with
/// the thread, also when `f` panics, so nothing is left behind on the host; processes spawned
/// from `f` inherit the namespace.
pub fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let h = std::thread::spawn(move || {
        if let Err(e) = nftproxy_nl::os::unshare_net() {
            panic!("unshare(CLONE_NEWNET): {e}");
        }
        f()
    });
    h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// The objects of the shared test cluster (`tests/flows/cluster.yaml`: two nodes, node-a and
/// node-b, and a Service of each kind).
pub fn cluster_objects() -> crate::k8s::objects::Objects {
    crate::k8s::objects::Objects::parse(include_str!("../tests/flows/cluster.yaml"))
        .expect("tests/flows/cluster.yaml parses")
}

/// The proxy state of node-a for a scenario's objects (the scenario files name their nodes).
pub fn node_a_state(objs: &crate::k8s::objects::Objects) -> crate::proxy::ProxyState {
    let node = objs.node_info(Some("node-a"));
    let mut p = Vec::new();
    crate::pipeline::proxy_state(&objs.services, &objs.slices, &[], &node, &mut p)
}

/// The settings the tests and the benchmark compile with: pods 10.0.0.0/8 and fd00:10::/64
/// (ClusterCIDR detection), NodePorts on the primary addresses.
pub fn proxy_config(node: &str) -> crate::pipeline::config::ProxyConfig {
    use crate::pipeline::config::{DetectLocal, NodePortAddresses, ProxyConfig};
    ProxyConfig {
        node_name: node.to_string(),
        cluster_cidrs: vec![
            "10.0.0.0/8".parse().expect("cidr"),
            "fd00:10::/64".parse().expect("cidr"),
        ],
        masquerade_all: false,
        masquerade_bit: 14,
        nodeport: NodePortAddresses {
            primary: true,
            cidrs: vec![],
        },
        detect_local: DetectLocal::ClusterCidr,
        pod_interface: String::new(),
    }
}
