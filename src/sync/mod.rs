//! The sync loop: coalesce changes, compute the desired ruleset, plan, apply atomically, report.
//!
//! It owns error handling: a failed apply is logged and counted, the belief about the kernel is
//! dropped (so the next sync rebuilds everything), and the sync is retried with backoff. It never
//! exits on a sync error. All timing uses tokio time, so tests run on paused time.

pub mod drift;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::apply::{Applier, ApplyError, Skeleton};
use crate::nft::ir::{Family, Ruleset};
use crate::nft::plan;
use crate::nft::tx::Transaction;
use crate::proxy::ProxyState;

/// Syncs allowed back to back before `min_sync_period` rate limiting sets in.
const SYNC_BURST: u32 = 3;
/// How long a change waits for its companions (a Service and its EndpointSlice are written
/// moments apart) before an idle agent syncs.
const GATHER: Duration = Duration::from_millis(2);

/// A token bucket: `burst` syncs at once, then one per `period`.
#[derive(Debug, Clone)]
struct TokenBucket {
    burst: u32,
    period: Duration,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn new(burst: u32, period: Duration) -> Self {
        TokenBucket {
            burst,
            period,
            tokens: f64::from(burst),
            at: Instant::now(),
        }
    }

    /// Take one token; returns when the sync may run (now, or when the next token is there).
    fn take(&mut self, now: Instant) -> Instant {
        if self.period.is_zero() {
            return now;
        }
        let refill = now.duration_since(self.at).as_secs_f64() / self.period.as_secs_f64();
        self.tokens = (self.tokens + refill).min(f64::from(self.burst));
        self.at = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            now
        } else {
            // Borrowed: the debt is paid back by waiting.
            now + self.period.mul_f64(-self.tokens)
        }
    }
}

/// What the loop needs to know about timing.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// Minimum time between two syncs (coalescing window under bursts).
    pub min_sync_period: Duration,
    /// Periodic resync and self-heal check.
    pub sync_period: Duration,
    /// How long an unreferenced chain stays (flushed) before it is deleted.
    pub chain_delete_grace: Duration,
    /// Run applies on a blocking thread (the kernel works inside `sendmsg`); tests with the
    /// in-memory applier run them inline.
    pub blocking_apply: bool,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            min_sync_period: Duration::from_millis(50),
            sync_period: Duration::from_secs(30),
            chain_delete_grace: Duration::from_secs(1),
            blocking_apply: true,
        }
    }
}

/// The desired state computed from a snapshot of the stores.
#[derive(Debug, Clone)]
pub struct Desired {
    pub ruleset: Ruleset,
    pub state: Arc<ProxyState>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    /// Rebuild every table from scratch in one transaction.
    Full,
    /// Only the delta against what was applied.
    Partial,
}

impl SyncKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncKind::Full => "full",
            SyncKind::Partial => "partial",
        }
    }
}

/// What one successful sync did (for logs, metrics, health servers and conntrack cleanup).
#[derive(Debug, Clone)]
pub struct Report {
    pub kind: SyncKind,
    pub duration: Duration,
    /// The kernel commit alone (netlink send and error read).
    pub apply_time: Duration,
    pub ops: usize,
    pub elements: usize,
    pub skeleton_ops: usize,
    pub previous: Option<Arc<ProxyState>>,
    pub state: Arc<ProxyState>,
    pub ruleset_elements: usize,
    pub ruleset_chains: usize,
    pub ruleset_rules: usize,
}

/// Observes the loop: successes and failures.
pub trait Observer: Send {
    fn applied(&mut self, report: &Report);
    fn failed(&mut self, kind: SyncKind, error: &str);
}

/// Shared status read by the agent health server.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// When the last sync succeeded.
    pub last_success: Option<Instant>,
    /// The oldest change accepted but not yet applied.
    pub pending_since: Option<Instant>,
}

pub type SharedStatus = Arc<Mutex<Status>>;

