//! nf_tables change notifications (the `NFNLGRP_NFTABLES` multicast group, what `nft monitor`
//! reads): tells the sync loop, within milliseconds, that someone else changed our tables.
//!
//! Every commit in the namespace is announced as its objects' NEW/DEL messages followed by one
//! NEWGEN message, each carrying the netlink port id of the committing socket in its header.
//! Messages are gathered per commit and dropped when NEWGEN carries the port id of the agent's
//! own socket (the echo of its own commits; the process id in NEWGEN is no use for that inside a
//! container, where the kernel reports the host's pid); otherwise the
//! commit is reported with the sets it touched in our tables (or "the whole table" when it
//! touched chains, rules, set definitions or the table itself).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use nftproxy_nl::{consts, message_attrs, NlError, RawSocket, Received};

use crate::net::Family;

/// `NFNLGRP_NFTABLES` (linux/netfilter/nfnetlink.h).
const NFNLGRP_NFTABLES: u32 = 7;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFT_MSG_NEWGEN: u16 = 15;
/// NFTA_TABLE_NAME, NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, NFTA_SET_TABLE, NFTA_SET_ELEM_LIST_TABLE
/// are all attribute 1.
const ATTR_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
/// NFTA_SET_NAME.
const NFTA_SET_NAME: u16 = 2;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
/// Large enough that a burst of foreign element changes fits; an overflow is reported as a
/// lost notification (and answered by reading everything back).
const RCVBUF: usize = 8 << 20;

/// What a foreign commit touched in our tables: per family, the sets whose elements may have
/// changed (empty: only rules or chains), or None when every set must be read (the table itself
/// was created or deleted).
pub type Touched = BTreeMap<Family, Option<BTreeSet<String>>>;

/// What one `recv` delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Another process committed changes to our tables.
    Foreign(Touched),
    /// The socket overflowed: notifications were lost; anything may have changed.
    Lost,
}

/// Gathers the messages of one commit until its NEWGEN.
#[derive(Debug, Default)]
pub struct Gatherer {
    table: String,
    own_portid: u32,
    pending: Touched,
}

fn family_of(nfgen_family: u8) -> Option<Family> {
    match u16::from(nfgen_family) {
        consts::NFPROTO_IPV4 => Some(Family::Ip),
        consts::NFPROTO_IPV6 => Some(Family::Ip6),
        _ => None,
    }
}

fn attr_str(a: &[u8]) -> &str {
    let end = a.iter().position(|&b| b == 0).unwrap_or(a.len());
    std::str::from_utf8(&a[..end]).unwrap_or("")
}

impl Gatherer {
    pub fn new(table: &str, own_portid: u32) -> Gatherer {
        Gatherer {
            table: table.to_string(),
            own_portid,
            pending: Touched::new(),
        }
    }

    /// Feed one datagram (several netlink messages); returns the foreign commits it completed.
    pub fn feed(&mut self, buf: &[u8]) -> Vec<Touched> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos + NLMSG_HDRLEN <= buf.len() {
            let len =
                u32::from_ne_bytes([buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]]) as usize;
            if len < NLMSG_HDRLEN || pos + len > buf.len() {
                break;
            }
            let msg = &buf[pos..pos + len];
            if let Some(done) = self.message(msg) {
                out.push(done);
            }
            pos += (len + 3) & !3;
        }
        out
    }

    fn message(&mut self, msg: &[u8]) -> Option<Touched> {
        let ty = u16::from_ne_bytes([msg[4], msg[5]]);
        if ty >> 8 != NFNL_SUBSYS_NFTABLES || msg.len() < NLMSG_HDRLEN + NFGENMSG_LEN {
            return None;
        }
        let kind = ty & 0xff;
        let attrs = message_attrs(msg);
        if kind == NFT_MSG_NEWGEN {
            let portid = u32::from_ne_bytes([msg[12], msg[13], msg[14], msg[15]]);
            let touched = std::mem::take(&mut self.pending);
            return (portid != self.own_portid && !touched.is_empty()).then_some(touched);
        }
        let family = family_of(msg[NLMSG_HDRLEN])?;
        let table = attrs
            .iter()
            .find(|(t, _, _)| *t == ATTR_TABLE)
            .map(|(_, _, a)| attr_str(a));
        if table != Some(self.table.as_str()) {
            return None;
        }
        let entry = self
            .pending
            .entry(family)
            .or_insert_with(|| Some(BTreeSet::new()));
        // The read-back always compares every rule and set definition (a few hundred objects);
        // only elements are read per set. So a rule or chain change names no set, a set
        // created or deleted names itself, an element change its set; a table created or
        // deleted (or anything else) means every set.
        let named = |attr: u16| {
            attrs
                .iter()
                .find(|(t, _, _)| *t == attr)
                .map(|(_, _, a)| attr_str(a).to_string())
        };
        let set = match kind {
            NFT_MSG_NEWCHAIN | NFT_MSG_DELCHAIN | NFT_MSG_NEWRULE | NFT_MSG_DELRULE => return None,
            NFT_MSG_NEWSETELEM | NFT_MSG_DELSETELEM => named(NFTA_SET_ELEM_LIST_SET),
            NFT_MSG_NEWSET | NFT_MSG_DELSET => named(NFTA_SET_NAME),
            _ => None,
        };
        match (entry.as_mut(), set) {
            (Some(sets), Some(name)) => {
                sets.insert(name);
            }
            (_, None) => *entry = None,
            (None, Some(_)) => {}
        }
        None
    }
}

