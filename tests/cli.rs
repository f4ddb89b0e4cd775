//! The binary with kube-proxy's command line: `--write-config-to` writes a configuration that
//! reads back as the same settings, and kube-proxy's other flags are accepted.
#![allow(clippy::unwrap_used)] // a test: a panic is the failure report

mod common;

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
            "--kube-api-content-type=application/json",
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
    assert_eq!(
        f.kube_api_content_type,
        Some(nftproxy::k8s::watch::Encoding::Json)
    );
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
        "--kube-api-content-type=application/yaml",
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

/// `nftproxy cleanup --kube-proxy` in a fresh network namespace holding what kube-proxy's three
/// modes leave behind: its nftables tables, KUBE-* chains in both iptables back ends (legacy and
/// nft, IPv4 and IPv6), an ipset its rules still match, and the `kube-ipvs0` interface (a bridge
/// here: this kernel may lack the dummy driver kube-proxy uses). Everything of kube-proxy's goes;
/// nftproxy's own table and what other components own stay; a second run has nothing to do.
#[test]
#[ignore = "privileged (root, network namespaces): cargo test -- --ignored, or `just test-privileged`"]
fn cleanup_kube_proxy_removes_every_mode_leftovers_and_nothing_else() {
    common::require_root();
    let tools = [
        "iptables-legacy-restore",
        "iptables-nft-restore",
        "ip6tables-nft-restore",
        "ipset",
        "ip",
    ];
    for t in tools {
        if Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            panic!("{t} is not installed (scripts/setup.sh installs iptables, ipset, iproute2)");
        }
    }
    let bin = env!("CARGO_BIN_EXE_nftproxy");
    common::in_netns(move || {
        let run = |cmd: &str, args: &[&str], stdin: Option<&str>| -> String {
            use std::io::Write;
            let mut c = Command::new(cmd)
                .args(args)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            c.stdin
                .take()
                .unwrap()
                .write_all(stdin.unwrap_or("").as_bytes())
                .unwrap();
            let o = c.wait_with_output().unwrap();
            assert!(
                o.status.success(),
                "{cmd} {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        common::nft(
            &["-f", "-"],
            Some(
                "table ip kube-proxy { chain services { }; }\n\
                 table ip6 kube-proxy { chain services { }; }\n\
                 table ip nftproxy { chain services { }; }\n\
                 table inet other-component { chain c { }; }\n",
            ),
        );
        run(
            "ipset",
            &["create", "KUBE-CLUSTER-IP", "hash:ip,port"],
            None,
        );
        run("ipset", &["create", "other-set", "hash:ip"], None);
        run("ip", &["link", "add", "kube-ipvs0", "type", "bridge"], None);
        // kube-proxy's iptables mode on the legacy back end; kubelet's canary stays.
        run(
            "iptables-legacy-restore",
            &["--noflush"],
            Some(
                "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-AAA - [0:0]\n:KUBE-SEP-BBB - [0:0]\n\
                 :KUBE-KUBELET-CANARY - [0:0]\n:KUBE-POSTROUTING - [0:0]\n\
                 -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
                 -A OUTPUT -j KUBE-SERVICES\n-A POSTROUTING -j KUBE-POSTROUTING\n\
                 -A KUBE-SERVICES -d 10.96.0.1/32 -p tcp --dport 443 -j KUBE-SVC-AAA\n\
                 -A KUBE-SVC-AAA -j KUBE-SEP-BBB\n\
                 -A KUBE-SEP-BBB -p tcp -j DNAT --to-destination 192.168.0.1:6443\n\
                 -A KUBE-POSTROUTING -j MASQUERADE\nCOMMIT\n",
            ),
        );
        // ... its IPVS mode's filter rules on the nft back end, matching its ipset; a chain
        // of another component that stays, with its jump.
        run(
            "iptables-nft-restore",
            &["--noflush"],
            Some(
                "*filter\n:KUBE-FORWARD - [0:0]\n:KUBE-IPVS-FILTER - [0:0]\n:CNI-FORWARD - [0:0]\n\
                 -A FORWARD -j KUBE-FORWARD\n-A INPUT -j KUBE-IPVS-FILTER\n-A FORWARD -j CNI-FORWARD\n\
                 -A KUBE-IPVS-FILTER -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT\n\
                 -A KUBE-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
                 -A CNI-FORWARD -j ACCEPT\nCOMMIT\n",
            ),
        );
        run(
            "ip6tables-nft-restore",
            &["--noflush"],
            Some(
                "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-CCC - [0:0]\n\
                 -A PREROUTING -j KUBE-SERVICES\n-A KUBE-SERVICES -d fd00::1/128 -j KUBE-SVC-CCC\n\
                 COMMIT\n",
            ),
        );

        let out = Command::new(bin)
            .args(["cleanup", "--kube-proxy"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "cleanup failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in [
            "deleted 2 nftables table(s)",
            "deleted kube-proxy's chains (iptables-legacy-save)",
            "deleted kube-proxy's chains (iptables-nft-save)",
            "deleted kube-proxy's chains (ip6tables-nft-save)",
            "deleted interface kube-ipvs0",
            "deleted ipset KUBE-CLUSTER-IP",
        ] {
            assert!(stdout.contains(line), "{line:?} missing:\n{stdout}");
        }

        let tables = common::nft(&["list", "tables"], None);
        // nftproxy's table stays (the live agent's); iptables-nft's own tables, `ip filter` and
        // `ip6 nat`, stay with their built-in chains.
        assert!(!tables.contains("kube-proxy"), "{tables}");
        assert!(tables.contains("table ip nftproxy"), "{tables}");
        assert!(tables.contains("table inet other-component"), "{tables}");
        let legacy = run("iptables-legacy-save", &[], None);
        assert!(!legacy.contains("KUBE-SERVICES") && !legacy.contains("KUBE-SEP-BBB"));
        assert!(!legacy.contains("KUBE-POSTROUTING"), "{legacy}");
        assert!(legacy.contains(":KUBE-KUBELET-CANARY"), "{legacy}");
        let nft4 = run("iptables-nft-save", &[], None);
        assert!(!nft4.contains("KUBE-"), "{nft4}");
        assert!(nft4.contains("-A FORWARD -j CNI-FORWARD"), "{nft4}");
        let nft6 = run("ip6tables-nft-save", &[], None);
        assert!(!nft6.contains("KUBE-"), "{nft6}");
        assert_eq!(run("ipset", &["list", "-n"], None).trim(), "other-set");
        let links = run("ip", &["-o", "link"], None);
        assert!(!links.contains("kube-ipvs0"), "{links}");

        // Nothing left: a second run does nothing and succeeds.
        let again = Command::new(bin)
            .args(["cleanup", "--kube-proxy"])
            .output()
            .unwrap();
        let again_out = String::from_utf8_lossy(&again.stdout);
        assert!(again.status.success(), "{again_out}");
        assert_eq!(again_out.trim(), "deleted 0 nftables table(s)");
    });
}

/// `explain`, `services` and `report` offline, as an operator runs them on a file (`-f`, the
/// node by `--node`): the JSON fields tools rely on, and the text.
#[test]
fn explain_services_report_offline() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/flows/cluster.yaml");
    let run = |args: &[&str]| {
        let out = nftproxy()
            .args(args)
            .args([
                "-f",
                file,
                "--node",
                "node-a",
                "--cluster-cidr",
                "10.0.0.0/8",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let e: serde_json::Value = serde_json::from_str(&run(&[
        "explain",
        "--from",
        "203.0.113.5",
        "--to",
        "192.0.2.12:80/tcp",
        "--json",
    ]))
    .unwrap();
    assert_eq!(e["verdict"], "forward");
    assert_eq!(e["service"], "ns/lb-local:p/tcp");
    assert_eq!(e["endpoints"], serde_json::json!(["10.0.1.3:8080"]));
    assert_eq!(e["sourceSeenByEndpoint"], "203.0.113.5");
    assert_eq!(e["masquerade"], false);
    assert!(e["steps"].as_array().is_some_and(|s| s.len() >= 3));
    assert!(e["advice"].is_null());
    let text = run(&["explain", "--from", "203.0.113.5", "--to", "192.0.2.13:80"]);
    assert!(text.contains("verdict:   dropped"), "{text}");
    assert!(
        text.contains("advice:") && text.contains(":32013/healthz"),
        "{text}"
    );
    let svc = run(&["svc", "-n", "ns", "lb-local"]);
    assert!(
        svc.starts_with("NAMESPACE") && svc.contains("kept"),
        "{svc}"
    );
    let lines: serde_json::Value =
        serde_json::from_str(&run(&["services", "--problems", "-o", "json"])).unwrap();
    assert!(lines
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["name"] == "lb-local-remote"));
    let report = run(&["report"]);
    assert!(
        report.contains("ns/lb-cluster:p/tcp") && report.contains("Look at:"),
        "{report}"
    );
    // A malformed flow is a clear error (exit 2), not a crash.
    let bad = nftproxy()
        .args(["explain", "--from", "x", "--to", "1.2.3.4:80", "-f", file])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--from \"x\""));
}
