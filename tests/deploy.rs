//! The deployment manifests parse as the typed Kubernetes objects and carry what a kube-proxy
//! replacement needs.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

mod common;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::Deserialize;

fn docs(name: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(common::root().join("deploy").join(name)).expect("manifest");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_json::Value::deserialize(d).expect("yaml"))
        .filter(|v| !v.is_null())
        .collect()
}

fn typed<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> T {
    serde_json::from_value(v.clone()).expect("typed object")
}

#[test]
fn rbac_is_least_privilege() {
    let d = docs("rbac.yaml");
    let sa: ServiceAccount = typed(&d[0]);
    assert_eq!(sa.metadata.name.as_deref(), Some("nftproxy"));
    let role: ClusterRole = typed(&d[1]);
    let rules = role.rules.expect("rules");
    let verbs_for = |group: &str, res: &str| -> Vec<String> {
        rules
            .iter()
            .filter(|r| {
                r.api_groups.iter().flatten().any(|g| g == group)
                    && r.resources.iter().flatten().any(|x| x == res)
            })
            .flat_map(|r| r.verbs.clone())
            .collect()
    };
    for (g, r) in [
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
        ("networking.k8s.io", "servicecidrs"),
    ] {
        let mut v = verbs_for(g, r);
        v.sort();
        assert_eq!(v, vec!["get", "list", "watch"], "{g}/{r}");
    }
    let mut ev = verbs_for("events.k8s.io", "events");
    ev.sort();
    assert_eq!(ev, vec!["create", "patch"]);
    let all_verbs: Vec<&String> = rules.iter().flat_map(|r| r.verbs.iter()).collect();
    assert!(
        !all_verbs
            .iter()
            .any(|v| ["*", "delete", "update", "deletecollection"].contains(&v.as_str())),
        "no write access beyond events"
    );
    let binding: ClusterRoleBinding = typed(&d[2]);
    assert_eq!(binding.role_ref.name, "nftproxy");
    assert_eq!(binding.subjects.expect("subjects")[0].name, "nftproxy");
}

#[test]
fn daemonset_runs_on_every_node_with_host_network_and_probes() {
    let d = docs("daemonset.yaml");
    let ds: DaemonSet = typed(&d[0]);
    let spec = ds.spec.expect("spec");
    assert_eq!(
        spec.update_strategy.and_then(|u| u.type_).as_deref(),
        Some("RollingUpdate")
    );
    let pod = spec.template.spec.expect("pod spec");
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.tolerations
            .expect("tolerations")
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "tolerates everything"
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("nftproxy"));
    let c = &pod.containers[0];
    let env = c.env.as_ref().expect("env");
    let node = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        node.value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );
    // The API server's real address comes from an optional ConfigMap (bootstrap without
    // kube-proxy), read by the agent as NFTPROXY_MASTER; DNS is the node's, not the cluster's.
    let master = env
        .iter()
        .find(|e| e.name == "NFTPROXY_MASTER")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.config_map_key_ref.as_ref())
        .expect("NFTPROXY_MASTER from a ConfigMap");
    assert_eq!(
        (master.name.as_str(), master.key.as_str(), master.optional),
        ("nftproxy", "apiServer", Some(true))
    );
    assert_eq!(pod.dns_policy.as_deref(), Some("Default"));
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_ne!(
        sc.privileged,
        Some(true),
        "capabilities instead of privileged"
    );
    let caps = sc
        .capabilities
        .as_ref()
        .and_then(|c| c.add.clone())
        .unwrap_or_default();
    assert!(caps.contains(&"NET_ADMIN".to_string()) && caps.contains(&"NET_RAW".to_string()));
    assert_eq!(
        c.liveness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.as_deref()),
        Some("/livez")
    );
    assert_eq!(
        c.readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.as_deref()),
        Some("/healthz")
    );
    assert!(c
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory")));
    // The memory limit covers the cold-start peaks measured for the README's sizing table
    // (100k Services x 5: 697 MiB, 5k x 250: 812 MiB): a lower one OOM-kills the agent at every
    // start on such a node.
    let limit = c
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("memory"))
        .map(|q| q.0.clone())
        .unwrap_or_default();
    let mib = match (limit.strip_suffix("Gi"), limit.strip_suffix("Mi")) {
        (Some(g), _) => g.parse::<u64>().unwrap() * 1024,
        (_, Some(m)) => m.parse::<u64>().unwrap(),
        _ => panic!("memory limit {limit:?} not in Mi or Gi"),
    };
    assert!(mib >= 900, "memory limit {limit} below the measured peaks");
    // kube-proxy's command line, as kubeadm's DaemonSet has it: the config file and the node.
    let args = c.args.clone().unwrap_or_default();
    assert_eq!(
        args,
        vec![
            "--config=/var/lib/kube-proxy/config.conf",
            "--hostname-override=$(NODE_NAME)"
        ]
    );
    // The agent's own flag parser accepts the manifest's arguments (no subcommand means run).
    use clap::Parser;
    let mut argv = vec![std::ffi::OsString::from("nftproxy")];
    argv.extend(args.iter().map(Into::into));
    let argv = nftproxy::cmd::args::with_default_command(argv);
    match nftproxy::cmd::args::Cli::try_parse_from(argv)
        .expect("daemonset args parse")
        .command
    {
        nftproxy::cmd::args::Command::Run(_) => {}
        other => panic!("not run: {other:?}"),
    }
    // The file comes from the ConfigMap in configmap.yaml, mounted where --config points.
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "config")
        .expect("config mount");
    // kubeadm's path: its config.conf names /var/lib/kube-proxy/kubeconfig.conf.
    assert_eq!(mount.mount_path, "/var/lib/kube-proxy");
    let vol = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "config")
        .and_then(|v| v.config_map.as_ref())
        .expect("config volume from a ConfigMap");
    assert_eq!(vol.name, "nftproxy-config");
    assert_eq!(
        pod.node_selector
            .as_ref()
            .and_then(|n| n.get("kubernetes.io/os"))
            .map(String::as_str),
        Some("linux")
    );
}