/// Turns the monitor's subscription off and on around the agent's own big commits. While anyone
/// listens, the kernel builds one notification per element of a commit (kernel 6.x,
/// nf_tables_commit -> nf_tables_setelem_notify): 800,000 of them for a first sync at 100,000
/// Services, which overflow the monitor's queue and were answered by a read-back of the whole
/// ruleset (14.7 s there, 5.5 s at 50,000) although only the agent itself had committed. The
/// sync loop pauses the subscription for such a commit and compares the ruleset generation
/// before and after: anything but exactly its own one commit in between is verified in full.
pub trait QuietSwitch: Send + Sync {
    fn pause(&self) -> std::io::Result<()>;
    fn resume(&self) -> std::io::Result<()>;
}

/// The monitor's [`QuietSwitch`].
#[derive(Clone)]
pub struct Listening {
    sock: Arc<RawSocket>,
}

impl QuietSwitch for Listening {
    fn pause(&self) -> std::io::Result<()> {
        self.sock.set_membership(NFNLGRP_NFTABLES, false)
    }

    fn resume(&self) -> std::io::Result<()> {
        self.sock.set_membership(NFNLGRP_NFTABLES, true)
    }
}

/// A netlink socket subscribed to nf_tables notifications. `wait` blocks: run it on a thread
/// of its own.
pub struct Monitor {
    sock: Arc<RawSocket>,
    buf: Vec<u8>,
    gatherer: Gatherer,
}

impl Monitor {
    /// Subscribe (in the caller's network namespace) to changes of tables named `table` made by
    /// any socket but the one with port id `own_portid` (the agent's applier).
    pub fn open(table: &str, own_portid: u32) -> Result<Monitor, NlError> {
        let io = |op| move |source| NlError::Io { op, source };
        let sock = RawSocket::subscribe(1 << (NFNLGRP_NFTABLES - 1)).map_err(io("monitor bind"))?;
        // Best effort: without the larger queue a burst is reported as lost and read back.
        let _ = sock.set_recv_buffer(RCVBUF);
        Ok(Monitor {
            sock: Arc::new(sock),
            buf: vec![0u8; 1 << 20],
            gatherer: Gatherer::new(table, own_portid),
        })
    }

    /// A switch that stops and restarts the notifications (for the sync loop's big commits).
    pub fn switch(&self) -> Listening {
        Listening {
            sock: self.sock.clone(),
        }
    }

    /// Wait for the next foreign change (or a loss of notifications).
    pub fn wait(&mut self) -> Result<Notice, NlError> {
        loop {
            let n = match self.sock.recv(&mut self.buf) {
                Ok(Received::Datagram(n)) => n,
                // The kernel dropped notifications (a full queue), or one did not fit.
                Ok(Received::Overflow | Received::Truncated(_)) => {
                    self.gatherer.pending.clear();
                    return Ok(Notice::Lost);
                }
                Err(source) => {
                    return Err(NlError::Io {
                        op: "monitor recv",
                        source,
                    })
                }
            };
            let mut done = self.gatherer.feed(&self.buf[..n]);
            if let Some(mut all) = done.pop() {
                for t in done {
                    merge(&mut all, t);
                }
                return Ok(Notice::Foreign(all));
            }
        }
    }
}

