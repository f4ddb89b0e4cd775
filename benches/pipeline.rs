//! `cargo bench --bench pipeline [-- N E]`: where a sync's CPU time goes at N Services x E
//! endpoints (pure stages only: model, endpoint choice, compile, plan, render). Prints figures;
//! asserts nothing.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use nftproxy::config::{NodePortAddresses, ProxyConfig};
use nftproxy::engine::{Dirty, Engine, ObjKey, Source};
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

/// The changed objects, as the reflector stores would hold them.
#[derive(Default)]
struct Src {
    slices: RefCell<BTreeMap<ObjKey, Arc<EndpointSlice>>>,
}

impl Source for Src {
    fn service(&self, _: &ObjKey) -> Option<Arc<Service>> {
        None
    }
    fn slice(&self, key: &ObjKey) -> Option<Arc<EndpointSlice>> {
        self.slices.borrow().get(key).cloned()
    }
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
    let (svcs, slices) = objects(n, e);
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

    // One endpoint replaced, the way the agent does it: the engine re-reads the changed slice
    // and recompiles its Service; plan diffs the persistent sets.
    let svcs: Vec<Arc<Service>> = svcs.into_iter().map(Arc::new).collect();
    let mut slices: Vec<Arc<EndpointSlice>> = slices.into_iter().map(Arc::new).collect();
    let cfg_c = cc.clone();
    let mut engine = Engine::default();
    let src = Src::default();
    let t = Instant::now();
    let first = engine
        .compute(
            &src,
            &Dirty::default(),
            || (svcs.clone(), slices.clone()),
            &node,
            &[],
            &cfg_c,
        )
        .expect("engine");
    let t_engine_full = ms(t);
    let mut applied = first.ruleset;
    let mut samples = Vec::new();
    let mut last_ops = 0;
    for round in 0..20usize {
        let i = (n / 2 + round * 7919) % n;
        let mut changed = (*slices[i]).clone();
        changed.endpoints[0].addresses =
            vec![format!("10.250.{}.{}", round / 250, round % 250 + 1)];
        slices[i] = Arc::new(changed);
        let key = (
            "bench".to_string(),
            slices[i].metadata.name.clone().unwrap_or_default(),
        );
        src.slices
            .borrow_mut()
            .insert(key.clone(), slices[i].clone());
        let dirty = Dirty {
            slices: [key].into(),
            ..Dirty::default()
        };
        let t = Instant::now();
        let out = engine
            .compute(
                &src,
                &dirty,
                || unreachable!("incremental"),
                &node,
                &[],
                &cfg_c,
            )
            .expect("engine");
        let t_compute = ms(t);
        let t = Instant::now();
        let part = plan::partial(&applied, &out.ruleset, &BTreeSet::new());
        let t_plan = ms(t);
        let t = Instant::now();
        applied = plan::after(&applied, &out.ruleset, &part);
        let t_after = ms(t);
        last_ops = part.tx.element_count();
        samples.push((t_compute, t_plan, t_after));
    }
    samples.sort_by(|a, b| (a.0 + a.1 + a.2).total_cmp(&(b.0 + b.1 + b.2)));
    let (t_compute, t_plan, t_after) = samples[samples.len() / 2];

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
    println!("  engine, from scratch       {t_engine_full:9.1} ms");
    println!("one endpoint replaced (incremental engine; median of 20):");
    println!("  engine (model+compile)     {t_compute:9.3} ms");
    println!("  plan (diff)                {t_plan:9.3} ms  -> {last_ops} element ops");
    println!("  applied-state bookkeeping  {t_after:9.3} ms");
    println!(
        "  total                      {:9.3} ms",
        t_compute + t_plan + t_after
    );
}
