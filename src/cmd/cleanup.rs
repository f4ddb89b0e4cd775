//! `nftproxy cleanup`: remove what nftproxy (and, with `--kube-proxy`, kube-proxy) left in the
//! kernel. kube-proxy's leftovers are its nftables tables and, from its older modes, its
//! iptables chains, IPVS services, `kube-ipvs0` interface and `KUBE-*` ipsets, removed as
//! kube-proxy's own `--cleanup` removes them (kubernetes `pkg/proxy/iptables/proxier.go`,
//! `CleanupLeftovers`; `pkg/proxy/ipvs`). Chains other components own (kubelet's
//! `KUBE-KUBELET-CANARY`, `KUBE-FIREWALL`) stay.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, ExitCode, Stdio};

use crate::net::Family;

/// Chains kube-proxy's iptables and IPVS modes create, besides the per-Service ones.
const KUBE_PROXY_CHAINS: &[&str] = &[
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL",
    "KUBE-PROXY-CANARY",
    "KUBE-MARK-MASQ",
    "KUBE-LOAD-BALANCER",
    "KUBE-IPVS-FILTER",
    "KUBE-IPVS-OUT-FILTER",
    "KUBE-SOURCE-RANGES-FIREWALL",
    "KUBE-NODE-PORT",
];

/// The chains iptables creates itself, whose jumps to kube-proxy's chains are kube-proxy's.
const BUILT_IN: &[&str] = &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// Per-Service chains: services, endpoints, firewalls, external and local dispatch.
const KUBE_PROXY_PREFIXES: &[&str] = &[
    "KUBE-SVC-",
    "KUBE-SEP-",
    "KUBE-FW-",
    "KUBE-XLB-",
    "KUBE-EXT-",
    "KUBE-SVL-",
];

