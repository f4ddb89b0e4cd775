//! The sync loop: coalesce changes, compute the desired ruleset, plan, apply atomically, report.
//!
//! It is the only code that talks to the kernel's nftables: commits, the ClientIP affinity
//! cleanup after them, drift verification and repair, and the reads of the drop/reject counters
//! all run here, on the one applier it owns. Observers get [`Report`]s with every fact they need.
//!
//! It owns error handling: a failed apply is logged and counted, the belief about the kernel is
//! dropped (so the next sync rebuilds everything), and the sync is retried with backoff; a failed
//! affinity cleanup is counted and retried the same way. It never exits on a sync error. All
//! timing uses tokio time, so tests run on paused time.

pub mod affinity;
pub mod drift;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::apply::monitor::{self, Notice, QuietSwitch, Touched};
use crate::apply::{Applier, ApplyError, KernelTable};
pub(crate) use crate::lock::lock;
use crate::net::Family;
use crate::nft::compile::Owners;
use crate::nft::ir::{Element, Ruleset};
use crate::nft::plan;
use crate::nft::tx::{Op, Transaction};
use crate::proxy::ProxyState;

/// Commits with at least this many element operations run with the monitor's notifications
/// paused: below it, the notifications cost the kernel little and fit the monitor's queue
/// (a routine partial sync changes a handful of elements; a 1,000-endpoint burst 2,000).
pub const QUIET_ELEMENTS: usize = 5_000;
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
    /// How often the drop/reject counters are read for the observers (None: never).
    pub counter_period: Option<Duration>,
    /// A commit of more element changes than this is cut into transactions of about this many,
    /// each showing whole Services (`plan::split`); 0: always one transaction.
    pub split_elements: usize,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            min_sync_period: Duration::from_millis(50),
            sync_period: Duration::from_secs(30),
            chain_delete_grace: Duration::from_secs(1),
            blocking_apply: true,
            counter_period: None,
            split_elements: SPLIT_ELEMENTS,
        }
    }
}

/// Element changes per transaction when a big commit is split: ~3 ms in the kernel each
/// (kernel 6.18, 50,000 Services x 5: 208 transactions, 0.6 s in the kernel in all, 1.2 s with
/// building them, as in one transaction; a SCHED_FIFO TCP echo through the node then waited
/// 2.1 ms at p99, against 0.8 s behind one 400,000-element transaction).
pub const SPLIT_ELEMENTS: usize = 2_000;

/// The desired state computed from a snapshot of the stores.
#[derive(Debug, Clone)]
pub struct Desired {
    pub ruleset: Ruleset,
    pub state: Arc<ProxyState>,
    /// What the observers need to know about this node along with the state.
    pub node: NodeFacts,
    /// When the changes this state includes were made (EndpointSlice trigger times), for the
    /// programming latency.
    pub triggers: Vec<SystemTime>,
    /// How many Service and EndpointSlice changes this state takes in.
    pub changes: Changes,
}

impl Desired {
    pub fn new(ruleset: Ruleset, state: Arc<ProxyState>) -> Desired {
        Desired {
            ruleset,
            state,
            node: NodeFacts::default(),
            triggers: Vec::new(),
            changes: Changes::default(),
        }
    }
}

/// Counts of object changes (kube-proxy's `*_changes_total` and `*_changes_pending`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    pub services: usize,
    pub slices: usize,
}

/// Facts about this node that travel with a desired state to the observers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// Being deleted or marked for removal: /healthz fails so load balancers drain the node.
    pub ineligible: bool,
    /// Where the healthCheckNodePort servers listen.
    pub health_addrs: Vec<IpAddr>,
    /// The NodePort addresses when they are single addresses (None: CIDRs, i.e. any address).
    pub nodeport_ips: Option<Vec<IpAddr>>,
    /// The Node as the state was computed for (`explain` reads its addresses and pod CIDRs).
    pub info: crate::model::NodeInfo,
}

/// The counter sets the loop reads for the observers: (set, whether it counts drops).
pub const COUNTER_SETS: [(&str, bool); 4] = [
    (crate::nft::names::NO_ENDPOINT_DROP, true),
    (crate::nft::names::NODEPORT_NO_ENDPOINT_DROP, true),
    (crate::nft::names::NO_ENDPOINT_REJECT, false),
    (crate::nft::names::NODEPORT_NO_ENDPOINT_REJECT, false),
];