pub struct Syncer<A: Applier + 'static> {
    cfg: SyncConfig,
    applier: Arc<Mutex<A>>,
    applied: Option<Ruleset>,
    previous_state: Option<Arc<ProxyState>>,
    stale: BTreeMap<(Family, String), Instant>,
    our_generation: Option<u32>,
    status: SharedStatus,
    failures: u32,
    /// Time the last desired-state computation took (snapshot, model, compile), for the log.
    compute_time: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep going with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<A: Applier + 'static> Syncer<A> {
    pub fn new(cfg: SyncConfig, applier: A, status: SharedStatus) -> Self {
        Syncer {
            cfg,
            applier: Arc::new(Mutex::new(applier)),
            applied: None,
            previous_state: None,
            stale: BTreeMap::new(),
            our_generation: None,
            status,
            failures: 0,
            compute_time: Duration::ZERO,
        }
    }

    /// Access the applier (tests inspect the fake).
    pub fn applier(&self) -> Arc<Mutex<A>> {
        self.applier.clone()
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut A) -> T + Send + 'static,
    ) -> Result<T, ApplyError> {
        let applier = self.applier.clone();
        if self.cfg.blocking_apply {
            tokio::task::spawn_blocking(move || f(&mut lock(&applier)))
                .await
                .map_err(|e| ApplyError::Io(format!("apply thread: {e}")))
        } else {
            Ok(f(&mut lock(&applier)))
        }
    }

    /// Whether the kernel still holds what we applied. Cheap: the generation id, and only when it
    /// moved without us, a look at whether our tables exist.
    async fn kernel_intact(&mut self) -> bool {
        let Some(ours) = self.our_generation else {
            return false;
        };
        let Some(applied) = self.applied.as_ref() else {
            return false;
        };
        let expected: Vec<(Family, Skeleton)> = applied
            .tables
            .iter()
            .map(|(f, t)| (*f, Skeleton::of(t)))
            .collect();
        let result = self
            .call(move |a| -> Result<bool, ApplyError> {
                if a.generation()? == ours {
                    return Ok(true);
                }
                // Someone committed something in this namespace: was it our table?
                for (f, want) in expected {
                    if !a.table_exists(f)? || a.skeleton(f)? != want {
                        return Ok(false);
                    }
                }
                Ok(true)
            })
            .await;
        match result {
            Ok(Ok(intact)) => {
                if !intact {
                    tracing::warn!(
                        "nftproxy tables were changed or deleted from outside; rebuilding"
                    );
                }
                intact
            }
            Ok(Err(e)) | Err(e) => {
                tracing::warn!(error = %e, "could not check the kernel ruleset; rebuilding");
                false
            }
        }
    }

    /// One sync. `check_kernel` asks for the self-heal check (periodic syncs).
    pub async fn sync(
        &mut self,
        desired: Desired,
        check_kernel: bool,
        observer: &mut dyn Observer,
    ) -> Result<Report, String> {
        let start = Instant::now();
        if check_kernel && self.applied.is_some() && !self.kernel_intact().await {
            self.applied = None;
        }
        let now = Instant::now();
        let due: BTreeSet<(Family, String)> = self
            .stale
            .iter()
            .filter(|(_, t)| now.duration_since(**t) >= self.cfg.chain_delete_grace)
            .map(|(k, _)| k.clone())
            .collect();
        let (kind, tx, p) = match &self.applied {
            Some(applied) => {
                let p = plan::partial(applied, &desired.ruleset, &due);
                if p.needs_full {
                    (SyncKind::Full, plan::full(&desired.ruleset), None)
                } else {
                    (SyncKind::Partial, p.tx.clone(), Some(p))
                }
            }
            None => (SyncKind::Full, plan::full(&desired.ruleset), None),
        };
        let (ops, elements, skeleton_ops) = (tx.ops.len(), tx.element_count(), tx.skeleton_ops());
        let mut apply_time = Duration::ZERO;
        if !tx.is_empty() {
            let apply_start = Instant::now();
            let tx: Transaction = tx;
            let result = self
                .call(move |a| -> Result<u32, ApplyError> {
                    a.apply(&tx)?;
                    a.generation()
                })
                .await
                .and_then(|r| r);
            apply_time = apply_start.elapsed();
            match result {
                Ok(generation) => self.our_generation = Some(generation),
                Err(e) => {
                    self.applied = None;
                    self.failures += 1;
                    let msg = e.to_string();
                    tracing::error!(kind = kind.as_str(), ops, error = %msg, "sync failed; the next sync rebuilds everything");
                    observer.failed(kind, &msg);
                    return Err(msg);
                }
            }
        } else if self.our_generation.is_none() {
            if let Ok(Ok(g)) = self.call(|a| a.generation()).await {
                self.our_generation = Some(g);
            }
        }
        self.failures = 0;
        let applied = match (&self.applied, &p) {
            (Some(a), Some(p)) => {
                for c in &p.flushed_stale {
                    self.stale.insert(c.clone(), now);
                }
                self.stale.retain(|k, _| !due.contains(k));
                plan::after(a, &desired.ruleset, p)
            }
            _ => {
                self.stale.clear();
                desired.ruleset.clone()
            }
        };
        let (mut chains, mut rules) = (0, 0);
        for t in applied.tables.values() {
            chains += t.chains.len();
            rules += t.chains.values().map(|c| c.rules.len()).sum::<usize>();
        }
        let ruleset_elements = applied
            .tables
            .values()
            .flat_map(|t| t.elements.values())
            .map(|e| e.len())
            .sum();
        self.applied = Some(applied);
        let report = Report {
            kind,
            duration: start.elapsed(),
            apply_time,
            ops,
            elements,
            skeleton_ops,
            previous: self.previous_state.replace(desired.state.clone()),
            state: desired.state,
            ruleset_elements,
            ruleset_chains: chains,
            ruleset_rules: rules,
        };
        {
            let mut st = lock(&self.status);
            st.last_success = Some(Instant::now());
        }
        tracing::info!(
            kind = kind.as_str(),
            ops,
            elements,
            skeleton_ops,
            compute_ms = self.compute_time.as_secs_f64() * 1000.0,
            duration_ms = report.duration.as_secs_f64() * 1000.0,
            apply_ms = apply_time.as_secs_f64() * 1000.0,
            "synced"
        );
        observer.applied(&report);
        Ok(report)
    }

    /// When the next sync must run even without changes: retry after failure, chain deletion.
    fn next_deadline(&self, last_sync: Instant) -> Instant {
        // Far away unless a retry or a chain deletion is pending: the periodic check runs on
        // its own timer and only rebuilds when the kernel lost our tables.
        let mut next = last_sync + Duration::from_secs(365 * 86400);
        if self.applied.is_none() && self.failures > 0 {
            let backoff = Duration::from_millis(200)
                .saturating_mul(1 << self.failures.min(8))
                .min(self.cfg.sync_period);
            next = next.min(last_sync + backoff);
        }
        if let Some(oldest) = self.stale.values().min() {
            next = next.min(*oldest + self.cfg.chain_delete_grace);
        }
        next
    }

    /// The loop. `changes` carries "something changed" nudges from the watchers; `desired`
    /// computes the desired state from the current stores (None: not ready). Ends when
    /// `changes` closes. When nothing changes, the periodic tick costs one generation-id query:
    /// nothing is relisted or recompiled unless the kernel lost our tables.
    pub async fn run(
        mut self,
        mut changes: mpsc::Receiver<()>,
        mut desired: impl FnMut() -> Option<Desired> + Send,
        observer: &mut dyn Observer,
    ) {
        let mut last_sync = Instant::now() - self.cfg.min_sync_period;
        let mut bucket = TokenBucket::new(SYNC_BURST, self.cfg.min_sync_period);
        let mut last_check = Instant::now();
        let mut need_sync = true; // the first sync runs at once
        loop {
            if need_sync {
                // Coalesce: an idle agent syncs at once (after a breath that lets a Service and its
                // slice arrive together); under a stream of changes, one sync per min_sync_period.
                tokio::time::sleep(GATHER).await;
                let earliest = bucket.take(Instant::now());
                if Instant::now() < earliest {
                    tokio::time::sleep_until(earliest).await;
                }
                while changes.try_recv().is_ok() {}
                let compute_start = Instant::now();
                if let Some(d) = desired() {
                    last_sync = Instant::now();
                    self.compute_time = last_sync.duration_since(compute_start);
                    if self.sync(d, false, observer).await.is_ok() {
                        lock(&self.status).pending_since = None;
                    }
                }
            }
            let retry_or_gc = self.next_deadline(last_sync);
            let check = last_check + self.cfg.sync_period;
            tokio::select! {
                msg = changes.recv() => {
                    let Some(()) = msg else { return };
                    let mut st = lock(&self.status);
                    if st.pending_since.is_none() {
                        st.pending_since = Some(Instant::now());
                    }
                    need_sync = true;
                }
                _ = tokio::time::sleep_until(retry_or_gc), if retry_or_gc < check => { need_sync = true; }
                _ = tokio::time::sleep_until(check) => {
                    last_check = Instant::now();
                    need_sync = self.applied.is_none() || !self.kernel_intact().await;
                    if need_sync {
                        self.applied = None;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