/// Fold `b` into `a` (None, the whole table, wins).
pub fn merge(a: &mut Touched, b: Touched) {
    for (f, sets) in b {
        match (a.entry(f).or_insert_with(|| Some(BTreeSet::new())), sets) {
            (Some(x), Some(y)) => x.extend(y),
            (slot, None) => *slot = None,
            (None, Some(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(payload);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    fn msg(kind: u16, family: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        msg_from(0, kind, family, attrs)
    }

    fn msg_from(portid: u32, kind: u16, family: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = attrs.concat();
        let len = NLMSG_HDRLEN + NFGENMSG_LEN + body.len();
        let mut v = Vec::new();
        v.extend_from_slice(&(len as u32).to_ne_bytes());
        v.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | kind).to_ne_bytes());
        v.extend_from_slice(&[0; 6]);
        v.extend_from_slice(&portid.to_ne_bytes());
        v.extend_from_slice(&[family, 0, 0, 0]);
        v.extend_from_slice(&body);
        v
    }

    fn elem(table: &str, set: &str, family: u8) -> Vec<u8> {
        msg(
            NFT_MSG_NEWSETELEM,
            family,
            &[
                attr(ATTR_TABLE, format!("{table}\0").as_bytes()),
                attr(NFTA_SET_ELEM_LIST_SET, format!("{set}\0").as_bytes()),
            ],
        )
    }

    fn gen(portid: u32) -> Vec<u8> {
        msg_from(
            portid,
            NFT_MSG_NEWGEN,
            0,
            &[
                attr(1, &7u32.to_be_bytes()),
                attr(2, &1234u32.to_be_bytes()),
            ],
        )
    }

    #[test]
    fn foreign_commits_are_reported_with_their_sets_and_echoes_dropped() {
        let mut g = Gatherer::new("nftproxy", 42);
        // Our own commit: dropped.
        let own = [elem("nftproxy", "clusterip", 2), gen(42)].concat();
        assert!(g.feed(&own).is_empty());
        // Someone else's commit, to our table and to another one.
        let theirs = [
            elem("nftproxy", "clusterip", 2),
            elem("nftproxy", "ip-cluster-backends", 2),
            elem("filter", "blocklist", 2),
            gen(7),
        ]
        .concat();
        let got = g.feed(&theirs);
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0],
            Touched::from([(
                Family::Ip,
                Some(BTreeSet::from([
                    "clusterip".to_string(),
                    "ip-cluster-backends".to_string()
                ]))
            )])
        );
        // A rule change in the ip6 table: no set to read (rules are always compared).
        let rule = msg(6, 10, &[attr(ATTR_TABLE, b"nftproxy\0")]);
        let got = g.feed(&[rule, gen(7)].concat());
        assert_eq!(
            got,
            vec![Touched::from([(Family::Ip6, Some(BTreeSet::new()))])]
        );
        // A set deleted: that set; the table deleted: everything.
        let delset = msg(
            NFT_MSG_DELSET,
            10,
            &[
                attr(ATTR_TABLE, b"nftproxy\0"),
                attr(NFTA_SET_NAME, b"clusterip\0"),
            ],
        );
        let got = g.feed(&[delset, gen(7)].concat());
        assert_eq!(
            got,
            vec![Touched::from([(
                Family::Ip6,
                Some(BTreeSet::from(["clusterip".to_string()]))
            )])]
        );
        let deltable = msg(2, 2, &[attr(ATTR_TABLE, b"nftproxy\0")]);
        let got = g.feed(&[deltable, gen(7)].concat());
        assert_eq!(got, vec![Touched::from([(Family::Ip, None)])]);
        // Only other tables: nothing to report.
        assert!(g
            .feed(&[elem("filter", "x", 2), gen(7)].concat())
            .is_empty());
    }

    #[test]
    fn merging_keeps_the_widest() {
        let mut a = Touched::from([(Family::Ip, Some(BTreeSet::from(["a".to_string()])))]);
        merge(
            &mut a,
            Touched::from([
                (Family::Ip, Some(BTreeSet::from(["b".to_string()]))),
                (Family::Ip6, None),
            ]),
        );
        assert_eq!(a[&Family::Ip].as_ref().map(|s| s.len()), Some(2));
        assert_eq!(a[&Family::Ip6], None);
    }

    #[test]
    #[ignore = "privileged (root, network namespaces): cargo test -- --ignored, or `just test-privileged`"]
    fn a_paused_monitor_hears_nothing_and_hears_again_after_resume() {
        use crate::apply::Applier;
        use crate::nft::tx::{Op, Transaction};
        crate::testutil::require_root();
        crate::testutil::in_netns(|| {
            // Port id 0 is nobody's applier: every commit here is foreign to the monitor.
            let mut m = Monitor::open(crate::nft::ir::TABLE_NAME, 0).expect("monitor");
            m.sock
                .set_recv_timeout(std::time::Duration::from_secs(2))
                .expect("timeout");
            let switch = m.switch();
            let mut a = crate::apply::netlink::NetlinkApplier::new().expect("applier");
            let add = |f| Transaction {
                ops: vec![Op::AddTable(f)],
            };
            switch.pause().expect("pause");
            a.apply(&add(Family::Ip)).expect("commit while paused");
            switch.resume().expect("resume");
            a.apply(&add(Family::Ip6)).expect("commit after resume");
            // Only the second commit is announced: the first one built no notification for us.
            match m.wait().expect("a notice after resume") {
                Notice::Foreign(t) => {
                    assert_eq!(t.keys().copied().collect::<Vec<_>>(), vec![Family::Ip6])
                }
                Notice::Lost => panic!("lost notifications"),
            }
            crate::apply::netlink::delete_nftproxy_tables().expect("cleanup");
        });
    }
}