/// One counter set as read from the kernel.
#[derive(Debug, Clone)]
pub struct Counters {
    pub family: Family,
    pub set: &'static str,
    /// Drops (true) or rejects.
    pub drops: bool,
    /// Each element with its (packets, bytes) counter.
    pub elements: Vec<(Element, Option<(u64, u64)>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    /// Rebuild every table from scratch in one transaction.
    Full,
    /// Only the delta against what was applied.
    Partial,
}

/// Why one sync did not reach the kernel. The loop logs, counts and retries it; the next sync
/// is full, or reads the kernel back first after a failed partial one.
#[derive(Debug, thiserror::Error)]
#[error("{} sync failed: {source}", kind.as_str())]
pub struct SyncError {
    pub kind: SyncKind,
    #[source]
    pub source: ApplyError,
    /// The changes still waiting to reach the kernel.
    pub pending: Changes,
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
    /// Transactions the commit took (0: nothing to commit; more than one: a big change split
    /// into whole Services).
    pub transactions: usize,
    pub previous: Option<Arc<ProxyState>>,
    pub state: Arc<ProxyState>,
    /// The ruleset as the kernel now holds it (what `explain` traces).
    pub ruleset: Ruleset,
    pub ruleset_elements: usize,
    pub ruleset_chains: usize,
    pub ruleset_rules: usize,
    /// This node's facts as of this state.
    pub node: NodeFacts,
    /// Trigger times of every change this commit made visible (also of changes whose first
    /// sync failed).
    pub triggers: Vec<SystemTime>,
    /// The object changes this commit made visible (also those of failed syncs before it).
    pub changes: Changes,
    /// Affinity entries deleted after the commit because their endpoint is gone.
    pub affinity_deleted: usize,
}

/// Observes the loop: successes and failures.
pub trait Observer: Send {
    fn applied(&mut self, report: &Report);
    fn failed(&mut self, error: &SyncError);
    /// The kernel was found to differ from what was applied (already logged); a repair follows.
    fn drifted(&mut self, _findings: &[drift::Finding]) {}
    /// The affinity cleanup after a commit failed (already logged); it is retried.
    fn cleanup_failed(&mut self, _error: &str) {}
    /// A change was accepted; a sync will follow.
    fn queued(&mut self) {}
    /// A periodic check found the kernel holding what was applied (kube-proxy syncs every
    /// sync period; this is nftproxy's equivalent, and its time is a successful sync's).
    fn checked(&mut self) {}
    /// The drop/reject counters of one set, read every `counter_period`.
    fn counters(&mut self, _read: &[Counters], _state: &Arc<ProxyState>) {}
}

/// Findings logged one by one; the rest are summed up in one line.
const LOGGED_FINDINGS: usize = 20;

/// Shared status read by the agent health server.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// When the last sync succeeded.
    pub last_success: Option<Instant>,
    /// The oldest change accepted but not yet applied.
    pub pending_since: Option<Instant>,
    /// Drift found in the kernel that no verification has shown repaired yet.
    pub drift: Option<String>,
    /// Why the agent cannot start (the API server unreachable at an address only nftproxy
    /// would make reachable): /livez fails while it is set.
    pub bootstrap: Option<String>,
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
    /// Foreign changes to our tables announced by the kernel (None: no monitor).
    outside: Option<mpsc::Receiver<Notice>>,
    /// Stops the monitor's notifications during a big commit of ours (see [`QuietSwitch`]).
    quiet: Option<(Arc<dyn QuietSwitch>, usize)>,
    /// Another commit ran while the notifications were paused: verify everything.
    unseen: bool,
    /// The first sync may adopt the tables a previous agent left (instead of recreating them).
    adopt: bool,
    /// A repair was committed for drift in this scope: verify it once more after the sync.
    repairing: Option<Option<Touched>>,
    /// When every element was last read back, and what it cost (bounds the periodic check).
    last_full_verify: Option<(Instant, Duration)>,
    /// Affinity entries may point at endpoints that are gone: clean them (again, after a failure).
    affinity_due: bool,
    /// Failed cleanups in a row (the retry backoff).
    cleanup_failures: u32,
    /// Trigger times of changes not yet committed.
    triggers: Vec<SystemTime>,
    /// Object changes not yet committed.
    changes: Changes,
    /// When the last commit succeeded (wall clock, as trigger times are): an older trigger time
    /// was programmed already (its slice changed again in a way that did not move it).
    last_commit_wall: Option<SystemTime>,
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
            outside: None,
            quiet: None,
            unseen: false,
            adopt: true,
            repairing: None,
            last_full_verify: None,
            affinity_due: false,
            cleanup_failures: 0,
            triggers: Vec::new(),
            changes: Changes::default(),
            last_commit_wall: None,
        }
    }

    /// Listen to foreign changes of our tables (see [`monitor`]): each is verified and repaired
    /// at once instead of at the next periodic check.
    pub fn with_monitor(mut self, notices: mpsc::Receiver<Notice>) -> Self {
        self.outside = Some(notices);
        self
    }

    /// Pause the monitor's notifications around commits of at least `min_elements` element
    /// operations (the agent: [`QUIET_ELEMENTS`]; the kernel then builds none, see
    /// [`QuietSwitch`]).
    pub fn with_quiet_switch(mut self, switch: Arc<dyn QuietSwitch>, min_elements: usize) -> Self {
        self.quiet = Some((switch, min_elements));
        self
    }

    /// Read our tables back, for the families in `scope` (None: all; a family mapped to a set
    /// list: only those sets' elements), against `reference`.
    async fn read_kernel(
        &self,
        reference: &Ruleset,
        scope: Option<&Touched>,
    ) -> Result<BTreeMap<Family, Option<KernelTable>>, ApplyError> {
        let mut wanted = Vec::new();
        for (f, t) in &reference.tables {
            let sets = match scope.map(|s| s.get(f)) {
                Some(None) => continue,
                Some(Some(Some(sets))) => Some(sets.clone()),
                Some(Some(None)) | None => None,
            };
            wanted.push((*f, t.clone(), sets));
        }
        self.call(
            move |a| -> Result<BTreeMap<Family, Option<KernelTable>>, ApplyError> {
                let mut out = BTreeMap::new();
                for (f, t, sets) in wanted {
                    out.insert(f, a.read_table(f, &t, sets.as_ref())?);
                }
                Ok(out)
            },
        )
        .await?
    }

    /// Compare the kernel with what was applied (within `scope`); on a difference, log and
    /// report it and make the kernel's view the new belief, so that the next sync's plan is the
    /// repair. Returns whether drift was found (a sync is then due). A failed read drops the
    /// belief (the next sync rebuilds everything).
    async fn verify(
        &mut self,
        scope: Option<Touched>,
        state: Option<Arc<ProxyState>>,
        observer: &mut dyn Observer,
    ) -> bool {
        let Some(applied) = self.applied.clone() else {
            return false;
        };
        if let Some(pending) = self.repairing.as_mut() {
            // A repair is due but not committed yet: the belief is the kernel as last read, so
            // reading again would only report the same drift twice. The repair's own check
            // after its commit covers this scope too.
            match (pending.as_mut(), scope) {
                (Some(p), Some(s)) => monitor::merge(p, s),
                (Some(_), None) => *pending = None,
                (None, _) => {}
            }
            return true;
        }
        let started = Instant::now();
        let kernel = match self.read_kernel(&applied, scope.as_ref()).await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the ruleset back; rebuilding");
                self.applied = None;
                return true;
            }
        };
        let read: Option<BTreeMap<Family, BTreeSet<String>>> = scope.as_ref().map(|s| {
            s.iter()
                .filter_map(|(f, sets)| sets.clone().map(|sets| (*f, sets)))
                .collect()
        });
        let d = drift::kernel_view(&applied, &kernel, read.as_ref(), state.as_deref());
        let elements: usize = kernel
            .values()
            .flatten()
            .map(|t| t.elements.values().map(Vec::len).sum::<usize>())
            .sum();
        let took = started.elapsed();
        let ms = took.as_secs_f64() * 1000.0;
        let whole = scope
            .as_ref()
            .is_none_or(|s| s.values().any(|sets| sets.is_none()));
        if scope.is_none() {
            self.last_full_verify = Some((started, took));
        }
        if whole {
            // A whole-table read is rare (someone else committed): its cost is worth a line.
            tracing::info!(
                ms,
                elements,
                drift = !d.is_empty(),
                "verified the kernel ruleset"
            );
        } else {
            tracing::debug!(
                ms,
                elements,
                drift = !d.is_empty(),
                "verified the kernel ruleset"
            );
        }
        if d.is_empty() {
            if self.repairing.is_none() {
                lock(&self.status).drift = None;
            }
            return false;
        }
        for f in d.findings.iter().take(LOGGED_FINDINGS) {
            tracing::warn!(finding = %f, "ruleset drift: the kernel differs from what nftproxy applied; repairing");
        }
        if d.findings.len() > LOGGED_FINDINGS {
            tracing::warn!(
                more = d.findings.len() - LOGGED_FINDINGS,
                "ruleset drift: further differences"
            );
        }
        observer.drifted(&d.findings);
        let summary = d
            .findings
            .iter()
            .take(3)
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        lock(&self.status).drift = Some(summary);
        self.mark_leftover(&d.leftover_chains);
        self.applied = if d.needs_full { None } else { Some(d.view) };
        self.repairing = Some(scope);
        true
    }

    /// Delete affinity entries that point at endpoints `state` no longer has (a second, small
    /// transaction after the commit: the entries are written by the packet path, so they must be
    /// listed first). A failure is logged, counted and retried with the next sync.
    async fn clean_affinity(
        &mut self,
        state: &Arc<ProxyState>,
        observer: &mut dyn Observer,
    ) -> usize {
        if !self.affinity_due {
            return 0;
        }
        // The families this node programs (a single-stack node has one table; the state
        // always carries both families).
        let families: Vec<Family> = self
            .applied
            .as_ref()
            .map(|a| a.tables.keys().copied().collect())
            .unwrap_or_default();
        let st = state.clone();
        match self
            .call(move |a| affinity::clean(a, &st, &families))
            .await
            .and_then(|r| r)
        {
            Ok(n) => {
                self.affinity_due = false;
                self.cleanup_failures = 0;
                if n > 0 {
                    tracing::info!(
                        deleted = n,
                        "removed affinity entries pointing to gone endpoints"
                    );
                }
                n
            }
            Err(e) => {
                tracing::warn!(error = %e, "affinity cleanup failed; retrying with backoff");
                // Its own count: a commit that succeeds does not reset the cleanup's backoff.
                self.cleanup_failures += 1;
                observer.cleanup_failed(&e.to_string());
                0
            }
        }
    }

    /// Read the drop/reject counters of every applied table (targeted set dumps, never the
    /// whole table) and hand them to the observer.
    async fn read_counters(&mut self, observer: &mut dyn Observer) {
        let (Some(applied), Some(state)) = (&self.applied, self.previous_state.clone()) else {
            return;
        };
        let families: Vec<Family> = applied.tables.keys().copied().collect();
        let read = self
            .call(move |a| {
                let mut out = Vec::new();
                for f in families {
                    for (set, drops) in COUNTER_SETS {
                        match a.list_elements(f, set) {
                            Ok(elements) => out.push(Counters {
                                family: f,
                                set,
                                drops,
                                elements,
                            }),
                            Err(e) => tracing::debug!(set, error = %e, "cannot read counters"),
                        }
                    }
                }
                out
            })
            .await;
        if let Ok(read) = read {
            observer.counters(&read, &state);
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
                .map_err(|e| ApplyError::Thread(e.to_string()))
        } else {
            Ok(f(&mut lock(&applier)))
        }
    }

    /// Whether a commit by anyone else may have changed the kernel since ours: the ruleset
    /// generation id moved without us. One netlink round trip.
    async fn generation_moved(&mut self) -> bool {
        let Some(ours) = self.our_generation else {
            return true;
        };
        match self.call(|a| a.generation()).await {
            Ok(Ok(g)) => g != ours,
            Ok(Err(e)) | Err(e) => {
                tracing::warn!(error = %e, "could not read the ruleset generation; verifying");
                true
            }
        }
    }

    /// The periodic self-heal check: when anyone committed since our last commit, compare every
    /// element, rule and set definition of our tables with what was applied (this also catches
    /// changes whose notification was lost). Returns whether a sync is due.
    async fn periodic_check(&mut self, observer: &mut dyn Observer) -> bool {
        if self.applied.is_none() {
            return true;
        }
        if !self.generation_moved().await {
            return false;
        }
        // Reading every element back costs about 10 us per element (0.3 s at 10k Services,
        // 4 s at 50k). When other components commit often, do it at most once per 20 times its
        // last cost (at most ~5% of a core); in between, compare rules and set definitions only
        // (a few hundred objects). Notifications still repair element changes at once.
        let elements_due = self
            .last_full_verify
            .is_none_or(|(at, cost)| Instant::now().duration_since(at) >= cost * 20);
        let scope = if elements_due {
            None
        } else {
            Some(
                self.applied
                    .as_ref()
                    .map(|a| {
                        a.tables
                            .keys()
                            .map(|f| (*f, Some(BTreeSet::new())))
                            .collect()
                    })
                    .unwrap_or_default(),
            )
        };
        let found = self
            .verify(scope, self.previous_state.clone(), observer)
            .await;
        if !found && elements_due {
            // Someone else's commit, not to our tables: nothing to do until the next one.
            if let Ok(Ok(g)) = self.call(|a| a.generation()).await {
                self.our_generation = Some(g);
            }
        }
        found
    }

    /// Take over the tables a previous agent left: read them back against the desired ruleset
    /// and believe what they hold, so the first sync commits only the difference instead of
    /// deleting and recreating them (no moment without rules, a small commit). Anything that
    /// cannot be taken over (a set definition that changed) leaves the belief empty: full sync.
    /// Also after a failed partial commit (atomic, so the kernel is as it was): the next commit
    /// is again only the difference. Returns whether the belief now comes from the kernel.
    async fn adopt(&mut self, desired: &Ruleset) -> bool {
        self.adopt = false;
        let first = self.our_generation.is_none();
        let kernel = match self.read_kernel(desired, None).await {
            Ok(k) => k,
            Err(e) => {
                tracing::info!(error = %e, "cannot read the existing ruleset back; rebuilding it");
                return false;
            }
        };
        if kernel.values().all(|t| t.is_none()) {
            return false;
        }
        let d = drift::kernel_view(desired, &kernel, None, None);
        if d.needs_full {
            tracing::info!("the existing tables differ in their set definitions; rebuilding them");
            return false;
        }
        tracing::info!(
            missing_elements = d.missing_elements,
            stale_elements = d.extra_elements,
            differences = d.findings.len(),
            "adopting the tables {}; committing only the difference",
            if first {
                "left by the previous agent"
            } else {
                "as the kernel holds them after a failed commit"
            }
        );
        self.mark_leftover(&d.leftover_chains);
        self.applied = Some(d.view);
        true
    }

    /// Empty chains found in the kernel that nothing wants are deleted like the ones the loop
    /// flushes itself: after the grace period (a chain flushed by a previous agent just before
    /// it stopped may still be on a packet's path for a moment).
    fn mark_leftover(&mut self, chains: &BTreeSet<(Family, String)>) {
        let now = Instant::now();
        for c in chains {
            self.stale.entry(c.clone()).or_insert(now);
        }
    }

    /// One sync. `check_kernel` asks for the self-heal check (periodic syncs).
    pub async fn sync(
        &mut self,
        desired: Desired,
        check_kernel: bool,
        observer: &mut dyn Observer,
    ) -> Result<Report, SyncError> {
        let start = Instant::now();
        if check_kernel && self.applied.is_some() {
            self.periodic_check(observer).await;
        }
        let adopted = self.applied.is_none() && self.adopt && self.adopt(&desired.ruleset).await;
        let last = self.last_commit_wall;
        self.triggers.extend(
            desired
                .triggers
                .iter()
                .filter(|t| last.is_none_or(|c| **t >= c))
                .copied(),
        );
        self.changes.services += desired.changes.services;
        self.changes.slices += desired.changes.slices;
        let now = Instant::now();
        let due: BTreeSet<(Family, String)> = self
            .stale
            .iter()
            .filter(|(_, t)| now.duration_since(**t) >= self.cfg.chain_delete_grace)
            .map(|(k, _)| k.clone())
            .collect();
        let (kind, tx, p) = self.plan_next(&desired.ruleset, &due);
        let (ops, elements, skeleton_ops) = (tx.ops.len(), tx.element_count(), tx.skeleton_ops());
        let states = (desired.state.clone(), self.previous_state.clone());
        let (apply_time, transactions) = self.commit(tx, kind, adopted, states, observer).await?;
        self.failures = 0;
        self.last_commit_wall = Some(SystemTime::now());
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
        let (ruleset_elements, chains, rules) = size_of(&applied);
        // The copy shares its element sets with the loop's (persistent sets): cheap.
        let ruleset = applied.clone();
        self.applied = Some(applied);
        if let Some(prev) = &self.previous_state {
            self.affinity_due |= affinity::lost(prev, &desired.state);
        }
        let affinity_deleted = self.clean_affinity(&desired.state, observer).await;
        let report = Report {
            kind,
            duration: start.elapsed(),
            apply_time,
            ops,
            elements,
            skeleton_ops,
            transactions,
            previous: self.previous_state.replace(desired.state.clone()),
            state: desired.state,
            ruleset,
            ruleset_elements,
            ruleset_chains: chains,
            ruleset_rules: rules,
            node: desired.node,
            triggers: std::mem::take(&mut self.triggers),
            changes: std::mem::take(&mut self.changes),
            affinity_deleted,
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
            transactions,
            compute_ms = self.compute_time.as_secs_f64() * 1000.0,
            duration_ms = report.duration.as_secs_f64() * 1000.0,
            apply_ms = apply_time.as_secs_f64() * 1000.0,
            "synced"
        );
        observer.applied(&report);
        if let Some(scope) = self.repairing.take() {
            // Show the repair worked (or find the next round of it).
            if !self
                .verify(scope, self.previous_state.clone(), observer)
                .await
            {
                tracing::info!("ruleset drift repaired");
                lock(&self.status).drift = None;
            }
        }
        Ok(report)
    }

    /// The transaction that takes the kernel from what was applied to `desired`: the
    /// difference (with the plan, needed to update the belief afterwards), or everything.
    fn plan_next(
        &self,
        desired: &Ruleset,
        due: &BTreeSet<(Family, String)>,
    ) -> (SyncKind, Transaction, Option<plan::Plan>) {
        match &self.applied {
            Some(applied) => {
                let p = plan::partial(applied, desired, due);
                if p.needs_full {
                    (SyncKind::Full, plan::full(desired), None)
                } else {
                    (SyncKind::Partial, p.tx.clone(), Some(p))
                }
            }
            None => (SyncKind::Full, plan::full(desired), None),
        }
    }

    /// Commit `tx` (nothing to send: only learn the generation once). A big one is cut into
    /// several transactions that each show whole Services (`plan::split`), where that is safe:
    /// a routine change that only adds sets and chains and changes elements, or a full build
    /// into a kernel that holds none of our tables (a cold start; a rebuild over existing
    /// tables stays one transaction, which replaces them without a moment of fewer Services).
    /// On failure the belief is dropped, the failure counted and reported, and the next sync
    /// reads the kernel back (after a routine partial commit, or when part of a split commit
    /// went in) or rebuilds everything. Returns the commit's time and its transaction count.
    async fn commit(
        &mut self,
        tx: Transaction,
        kind: SyncKind,
        adopted: bool,
        states: (Arc<ProxyState>, Option<Arc<ProxyState>>),
        observer: &mut dyn Observer,
    ) -> Result<(Duration, usize), SyncError> {
        if tx.is_empty() {
            if self.our_generation.is_none() {
                if let Ok(Ok(g)) = self.call(|a| a.generation()).await {
                    self.our_generation = Some(g);
                }
            }
            return Ok((Duration::ZERO, 0));
        }
        let ops = tx.ops.len();
        let started = Instant::now();
        let quiet = self
            .quiet
            .clone()
            .filter(|(_, min)| tx.element_count() >= *min)
            .map(|(q, _)| q);
        let max = self.cfg.split_elements;
        let split =
            max > 0 && tx.element_count() > max && plan::splittable(&tx, kind == SyncKind::Full);
        // Transactions that went in (shared with the blocking call: a failure after some of
        // them leaves the kernel between the old and the new ruleset).
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = sent.clone();
        let result = self
            .call(move |a| -> Result<(u32, bool), ApplyError> {
                // Only needed to tell another writer's commits from ours while nobody listens:
                // a routine commit does not pay for the extra round trip.
                let before = match &quiet {
                    Some(_) => Some(a.generation()?),
                    None => None,
                };
                let paused = match &quiet {
                    None => false,
                    Some(q) => match q.pause() {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::warn!(error = %e, "could not pause nftables notifications; committing with them");
                            false
                        }
                    },
                };
                let applied = apply_split(a, &tx, split, max, &states, &counted);
                if paused {
                    if let Some(Err(e)) = quiet.as_ref().map(|q| q.resume()) {
                        tracing::warn!(error = %e, "could not resume nftables notifications; outside changes are found by the periodic check only");
                    }
                }
                applied?;
                let after = a.generation()?;
                // Each of our transactions moved the generation by exactly one; more means
                // someone else committed while nobody listened.
                let ours = counted.load(std::sync::atomic::Ordering::Relaxed) as u32;
                let unseen = paused && before.is_some_and(|b| after != b.wrapping_add(ours));
                Ok((after, unseen))
            })
            .await
            .and_then(|r| r);
        let transactions = sent.load(std::sync::atomic::Ordering::Relaxed);
        match result {
            Ok((generation, unseen)) => {
                self.our_generation = Some(generation);
                self.unseen |= unseen;
                Ok((started.elapsed(), transactions))
            }
            Err(e) => {
                self.applied = None;
                self.failures += 1;
                // A failed transaction changed nothing (atomic): after a routine partial one,
                // the next sync reads the kernel back and again sends only the difference; if
                // that fails too (or a full one failed), it rebuilds everything. When part of
                // a split commit went in, the kernel holds whole Services of both versions:
                // read back too.
                self.adopt = (kind == SyncKind::Partial && !adopted) || transactions > 0;
                let next = if self.adopt {
                    "the next sync reads the kernel back"
                } else {
                    "the next sync rebuilds everything"
                };
                tracing::error!(kind = kind.as_str(), ops, transactions, error = %e, retryable = e.is_retryable(), "sync failed; {next}");
                let err = SyncError {
                    kind,
                    source: e,
                    pending: self.changes,
                };
                observer.failed(&err);
                Err(err)
            }
        }
    }

    /// When the next sync must run even without changes: retry after failure, chain deletion.
    fn next_deadline(&self, last_sync: Instant) -> Instant {
        // Far away unless a retry or a chain deletion is pending: the periodic check runs on
        // its own timer and only rebuilds when the kernel lost our tables.
        let mut next = last_sync + Duration::from_secs(365 * 86400);
        let backoff = |failures: u32| {
            Duration::from_millis(200)
                .saturating_mul(1 << failures.min(8))
                .min(self.cfg.sync_period)
        };
        if self.applied.is_none() && self.failures > 0 {
            next = next.min(last_sync + backoff(self.failures));
        }
        if self.affinity_due && self.cleanup_failures > 0 {
            next = next.min(last_sync + backoff(self.cleanup_failures));
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
        let mut counters = self.cfg.counter_period.map(|p| {
            let mut i = tokio::time::interval(p);
            // After a long sync, one read, not a burst of the missed ones.
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            i
        });
        let mut need_sync = true; // the first sync runs at once
        let mut outside = self.outside.take();
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
                // Outside changes announced meanwhile are found before planning: a plan on a
                // stale belief would fail (deleting what is gone) instead of repairing it.
                if let Some(scope) = drain_notices(&mut outside, None) {
                    self.verify(scope, self.previous_state.clone(), observer)
                        .await;
                }
                let compute_start = Instant::now();
                if let Some(d) = desired() {
                    last_sync = Instant::now();
                    self.compute_time = last_sync.duration_since(compute_start);
                    if self.sync(d, false, observer).await.is_ok() {
                        lock(&self.status).pending_since = None;
                    }
                }
                if std::mem::take(&mut self.unseen) {
                    // Someone else committed while our commit ran without notifications.
                    tracing::info!("another commit ran while notifications were paused for ours; verifying the whole ruleset");
                    if self
                        .verify(None, self.previous_state.clone(), observer)
                        .await
                    {
                        continue;
                    }
                }
                if self.repairing.is_some() && self.applied.is_some() {
                    // The check after a repair found more drift (a change that came in while
                    // the repair was planned): repair that too now, not at the next event.
                    continue;
                }
            }
            let retry_or_gc = self.next_deadline(last_sync);
            let check = last_check + self.cfg.sync_period;
            tokio::select! {
                msg = changes.recv() => {
                    let Some(()) = msg else { return };
                    observer.queued();
                    let mut st = lock(&self.status);
                    if st.pending_since.is_none() {
                        st.pending_since = Some(Instant::now());
                    }
                    need_sync = true;
                }
                _ = tokio::time::sleep_until(retry_or_gc), if retry_or_gc < check => { need_sync = true; }
                _ = tokio::time::sleep_until(check) => {
                    last_check = Instant::now();
                    need_sync = self.periodic_check(observer).await;
                    if !need_sync {
                        observer.checked();
                    }
                }
                _ = next_tick(&mut counters) => {
                    self.read_counters(observer).await;
                }
                notice = next_notice(&mut outside) => {
                    let Some(notice) = notice else {
                        tracing::warn!("the nftables change monitor stopped; drift is found by the periodic check only");
                        outside = None;
                        continue;
                    };
                    // Everything announced meanwhile is verified in one read.
                    let scope = drain_notices(&mut outside, Some(notice)).flatten();
                    if scope.is_none() {
                        tracing::info!("nftables notifications were lost; verifying the whole ruleset");
                    }
                    need_sync = self.verify(scope, self.previous_state.clone(), observer).await;
                }
            }
            if self.repairing.is_some() {
                need_sync = true;
            }
        }
    }
}

