//! `cargo bench --bench pipeline [-- N E]`: where a sync's CPU time goes at N Services x E
//! endpoints (pure stages only: model, endpoint choice, compile, plan, render). Prints figures;
//! asserts nothing.

use std::collections::BTreeSet;
use std::time::Instant;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use nftproxy::config::{NodePortAddresses, ProxyConfig};
use nftproxy::nft::{compile, plan, render};
use nftproxy::snapshot::{self, NodeInfo};

fn objects(n: usize, e: usize) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut svcs = Vec::with_capacity(n);
    let mut slices = Vec::with_capacity(n);
    for i in 0..n {
        let ip = format!("172.{}.{}.{}", 16 + (i >> 16), (i >> 8) & 255, i & 255);
        svcs.push(
            serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": "bench", "name": format!("s{i}")},
                "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]}
            }))
            .expect("service"),
        );
        let eps: Vec<_> = (0..e).map(|j| serde_json::json!({"addresses": [format!("10.{}.{}.{}", (i * e + j) >> 16 & 255, (i * e + j) >> 8 & 255, (i * e + j) & 255)], "nodeName": "other"})).collect();
        slices.push(
            serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": "bench", "name": format!("s{i}-1"), "labels": {"kubernetes.io/service-name": format!("s{i}")}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps
            }))
            .expect("slice"),
        );
    }
    (svcs, slices)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (n, e) = (
        args.first().copied().unwrap_or(10_000),
        args.get(1).copied().unwrap_or(5),
    );
    let (svcs, mut slices) = objects(n, e);
    let node = NodeInfo {
        name: "bench-node".into(),
        internal_ips: vec!["192.168.0.2".parse().expect("ip")],
        ..Default::default()
    };
    let cfg = ProxyConfig {
        node_name: node.name.clone(),
        cluster_cidrs: vec!["10.0.0.0/8".parse().expect("cidr")],
        masquerade_all: false,
        masquerade_bit: 14,
        nodeport: NodePortAddresses {
            primary: true,
            cidrs: vec![],
        },
    };
    let cc = cfg.compile_config(&node);

    let t = Instant::now();
    let mut p = Vec::new();
    let state = snapshot::proxy_state(&svcs, &slices, &[], &node, &mut p);
    let t_state = ms(t);
    let t = Instant::now();
    let rs = compile::compile(&state, &cc).expect("compile");
    let t_compile = ms(t);
    let t = Instant::now();
    let full = plan::full(&rs);
    let t_full = ms(t);
    let t = Instant::now();
    let text = render::ruleset(&rs);
    let t_render = ms(t);

    // One endpoint replaced: everything a partial sync recomputes today.
    slices[n / 2].endpoints[0].addresses = vec!["10.250.0.1".into()];
    let t = Instant::now();
    let mut p = Vec::new();
    let state2 = snapshot::proxy_state(&svcs, &slices, &[], &node, &mut p);
    let t_state2 = ms(t);
    let t = Instant::now();
    let rs2 = compile::compile(&state2, &cc).expect("compile");
    let t_compile2 = ms(t);
    let t = Instant::now();
    let part = plan::partial(&rs, &rs2, &BTreeSet::new());
    let t_plan = ms(t);
    let t = Instant::now();
    let _after = plan::after(&rs, &rs2, &part);
    let t_after = ms(t);

    let elements: usize = rs
        .tables
        .values()
        .flat_map(|t| t.elements.values())
        .map(|s| s.len())
        .sum();
    println!("pipeline at {n} Services x {e} endpoints ({elements} elements, {} ops in the full transaction, {} KiB of text)", full.ops.len(), text.len() / 1024);
    println!("  proxy state from objects   {t_state:9.1} ms");
    println!("  compile                    {t_compile:9.1} ms");
    println!("  full plan                  {t_full:9.1} ms");
    println!("  render text                {t_render:9.1} ms");
    println!("one endpoint replaced (partial sync, recomputed from scratch):");
    println!("  proxy state                {t_state2:9.1} ms");
    println!("  compile                    {t_compile2:9.1} ms");
    println!(
        "  plan (diff)                {t_plan:9.1} ms  -> {} element ops",
        part.tx.element_count()
    );
    println!("  applied-state bookkeeping  {t_after:9.1} ms");
    println!(
        "  total                      {:9.1} ms",
        t_state2 + t_compile2 + t_plan + t_after
    );
}
