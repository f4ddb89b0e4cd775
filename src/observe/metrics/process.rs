//! The process metrics every Prometheus client exports (client_golang's names and help), read
//! from /proc at each scrape: memory, CPU, open files, start time.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub struct ProcessMetrics {
    cpu_seconds: Counter<f64, AtomicU64>,
    open_fds: Gauge,
    max_fds: Gauge,
    virtual_memory: Gauge,
    resident_memory: Gauge,
    start_time: Gauge<f64, AtomicU64>,
}

impl ProcessMetrics {
    pub fn register(root: &mut Registry) -> ProcessMetrics {
        let m = ProcessMetrics {
            cpu_seconds: Counter::default(),
            open_fds: Gauge::default(),
            max_fds: Gauge::default(),
            virtual_memory: Gauge::default(),
            resident_memory: Gauge::default(),
            start_time: Gauge::default(),
        };
        let p = root.sub_registry_with_prefix("process");
        p.register(
            "cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            m.cpu_seconds.clone(),
        );
        p.register(
            "open_fds",
            "Number of open file descriptors.",
            m.open_fds.clone(),
        );
        p.register(
            "max_fds",
            "Maximum number of open file descriptors.",
            m.max_fds.clone(),
        );
        p.register(
            "virtual_memory_bytes",
            "Virtual memory size in bytes.",
            m.virtual_memory.clone(),
        );
        p.register(
            "resident_memory_bytes",
            "Resident memory size in bytes.",
            m.resident_memory.clone(),
        );
        p.register(
            "start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            m.start_time.clone(),
        );
        m
    }

    /// Read /proc/self now (a scrape is about to be encoded). Values that cannot be read keep
    /// their last value.
    pub fn update(&self) {
        let Ok(me) = procfs::process::Process::myself() else {
            return;
        };
        if let Ok(stat) = me.stat() {
            let ticks = procfs::ticks_per_second().max(1) as f64;
            let cpu = (stat.utime + stat.stime) as f64 / ticks;
            // A counter: add what was used since the last scrape.
            let before = self.cpu_seconds.get();
            if cpu > before {
                self.cpu_seconds.inc_by(cpu - before);
            }
            self.virtual_memory
                .set(i64::try_from(stat.vsize).unwrap_or(i64::MAX));
            let rss = stat.rss.saturating_mul(procfs::page_size());
            self.resident_memory
                .set(i64::try_from(rss).unwrap_or(i64::MAX));
            if let Ok(boot) = procfs::boot_time_secs() {
                self.start_time
                    .set(boot as f64 + stat.starttime as f64 / ticks);
            }
        }
        if let Ok(n) = me.fd_count() {
            self.open_fds.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        if let Ok(l) = me.limits() {
            if let procfs::process::LimitValue::Value(v) = l.max_open_files.soft_limit {
                self.max_fds.set(i64::try_from(v).unwrap_or(i64::MAX));
            }
        }
    }
}
