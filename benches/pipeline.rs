//! `cargo bench --bench pipeline [-- N E]`: where a sync's CPU time goes at N Services x E
//! endpoints (pure stages only: model, endpoint choice, compile, plan, render). Prints figures;
//! asserts nothing.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report
#![allow(clippy::disallowed_methods)] // a benchmark measures real time

use std::collections::BTreeSet;
use std::time::Instant;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use nftproxy::k8s::inbox::{key_of, Batch};
use nftproxy::model::NodeInfo;
use nftproxy::nft::{compile, plan, render};
use nftproxy::pipeline::{self, Engine};

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
        slices.push(slice_of(i, e));
    }
    (svcs, slices)
}

/// Service `i`'s slice of `e` endpoints.
fn slice_of(i: usize, e: usize) -> EndpointSlice {
    let eps: Vec<_> = (0..e).map(|j| serde_json::json!({"addresses": [format!("10.{}.{}.{}", (i * e + j) >> 16 & 255, (i * e + j) >> 8 & 255, (i * e + j) & 255)], "nodeName": "other"})).collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "bench", "name": format!("s{i}-1"), "labels": {"kubernetes.io/service-name": format!("s{i}")}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps
    }))
    .expect("slice")
}

/// Counts live heap bytes, to show what each structure costs.
#[global_allocator]
static GLOBAL: nftproxy_nl::alloc::CountingAlloc = nftproxy_nl::alloc::CountingAlloc;

fn mib() -> f64 {
    nftproxy_nl::alloc::CountingAlloc::live_bytes() as f64 / 1048576.0
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
    let m0 = mib();
    let (svcs, slices) = objects(n, e);
    let m_objects = mib() - m0;
    let node = NodeInfo {
        name: "bench-node".into(),
        internal_ips: vec!["192.168.0.2".parse().expect("ip")],
        ..Default::default()
    };
    let cfg = nftproxy::testutil::proxy_config(&node.name);
    let cc = cfg.compile_config(&node);

    let t = Instant::now();
    let mut p = Vec::new();
    let state = pipeline::proxy_state(&svcs, &slices, &[], &node, &mut p);
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
    let m = mib();
    drop(full);
    let m_full_tx = m - mib();
    let elements: usize = rs
        .tables
        .values()
        .flat_map(|t| t.elements.values())
        .map(|s| s.len())
        .sum();
    let m = mib();
    drop(rs);
    let m_ruleset = m - mib();
    let m = mib();
    drop(state);
    let m_state = m - mib();
    let text_kib = text.len() / 1024;
    drop(text);

    // The agent's way: the engine models the lists (and drops the objects), then a change
    // re-reads one slice and recompiles its Service; plan diffs the persistent sets.
    let cfg_c = cc.clone();
    let mut engine = Engine::default();
    // The objects are handed over and dropped once modelled.
    let m_before_engine = mib() - m_objects;
    let (all_svcs, all_slices) = (Batch::all(svcs), Batch::all(slices));
    let t = Instant::now();
    let first = engine
        .compute(all_svcs, all_slices, &node, &[], &cfg_c)
        .expect("engine");
    let t_engine_full = ms(t);
    let mut applied = first.ruleset;
    // Kept, as the agent keeps it (the sync loop's previous state): changes then copy shared
    // tree paths, as they do in the agent.
    let _previous_state = first.state;
    let m_engine = mib() - m_before_engine;
    let mut samples = Vec::new();
    let mut last_ops = 0;
    for round in 0..20usize {
        let i = (n / 2 + round * 7919) % n;
        let mut one_slice = slice_of(i, e);
        one_slice.endpoints[0].addresses =
            vec![format!("10.250.{}.{}", round / 250, round % 250 + 1)];
        let mut batch = Batch::default();
        batch
            .changed
            .insert(key_of(&one_slice.metadata), Some(one_slice.clone()));
        let t = Instant::now();
        let out = engine
            .compute(Batch::<Service>::default(), batch, &node, &[], &cfg_c)
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

    // A Service with 1,000 endpoints in 10 slices of 100 (as the EndpointSlice controller cuts
    // them): one endpoint replaced, 20 times.
    let big = |part: usize, eps: &[String]| -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "bench", "name": format!("big-{part}"), "labels": {"kubernetes.io/service-name": "s0"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": eps.iter().map(|a| serde_json::json!({"addresses": [a], "nodeName": "other"})).collect::<Vec<_>>()
        }))
        .expect("slice")
    };
    let mut big_eps: Vec<String> = (0..1000)
        .map(|j| format!("10.251.{}.{}", j / 250, j % 250 + 1))
        .collect();
    let mut batch = Batch::default();
    for part in 0..10 {
        let s = big(part, &big_eps[part * 100..(part + 1) * 100]);
        batch.changed.insert(key_of(&s.metadata), Some(s));
    }
    let out = engine
        .compute(Batch::<Service>::default(), batch, &node, &[], &cfg_c)
        .expect("engine");
    let p = plan::partial(&applied, &out.ruleset, &BTreeSet::new());
    applied = plan::after(&applied, &out.ruleset, &p);
    let mut big_samples = Vec::new();
    let mut big_ops = 0;
    for round in 0..20usize {
        let j = (round * 37) % 1000;
        big_eps[j] = format!("10.252.{}.{}", round / 250, round % 250 + 1);
        let part = j / 100;
        let s = big(part, &big_eps[part * 100..(part + 1) * 100]);
        let mut batch = Batch::default();
        batch.changed.insert(key_of(&s.metadata), Some(s));
        let t = Instant::now();
        let out = engine
            .compute(Batch::<Service>::default(), batch, &node, &[], &cfg_c)
            .expect("engine");
        let t_c = ms(t);
        let t = Instant::now();
        let part = plan::partial(&applied, &out.ruleset, &BTreeSet::new());
        applied = plan::after(&applied, &out.ruleset, &part);
        big_ops = part.tx.element_count();
        big_samples.push((t_c, ms(t)));
    }
    big_samples.sort_by(|a, b| (a.0 + a.1).total_cmp(&(b.0 + b.1)));
    let (big_compute, big_plan) = big_samples[big_samples.len() / 2];

    println!(
        "pipeline at {n} Services x {e} endpoints ({elements} elements, {text_kib} KiB of text)"
    );
    println!("live heap: objects {m_objects:.1} MiB, proxy state {m_state:.1} MiB, ruleset {m_ruleset:.1} MiB, full transaction {m_full_tx:.1} MiB, engine (model + compiled; objects dropped) {m_engine:.1} MiB");
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
    println!("one endpoint of a 1,000-endpoint Service replaced (median of 20):");
    println!("  engine (model+compile)     {big_compute:9.3} ms");
    println!("  plan + bookkeeping         {big_plan:9.3} ms  -> {big_ops} element ops");
}
