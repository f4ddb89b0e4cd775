//! The conntrack sysctls kube-proxy sets at start (kubernetes `cmd/kube-proxy/app/
//! server_linux.go` `setupConntrack`, `pkg/proxy/conntrack/sysctls.go`): the table size from
//! max-per-core x CPUs (at least min), the TCP established and close-wait timeouts, TCP
//! be-liberal, the UDP timeouts. A zero setting leaves the kernel's value alone; the table size
//! is only ever raised (kubernetes#142035) and the hash size follows it (max/4). Files are read
//! and written under a root directory, so tests use a temporary one and never touch the host.

use std::path::PathBuf;
use std::time::Duration;

/// kube-proxy's settings (`--conntrack-*`, `conntrack.*`), with its defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConntrackSettings {
    /// Table entries per CPU; 0 leaves the table size (and `min`) alone.
    pub max_per_core: u64,
    pub min: u64,
    pub tcp_established: Duration,
    pub tcp_close_wait: Duration,
    pub tcp_be_liberal: bool,
    pub udp: Duration,
    pub udp_stream: Duration,
}

impl Default for ConntrackSettings {
    fn default() -> Self {
        ConntrackSettings {
            max_per_core: 32 * 1024,
            min: 128 * 1024,
            tcp_established: Duration::from_secs(24 * 3600),
            tcp_close_wait: Duration::from_secs(3600),
            tcp_be_liberal: false,
            udp: Duration::ZERO,
            udp_stream: Duration::ZERO,
        }
    }
}

impl ConntrackSettings {
    /// Leave every conntrack sysctl as the node has it.
    pub fn leave_alone() -> ConntrackSettings {
        ConntrackSettings {
            max_per_core: 0,
            min: 0,
            tcp_established: Duration::ZERO,
            tcp_close_wait: Duration::ZERO,
            tcp_be_liberal: false,
            udp: Duration::ZERO,
            udp_stream: Duration::ZERO,
        }
    }
}

const MAX_FILE: &str = "proc/sys/net/netfilter/nf_conntrack_max";

/// The biggest table kube-proxy 1.36 scales to (kubernetes#137002), whatever the CPU count.
const MAX_SCALED: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    /// The file cannot be written: /proc/sys (or /sys) is mounted read-only in the container,
    /// or the process lacks the privilege.
    #[error("cannot write {}: {source}; conntrack settings need a privileged container (kube-proxy's DaemonSet is privileged), or set conntrack.maxPerCore and the timeouts to 0 to leave the node's values alone", path.display())]
    ReadOnly {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {value:?} is not a number", path.display())]
    Parse { path: PathBuf, value: String },
}

/// One value written (or found already right).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub file: String,
    pub from: u64,
    pub to: u64,
}

/// The sysctl files, under a root (`/` on a node).
pub struct Sysctls {
    root: PathBuf,
    /// Whether this process is in its node's network namespace: only there may the global
    /// knobs (table size, hash size) be changed.
    node_netns: bool,
}

/// What [`Sysctls::apply`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub changes: Vec<Change>,
    /// Why the table size was left alone although asked for.
    pub skipped: Option<String>,
}

impl Sysctls {
    /// The files under `root`, in the node's network namespace (tests).
    pub fn new(root: impl Into<PathBuf>) -> Sysctls {
        Sysctls {
            root: root.into(),
            node_netns: true,
        }
    }

