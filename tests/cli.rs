//! The binary with kube-proxy's command line: `--write-config-to` writes a configuration that
//! reads back as the same settings, and kube-proxy's other flags are accepted.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

use std::process::Command;

fn nftproxy() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nftproxy"))
}

#[test]
fn write_config_to_writes_a_kube_proxy_configuration_that_reads_back() {
    let dir = std::env::temp_dir().join(format!("nftproxy-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("written.conf");
    let status = nftproxy()
        .args([
            "--hostname-override=node-1",
            "--cluster-cidr=10.244.0.0/16",
            "--sync-period=1m30s",
            "--feature-gates=SomeGate=true",
            "--kube-api-qps=50",
            "--kube-api-burst=100",
            "--logging-format=json",
            "--conntrack-max-per-core=0",
            "--conntrack-tcp-timeout-close-wait=0s",
            "--detect-local-mode=NodeCIDR",
            "-v=2",
        ])
        .arg(format!("--write-config-to={}", out.display()))
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&out).unwrap();
    let conf = nftproxy::cmd::kpconfig::KubeProxyConfiguration::parse(&text, "written.conf")
        .expect("reads back");
    let f = conf.settings("written.conf").expect("valid");
    assert_eq!(f.cluster_cidrs, Some(vec!["10.244.0.0/16".to_string()]));
    assert_eq!(f.hostname_override.as_deref(), Some("node-1"));
    assert_eq!(f.sync_period, Some(std::time::Duration::from_secs(90)));
    assert_eq!(f.log_json, Some(true));
    assert_eq!(f.verbosity, Some(2));
    assert_eq!((f.kube_api_qps, f.kube_api_burst), (Some(50.0), Some(100)));
    assert_eq!(f.conntrack.max_per_core, Some(0));
    assert_eq!(f.conntrack.tcp_close_wait, Some(std::time::Duration::ZERO));
    assert_eq!(
        f.conntrack.tcp_established,
        Some(std::time::Duration::from_secs(86400))
    );
    assert_eq!(
        f.detect_local,
        Some(nftproxy::pipeline::config::DetectLocal::NodeCidr)
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn nonsense_is_refused_before_anything_runs() {
    for bad in [
        "--proxy-mode=ipvs",
        "--detect-local-mode=BridgeInterface",
        "--nodeport-addresses=nonsense",
        "--nodeport-addresses=127.0.0.0/8",
    ] {
        let out = nftproxy()
            .args(["--write-config-to=/dev/null", bad])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.is_empty(), "{bad}: no message");
    }
}

#[test]
fn the_interface_detect_local_mode_round_trips_and_needs_its_interface() {
    let dir = std::env::temp_dir().join(format!("nftproxy-cli-if-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("written.conf");
    let status = nftproxy()
        .args([
            "--detect-local-mode=InterfaceNamePrefix",
            "--pod-interface-name-prefix=veth",
        ])
        .arg(format!("--write-config-to={}", out.display()))
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&out).unwrap();
    let f = nftproxy::cmd::kpconfig::KubeProxyConfiguration::parse(&text, "written.conf")
        .and_then(|c| c.settings("written.conf"))
        .expect("reads back");
    assert_eq!(
        f.detect_local,
        Some(nftproxy::pipeline::config::DetectLocal::InterfaceNamePrefix)
    );
    assert_eq!(f.interface_name_prefix.as_deref(), Some("veth"));
    let refused = nftproxy()
        .args([
            "--detect-local-mode=InterfaceNamePrefix",
            "--write-config-to=/dev/null",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--pod-interface-name-prefix"));
    std::fs::remove_dir_all(&dir).ok();
}