/// Apply `tx` as one transaction, or (`split`) as several of about `max` element changes that
/// each show whole Services, counting those that went in. A full build is split only into a
/// kernel without our tables: checked here, at the edge, right before.
fn apply_split<A: Applier>(
    a: &mut A,
    tx: &Transaction,
    split: bool,
    max: usize,
    states: &(Arc<ProxyState>, Option<Arc<ProxyState>>),
    sent: &std::sync::atomic::AtomicUsize,
) -> Result<(), ApplyError> {
    let creates = tx.ops.iter().any(|op| matches!(op, Op::DeleteTable(_)));
    let fresh = |a: &mut A| -> Result<bool, ApplyError> {
        for f in [Family::Ip, Family::Ip6] {
            if a.table_exists(f)? {
                return Ok(false);
            }
        }
        Ok(true)
    };
    if !split || (creates && !fresh(a)?) {
        a.apply(tx)?;
        sent.store(1, std::sync::atomic::Ordering::Relaxed);
        return Ok(());
    }
    // The pieces are cut (grouped and copied) on a second thread while this one commits the
    // ones before: cutting costs about as much CPU as the kernel spends on them (~1 us per
    // element at 50,000 Services) and would otherwise add to the commit's length. Two pieces
    // wait at most.
    let (give, take) = std::sync::mpsc::sync_channel::<Transaction>(2);
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let owners = Owners::new(std::iter::once(states.0.as_ref()).chain(states.1.as_deref()));
            let cut = plan::split(tx, &|_, set, e| owners.group(set, e), max, &mut |t| {
                give.send(t)
            });
            // Err only when the committing side stopped: it reports why.
            drop(cut);
        });
        // Leaving early (a failed piece) drops the receiver, which stops the cutting.
        for t in take {
            a.apply(&t)?;
            sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    })
}