/// The shipped KubeProxyConfiguration is read exactly as the agent reads it: valid, every field
/// used (nothing reported as not applying), no hard-coded pod CIDR (NodeCIDR detection).
#[test]
fn the_configmap_is_a_kube_proxy_configuration_the_agent_takes_whole() {
    let cm: k8s_openapi::api::core::v1::ConfigMap = typed(&docs("configmap.yaml")[0]);
    assert_eq!(cm.metadata.name.as_deref(), Some("nftproxy-config"));
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get("config.conf"))
        .expect("config.conf");
    let conf = nftproxy::cmd::kpconfig::KubeProxyConfiguration::parse(text, "config.conf")
        .expect("parses");
    let f = conf.settings("config.conf").expect("valid");
    assert!(f.ignored.is_empty(), "{:?}", f.ignored);
    assert!(f.cluster_cidrs.is_none(), "no hard-coded pod CIDR");
    assert_eq!(
        f.detect_local,
        Some(nftproxy::pipeline::config::DetectLocal::NodeCidr)
    );
}

/// Every metric the alerts and the dashboard query is one the agent exports.
#[test]
fn monitoring_queries_name_only_exported_metrics() {
    use nftproxy::k8s::client::RequestSink;
    use nftproxy::observe::metrics::{Metrics, ServiceLabel};
    // Series with free labels (per Service, per API request) appear once they have a value.
    let m = Metrics::new();
    m.request(
        "GET",
        "api:6443",
        "200",
        std::time::Duration::from_millis(3),
    );
    let svc = ServiceLabel {
        namespace: "ns".into(),
        service: "s".into(),
    };
    m.no_local_endpoint_drops.get_or_create(&svc).inc();
    m.no_endpoint_rejects.get_or_create(&svc).inc();
    let exported = m.encode();
    let families: std::collections::BTreeSet<&str> = exported
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let known = |name: &str| {
        ["", "_total", "_bucket", "_count", "_sum"]
            .iter()
            .any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|base| families.contains(base))
            })
    };
    let dir = common::root().join("deploy/monitoring");
    let mut queries = Vec::new();
    let rule = &docs("monitoring/prometheusrule.yaml")[0];
    for g in rule["spec"]["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            queries.push(r["expr"].as_str().expect("expr").to_string());
        }
    }
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("nftproxy-dashboard.json")).expect("dashboard"),
    )
    .expect("dashboard JSON");
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            queries.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    queries.push(
        dash["templating"]["list"][1]["query"]
            .as_str()
            .expect("instance query")
            .to_string(),
    );
    let mut unknown = Vec::new();
    for q in &queries {
        for word in q.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            let ours = ["kubeproxy_", "nftproxy_", "rest_client_", "process_"]
                .iter()
                .any(|p| word.starts_with(p));
            if ours && !known(word) {
                unknown.push(format!("{word} (in {q})"));
            }
        }
    }
    assert!(unknown.is_empty(), "not exported: {unknown:#?}");
    assert!(queries.len() >= 15, "{}", queries.len());
    let pm = &docs("monitoring/podmonitor.yaml")[0];
    assert_eq!(pm["kind"], "PodMonitor");
    assert_eq!(
        pm["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["replacement"],
        "kube-proxy"
    );
}

#[test]
fn kind_config_disables_kube_proxy_and_kustomization_lists_everything() {
    let kind = &docs("kind.yaml")[0];
    assert_eq!(kind["networking"]["kubeProxyMode"], "none");
    let k = &docs("kustomization.yaml")[0];
    let res: Vec<&str> = k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .filter_map(|r| r.as_str())
        .collect();
    for r in &res {
        assert!(common::root().join("deploy").join(r).exists(), "{r}");
    }
    assert!(
        res.contains(&"rbac.yaml")
            && res.contains(&"configmap.yaml")
            && res.contains(&"daemonset.yaml")
    );
}