    /// This node's files. The network namespace is the node's when it is the one of this PID
    /// namespace's init (a hostNetwork pod shares the node's; a process started with `ip netns
    /// exec` does not): nf_conntrack_max is global and, before Linux 5.13, writable from any
    /// namespace, so only the node's may set it.
    pub fn node() -> Sysctls {
        let ns = |p: &str| std::fs::read_link(p).ok();
        let node_netns = match (ns("/proc/self/ns/net"), ns("/proc/1/ns/net")) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        };
        Sysctls {
            root: PathBuf::from("/"),
            node_netns,
        }
    }

    /// As [`Sysctls::new`], outside the node's network namespace (tests).
    #[cfg(test)]
    fn in_other_netns(root: impl Into<PathBuf>) -> Sysctls {
        Sysctls {
            root: root.into(),
            node_netns: false,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn read(&self, rel: &str) -> Result<u64, SysctlError> {
        let path = self.path(rel);
        let text = std::fs::read_to_string(&path).map_err(|source| SysctlError::Io {
            path: path.clone(),
            source,
        })?;
        text.trim().parse().map_err(|_| SysctlError::Parse {
            path,
            value: text.trim().to_string(),
        })
    }

    fn write(&self, rel: &str, value: u64) -> Result<(), SysctlError> {
        let path = self.path(rel);
        std::fs::write(&path, value.to_string()).map_err(|source| {
            let read_only = matches!(
                source.raw_os_error(),
                Some(libc::EROFS | libc::EACCES | libc::EPERM)
            );
            if read_only {
                SysctlError::ReadOnly { path, source }
            } else {
                SysctlError::Io { path, source }
            }
        })
    }

    /// Write `to` unless the file holds it already (`raise_only`: unless it holds more).
    fn set(
        &self,
        rel: &str,
        to: u64,
        raise_only: bool,
        out: &mut Vec<Change>,
    ) -> Result<(), SysctlError> {
        let from = self.read(rel)?;
        if from == to || (raise_only && from > to) {
            return Ok(());
        }
        self.write(rel, to)?;
        out.push(Change {
            file: rel.to_string(),
            from,
            to,
        });
        Ok(())
    }

    /// Apply `s` for a node with `cpus` CPUs; returns what changed. Stops at the first error.
    pub fn apply(&self, s: &ConntrackSettings, cpus: u64) -> Result<Applied, SysctlError> {
        let mut out = Vec::new();
        let mut skipped = None;
        if s.max_per_core > 0 && !self.node_netns {
            skipped = Some(
                "not in the node's network namespace: nf_conntrack_max and the hash size are global; left alone"
                    .to_string(),
            );
        } else if s.max_per_core > 0 {
            let max = (s.max_per_core.saturating_mul(cpus))
                .min(MAX_SCALED)
                .max(s.min);
            // The table size and the hash size are global (the initial network namespace's);
            // in any other namespace nf_conntrack_max is read-only (mode 0444, since Linux
            // 4.x). Writing its current value back first proves this process may change them,
            // before the hash size, which /sys would let any root process change for the
            // whole machine.
            let current = self.read(MAX_FILE)?;
            self.write(MAX_FILE, current)?;
            self.set(MAX_FILE, max, true, &mut out)?;
            // A hash table a quarter of the table size, as kube-proxy keeps it.
            self.set(
                "sys/module/nf_conntrack/parameters/hashsize",
                max / 4,
                true,
                &mut out,
            )?;
        }
        for (file, d) in [
            ("nf_conntrack_tcp_timeout_established", s.tcp_established),
            ("nf_conntrack_tcp_timeout_close_wait", s.tcp_close_wait),
            ("nf_conntrack_udp_timeout", s.udp),
            ("nf_conntrack_udp_timeout_stream", s.udp_stream),
        ] {
            if d.as_secs() > 0 {
                self.set(
                    &format!("proc/sys/net/netfilter/{file}"),
                    d.as_secs(),
                    false,
                    &mut out,
                )?;
            }
        }
        if s.tcp_be_liberal {
            self.set(
                "proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal",
                1,
                false,
                &mut out,
            )?;
        }
        Ok(Applied {
            changes: out,
            skipped,
        })
    }
}

/// The node's CPU count as kube-proxy counts it: the CPUs of the machine, not a container's CPU
/// quota (which `available_parallelism` would give).
pub fn cpus() -> u64 {
    use procfs::Current;
    procfs::CpuInfo::current()
        .map(|c| c.num_cores() as u64)
        .ok()
        .filter(|n| *n > 0)
        .unwrap_or(1)
}

/// Used by the tests: the files a node has, with their values.
#[cfg(test)]
fn fake_root(dir: &std::path::Path, values: &[(&str, u64)]) {
    for (rel, v) in values {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, format!("{v}\n")).expect("write");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nftproxy-sysctl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    const MAX: &str = "proc/sys/net/netfilter/nf_conntrack_max";
    const HASH: &str = "sys/module/nf_conntrack/parameters/hashsize";
    const EST: &str = "proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established";
    const CW: &str = "proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait";
    const LIB: &str = "proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal";
    const UDP: &str = "proc/sys/net/netfilter/nf_conntrack_udp_timeout";
    const UDPS: &str = "proc/sys/net/netfilter/nf_conntrack_udp_timeout_stream";

    fn node(dir: &Path) {
        fake_root(
            dir,
            &[
                (MAX, 65536),
                (HASH, 16384),
                (EST, 432000),
                (CW, 60),
                (LIB, 0),
                (UDP, 30),
                (UDPS, 120),
            ],
        );
    }

    fn value(dir: &Path, rel: &str) -> u64 {
        std::fs::read_to_string(dir.join(rel))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn kube_proxys_defaults_on_a_4_cpu_node() {
        let d = tmp("defaults");
        node(&d);
        let changes = Sysctls::new(&d)
            .apply(&ConntrackSettings::default(), 4)
            .unwrap()
            .changes;
        // 32768 x 4 = 131072 = min: raised from 65536; the hash table follows (max/4).
        assert_eq!(value(&d, MAX), 131072);
        assert_eq!(value(&d, HASH), 32768);
        assert_eq!(value(&d, EST), 86400);
        assert_eq!(value(&d, CW), 3600);
        // Unset (0) or false: left as the node has them.
        assert_eq!(
            (value(&d, LIB), value(&d, UDP), value(&d, UDPS)),
            (0, 30, 120)
        );
        assert_eq!(changes.len(), 4, "{changes:?}");
        // Applying again changes nothing.
        assert!(Sysctls::new(&d)
            .apply(&ConntrackSettings::default(), 4)
            .unwrap()
            .changes
            .is_empty());
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn the_table_is_only_raised_and_scaling_is_capped() {
        let d = tmp("raise");
        node(&d);
        fake_root(&d, &[(MAX, 4_000_000), (HASH, 1_000_000)]);
        Sysctls::new(&d)
            .apply(&ConntrackSettings::default(), 4)
            .unwrap();
        assert_eq!(value(&d, MAX), 4_000_000, "never lowered");
        fake_root(&d, &[(MAX, 1000)]);
        Sysctls::new(&d)
            .apply(&ConntrackSettings::default(), 512)
            .unwrap();
        assert_eq!(value(&d, MAX), 1 << 20, "capped at 1,048,576");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn zero_leaves_everything_alone_and_set_values_are_written() {
        let d = tmp("zero");
        node(&d);
        assert!(Sysctls::new(&d)
            .apply(&ConntrackSettings::leave_alone(), 4)
            .unwrap()
            .changes
            .is_empty());
        let s = ConntrackSettings {
            tcp_be_liberal: true,
            udp: Duration::from_secs(60),
            udp_stream: Duration::from_secs(180),
            ..ConntrackSettings::leave_alone()
        };
        Sysctls::new(&d).apply(&s, 4).unwrap();
        assert_eq!(
            (value(&d, LIB), value(&d, UDP), value(&d, UDPS)),
            (1, 60, 180)
        );
        assert_eq!(value(&d, MAX), 65536);
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn no_global_change_where_the_table_size_is_read_only() {
        let d = tmp("readonly");
        node(&d);
        // As in a network namespace other than the node's: nf_conntrack_max cannot be written
        // (here: a directory where the file should be).
        std::fs::remove_file(d.join(MAX)).unwrap();
        std::fs::create_dir_all(d.join(MAX)).unwrap();
        assert!(Sysctls::new(&d)
            .apply(&ConntrackSettings::default(), 64)
            .is_err());
        assert_eq!(value(&d, HASH), 16384, "the global hash size is untouched");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn outside_the_node_namespace_only_the_namespace_timeouts_are_set() {
        let d = tmp("othernetns");
        node(&d);
        let a = Sysctls::in_other_netns(&d)
            .apply(&ConntrackSettings::default(), 64)
            .unwrap();
        assert!(a.skipped.is_some());
        assert_eq!(
            (value(&d, MAX), value(&d, HASH)),
            (65536, 16384),
            "globals untouched"
        );
        assert_eq!((value(&d, EST), value(&d, CW)), (86400, 3600));
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn a_missing_file_is_a_clear_error() {
        let d = tmp("missing");
        let e = Sysctls::new(&d)
            .apply(&ConntrackSettings::default(), 4)
            .unwrap_err();
        assert!(e.to_string().contains("nf_conntrack_max"), "{e}");
    }
}
