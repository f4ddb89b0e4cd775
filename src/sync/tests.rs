use super::*;
use crate::apply::fake::FakeApplier;
use crate::k8s::objects::Objects;
use crate::nft::tx::Op;

fn objects() -> Objects {
    crate::testutil::cluster_objects()
}

fn desired_of(objs: &Objects) -> Desired {
    let node = objs.node_info(Some("node-a"));
    let cfg = crate::testutil::proxy_config("node-a");
    let (ruleset, state) = crate::pipeline::from_objects(objs, &cfg, &node)
        .map(|o| (o.ruleset, o.state))
        .expect("compile");
    Desired::new(ruleset, Arc::new(state))
}

#[derive(Default)]
struct Recorder {
    applied: Vec<(SyncKind, usize, usize)>,
    transactions: Vec<usize>,
    failed: Vec<String>,
    drifts: Vec<Vec<String>>,
}

impl Observer for Recorder {
    fn applied(&mut self, r: &Report) {
        self.applied.push((r.kind, r.skeleton_ops, r.elements));
        self.transactions.push(r.transactions);
    }
    fn failed(&mut self, e: &SyncError) {
        self.failed.push(e.to_string());
    }
}

/// The loop's observer in these tests: records into a shared [`Recorder`].
struct Fwd(Arc<Mutex<Recorder>>);

impl Observer for Fwd {
    fn applied(&mut self, r: &Report) {
        lock(&self.0).applied(r)
    }
    fn failed(&mut self, e: &SyncError) {
        lock(&self.0).failed(e)
    }
    fn drifted(&mut self, f: &[drift::Finding]) {
        lock(&self.0)
            .drifts
            .push(f.iter().map(|f| f.to_string()).collect());
    }
}

fn cfg() -> SyncConfig {
    SyncConfig {
        min_sync_period: Duration::from_millis(100),
        sync_period: Duration::from_secs(30),
        chain_delete_grace: Duration::from_secs(1),
        blocking_apply: false,
        counter_period: None,
        split_elements: 0,
    }
}

type Shared = Arc<Mutex<Objects>>;

/// Handles on a running loop: objects, change nudges, the fake, what was observed, status, and
/// how many times the desired state was computed.
type Running = (
    Shared,
    mpsc::Sender<()>,
    Arc<Mutex<FakeApplier>>,
    Arc<Mutex<Recorder>>,
    SharedStatus,
    Arc<Mutex<usize>>,
);

/// Start the loop on the current (paused-time) runtime.
fn start(fake: FakeApplier) -> Running {
    start_with(fake, None)
}

/// The same, with a stand-in for the kernel's change notifications.
fn start_with(fake: FakeApplier, notices: Option<mpsc::Receiver<Notice>>) -> Running {
    start_cfg(fake, notices, cfg())
}

/// The same, with a sync configuration.
fn start_cfg(
    fake: FakeApplier,
    notices: Option<mpsc::Receiver<Notice>>,
    cfg: SyncConfig,
) -> Running {
    let objs: Shared = Arc::new(Mutex::new(objects()));
    let status: SharedStatus = Arc::default();
    let mut syncer = Syncer::new(cfg, fake, status.clone());
    if let Some(n) = notices {
        syncer = syncer.with_monitor(n);
    }
    let applier = syncer.applier();
    let (tx, rx) = mpsc::channel(1024);
    let rec = Arc::new(Mutex::new(Recorder::default()));
    let computed = Arc::new(Mutex::new(0usize));
    let (o, r, c) = (objs.clone(), rec.clone(), computed.clone());
    tokio::spawn(async move {
        let mut fwd = Fwd(r);
        syncer
            .run(
                rx,
                move || {
                    *lock(&c) += 1;
                    Some(desired_of(&lock(&o)))
                },
                &mut fwd,
            )
            .await
    });
    (objs, tx, applier, rec, status, computed)
}

async fn settle(d: Duration) {
    tokio::time::sleep(d).await;
}