/// Elements, chains and rules of a ruleset (for the report).
fn size_of(rs: &Ruleset) -> (usize, usize, usize) {
    let (mut elements, mut chains, mut rules) = (0, 0, 0);
    for t in rs.tables.values() {
        elements += t.elements.values().map(|e| e.len()).sum::<usize>();
        chains += t.chains.len();
        rules += t.chains.values().map(|c| c.rules.len()).sum::<usize>();
    }
    (elements, chains, rules)
}

/// Fold `first` and every notice already queued into one verification scope: None when there
/// is nothing, Some(None) when everything must be read (a loss), else the sets touched.
fn drain_notices(
    rx: &mut Option<mpsc::Receiver<Notice>>,
    first: Option<Notice>,
) -> Option<Option<Touched>> {
    let mut scope: Option<Option<Touched>> = None;
    let queued = std::iter::from_fn(|| rx.as_mut().and_then(|r| r.try_recv().ok()));
    for n in first.into_iter().chain(queued) {
        scope = Some(match (scope, n) {
            (None, Notice::Foreign(t)) => Some(t),
            (Some(Some(mut s)), Notice::Foreign(t)) => {
                monitor::merge(&mut s, t);
                Some(s)
            }
            _ => None,
        });
    }
    scope
}

/// The next tick of an optional interval, or never without one.
async fn next_tick(i: &mut Option<tokio::time::Interval>) {
    match i {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The next notice of the monitor, or never without one.
async fn next_notice(rx: &mut Option<mpsc::Receiver<Notice>>) -> Option<Notice> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
