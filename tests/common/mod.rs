//! Shared helpers for the tests in `tests/`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use nftproxy::k8s::objects::Objects;
use nftproxy::nft::ir::Ruleset;
use nftproxy::pipeline;
use nftproxy::pipeline::config::ProxyConfig;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Config used by the scenario tests: pods 10.0.0.0/8, NodePorts on the primary address.
pub fn proxy_config(node: &str) -> ProxyConfig {
    nftproxy::testutil::proxy_config(node)
}

pub fn load_objects(path: &Path) -> Objects {
    Objects::parse(
        &std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .expect("objects")
}

/// Compile a scenario file for `node` (the first Node in the file when empty). The problems it
/// reports must be exactly those in NAME.problems (none when there is no such file);
/// `BLESS=1` rewrites that file.
pub fn compile_file(path: &Path, node: &str) -> Ruleset {
    let objs = load_objects(path);
    let info = objs.node_info(if node.is_empty() { None } else { Some(node) });
    let cfg = proxy_config(&info.name);
    let out = pipeline::from_objects(&objs, &cfg, &info).expect("compile");
    let got: String = out
        .problems
        .iter()
        .map(|p| format!("{}: {}\n", p.object, p.reason))
        .collect();
    let file = path.with_extension("problems");
    if std::env::var("BLESS").as_deref() == Ok("1") && node.is_empty() {
        if got.is_empty() {
            let _ = std::fs::remove_file(&file);
        } else {
            std::fs::write(&file, &got).expect("write problems");
        }
    }
    let want = std::fs::read_to_string(&file).unwrap_or_default();
    assert_eq!(
        got,
        want,
        "problems of {} differ from {} (BLESS=1 accepts)",
        path.display(),
        file.display()
    );
    out.ruleset
}

/// See [`nftproxy::testutil::require_root`].
pub fn require_root() {
    nftproxy::testutil::require_root()
}

/// See [`nftproxy::testutil::in_netns`].
pub fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    nftproxy::testutil::in_netns(f)
}

/// Run `nft` with arguments (and optional stdin), returning stdout; panics on failure.
pub fn nft(args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut cmd = Command::new("nft");
    cmd.args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(std::process::Stdio::piped());
    }
    let mut child = cmd.spawn().expect("spawn nft (is nftables installed?)");
    if let Some(s) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(s.as_bytes())
            .expect("write nft stdin");
    }
    let out = child.wait_with_output().expect("nft");
    assert!(
        out.status.success(),
        "nft {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// node-a's ruleset for tests/flows/cluster.yaml with an interface detect-local mode (no
/// cluster CIDR): `iface` is the bridge, or the name prefix.
pub fn interface_mode_ruleset(
    mode: nftproxy::pipeline::config::DetectLocal,
    iface: &str,
) -> Ruleset {
    let objs = load_objects(&root().join("tests/flows/cluster.yaml"));
    let node = objs.node_info(Some("node-a"));
    let mut cfg = proxy_config("node-a");
    cfg.cluster_cidrs.clear();
    cfg.detect_local = mode;
    cfg.pod_interface = iface.into();
    pipeline::from_objects(&objs, &cfg, &node)
        .expect("compile")
        .ruleset
}