fn kube_proxy_chain(name: &str) -> bool {
    KUBE_PROXY_CHAINS.contains(&name) || KUBE_PROXY_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Per table: kube-proxy's chains, the jumps to them to delete, and the ones of them that
/// foreign chains still jump to.
type TableCleanup = (BTreeSet<String>, Vec<String>, BTreeSet<String>);

/// The `iptables-restore --noflush` input that removes kube-proxy's chains from an
/// `iptables-save` dump: first the jumps to them from the built-in chains, then the chains
/// (flushed, then deleted). A kube-proxy chain that another component's chain still jumps to
/// (CNI portmap can be set to use `KUBE-MARK-MASQ`) stays, with what it needs. Empty when there
/// is nothing to remove.
pub fn iptables_cleanup(save: &str) -> String {
    let mut tables: BTreeMap<String, TableCleanup> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            current = Some(t.trim().to_string());
            tables.entry(t.trim().to_string()).or_default();
            continue;
        }
        let Some(t) = current.as_ref() else { continue };
        let entry = tables.entry(t.clone()).or_default();
        if let Some(chain) = line.strip_prefix(':') {
            let name = chain.split_whitespace().next().unwrap_or_default();
            if kube_proxy_chain(name) {
                entry.0.insert(name.to_string());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let mut words = rule.split_whitespace();
            let chain = words.next().unwrap_or_default();
            let words: Vec<&str> = rule.split_whitespace().collect();
            let target = words
                .windows(2)
                .find(|w| w[0] == "-j" || w[0] == "-g")
                .map(|w| w[1]);
            match target {
                Some(t) if kube_proxy_chain(t) && BUILT_IN.contains(&chain) => {
                    entry.1.push(format!("-D {rule}"));
                }
                Some(t) if kube_proxy_chain(t) && !kube_proxy_chain(chain) => {
                    entry.2.insert(t.to_string());
                }
                _ => {}
            }
        }
    }
    let mut out = String::new();
    for (table, (mut chains, deletes, kept)) in tables {
        chains.retain(|c| !kept.contains(c));
        if chains.is_empty() && deletes.is_empty() {
            continue;
        }
        out.push_str(&format!("*{table}\n"));
        for d in &deletes {
            out.push_str(d);
            out.push('\n');
        }
        for c in &chains {
            out.push_str(&format!("-F {c}\n"));
        }
        for c in &chains {
            out.push_str(&format!("-X {c}\n"));
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// Run `iptables-save` / `iptables-restore` (or the ip6 ones); Ok(false) when the tools are
/// not installed (then there is nothing of theirs to clean either).
fn clean_iptables(save: &str, restore: &str) -> Result<bool, String> {
    let dump = match Command::new(save).stderr(Stdio::null()).output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => {
            return Err(format!(
                "{save}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("{save}: {e}")),
    };
    let input = iptables_cleanup(&dump);
    if input.is_empty() {
        return Ok(false);
    }
    let mut child = Command::new(restore)
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{restore}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| format!("{restore}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{restore}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{restore}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(true)
}

/// IPVS mode's leftovers: the `kube-ipvs0` dummy interface (its addresses are the Service
/// IPs), the virtual servers, and the `KUBE-*` ipsets. Only when `kube-ipvs0` exists, the sign
/// that kube-proxy ran in IPVS mode here.
/// What one clean-up step did: a line for the operator, and whether it failed.
type Step = Result<String, String>;

fn run_quiet(cmd: &str, args: &[&str]) -> Result<(), String> {
    match Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
    {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("{cmd} {}: {e}", args.join(" "))),
    }
}

/// Whether kube-proxy's IPVS interface is in this process's network namespace. Asked with `ip`
/// (netlink) rather than /sys/class/net, which shows the namespace sysfs was mounted in: the
/// same in a hostNetwork pod, not for a process that only entered the namespace.
fn kube_ipvs0_exists() -> bool {
    match Command::new("ip")
        .args(["-o", "link", "show", "dev", "kube-ipvs0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) => s.success(),
        Err(_) => std::path::Path::new("/sys/class/net/kube-ipvs0").exists(),
    }
}

/// kube-proxy's IPVS mode: its virtual servers, its `kube-ipvs0` dummy interface (every
/// Service address bound to it) and its `KUBE-*` ipsets (kubernetes `pkg/proxy/ipvs/proxier.go`,
/// `CleanupLeftovers`: it flushes every virtual server, deletes the interface, then the ipsets
/// once the iptables rules that match them are gone, which is why this runs after the iptables
/// step).
fn clean_ipvs() -> Vec<Step> {
    let mut steps = Vec::new();
    let ipvs_mode = kube_ipvs0_exists();
    if ipvs_mode {
        // Virtual servers exist only where the kernel has IPVS (CONFIG_IP_VS; /proc/net/ip_vs
        // appears with the module). Without it there is nothing to clear and ipvsadm would
        // fail with "Protocol not available". Like kube-proxy, clear them only on a node that
        // ran its IPVS mode (the interface is its mark), never IPVS another tool owns alone.
        if std::path::Path::new("/proc/net/ip_vs").exists() {
            steps.push(
                run_quiet("ipvsadm", &["--clear"])
                    .map(|()| "deleted the IPVS virtual servers".to_string())
                    .map_err(|e| format!("IPVS virtual servers not removed: {e}")),
            );
        }
        steps.push(
            run_quiet("ip", &["link", "del", "kube-ipvs0"])
                .map(|()| "deleted interface kube-ipvs0".to_string()),
        );
    }
    match Command::new("ipset").args(["list", "-n"]).output() {
        Ok(o) if o.status.success() => {
            for set in String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|s| s.starts_with("KUBE-"))
            {
                steps.push(
                    run_quiet("ipset", &["destroy", set])
                        .map(|()| format!("deleted ipset {set}"))
                        .map_err(|e| format!("ipset {set} not deleted (still in use?): {e}")),
                );
            }
        }
        Ok(o) => steps.push(Err(format!(
            "ipset list -n: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ))),
        // No ipset tool: no IPVS mode ran from this image's point of view; say so only when
        // the IPVS interface shows that it did.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if ipvs_mode {
                steps.push(Err(
                    "ipset is not installed: KUBE-* ipsets not checked".into()
                ));
            }
        }
        Err(e) => steps.push(Err(format!("ipset list -n: {e}"))),
    }
    steps
}

/// The iptables tools to clean with: kube-proxy's image picks the legacy or the nft back end
/// per node (its iptables-wrapper), so a node may hold KUBE-* chains in either, whichever this
/// image's `iptables` points at. Each variant that is installed is cleaned; a plain
/// `iptables-save` is the fallback where neither variant name exists.
fn iptables_variants() -> Vec<(String, String)> {
    let installed = |name: &str| {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(name).is_file()))
    };
    let mut out = Vec::new();
    for v4v6 in ["iptables", "ip6tables"] {
        let mut found = false;
        for backend in ["legacy", "nft"] {
            let save = format!("{v4v6}-{backend}-save");
            if installed(&save) {
                out.push((save, format!("{v4v6}-{backend}-restore")));
                found = true;
            }
        }
        if !found {
            out.push((format!("{v4v6}-save"), format!("{v4v6}-restore")));
        }
    }
    out
}

/// `kube_proxy`: remove kube-proxy's leftovers and leave nftproxy's tables alone (the step a
/// migration ends with, run next to the live agent: deleting its tables too would cut every
/// Service on the node until the agent noticed); else remove nftproxy's tables.
pub fn cleanup(kube_proxy: bool) -> ExitCode {
    let owner = if kube_proxy { "kube-proxy" } else { "nftproxy" };
    let tables = [(Family::Ip, owner), (Family::Ip6, owner)];
    let mut failed = false;
    match crate::apply::netlink::delete_tables(&tables) {
        Ok(n) => println!("deleted {n} nftables table(s)"),
        Err(e) => {
            eprintln!("nftproxy cleanup: {e}");
            failed = true;
        }
    }
    if kube_proxy {
        for (save, restore) in iptables_variants() {
            match clean_iptables(&save, &restore) {
                Ok(true) => println!("deleted kube-proxy's chains ({save})"),
                Ok(false) => {}
                Err(e) => {
                    eprintln!("nftproxy cleanup: {e}");
                    failed = true;
                }
            }
        }
        for step in clean_ipvs() {
            match step {
                Ok(done) => println!("{done}"),
                Err(e) => {
                    eprintln!("nftproxy cleanup: {e}");
                    failed = true;
                }
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "\
# Generated by iptables-save
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-NPX46M4PTMTKRN6Y - [0:0]
:KUBE-SEP-ABC - [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 443 -j KUBE-SVC-NPX46M4PTMTKRN6Y
-A KUBE-SVC-NPX46M4PTMTKRN6Y -j KUBE-SEP-ABC
-A KUBE-SEP-ABC -p tcp -m tcp -j DNAT --to-destination 192.168.0.1:6443
:CNI-HOSTPORT-SETMARK - [0:0]
-A CNI-HOSTPORT-SETMARK -j KUBE-MARK-MASQ
COMMIT
*filter
:INPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
COMMIT
";

    #[test]
    fn kube_proxys_chains_and_the_jumps_to_them_go_others_stay() {
        let out = iptables_cleanup(SAVE);
        let lines: Vec<&str> = out.lines().collect();
        for want in [
            "*nat",
            "-D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-D OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-D POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
            "-X KUBE-SERVICES",
            "-X KUBE-SVC-NPX46M4PTMTKRN6Y",
            "-X KUBE-SEP-ABC",
            "*filter",
            "-D FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
            "-X KUBE-FORWARD",
        ] {
            assert!(lines.contains(&want), "{want}\n{out}");
        }
        // KUBE-MARK-MASQ stays: CNI portmap still jumps to it.
        for keep in [
            "KUBE-KUBELET-CANARY",
            "KUBE-FIREWALL",
            "CNI-HOSTPORT-DNAT",
            "KUBE-MARK-MASQ",
        ] {
            assert!(!out.contains(keep), "{keep} removed:\n{out}");
        }
        // Rules inside removed chains are flushed with them, not deleted one by one.
        assert!(!out.contains("-D KUBE-SERVICES"), "{out}");
        // Every table's removal is one transaction.
        assert_eq!(out.matches("COMMIT").count(), 2);
        assert!(iptables_cleanup("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n").is_empty());
    }

    /// The real tools in a fresh network namespace: kube-proxy's chains (iptables-nft) go,
    /// kubelet's stay.
    #[test]
    #[ignore = "privileged (root, network namespaces): cargo test -- --ignored, or `just test-privileged`"]
    fn iptables_leftovers_are_removed_in_a_namespace() {
        crate::testutil::require_root();
        if Command::new("iptables-save").output().is_err() {
            eprintln!("SKIPPED: iptables is not installed");
            return;
        }
        crate::testutil::in_netns(|| {
            let ipt = |args: &[&str]| {
                let s = Command::new("iptables")
                    .args(args)
                    .status()
                    .expect("iptables");
                assert!(s.success(), "iptables {args:?}");
            };
            ipt(&["-t", "nat", "-N", "KUBE-SERVICES"]);
            ipt(&["-t", "nat", "-N", "KUBE-SVC-X"]);
            ipt(&["-t", "nat", "-N", "KUBE-KUBELET-CANARY"]);
            ipt(&["-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES"]);
            ipt(&[
                "-t",
                "nat",
                "-A",
                "KUBE-SERVICES",
                "-d",
                "10.96.0.1/32",
                "-j",
                "KUBE-SVC-X",
            ]);
            assert_eq!(
                clean_iptables("iptables-save", "iptables-restore"),
                Ok(true)
            );
            let after = Command::new("iptables-save").output().expect("save").stdout;
            let after = String::from_utf8_lossy(&after);
            assert!(
                !after.contains("KUBE-SERVICES") && !after.contains("KUBE-SVC-X"),
                "{after}"
            );
            assert!(after.contains("KUBE-KUBELET-CANARY"), "{after}");
            // Nothing left to do: idempotent.
            assert_eq!(
                clean_iptables("iptables-save", "iptables-restore"),
                Ok(false)
            );
        });
    }
}