fn drop_endpoint(objs: &Shared) {
    let mut o = lock(objs);
    let s = o
        .slices
        .iter_mut()
        .find(|s| s.metadata.name.as_deref() == Some("web-ipv4"))
        .expect("slice");
    s.endpoints.pop();
}

#[tokio::test(start_paused = true)]
async fn first_sync_is_full_then_changes_are_element_only() {
    let (objs, tx, applier, rec, _, _) = start(FakeApplier::new());
    settle(Duration::from_millis(10)).await;
    assert_eq!(lock(&rec).applied.len(), 1);
    assert_eq!(lock(&rec).applied[0].0, SyncKind::Full);
    drop_endpoint(&objs);
    tx.send(()).await.unwrap();
    settle(Duration::from_millis(200)).await;
    let r = lock(&rec);
    assert_eq!(r.applied.len(), 2, "{:?}", r.applied);
    assert_eq!(r.applied[1].0, SyncKind::Partial);
    assert_eq!(r.applied[1].1, 0, "no skeleton ops for an endpoint change");
    assert!(r.applied[1].2 > 0);
    assert_eq!(lock(&applier).committed.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn bursts_are_coalesced() {
    let (objs, tx, applier, rec, _, _) = start(FakeApplier::new());
    settle(Duration::from_millis(10)).await;
    // 1000 changes within 50 ms: 20 per millisecond (tokio timers tick in milliseconds).
    for _ in 0..50 {
        for _ in 0..20 {
            drop_endpoint(&objs);
            tx.send(()).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    settle(Duration::from_millis(500)).await;
    let n = lock(&rec).applied.len();
    assert!(n <= 5, "1000 changes in 50ms became {n} syncs");
    let dump = lock(&applier).dump();
    assert!(
        !dump.contains("10.0.2.1 . 8080") && !dump.contains("10.0.1.1 . 8080"),
        "the final state is applied"
    );
}

#[tokio::test(start_paused = true)]
async fn failures_retry_with_backoff_and_rebuild() {
    let mut fake = FakeApplier::new();
    fake.fail.push_back(ApplyError::Injected("1".into()));
    fake.fail.push_back(ApplyError::Injected("2".into()));
    let (_, _tx, applier, rec, status, _) = start(fake);
    settle(Duration::from_millis(10)).await;
    assert_eq!(lock(&rec).failed.len(), 1);
    assert!(lock(&status).last_success.is_none());
    settle(Duration::from_secs(3)).await;
    let r = lock(&rec);
    assert_eq!(r.failed.len(), 2, "retried: {:?}", r.failed);
    assert_eq!(r.applied.len(), 1, "then succeeded");
    assert_eq!(r.applied[0].0, SyncKind::Full);
    assert!(lock(&status).last_success.is_some());
    assert_eq!(lock(&applier).calls, 3);
}

#[tokio::test(start_paused = true)]
async fn a_failed_partial_is_followed_by_a_read_back_then_a_full_sync() {
    let (objs, tx, applier, rec, _, _) = start(FakeApplier::new());
    settle(Duration::from_millis(10)).await;
    lock(&applier).fail.push_back(ApplyError::Invalid {
        what: "x".into(),
        detail: "injected".into(),
    });
    drop_endpoint(&objs);
    tx.send(()).await.unwrap();
    settle(Duration::from_secs(2)).await;
    {
        let r = lock(&rec);
        assert_eq!(r.failed.len(), 1);
        // The kernel is read back (the failed commit changed nothing): still only the delta.
        assert_eq!(
            r.applied.last().map(|a| (a.0, a.1)),
            Some((SyncKind::Partial, 0)),
            "{:?}",
            r.applied
        );
    }
    // A failure of that read-back-based commit too: then everything is rebuilt.
    for _ in 0..2 {
        lock(&applier).fail.push_back(ApplyError::Invalid {
            what: "x".into(),
            detail: "injected".into(),
        });
    }
    drop_endpoint(&objs);
    tx.send(()).await.unwrap();
    settle(Duration::from_secs(5)).await;
    let r = lock(&rec);
    assert_eq!(r.failed.len(), 3);
    assert_eq!(
        r.applied.last().map(|a| a.0),
        Some(SyncKind::Full),
        "{:?}",
        r.applied
    );
}

#[tokio::test(start_paused = true)]
async fn idle_agent_does_no_work_and_self_heals() {
    let (_, _tx, applier, rec, _, computed) = start(FakeApplier::new());
    settle(Duration::from_millis(10)).await;
    assert_eq!(*lock(&computed), 1);
    // Other components commit in this namespace; nothing of ours changed.
    lock(&applier).external_commit();
    settle(Duration::from_secs(95)).await;
    assert_eq!(*lock(&computed), 1, "no recompute while nothing changes");
    assert_eq!(lock(&rec).applied.len(), 1);
    // Someone deletes our table: the next periodic check recreates it (only it).
    lock(&applier).external_delete_table(Family::Ip);
    settle(Duration::from_secs(31)).await;
    assert_eq!(lock(&rec).applied.len(), 2);
    assert_eq!(lock(&rec).drifts.len(), 1);
    assert!(lock(&applier).state.tables.contains_key(&Family::Ip));
    assert!(
        lock(&applier).committed[1]
            .ops
            .iter()
            .all(|op| !matches!(op, Op::DeleteTable(_))),
        "the ip6 table is left alone"
    );
    // Someone flushes one of our chains: refilled at the next check, nothing else touched.
    lock(&applier).external_flush_chain(Family::Ip, "services");
    settle(Duration::from_secs(31)).await;
    assert_eq!(lock(&rec).applied.len(), 3);
    assert!(!lock(&applier).state.tables[&Family::Ip].chains["services"]
        .rules
        .is_empty());
    let last = lock(&applier).committed.last().cloned().expect("repair");
    assert!(last
        .ops
        .iter()
        .all(|op| matches!(op, Op::AddRule { chain, .. } | Op::AddChain { name: chain, .. } if chain == "services")));
    // Someone deletes one element: the repair adds it back, and only it.
    let (set, one) = busiest(&lock(&applier));
    lock(&applier).external_delete_element(Family::Ip, &set, &one);
    settle(Duration::from_secs(31)).await;
    assert_eq!(lock(&rec).applied.len(), 4);
    let last = lock(&applier).committed.last().cloned().expect("repair");
    assert_eq!(last.element_count(), 1, "{last:?}");
    assert_eq!(lock(&rec).drifts.len(), 3);
}

/// The ip set with the most elements, and one of them.
fn busiest(fake: &FakeApplier) -> (String, crate::nft::ir::Element) {
    let t = &fake.state.tables[&Family::Ip];
    t.elements
        .iter()
        .filter(|(n, _)| !t.sets[*n].runtime_owned())
        .max_by_key(|(_, e)| e.len())
        .and_then(|(n, e)| e.iter().next().map(|x| (n.clone(), x.clone())))
        .expect("an element")
}

#[tokio::test(start_paused = true)]
async fn announced_outside_changes_are_repaired_at_once() {
    let (ntx, nrx) = mpsc::channel(16);
    let (_, _tx, applier, rec, status, _) = start_with(FakeApplier::new(), Some(nrx));
    settle(Duration::from_millis(10)).await;
    let (set, one) = busiest(&lock(&applier));
    lock(&applier).external_flush_set(Family::Ip, &set);
    let touched: Touched = [(Family::Ip, Some(BTreeSet::from([set.clone()])))].into();
    ntx.send(Notice::Foreign(touched)).await.unwrap();
    settle(Duration::from_millis(10)).await;
    assert_eq!(
        lock(&rec).applied.len(),
        2,
        "repaired without waiting for the periodic check"
    );
    assert!(lock(&applier).state.tables[&Family::Ip].elements[&set].contains(&one));
    assert_eq!(lock(&rec).drifts.len(), 1);
    assert!(
        lock(&rec).drifts[0][0].contains(&set),
        "{:?}",
        lock(&rec).drifts
    );
    assert!(lock(&status).drift.is_none(), "shown repaired");
    // A lost notification: everything is verified.
    lock(&applier).external_delete_element(Family::Ip, &set, &one);
    ntx.send(Notice::Lost).await.unwrap();
    settle(Duration::from_millis(10)).await;
    assert_eq!(lock(&rec).applied.len(), 3);
    assert!(lock(&applier).state.tables[&Family::Ip].elements[&set].contains(&one));
    // A notice for a change that is not drift (someone re-added what we had): no sync.
    ntx.send(Notice::Lost).await.unwrap();
    settle(Duration::from_millis(10)).await;
    assert_eq!(lock(&rec).applied.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn drift_found_by_the_check_after_a_repair_is_repaired_too() {
    let (ntx, nrx) = mpsc::channel(16);
    let (_, _tx, applier, rec, status, _) = start_with(FakeApplier::new(), Some(nrx));
    settle(Duration::from_millis(10)).await;
    let (set, one) = busiest(&lock(&applier));
    // Two outside changes, announced one after the other: the second arrives while the repair
    // of the first is being planned, and only the check after that repair sees it.
    let other = {
        let a = lock(&applier);
        let t = &a.state.tables[&Family::Ip];
        t.elements
            .iter()
            .find(|(n, e)| **n != set && !e.is_empty() && !t.sets[*n].runtime_owned())
            .map(|(n, e)| (n.clone(), e.iter().next().cloned().expect("element")))
            .expect("a second set")
    };
    lock(&applier).external_delete_element(Family::Ip, &set, &one);
    lock(&applier).external_delete_element(Family::Ip, &other.0, &other.1);
    let notice =
        |s: &str| Notice::Foreign([(Family::Ip, Some(BTreeSet::from([s.to_string()])))].into());
    ntx.send(notice(&set)).await.unwrap();
    // The loop has read the first notice and waits out its gathering breath (2 ms).
    settle(Duration::from_millis(1)).await;
    ntx.send(notice(&other.0)).await.unwrap();
    settle(Duration::from_millis(50)).await;
    let a = lock(&applier);
    assert!(a.state.tables[&Family::Ip].elements[&set].contains(&one));
    assert!(
        a.state.tables[&Family::Ip].elements[&other.0].contains(&other.1),
        "the second change is repaired without waiting for another event: {:?}",
        lock(&rec).drifts
    );
    assert!(lock(&status).drift.is_none());
}

#[tokio::test(start_paused = true)]
async fn unrepairable_drift_is_reported_unhealthy() {
    let (ntx, nrx) = mpsc::channel(16);
    let (_, _tx, applier, rec, status, _) = start_with(FakeApplier::new(), Some(nrx));
    settle(Duration::from_millis(10)).await;
    let (set, _) = busiest(&lock(&applier));
    lock(&applier).external_flush_set(Family::Ip, &set);
    // Every repair commit fails.
    for _ in 0..50 {
        lock(&applier)
            .fail
            .push_back(ApplyError::Injected("test".into()));
    }
    ntx.send(Notice::Lost).await.unwrap();
    settle(Duration::from_secs(5)).await;
    assert!(
        lock(&status).drift.is_some(),
        "drift stays reported while not repaired"
    );
    assert!(!lock(&rec).failed.is_empty());
    lock(&applier).fail.clear();
    settle(Duration::from_secs(40)).await;
    assert!(
        lock(&status).drift.is_none(),
        "repaired once commits work again"
    );
}

#[tokio::test(start_paused = true)]
async fn a_restarted_agent_adopts_the_tables_it_finds() {
    let objs = objects();
    let desired = desired_of(&objs);
    // What a previous agent left, with one endpoint since gone from the API.
    let mut fake = FakeApplier::new();
    fake.apply(&crate::nft::plan::full(&desired.ruleset))
        .unwrap();
    let (set, one) = busiest(&fake);
    fake.external_delete_element(Family::Ip, &set, &one);
    let before = fake.committed.len();
    let (_, _tx, applier, rec, _, _) = start(fake);
    settle(Duration::from_millis(10)).await;
    let r = lock(&rec);
    assert_eq!(r.applied.len(), 1);
    assert_eq!(r.applied[0].0, SyncKind::Partial, "adopted, not recreated");
    let a = lock(&applier);
    assert_eq!(a.committed.len(), before + 1);
    assert_eq!(
        a.committed[before].element_count(),
        1,
        "only the difference"
    );
    assert_eq!(
        crate::nft::render::normalise(&a.dump()),
        crate::nft::render::normalise(&crate::nft::render::ruleset(&desired.ruleset))
    );
}

/// An empty chain nothing wants (a per-count chain a previous agent flushed and stopped before
/// deleting it, or one added from outside) is invisible to a dump of rules; the adoption lists
/// chains too and deletes it after the grace period, so the kernel ends equal to the ruleset.
#[tokio::test(start_paused = true)]
async fn a_restarted_agent_deletes_an_empty_chain_the_previous_one_left() {
    let desired = desired_of(&objects());
    let mut fake = FakeApplier::new();
    fake.apply(&crate::nft::plan::full(&desired.ruleset))
        .unwrap();
    fake.apply(&add_empty_chain("pick-ip-cluster-n12")).unwrap();
    let (_, _tx, applier, rec, _, _) = start(fake);
    settle(Duration::from_millis(10)).await;
    assert_eq!(lock(&rec).applied[0].0, SyncKind::Partial, "adopted");
    assert!(
        has_chain(&lock(&applier), "pick-ip-cluster-n12"),
        "kept during the grace period"
    );
    settle(Duration::from_secs(2)).await;
    let a = lock(&applier);
    assert!(!has_chain(&a, "pick-ip-cluster-n12"), "deleted when due");
    assert_eq!(
        crate::nft::render::normalise(&a.dump()),
        crate::nft::render::normalise(&crate::nft::render::ruleset(&desired.ruleset))
    );
}

/// The same chain added from outside while the agent runs: a full check finds it (drift) and
/// the loop deletes it after the grace period.
#[tokio::test(start_paused = true)]
async fn an_empty_chain_added_from_outside_is_found_and_deleted() {
    let (ntx, nrx) = mpsc::channel(16);
    let (_, _tx, applier, rec, status, _) = start_with(FakeApplier::new(), Some(nrx));
    settle(Duration::from_millis(10)).await;
    lock(&applier).apply(&add_empty_chain("intruder")).unwrap();
    ntx.send(Notice::Lost).await.unwrap();
    settle(Duration::from_millis(10)).await;
    assert_eq!(lock(&rec).drifts.len(), 1);
    assert!(
        lock(&rec).drifts[0][0].contains("chain intruder"),
        "{:?}",
        lock(&rec).drifts
    );
    settle(Duration::from_secs(2)).await;
    assert!(!has_chain(&lock(&applier), "intruder"), "deleted when due");
    assert!(lock(&status).drift.is_none(), "shown repaired");
    assert!(lock(&rec).failed.is_empty(), "{:?}", lock(&rec).failed);
}

fn add_empty_chain(name: &str) -> crate::nft::tx::Transaction {
    crate::nft::tx::Transaction {
        ops: vec![Op::AddChain {
            family: Family::Ip,
            name: name.into(),
            base: None,
        }],
    }
}

fn has_chain(fake: &FakeApplier, name: &str) -> bool {
    fake.state.tables[&Family::Ip].chains.contains_key(name)
}

#[tokio::test(start_paused = true)]
async fn an_idle_agent_syncs_at_once_even_right_after_a_sync() {
    let (objs, tx, _, rec, _, _) = start(FakeApplier::new());
    settle(Duration::from_millis(500)).await;
    // Two changes 20 ms apart (less than min_sync_period = 100 ms): both applied within a few ms.
    for i in 0..2 {
        drop_endpoint(&objs);
        let t0 = Instant::now();
        tx.send(()).await.unwrap();
        let before = lock(&rec).applied.len();
        while lock(&rec).applied.len() == before {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let waited = t0.elapsed();
        assert!(
            waited <= Duration::from_millis(5),
            "change {i} waited {waited:?}"
        );
        settle(Duration::from_millis(20)).await;
    }
}

/// The affinity cleanup runs in the loop, right after the commit that removed an endpoint, on
/// the loop's own applier; a failed cleanup is reported and retried without a new change. On a
/// dual-stack node and on an IPv4-only one (whose ruleset has no ip6 table to clean).
#[tokio::test(start_paused = true)]
async fn affinity_entries_of_gone_endpoints_are_cleaned_and_retried() {
    affinity_cleanup(false).await;
    affinity_cleanup(true).await;
}

async fn affinity_cleanup(ipv4_only: bool) {
    use crate::net::Family;
    use crate::nft::ir::{Element, Value};
    let node_objs = objects();
    let real_desired = move |objs: &Objects| {
        let mut node = node_objs.node_info(Some("node-a"));
        if ipv4_only {
            node.internal_ips.retain(|ip| ip.is_ipv4());
        }
        let out =
            crate::pipeline::from_objects(objs, &crate::testutil::proxy_config("node-a"), &node)
                .expect("compile");
        Desired::new(out.ruleset, Arc::new(out.state))
    };
    let objs: Shared = Arc::new(Mutex::new(objects()));
    let mut fake = FakeApplier::new();
    // Call 1: the first full sync; call 2: the commit dropping an endpoint; call 3: the cleanup.
    fake.fail_call
        .insert(3, ApplyError::Injected("cleanup".into()));
    let syncer = Syncer::new(cfg(), fake, Arc::default());
    let applier = syncer.applier();
    let (tx, rx) = mpsc::channel(16);
    #[derive(Default)]
    struct Seen {
        deleted: usize,
        cleanup_failures: usize,
    }
    struct Obs(Arc<Mutex<Seen>>);
    impl Observer for Obs {
        fn applied(&mut self, r: &Report) {
            lock(&self.0).deleted += r.affinity_deleted;
        }
        fn failed(&mut self, _: &SyncError) {}
        fn cleanup_failed(&mut self, _: &str) {
            lock(&self.0).cleanup_failures += 1;
        }
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (o, s) = (objs.clone(), seen.clone());
    tokio::spawn(async move {
        syncer
            .run(rx, move || Some(real_desired(&lock(&o))), &mut Obs(s))
            .await
    });
    settle(Duration::from_millis(10)).await;
    // A client stuck to 10.0.2.11 through the affinity Service's ClusterIP.
    let entry = Element::new(
        vec![
            Value::Addr("10.9.9.9".parse().unwrap()),
            Value::Addr("172.30.0.19".parse().unwrap()),
            Value::Proto(crate::net::Proto::Tcp),
            Value::Port(80),
        ],
        Some(vec![
            Value::Addr("10.0.2.11".parse().unwrap()),
            Value::Port(8080),
        ]),
    );
    lock(&applier).packet_path_add_element(Family::Ip, "ip-affinity", entry.clone());
    {
        let mut o = lock(&objs);
        let s = o
            .slices
            .iter_mut()
            .find(|s| s.metadata.name.as_deref() == Some("affinity-ipv4"))
            .expect("slice");
        s.endpoints.retain(|e| e.addresses != ["10.0.2.11"]);
    }
    tx.send(()).await.unwrap();
    settle(Duration::from_millis(200)).await;
    let held = |a: &FakeApplier| {
        a.state.tables[&Family::Ip]
            .elements
            .get("ip-affinity")
            .is_some_and(|e| e.contains(&entry))
    };
    assert_eq!(
        lock(&seen).cleanup_failures,
        1,
        "the injected failure was reported"
    );
    // Retried with backoff, without any new change.
    settle(Duration::from_secs(2)).await;
    assert!(!held(&lock(&applier)), "the stale entry is gone");
    assert_eq!(lock(&seen).deleted, 1);
    assert_eq!(lock(&applier).calls, 4);
}

/// A kernel where another component deletes one of our elements right after the agent's first
/// (big) commit, while the agent's notifications are paused: nobody announces it.
struct Racing {
    inner: FakeApplier,
    race: bool,
}

impl Applier for Racing {
    fn apply(&mut self, tx: &crate::nft::tx::Transaction) -> Result<(), ApplyError> {
        self.inner.apply(tx)?;
        if std::mem::take(&mut self.race) {
            let (set, one) = busiest(&self.inner);
            self.inner.external_delete_element(Family::Ip, &set, &one);
        }
        Ok(())
    }
    fn generation(&mut self) -> Result<u32, ApplyError> {
        self.inner.generation()
    }
    fn table_exists(&mut self, family: Family) -> Result<bool, ApplyError> {
        self.inner.table_exists(family)
    }
    fn skeleton(&mut self, family: Family) -> Result<crate::apply::Skeleton, ApplyError> {
        self.inner.skeleton(family)
    }
    fn list_elements(
        &mut self,
        family: Family,
        set: &str,
    ) -> Result<Vec<crate::apply::Counted>, ApplyError> {
        self.inner.list_elements(family, set)
    }
    fn read_table(
        &mut self,
        family: Family,
        like: &crate::nft::ir::Table,
        sets: Option<&BTreeSet<String>>,
    ) -> Result<Option<crate::apply::KernelTable>, ApplyError> {
        self.inner.read_table(family, like, sets)
    }
}

#[derive(Default)]
struct Switch {
    calls: Mutex<Vec<&'static str>>,
}

impl QuietSwitch for Switch {
    fn pause(&self) -> std::io::Result<()> {
        lock(&self.calls).push("pause");
        Ok(())
    }
    fn resume(&self) -> std::io::Result<()> {
        lock(&self.calls).push("resume");
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_commit_made_without_notifications_is_verified_when_others_committed_meanwhile() {
    let objs = objects();
    let switch = Arc::new(Switch::default());
    let fake = Racing {
        inner: FakeApplier::new(),
        race: true,
    };
    let (_tx, rx) = mpsc::channel::<Notice>(1);
    // Every commit is "big" here (at least one element), so the first one runs paused.
    let syncer = Syncer::new(cfg(), fake, SharedStatus::default())
        .with_monitor(rx)
        .with_quiet_switch(switch.clone(), 1);
    let applier = syncer.applier();
    let (_changes_tx, changes) = mpsc::channel(8);
    let rec = Arc::new(Mutex::new(Recorder::default()));
    let r = rec.clone();
    tokio::spawn(async move {
        let mut fwd = Fwd(r);
        syncer
            .run(changes, move || Some(desired_of(&objs)), &mut fwd)
            .await
    });
    // Well before the periodic check (30 s): found by the generation moving by two.
    settle(Duration::from_secs(2)).await;
    assert_eq!(
        lock(&switch.calls).first().copied(),
        Some("pause"),
        "the first commit ran without notifications"
    );
    assert_eq!(lock(&switch.calls)[1], "resume");
    assert_eq!(lock(&rec).drifts.len(), 1, "the foreign deletion was found");
    let last = lock(&applier)
        .inner
        .committed
        .last()
        .cloned()
        .expect("repair");
    assert_eq!(last.element_count(), 1, "and repaired: {last:?}");
}

fn split_cfg(max: usize) -> SyncConfig {
    SyncConfig {
        split_elements: max,
        ..cfg()
    }
}

fn rendered(r: &crate::nft::ir::Ruleset) -> String {
    crate::nft::render::normalise(&crate::nft::render::ruleset(r))
}

#[tokio::test(start_paused = true)]
async fn a_cold_start_is_committed_in_pieces_of_whole_services() {
    let (objs, tx, applier, rec, _, _) = start_cfg(FakeApplier::new(), None, split_cfg(4));
    settle(Duration::from_millis(10)).await;
    let desired = desired_of(&lock(&objs));
    {
        let r = lock(&rec);
        assert_eq!(r.applied.len(), 1);
        assert_eq!(r.applied[0].0, SyncKind::Full);
        let a = lock(&applier);
        assert!(r.transactions[0] > 2, "{:?}", r.transactions);
        assert_eq!(a.committed.len(), r.transactions[0]);
        // The first builds the skeleton; elements follow in small pieces.
        assert!(a.committed[0].skeleton_ops() > 0);
        assert!(a.committed[1..].iter().all(|t| t.skeleton_ops() == 0));
        assert_eq!(
            a.committed.iter().map(|t| t.element_count()).sum::<usize>(),
            r.applied[0].2
        );
        assert_eq!(
            crate::nft::render::normalise(&a.dump()),
            rendered(&desired.ruleset)
        );
    }
    // A routine change after it is one small transaction, as always.
    drop_endpoint(&objs);
    tx.send(()).await.unwrap();
    settle(Duration::from_millis(200)).await;
    let r = lock(&rec);
    assert_eq!(r.applied.last().map(|a| a.0), Some(SyncKind::Partial));
    assert_eq!(r.transactions.last(), Some(&1));
    assert_eq!(
        crate::nft::render::normalise(&lock(&applier).dump()),
        rendered(&desired_of(&lock(&objs)).ruleset)
    );
}

#[tokio::test(start_paused = true)]
async fn a_rebuild_over_existing_tables_stays_one_transaction() {
    // Tables a previous agent left, with a set whose definition changed: they cannot be
    // adopted, and replacing them piece by piece would show fewer Services meanwhile.
    let objs = objects();
    let desired = desired_of(&objs);
    let mut old = desired.ruleset.clone();
    let t = old.tables.get_mut(&Family::Ip).expect("ip table");
    t.sets
        .get_mut(crate::nft::names::NO_ENDPOINT_DROP)
        .expect("set")
        .flags
        .counter = false;
    let mut fake = FakeApplier::new();
    fake.apply(&crate::nft::plan::full(&old)).unwrap();
    let before = fake.committed.len();
    let (_, _tx, applier, rec, _, _) = start_cfg(fake, None, split_cfg(4));
    settle(Duration::from_millis(10)).await;
    let r = lock(&rec);
    assert_eq!(r.applied.len(), 1);
    assert_eq!(r.applied[0].0, SyncKind::Full);
    assert_eq!(r.transactions, vec![1]);
    let a = lock(&applier);
    assert_eq!(a.committed.len(), before + 1);
    assert_eq!(
        crate::nft::render::normalise(&a.dump()),
        rendered(&desired.ruleset)
    );
}

#[tokio::test(start_paused = true)]
async fn a_split_commit_that_fails_midway_is_read_back_and_completed() {
    let mut fake = FakeApplier::new();
    fake.fail_call.insert(
        3,
        ApplyError::Invalid {
            what: "x".into(),
            detail: "injected".into(),
        },
    );
    let (objs, _tx, applier, rec, _, _) = start_cfg(fake, None, split_cfg(4));
    settle(Duration::from_millis(10)).await;
    {
        let r = lock(&rec);
        assert_eq!(r.failed.len(), 1);
        assert!(r.applied.is_empty());
        assert_eq!(lock(&applier).committed.len(), 2, "two pieces went in");
    }
    settle(Duration::from_secs(2)).await;
    let r = lock(&rec);
    // Read back: the rest is the difference, not a rebuild of what went in.
    assert_eq!(r.applied.len(), 1, "{:?}", r.failed);
    assert_eq!(r.applied[0].0, SyncKind::Partial);
    assert_eq!(r.applied[0].1, 0, "no skeleton ops: the skeleton went in");
    let a = lock(&applier);
    assert_eq!(
        crate::nft::render::normalise(&a.dump()),
        rendered(&desired_of(&lock(&objs)).ruleset)
    );
}
