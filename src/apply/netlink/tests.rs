//! Tests of `apply::netlink`: the lowering of the IR onto the `nftproxy-nl` wrapper.
//!
//! Unit tests (no privileges) pin the encoding against bytes and texts captured from nft 1.0.6.
//! Privileged tests run in throwaway network namespaces (`unshare(CLONE_NEWNET)` on a fresh
//! thread; `nft` subprocesses spawned from that thread inherit it) and compare what the applier
//! makes of a transaction with what `nft -f` makes of the hand-written canonical text: the
//! `nft list table` output, every rule's expressions, every set's attributes (user data
//! included) and every kernel element must be identical. They are `#[ignore]`d (run them with
//! `cargo test -- --ignored` as root) and panic when run without root.
//!
//! Address plan (inside the namespaces only): pods 10.0.0.0/8, services 172.30.0.0/16, nodes
//! 192.168.0.0/24, external clients 203.0.113.0/24, LB IPs 192.0.2.0/24; IPv6 pods fd00::/8,
//! services fd30::/64, LB 2001:db8::/64.

use std::collections::{BTreeMap, BTreeSet};
use tokio::time::Instant;

use super::*;
use crate::apply::Applier;
use crate::nft::ir::{Chain, SetFlags, Table};
use crate::testutil::{in_netns, require_root};

// ---------------------------------------------------------------------------------------------
// IR helpers
// ---------------------------------------------------------------------------------------------

fn fl(interval: bool, timeout: bool, counter: bool) -> SetFlags {
    SetFlags {
        interval,
        timeout,
        counter,
    }
}

fn def(key: Decl, data: Option<Decl>, flags: SetFlags) -> SetDef {
    SetDef {
        key,
        data,
        flags,
        size: None,
        constant: false,
    }
}

fn ty(ts: &[FieldType]) -> Decl {
    Decl::Type(ts.to_vec())
}

fn tof(fs: &[Field]) -> Decl {
    Decl::Typeof(fs.to_vec())
}

fn ip(s: &str) -> Value {
    Value::Addr(s.parse().unwrap())
}

fn pfx(s: &str) -> Value {
    Value::Prefix(s.parse().unwrap())
}

fn el(key: Vec<Value>) -> Element {
    Element::new(key, None)
}

fn mel(key: Vec<Value>, value: Vec<Value>) -> Element {
    Element::new(key, Some(value))
}

fn lookup(key: &[Field], set: &str, negate: bool) -> Match {
    Match::Lookup {
        key: key.to_vec(),
        set: set.into(),
        negate,
    }
}

fn rule(matches: Vec<Match>, action: Action) -> Rule {
    Rule { matches, action }
}

fn base(kind: ChainType, hook: Hook, priority: i32) -> Option<BaseChain> {
    Some(BaseChain {
        kind,
        hook,
        priority,
    })
}

const V4: FieldType = FieldType::Ipv4Addr;
const V6: FieldType = FieldType::Ipv6Addr;
const PROTO: FieldType = FieldType::InetProto;
const SVC: FieldType = FieldType::InetService;
const TCP: Value = Value::Proto(Proto::Tcp);
const UDP: Value = Value::Proto(Proto::Udp);
const SCTP: Value = Value::Proto(Proto::Sctp);

#[derive(Default)]
struct TableBuilder {
    t: Table,
}

impl TableBuilder {
    fn set(mut self, name: &str, def: SetDef, elems: Vec<Element>) -> Self {
        self.t.sets.insert(name.into(), def);
        if !elems.is_empty() {
            self.t
                .elements
                .insert(name.into(), elems.into_iter().collect());
        }
        self
    }

    fn chain(mut self, name: &str, base: Option<BaseChain>, rules: Vec<Rule>) -> Self {
        self.t.chains.insert(name.into(), Chain { base, rules });
        self
    }
}

/// The ops that create `t` from nothing, in the order nft -f uses: table, chains, sets with
/// their elements, rules.
fn create_tx(family: Family, t: &Table) -> Transaction {
    let mut ops = vec![Op::AddTable(family)];
    for (name, c) in &t.chains {
        ops.push(Op::AddChain {
            family,
            name: name.clone(),
            base: c.base.clone(),
        });
    }
    for (name, d) in &t.sets {
        ops.push(Op::AddSet {
            family,
            name: name.clone(),
            def: d.clone(),
        });
        if let Some(els) = t.elements.get(name) {
            ops.push(Op::AddElements {
                family,
                set: name.clone(),
                def: d.clone(),
                elements: els.iter().cloned().collect(),
            });
        }
    }
    for (name, c) in &t.chains {
        for r in &c.rules {
            ops.push(Op::AddRule {
                family,
                chain: name.clone(),
                rule: r.clone(),
            });
        }
    }
    Transaction { ops }
}

// ---------------------------------------------------------------------------------------------
// Unit tests: registers, set declarations, rules, elements
// ---------------------------------------------------------------------------------------------

#[test]
fn register_numbering_follows_nft() {
    // slot 1 -> NFT_REG_1; unaligned slots -> 32-bit registers; aligned -> 128-bit ones.
    let got: Vec<u32> = (1..=16).map(nft_reg).collect();
    assert_eq!(
        got,
        vec![1, 9, 10, 11, 2, 13, 14, 15, 3, 17, 18, 19, 4, 21, 22, 23]
    );
    assert_eq!(key_slots(&[Field::Daddr], Family::Ip6), 4);
    assert_eq!(
        key_slots(&[Field::Daddr, Field::L4proto, Field::ThDport], Family::Ip),
        3
    );
    assert_eq!(
        key_slots(
            &[
                Field::CtOrigSaddr,
                Field::CtOrigDaddr,
                Field::L4proto,
                Field::CtOrigProtoDst
            ],
            Family::Ip6
        ),
        10
    );
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Attributes of nft-created sets, captured with `nft --debug=mnl -f` (nft 1.0.6, x86_64).
#[cfg(target_endian = "little")]
#[test]
fn set_declarations_match_nft_bytes() {
    use Field::*;
    struct Case {
        family: Family,
        def: SetDef,
        flags: u32,
        key: (u32, u32),
        data: Option<(u32, u32)>,
        desc: Vec<u8>,
        udata: &'static str,
    }
    let cases = vec![
        // set s1 { type ipv4_addr; flags interval; }
        Case { family: Family::Ip, def: def(ty(&[V4]), None, fl(true, false, false)), flags: 4, key: (7, 4), data: None, desc: vec![], udata: "000402000000" },
        // set s2 { type ipv4_addr . ipv4_addr; }
        Case {
            family: Family::Ip,
            def: def(ty(&[V4, V4]), None, fl(false, false, false)),
            flags: 0,
            key: (0x1c7, 8),
            data: None,
            desc: vec![],
            udata: "000400000000030800040d0000000100",
        },
        // set s3 { type ipv4_addr . inet_proto . inet_service . ipv4_addr; flags interval; }
        Case {
            family: Family::Ip,
            def: def(ty(&[V4, PROTO, SVC, V4]), None, fl(true, false, false)),
            flags: 0x84,
            key: (0x1cc347, 16),
            data: None,
            desc: vec![4, 1, 2, 4],
            udata: "000400000000030800040d0000000100",
        },
        // set s9 { type inet_proto; }
        Case { family: Family::Ip, def: def(ty(&[PROTO]), None, fl(false, false, false)), flags: 0, key: (12, 1), data: None, desc: vec![], udata: "000400000000" },
        // set s11 { typeof meta l4proto; }
        Case {
            family: Family::Ip,
            def: def(tof(&[L4proto]), None, fl(false, false, false)),
            flags: 0,
            key: (12, 1),
            data: None,
            desc: vec![],
            udata: "000401000000030e0004090000000106000410000000",
        },
        // set s17 { typeof numgen random mod 65536; }
        Case {
            family: Family::Ip,
            def: def(tof(&[Numgen(65536)]), None, fl(false, false, false)),
            flags: 0,
            key: (4, 4),
            data: None,
            desc: vec![],
            udata: "000401000000031a0004170000000112000401000000010400000100020400000000",
        },
        // set c { typeof ct original proto-dst; }
        Case {
            family: Family::Ip,
            def: def(tof(&[CtOrigProtoDst]), None, fl(false, false, false)),
            flags: 0,
            key: (0, 2),
            data: None,
            desc: vec![],
            udata: "000402000000031400040c000000010c00040c000000010400000000",
        },
        // set b { typeof ct original ip saddr; }
        Case {
            family: Family::Ip,
            def: def(tof(&[CtOrigSaddr]), None, fl(false, false, false)),
            flags: 0,
            key: (7, 4),
            data: None,
            desc: vec![],
            udata: "000402000000031400040c000000010c000413000000010400000000",
        },
        // map m16 { type ipv4_addr : ipv4_addr . inet_service; }
        Case {
            family: Family::Ip,
            def: def(ty(&[V4]), Some(ty(&[V4, SVC])), fl(false, false, false)),
            flags: 8,
            key: (7, 4),
            data: Some((0x1cd, 8)),
            desc: vec![],
            udata: "000402000000010400000000040800040d0000000100060400000000",
        },
        // map m15 { typeof ip saddr : ip daddr; }
        Case {
            family: Family::Ip,
            def: def(tof(&[Saddr]), Some(tof(&[Daddr])), fl(false, false, false)),
            flags: 8,
            key: (7, 4),
            data: Some((7, 4)),
            desc: vec![],
            udata: "0004020000000104020000000314000407000000010c00040c00000001040b0000000414000407000000010c00040c00000001040c000000060400000000",
        },
        // map backends { typeof ip daddr . meta l4proto . th dport . numgen random mod 65536 : ip daddr . th dport; }
        Case {
            family: Family::Ip,
            def: def(tof(&[Daddr, L4proto, ThDport, Numgen(3)]), Some(tof(&[Daddr, ThDport])), fl(false, false, false)),
            flags: 8,
            key: (0x1cc344, 16),
            data: Some((0x1cd, 8)),
            desc: vec![],
            udata: "000400000000010400000000036000040d00000001580014000407000000010c00040c00000001040c000000010e00040900000001060004100000000214000407000000010c00040b000000010402000000031a0004170000000112000401000000010400000100020400000000043400040d000000012c0014000407000000010c00040c00000001040c0000000114000407000000010c00040b000000010402000000060400000000",
        },
        // map m6 { typeof ct original ip saddr . ct original ip daddr . meta l4proto . ct original proto-dst : ip daddr . th dport; flags timeout; }
        Case {
            family: Family::Ip,
            def: def(tof(&[CtOrigSaddr, CtOrigDaddr, L4proto, CtOrigProtoDst]), Some(tof(&[Daddr, ThDport])), fl(false, true, false)),
            flags: 0x18,
            key: (0x1c7300, 16),
            data: Some((0x1cd, 8)),
            desc: vec![],
            udata: "000400000000010400000000035a00040d0000000152001400040c000000010c000413000000010400000000011400040c000000010c000414000000010400000000020e0004090000000106000410000000031400040c000000010c00040c000000010400000000043400040d000000012c0014000407000000010c00040c00000001040c0000000114000407000000010c00040b000000010402000000060400000000",
        },
        // set s14 { typeof ip daddr . numgen random mod 65536; flags interval; }
        Case {
            family: Family::Ip,
            def: def(tof(&[Daddr, Numgen(65536)]), None, fl(true, false, false)),
            flags: 0x84,
            key: (0x1c4, 8),
            data: None,
            desc: vec![4, 4],
            udata: "000400000000033a00040d00000001320014000407000000010c00040c00000001040c000000011a0004170000000112000401000000010400000100020400000000",
        },
        // table ip6: set s3 { type ipv6_addr . inet_proto . inet_service . ipv6_addr; flags interval; }
        Case {
            family: Family::Ip6,
            def: def(ty(&[V6, PROTO, SVC, V6]), None, fl(true, false, false)),
            flags: 0x84,
            key: (0x20c348, 40),
            data: None,
            desc: vec![16, 1, 2, 16],
            udata: "000400000000030800040d0000000100",
        },
        // table ip6: map m6 (ct original ip6 …) : ip6 daddr . th dport; flags timeout
        Case {
            family: Family::Ip6,
            def: def(tof(&[CtOrigSaddr, CtOrigDaddr, L4proto, CtOrigProtoDst]), Some(tof(&[Daddr, ThDport])), fl(false, true, false)),
            flags: 0x18,
            key: (0x208300, 40),
            data: Some((0x20d, 20)),
            desc: vec![],
            udata: "000400000000010400000000035a00040d0000000152001400040c000000010c000415000000010400000000011400040c000000010c000416000000010400000000020e0004090000000106000410000000031400040c000000010c00040c000000010400000000043400040d000000012c0014000407000000010c00040d0000000104090000000114000407000000010c00040b000000010402000000060400000000",
        },
        // table ip6: map b { typeof ip6 daddr . meta l4proto . th dport . numgen random mod 65536 : ip6 daddr . th dport; }
        Case {
            family: Family::Ip6,
            def: def(tof(&[Daddr, L4proto, ThDport, Numgen(2)]), Some(tof(&[Daddr, ThDport])), fl(false, false, false)),
            flags: 8,
            key: (0x20c344, 28),
            data: Some((0x20d, 20)),
            desc: vec![],
            udata: "000400000000010400000000036000040d00000001580014000407000000010c00040d000000010409000000010e00040900000001060004100000000214000407000000010c00040b000000010402000000031a0004170000000112000401000000010400000100020400000000043400040d000000012c0014000407000000010c00040d0000000104090000000114000407000000010c00040b000000010402000000060400000000",
        },
    ];
    for (i, c) in cases.into_iter().enumerate() {
        let layout = SetLayout::from_def(c.family, &c.def).unwrap();
        let s = layout.declaration(&c.def, "nftproxy", "s", 1).unwrap();
        let info = s.info();
        assert_eq!(info.flags, c.flags, "case {i}: flags");
        assert_eq!((info.key_type, info.key_len), c.key, "case {i}: key");
        assert_eq!(info.data_type.zip(info.data_len), c.data, "case {i}: data");
        assert_eq!(info.desc_concat, c.desc, "case {i}: desc concat");
        assert_eq!(info.userdata, hex(c.udata), "case {i}: user data");
        // …and the kernel-side view decodes back to the same layout.
        let back = SetLayout::from_kernel(c.family, &info).unwrap();
        assert_eq!(
            back.key
                .comps
                .iter()
                .map(|x| (x.ty, x.len))
                .collect::<Vec<_>>(),
            layout
                .key
                .comps
                .iter()
                .map(|x| (x.ty, x.len))
                .collect::<Vec<_>>()
        );
        assert_eq!(back.interval, layout.interval);
    }
}

#[test]
fn counter_sets_carry_a_counter_template_and_sizes_are_sent() {
    let mut d = def(ty(&[V4, PROTO, SVC]), None, fl(false, false, true));
    d.size = Some(65535);
    let s = SetLayout::from_def(Family::Ip, &d)
        .unwrap()
        .declaration(&d, "nftproxy", "cnt", 4)
        .unwrap();
    assert_eq!(s.info().expr_names, vec!["counter"]);
    let bad = def(ty(&[FieldType::Slot]), None, fl(false, false, false));
    assert!(SetLayout::from_def(Family::Ip, &bad)
        .unwrap_err()
        .to_string()
        .contains("typeof"));
}

fn lowered(family: Family, r: &Rule, interval_sets: &[&str]) -> Vec<String> {
    let lookup = |set: &str| SetRef {
        id: Some(1),
        interval: interval_sets.contains(&set),
    };
    lower_rule(family, "nftproxy", "c", r, &lookup)
        .unwrap()
        .expr_texts()
}

fn lines(s: &str) -> Vec<String> {
    s.lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Rules lower to exactly the expressions `nft --debug=netlink` printed for their text.
#[test]
fn rules_lower_like_nft() {
    use Field::*;
    let cases: Vec<(Family, Rule, &[&str], &str)> = vec![
        (
            Family::Ip,
            rule(vec![Match::CtStateNew], Action::Jump("services".into())),
            &[],
            "[ ct load state => reg 1 ]
             [ bitwise reg 1 = ( reg 1 & 0x00000008 ) ^ 0x00000000 ]
             [ cmp neq reg 1 0x00000000 ]
             [ immediate reg 0 jump -> services ]",
        ),
        (
            Family::Ip,
            rule(vec![Match::MarkUnset(0x4000)], Action::Return),
            &[],
            "[ meta load mark => reg 1 ]
             [ bitwise reg 1 = ( reg 1 & 0x00004000 ) ^ 0x00000000 ]
             [ cmp eq reg 1 0x00000000 ]
             [ immediate reg 0 return ]",
        ),
        (
            Family::Ip,
            rule(vec![], Action::MarkXor(0x4000)),
            &[],
            "[ meta load mark => reg 1 ]
             [ bitwise reg 1 = ( reg 1 & 0xffffffff ) ^ 0x00004000 ]
             [ meta set mark with reg 1 ]",
        ),
        (
            Family::Ip,
            rule(vec![], Action::Masquerade),
            &[],
            "[ masq flags 0x10 ]",
        ),
        (
            Family::Ip,
            rule(
                vec![
                    Match::CtStateNew,
                    lookup(&[Daddr, L4proto, ThDport], "cnt", false),
                ],
                Action::Drop,
            ),
            &[],
            "[ ct load state => reg 1 ]
             [ bitwise reg 1 = ( reg 1 & 0x00000008 ) ^ 0x00000000 ]
             [ cmp neq reg 1 0x00000000 ]
             [ payload load 4b @ network header + 16 => reg 1 ]
             [ meta load l4proto => reg 9 ]
             [ payload load 2b @ transport header + 2 => reg 10 ]
             [ lookup reg 1 set cnt ]
             [ immediate reg 0 drop ]",
        ),
        (
            Family::Ip,
            rule(
                vec![lookup(&[Saddr], "pod-cidrs", true)],
                Action::MarkOr(0x4000),
            ),
            &["pod-cidrs"],
            "[ payload load 4b @ network header + 12 => reg 1 ]
             [ lookup reg 1 set pod-cidrs 0x1 ]
             [ meta load mark => reg 1 ]
             [ bitwise reg 1 = ( reg 1 & 0xffffbfff ) ^ 0x00004000 ]
             [ meta set mark with reg 1 ]",
        ),
        (
            Family::Ip,
            rule(
                vec![
                    Match::CtStatusDnat,
                    lookup(&[Saddr, Daddr], "hairpin", false),
                ],
                Action::Masquerade,
            ),
            &[],
            "[ ct load status => reg 1 ]
             [ bitwise reg 1 = ( reg 1 & 0x00000020 ) ^ 0x00000000 ]
             [ cmp neq reg 1 0x00000000 ]
             [ payload load 4b @ network header + 12 => reg 1 ]
             [ payload load 4b @ network header + 16 => reg 9 ]
             [ lookup reg 1 set hairpin ]
             [ masq flags 0x10 ]",
        ),
        (
            Family::Ip,
            rule(vec![Match::FibDaddrLocal], Action::Goto("masq".into())),
            &[],
            "[ fib daddr type => reg 1 ]
             [ cmp eq reg 1 0x00000002 ]
             [ immediate reg 0 goto -> masq ]",
        ),
        (
            Family::Ip,
            rule(vec![Match::FibSaddrLocal], Action::Reject),
            &[],
            "[ fib saddr type => reg 1 ]
             [ cmp eq reg 1 0x00000002 ]
             [ reject type 0 code 3 ]",
        ),
        (
            Family::Ip,
            rule(
                vec![lookup(&[Daddr, L4proto, ThDport, Saddr], "fw-allow", true)],
                Action::Drop,
            ),
            &["fw-allow"],
            "[ payload load 4b @ network header + 16 => reg 1 ]
             [ meta load l4proto => reg 9 ]
             [ byteorder reg 9 = hton(reg 9, 2, 1) ]
             [ payload load 2b @ transport header + 2 => reg 10 ]
             [ payload load 4b @ network header + 12 => reg 11 ]
             [ lookup reg 1 set fw-allow 0x1 ]
             [ immediate reg 0 drop ]",
        ),
        (
            Family::Ip,
            rule(
                vec![],
                Action::DnatMap {
                    key: vec![Daddr, L4proto, ThDport, Numgen(3)],
                    map: "backends".into(),
                },
            ),
            &[],
            "[ payload load 4b @ network header + 16 => reg 1 ]
             [ meta load l4proto => reg 9 ]
             [ payload load 2b @ transport header + 2 => reg 10 ]
             [ numgen reg 11 = random mod 3 ]
             [ lookup reg 1 set backends dreg 1 ]
             [ nat dnat ip addr_min reg 1 proto_min reg 9 ]",
        ),
        (
            Family::Ip,
            rule(
                vec![Match::L4protoIs(Proto::Tcp)],
                Action::UpdateTimeout {
                    set: "affinity".into(),
                    key: vec![CtOrigSaddr, CtOrigDaddr, L4proto, CtOrigProtoDst],
                    timeout_secs: 10800,
                    value: vec![Daddr, ThDport],
                },
            ),
            &[],
            "[ meta load l4proto => reg 1 ]
             [ cmp eq reg 1 0x00000006 ]
             [ ct load src_ip => reg 1 , dir original ]
             [ ct load dst_ip => reg 9 , dir original ]
             [ meta load l4proto => reg 10 ]
             [ ct load proto_dst => reg 11 , dir original ]
             [ payload load 4b @ network header + 16 => reg 2 ]
             [ payload load 2b @ transport header + 2 => reg 13 ]
             [ dynset update reg_key 1 set affinity sreg_data 2 timeout 10800000ms ]",
        ),
        (
            Family::Ip6,
            rule(
                vec![],
                Action::DnatMap {
                    key: vec![Daddr, L4proto, ThDport, Numgen(3)],
                    map: "backends".into(),
                },
            ),
            &[],
            "[ payload load 16b @ network header + 24 => reg 1 ]
             [ meta load l4proto => reg 2 ]
             [ payload load 2b @ transport header + 2 => reg 13 ]
             [ numgen reg 14 = random mod 3 ]
             [ lookup reg 1 set backends dreg 1 ]
             [ nat dnat ip6 addr_min reg 1 proto_min reg 2 ]",
        ),
        (
            Family::Ip6,
            rule(
                vec![],
                Action::DnatMap {
                    key: vec![Saddr, Daddr, L4proto, ThDport],
                    map: "aff2".into(),
                },
            ),
            &[],
            "[ payload load 16b @ network header + 8 => reg 1 ]
             [ payload load 16b @ network header + 24 => reg 2 ]
             [ meta load l4proto => reg 3 ]
             [ payload load 2b @ transport header + 2 => reg 17 ]
             [ lookup reg 1 set aff2 dreg 1 ]
             [ nat dnat ip6 addr_min reg 1 proto_min reg 2 ]",
        ),
        (
            Family::Ip6,
            rule(
                vec![lookup(&[Daddr, Numgen(3)], "s14", false)],
                Action::Drop,
            ),
            &["s14"],
            "[ payload load 16b @ network header + 24 => reg 1 ]
             [ numgen reg 2 = random mod 3 ]
             [ byteorder reg 2 = hton(reg 2, 4, 4) ]
             [ lookup reg 1 set s14 ]
             [ immediate reg 0 drop ]",
        ),
        (
            Family::Ip6,
            rule(vec![lookup(&[L4proto], "s11", false)], Action::Drop),
            &["s11"],
            "[ meta load l4proto => reg 1 ]
             [ lookup reg 1 set s11 ]
             [ immediate reg 0 drop ]",
        ),
        (
            Family::Ip6,
            rule(vec![lookup(&[Numgen(4)], "s17", false)], Action::Drop),
            &["s17"],
            "[ numgen reg 1 = random mod 4 ]
             [ byteorder reg 1 = hton(reg 1, 4, 4) ]
             [ lookup reg 1 set s17 ]
             [ immediate reg 0 drop ]",
        ),
        (
            Family::Ip6,
            rule(vec![Match::FibSaddrLocal], Action::Reject),
            &[],
            "[ fib saddr type => reg 1 ]
             [ cmp eq reg 1 0x00000002 ]
             [ reject type 0 code 4 ]",
        ),
    ];
    for (i, (fam, r, intervals, want)) in cases.iter().enumerate() {
        assert_eq!(lowered(*fam, r, intervals), lines(want), "case {i}: {r:?}");
    }
}

#[test]
fn set_ids_are_unique_within_a_batch() {
    let d = def(ty(&[V4]), None, fl(false, false, false));
    let f = Family::Ip;
    let add = |n: &str| Op::AddSet {
        family: f,
        name: n.into(),
        def: d.clone(),
    };
    let known = HashMap::new();
    let ops = vec![
        add("a"),
        add("b"),
        Op::DeleteSet {
            family: f,
            name: "a".into(),
        },
        add("c"),
    ];
    let tx = Transaction { ops: ops.clone() };
    let mut low = Lowering::new("nftproxy", 1, &known, &tx);
    for (i, op) in ops.iter().enumerate() {
        low.op(i, op).unwrap();
    }
    low.batch.end();
    // NFTA_SET_ID = 10, a big-endian u32 in NEWSET messages.
    let ids: Vec<u32> = (2..=5)
        .filter_map(|seq| low.batch.record(seq).copied())
        .filter(|r| r.tag != 2)
        .map(|r| {
            let msg = low.batch.message_bytes(&r);
            let (_, _, v) = nl::message_attrs(msg)
                .into_iter()
                .find(|a| a.0 == 10)
                .unwrap();
            u32::from_be_bytes(v.try_into().unwrap())
        })
        .collect();
    assert_eq!(ids, vec![1, 2, 3]);
    assert_eq!(low.set_id(f, "c"), Some(3));
    assert_eq!(low.set_id(f, "a"), None);
}

#[test]
fn keys_that_do_not_fit_the_registers_are_rejected() {
    use Field::*;
    let r = rule(
        vec![lookup(&[Saddr, Daddr, Saddr, Daddr, Saddr], "x", false)],
        Action::Drop,
    );
    let lookup = |_: &str| SetRef {
        id: None,
        interval: false,
    };
    assert!(lower_rule(Family::Ip6, "nftproxy", "c", &r, &lookup)
        .unwrap_err()
        .to_string()
        .contains("registers"));
}

fn infos(layout: &SetLayout, elements: &[Element], add: bool) -> Vec<nl::ElemInfo> {
    kernel_elements_vec(layout, elements, add)
        .unwrap()
        .iter()
        .map(|k| k.elem.info())
        .collect()
}

#[test]
fn rbtree_elements_are_start_and_end_pairs() {
    let d = def(ty(&[V4]), None, fl(true, false, false));
    let layout = SetLayout::from_def(Family::Ip, &d).unwrap();
    let els = vec![
        el(vec![pfx("192.168.1.0/24")]),
        el(vec![pfx("10.0.0.0/8")]),
        el(vec![pfx("255.255.255.0/24")]),
        el(vec![pfx("192.168.0.2/32")]),
    ];
    let got = infos(&layout, &els, true);
    let open = vec![1, 4, 1, 0, 0, 0];
    let want = vec![
        nl::ElemInfo {
            key: vec![10, 0, 0, 0],
            ..Default::default()
        },
        nl::ElemInfo {
            key: vec![11, 0, 0, 0],
            flags: 1,
            ..Default::default()
        },
        nl::ElemInfo {
            key: vec![192, 168, 0, 2],
            ..Default::default()
        },
        nl::ElemInfo {
            key: vec![192, 168, 0, 3],
            flags: 1,
            ..Default::default()
        },
        nl::ElemInfo {
            key: vec![192, 168, 1, 0],
            ..Default::default()
        },
        nl::ElemInfo {
            key: vec![192, 168, 2, 0],
            flags: 1,
            ..Default::default()
        },
        // Runs to the top: no end element, the "open" flag in the element's user data instead.
        nl::ElemInfo {
            key: vec![255, 255, 255, 0],
            userdata: Some(open),
            ..Default::default()
        },
    ];
    assert_eq!(got, want);
    // Deleting sends the same pairs, without user data.
    let del = infos(&layout, &els[..1], false);
    assert_eq!(del, want[4..6].to_vec());
    // And a dump of them decodes back (in any order, with the leading end-at-zero ignored).
    let mut dump = got.clone();
    dump.reverse();
    dump.push(nl::ElemInfo {
        key: vec![0; 4],
        flags: 1,
        ..Default::default()
    });
    let back: BTreeSet<Element> = layout
        .decode(&dump, false)
        .unwrap()
        .into_iter()
        .map(|(e, _)| e)
        .collect();
    assert_eq!(back, els.into_iter().collect());
}

#[test]
fn pipapo_elements_carry_key_end() {
    let d = def(ty(&[V4, PROTO, SVC, V4]), None, fl(true, false, false));
    let layout = SetLayout::from_def(Family::Ip, &d).unwrap();
    let els = vec![
        el(vec![
            ip("192.0.2.10"),
            TCP,
            Value::Port(80),
            pfx("203.0.113.0/24"),
        ]),
        el(vec![
            ip("192.0.2.11"),
            UDP,
            Value::Port(53),
            pfx("198.51.100.7/32"),
        ]),
    ];
    let got = infos(&layout, &els, true);
    assert_eq!(got[0].key, hex("c000020a0600000000500000cb007100"));
    assert_eq!(
        got[0].key_end,
        Some(hex("c000020a0600000000500000cb0071ff"))
    );
    assert_eq!(
        got[1].key_end,
        Some(got[1].key.clone()),
        "nft sends KEY_END even for a single address"
    );
    let del = infos(&layout, &els, false);
    assert_eq!(del[0].key_end, got[0].key_end);
    assert_eq!(del[1].key_end, None, "…but not when deleting one");
    let back: BTreeSet<Element> = layout
        .decode(&got, false)
        .unwrap()
        .into_iter()
        .map(|(e, _)| e)
        .collect();
    assert_eq!(back, els.into_iter().collect());
}

#[test]
fn slots_are_host_order_except_in_interval_sets() {
    use Field::*;
    let hash = def(
        tof(&[Daddr, L4proto, ThDport, Numgen(65536)]),
        Some(tof(&[Daddr, ThDport])),
        fl(false, false, false),
    );
    let layout = SetLayout::from_def(Family::Ip, &hash).unwrap();
    let els = vec![mel(
        vec![ip("172.30.0.10"), TCP, Value::Port(80), Value::Slot(1)],
        vec![ip("10.0.1.1"), Value::Port(8080)],
    )];
    let got = infos(&layout, &els, true);
    let mut key = hex("ac1e000a0600000000500000");
    key.extend_from_slice(&1u32.to_ne_bytes());
    assert_eq!(got[0].key, key);
    assert_eq!(got[0].data, Some(hex("0a0001011f900000")));
    assert_eq!(
        layout.decode(&got, true).unwrap(),
        vec![(els[0].clone(), Some((0, 0)))]
    );

    let int = def(tof(&[Daddr, Numgen(65536)]), None, fl(true, false, false));
    let layout = SetLayout::from_def(Family::Ip, &int).unwrap();
    let els = vec![el(vec![ip("192.0.2.10"), Value::Slot(5)])];
    let got = infos(&layout, &els, true);
    assert_eq!(got[0].key, hex("c000020a00000005"));
    let back: Vec<Element> = layout
        .decode(&got, false)
        .unwrap()
        .into_iter()
        .map(|(e, _)| e)
        .collect();
    assert_eq!(
        back,
        vec![el(vec![pfx("192.0.2.10/32"), Value::Slot(5)])]
            .into_iter()
            .map(|e| {
                // Only the last component of an interval concatenation comes back as a prefix.
                let mut key = e.key().to_vec();
                key[0] = ip("192.0.2.10");
                key[1] = Value::Slot(5);
                el(key)
            })
            .collect::<Vec<_>>()
    );
}

#[test]
fn element_values_are_type_checked() {
    let d = def(ty(&[V4, PROTO, SVC]), None, fl(false, false, false));
    let layout = SetLayout::from_def(Family::Ip, &d).unwrap();
    let err = |els: Vec<Element>| kernel_elements_vec(&layout, &els, true).err().unwrap();
    assert!(err(vec![el(vec![ip("fd00::1"), TCP, Value::Port(1)])])
        .to_string()
        .contains("does not fit"));
    assert!(err(vec![el(vec![ip("10.0.0.1"), TCP])])
        .to_string()
        .contains("components"));
    assert!(err(vec![el(vec![pfx("10.0.0.0/8"), TCP, Value::Port(1)])])
        .to_string()
        .contains("interval"));
    assert!(err(vec![mel(
        vec![ip("10.0.0.1"), TCP, Value::Port(1)],
        vec![ip("10.0.0.2")]
    )])
    .to_string()
    .contains("has a value"));
}

#[test]
fn decode_rejects_ranges_that_are_not_prefixes() {
    let c = Comp::of_type(V4).unwrap();
    assert!(decode_range(&[10, 0, 0, 1], &[10, 0, 0, 6], &c, true).is_err());
    assert_eq!(
        decode_range(&[10, 0, 0, 0], &[10, 0, 0, 255], &c, true).unwrap(),
        pfx("10.0.0.0/24")
    );
    assert_eq!(
        decode_range(&[0; 4], &[255; 4], &c, true).unwrap(),
        pfx("0.0.0.0/0")
    );
    assert_eq!(
        decode_range(&[10, 0, 0, 1], &[10, 0, 0, 1], &c, false).unwrap(),
        ip("10.0.0.1")
    );
}

#[test]
fn ops_are_described_for_errors() {
    let d = def(ty(&[V4]), None, fl(false, false, false));
    let f = Family::Ip;
    assert_eq!(
        describe(
            &Op::DeleteChain {
                family: f,
                name: "foo".into()
            },
            "nftproxy"
        ),
        "delete chain ip nftproxy foo"
    );
    assert_eq!(
        describe(
            &Op::AddElements {
                family: f,
                set: "cluster-backends".into(),
                def: d.clone(),
                elements: vec![].into()
            },
            "nftproxy"
        ),
        "add element to set ip nftproxy cluster-backends"
    );
    assert_eq!(
        describe(
            &Op::AddSet {
                family: Family::Ip6,
                name: "m".into(),
                def: def(ty(&[V6]), Some(ty(&[V6])), d.flags.clone())
            },
            "x"
        ),
        "add map ip6 x m"
    );
    let k = |errno| KernelError {
        errno,
        seq: 1,
        msg: None,
        bad_attr_offset: None,
    };
    assert!(matches!(
        errno_error("w".into(), &k(libc::ENOENT)),
        ApplyError::NotFound { .. }
    ));
    assert!(matches!(
        errno_error("w".into(), &k(libc::EEXIST)),
        ApplyError::Exists { .. }
    ));
    assert!(matches!(
        errno_error("w".into(), &k(libc::EBUSY)),
        ApplyError::Busy { .. }
    ));
    assert!(matches!(
        errno_error("w".into(), &k(libc::EPERM)),
        ApplyError::Unsupported { .. }
    ));
    assert!(matches!(
        errno_error("w".into(), &k(libc::EOPNOTSUPP)),
        ApplyError::Unsupported { .. }
    ));
    assert!(matches!(
        errno_error("w".into(), &k(libc::EAFNOSUPPORT)),
        ApplyError::Unsupported { .. }
    ));
    assert!(matches!(
        errno_error("w".into(), &k(libc::ENOBUFS)),
        ApplyError::Io { .. }
    ));
    assert!(matches!(
        errno_error("w".into(), &k(libc::EINTR)),
        ApplyError::Io { .. }
    ));
    assert!(matches!(
        errno_error("w".into(), &k(libc::EINVAL)),
        ApplyError::Invalid { .. }
    ));
    assert!(matches!(
        errno_error("w".into(), &k(libc::ENOTEMPTY)),
        ApplyError::Invalid { .. }
    ));
}
fn nft(args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    use std::io::Write;
    let mut child = std::process::Command::new("nft")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn nft: {e}"))?;
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        return Err(format!(
            "nft {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nft_ok(args: &[&str], stdin: Option<&str>) -> String {
    nft(args, stdin).unwrap_or_else(|e| panic!("{e}"))
}

/// `nft list` output with element lists flattened and sorted, blocks sorted by name.
fn normalise(listing: &str) -> String {
    let mut header = Vec::new();
    let mut blocks: Vec<Vec<String>> = Vec::new();
    let mut cur: Option<Vec<String>> = None;
    let mut elems: Option<String> = None;
    for raw in listing.lines() {
        let l = raw.trim();
        if let Some(acc) = elems.as_mut() {
            acc.push(' ');
            acc.push_str(l);
        } else if let Some(rest) = l.strip_prefix("elements = {") {
            elems = Some(rest.to_string());
        } else if l.starts_with("set ") || l.starts_with("map ") || l.starts_with("chain ") {
            cur = Some(vec![l.to_string()]);
            continue;
        } else if l == "}" {
            if let Some(b) = cur.take() {
                blocks.push(b);
            }
            continue;
        } else if !l.is_empty() {
            match cur.as_mut() {
                Some(b) => b.push(l.to_string()),
                None => header.push(l.to_string()),
            }
            continue;
        } else {
            continue;
        }
        if let Some(acc) = elems.as_ref().filter(|a| a.trim_end().ends_with('}')) {
            let mut items: Vec<String> = acc
                .trim()
                .trim_end_matches('}')
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            items.sort();
            if let Some(b) = cur.as_mut() {
                b.push(format!("elements = {{ {} }}", items.join(", ")));
            }
            elems = None;
        }
    }
    blocks.sort();
    let mut out = header.join("\n");
    for b in blocks {
        out.push_str("\n\n");
        out.push_str(&b.join("\n"));
    }
    out
}

/// Everything observable about our table in the current namespace.
#[derive(Debug, PartialEq)]
struct Snapshot {
    listing: String,
    rules: Vec<(String, Vec<String>)>,
    sets: Vec<nl::SetInfo>,
    elems: BTreeMap<String, Vec<nl::ElemInfo>>,
}

fn snapshot(family: Family) -> Snapshot {
    let listing = normalise(&nft_ok(
        &["list", "table", family.keyword(), "nftproxy"],
        None,
    ));
    let mut sock = nl::Socket::open().unwrap();
    let mut rules = sock.dump_rules(nfproto(family), "nftproxy").unwrap();
    rules.sort_by(|a, b| a.0.cmp(&b.0));
    let mut sets = sock.dump_sets(nfproto(family), "nftproxy").unwrap();
    sets.sort_by(|a, b| a.name.cmp(&b.name));
    let mut elems = BTreeMap::new();
    for s in &sets {
        let mut e = sock
            .dump_elems(nfproto(family), "nftproxy", &s.name)
            .unwrap();
        e.sort();
        elems.insert(s.name.clone(), e);
    }
    Snapshot {
        listing,
        rules,
        sets,
        elems,
    }
}

fn assert_same(ours: &Snapshot, nft: &Snapshot) {
    assert_eq!(
        ours.listing, nft.listing,
        "nft list differs\n--- ours ---\n{}\n--- nft ---\n{}",
        ours.listing, nft.listing
    );
    assert_eq!(ours.rules.len(), nft.rules.len());
    for (a, b) in ours.rules.iter().zip(&nft.rules) {
        assert_eq!(a, b, "rule expressions differ");
    }
    for (a, b) in ours.sets.iter().zip(&nft.sets) {
        assert_eq!(a, b, "set attributes differ");
    }
    assert_eq!(ours.sets.len(), nft.sets.len());
    assert_eq!(ours.elems, nft.elems, "kernel elements differ");
}

/// Load `text` with nft in one namespace and apply `tx` in another; return both snapshots.
fn load_both(family: Family, text: &str, tx: Transaction) -> (Snapshot, Snapshot) {
    let text = text.to_string();
    let by_nft = in_netns(move || {
        nft_ok(&["-f", "-"], Some(&text));
        snapshot(family)
    });
    let ours = in_netns(move || {
        let mut a = NetlinkApplier::new().unwrap();
        a.apply(&tx).unwrap_or_else(|e| panic!("apply: {e}"));
        snapshot(family)
    });
    (ours, by_nft)
}

// ---------------------------------------------------------------------------------------------
// Conformance: every construct, both families
// ---------------------------------------------------------------------------------------------

fn ip_case() -> (Table, &'static str) {
    use Field::*;
    let mut affinity = def(
        ty(&[V4, V4, PROTO, SVC]),
        Some(ty(&[V4, SVC])),
        fl(false, true, false),
    );
    affinity.size = Some(65535);
    let t = TableBuilder::default()
        .set(
            "aff-t",
            def(ty(&[V4, PROTO, SVC]), None, fl(false, false, false)),
            vec![el(vec![ip("172.30.0.20"), UDP, Value::Port(53)])],
        )
        .set("affinity", affinity, vec![])
        .set(
            "backends",
            def(
                tof(&[Daddr, L4proto, ThDport, Numgen(65536)]),
                Some(tof(&[Daddr, ThDport])),
                fl(false, false, false),
            ),
            vec![
                mel(
                    vec![ip("172.30.0.10"), TCP, Value::Port(80), Value::Slot(0)],
                    vec![ip("10.0.1.1"), Value::Port(8080)],
                ),
                mel(
                    vec![ip("172.30.0.10"), TCP, Value::Port(80), Value::Slot(1)],
                    vec![ip("10.0.2.1"), Value::Port(8080)],
                ),
            ],
        )
        .set(
            "cnt",
            def(ty(&[V4, PROTO, SVC]), None, fl(false, false, true)),
            vec![el(vec![ip("172.30.0.30"), TCP, Value::Port(443)])],
        )
        .set(
            "fw-allow",
            def(ty(&[V4, PROTO, SVC, V4]), None, fl(true, false, false)),
            vec![
                el(vec![
                    ip("192.0.2.10"),
                    TCP,
                    Value::Port(80),
                    pfx("203.0.113.0/24"),
                ]),
                el(vec![
                    ip("192.0.2.11"),
                    UDP,
                    Value::Port(53),
                    pfx("198.51.100.7/32"),
                ]),
            ],
        )
        .set(
            "hairpin",
            def(ty(&[V4, V4]), None, fl(false, false, false)),
            vec![el(vec![ip("10.0.1.1"), ip("10.0.1.1")])],
        )
        .set(
            "l4protos",
            def(ty(&[PROTO]), None, fl(false, false, false)),
            vec![el(vec![TCP]), el(vec![UDP]), el(vec![SCTP])],
        )
        .set(
            "ng-int",
            def(tof(&[Daddr, Numgen(65536)]), None, fl(true, false, false)),
            vec![el(vec![ip("192.0.2.10"), Value::Slot(5)])],
        )
        .set(
            "nodeport-addrs",
            def(ty(&[V4]), None, fl(true, false, false)),
            vec![el(vec![pfx("192.168.0.2/32")])],
        )
        .set(
            "np-backends",
            def(
                tof(&[L4proto, ThDport, Numgen(65536)]),
                Some(tof(&[Daddr, ThDport])),
                fl(false, false, false),
            ),
            vec![mel(
                vec![UDP, Value::Port(30053), Value::Slot(0)],
                vec![ip("10.0.2.5"), Value::Port(5353)],
            )],
        )
        .set(
            "pod-cidrs",
            def(ty(&[V4]), None, fl(true, false, false)),
            vec![
                el(vec![pfx("10.0.0.0/8")]),
                el(vec![pfx("192.168.1.0/24")]),
                el(vec![pfx("255.255.255.0/24")]),
            ],
        )
        .set(
            "ports",
            def(tof(&[ThDport]), None, fl(false, false, false)),
            vec![el(vec![Value::Port(80)]), el(vec![Value::Port(443)])],
        )
        .set(
            "svc-map",
            def(
                ty(&[V4, PROTO, SVC]),
                Some(ty(&[V4, SVC])),
                fl(false, false, false),
            ),
            vec![mel(
                vec![ip("172.30.0.40"), TCP, Value::Port(80)],
                vec![ip("10.0.3.1"), Value::Port(80)],
            )],
        )
        .chain(
            "affinity-update",
            None,
            vec![rule(
                vec![
                    Match::L4protoIs(Proto::Tcp),
                    lookup(&[CtOrigDaddr, L4proto, CtOrigProtoDst], "aff-t", false),
                ],
                Action::UpdateTimeout {
                    set: "affinity".into(),
                    key: vec![CtOrigSaddr, CtOrigDaddr, L4proto, CtOrigProtoDst],
                    timeout_secs: 10800,
                    value: vec![Daddr, ThDport],
                },
            )],
        )
        .chain(
            "filter-checks",
            None,
            vec![
                rule(
                    vec![lookup(&[Daddr, L4proto, ThDport], "cnt", false)],
                    Action::Reject,
                ),
                rule(
                    vec![lookup(&[Daddr, Numgen(3)], "ng-int", false)],
                    Action::Drop,
                ),
                rule(
                    vec![lookup(&[ThDport], "ports", true), Match::FibSaddrLocal],
                    Action::Return,
                ),
            ],
        )
        .chain(
            "filter-input",
            base(ChainType::Filter, Hook::Input, 0),
            vec![rule(
                vec![Match::CtStateNew],
                Action::Jump("filter-checks".into()),
            )],
        )
        .chain(
            "filter-output",
            base(ChainType::Filter, Hook::Output, 0),
            vec![rule(
                vec![Match::CtStateNew],
                Action::Jump("filter-checks".into()),
            )],
        )
        .chain(
            "filter-prerouting",
            base(ChainType::Filter, Hook::Prerouting, -110),
            vec![rule(
                vec![
                    Match::CtStateNew,
                    lookup(&[Daddr, L4proto, ThDport, Saddr], "fw-allow", true),
                ],
                Action::Drop,
            )],
        )
        .chain(
            "masq",
            None,
            vec![
                rule(vec![Match::MarkUnset(0x4000)], Action::Return),
                rule(vec![], Action::MarkXor(0x4000)),
                rule(vec![], Action::Masquerade),
            ],
        )
        .chain(
            "nat-output",
            base(ChainType::Nat, Hook::Output, -100),
            vec![rule(vec![], Action::Jump("services".into()))],
        )
        .chain(
            "nat-postrouting",
            base(ChainType::Nat, Hook::Postrouting, 100),
            vec![
                rule(
                    vec![
                        Match::CtStatusDnat,
                        lookup(&[Saddr, Daddr], "hairpin", false),
                    ],
                    Action::Masquerade,
                ),
                rule(
                    vec![Match::CtStatusDnat],
                    Action::Jump("affinity-update".into()),
                ),
                rule(vec![], Action::Jump("masq".into())),
            ],
        )
        .chain(
            "nat-prerouting",
            base(ChainType::Nat, Hook::Prerouting, -100),
            vec![rule(vec![], Action::Jump("services".into()))],
        )
        .chain(
            "nodeports",
            None,
            vec![
                rule(
                    vec![lookup(&[L4proto], "l4protos", false)],
                    Action::DnatMap {
                        key: vec![L4proto, ThDport, Numgen(1)],
                        map: "np-backends".into(),
                    },
                ),
                rule(vec![], Action::Drop),
            ],
        )
        .chain(
            "services",
            None,
            vec![
                rule(
                    vec![lookup(&[Saddr], "pod-cidrs", true)],
                    Action::MarkOr(0x4000),
                ),
                rule(
                    vec![
                        Match::FibDaddrLocal,
                        lookup(&[Daddr], "nodeport-addrs", false),
                    ],
                    Action::Goto("nodeports".into()),
                ),
                rule(
                    vec![lookup(&[L4proto], "l4protos", false)],
                    Action::DnatMap {
                        key: vec![Saddr, Daddr, L4proto, ThDport],
                        map: "affinity".into(),
                    },
                ),
                rule(
                    vec![lookup(&[L4proto], "l4protos", false)],
                    Action::DnatMap {
                        key: vec![Daddr, L4proto, ThDport, Numgen(2)],
                        map: "backends".into(),
                    },
                ),
                rule(
                    vec![],
                    Action::DnatMap {
                        key: vec![Daddr, L4proto, ThDport],
                        map: "svc-map".into(),
                    },
                ),
                rule(vec![], Action::Return),
            ],
        )
        .t;
    let text = r#"
table ip nftproxy {
	set aff-t {
		type ipv4_addr . inet_proto . inet_service
		elements = { 172.30.0.20 . udp . 53 }
	}
	map affinity {
		type ipv4_addr . ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service
		size 65535
		flags timeout
	}
	map backends {
		typeof ip daddr . meta l4proto . th dport . numgen random mod 65536 : ip daddr . th dport
		elements = { 172.30.0.10 . tcp . 80 . 0 : 10.0.1.1 . 8080, 172.30.0.10 . tcp . 80 . 1 : 10.0.2.1 . 8080 }
	}
	set cnt {
		type ipv4_addr . inet_proto . inet_service
		counter
		elements = { 172.30.0.30 . tcp . 443 }
	}
	set fw-allow {
		type ipv4_addr . inet_proto . inet_service . ipv4_addr
		flags interval
		elements = { 192.0.2.10 . tcp . 80 . 203.0.113.0/24, 192.0.2.11 . udp . 53 . 198.51.100.7 }
	}
	set hairpin {
		type ipv4_addr . ipv4_addr
		elements = { 10.0.1.1 . 10.0.1.1 }
	}
	set l4protos {
		type inet_proto
		elements = { tcp, udp, sctp }
	}
	set ng-int {
		typeof ip daddr . numgen random mod 65536
		flags interval
		elements = { 192.0.2.10 . 5 }
	}
	set nodeport-addrs {
		type ipv4_addr
		flags interval
		elements = { 192.168.0.2 }
	}
	map np-backends {
		typeof meta l4proto . th dport . numgen random mod 65536 : ip daddr . th dport
		elements = { udp . 30053 . 0 : 10.0.2.5 . 5353 }
	}
	set pod-cidrs {
		type ipv4_addr
		flags interval
		elements = { 10.0.0.0/8, 192.168.1.0/24, 255.255.255.0/24 }
	}
	set ports {
		typeof th dport
		elements = { 80, 443 }
	}
	map svc-map {
		type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service
		elements = { 172.30.0.40 . tcp . 80 : 10.0.3.1 . 80 }
	}
	chain affinity-update {
		meta l4proto tcp ct original ip daddr . meta l4proto . ct original proto-dst @aff-t update @affinity { ct original ip saddr . ct original ip daddr . meta l4proto . ct original proto-dst timeout 10800s : ip daddr . th dport }
	}
	chain filter-checks {
		ip daddr . meta l4proto . th dport @cnt reject
		ip daddr . numgen random mod 3 @ng-int drop
		th dport != @ports fib saddr type local return
	}
	chain filter-input {
		type filter hook input priority 0; policy accept;
		ct state new jump filter-checks
	}
	chain filter-output {
		type filter hook output priority 0; policy accept;
		ct state new jump filter-checks
	}
	chain filter-prerouting {
		type filter hook prerouting priority -110; policy accept;
		ct state new ip daddr . meta l4proto . th dport . ip saddr != @fw-allow drop
	}
	chain masq {
		meta mark & 0x00004000 == 0x00000000 return
		meta mark set meta mark ^ 0x00004000
		masquerade fully-random
	}
	chain nat-output {
		type nat hook output priority -100; policy accept;
		jump services
	}
	chain nat-postrouting {
		type nat hook postrouting priority 100; policy accept;
		ct status dnat ip saddr . ip daddr @hairpin masquerade fully-random
		ct status dnat jump affinity-update
		jump masq
	}
	chain nat-prerouting {
		type nat hook prerouting priority -100; policy accept;
		jump services
	}
	chain nodeports {
		meta l4proto @l4protos dnat ip to meta l4proto . th dport . numgen random mod 1 map @np-backends
		drop
	}
	chain services {
		ip saddr != @pod-cidrs meta mark set meta mark | 0x00004000
		fib daddr type local ip daddr @nodeport-addrs goto nodeports
		meta l4proto @l4protos dnat ip to ip saddr . ip daddr . meta l4proto . th dport map @affinity
		meta l4proto @l4protos dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 2 map @backends
		dnat ip to ip daddr . meta l4proto . th dport map @svc-map
		return
	}
}
"#;
    (t, text)
}

/// The same constructs in an ip6 table. nft 1.0.6 aborts (an assertion in its register
/// allocator) on `update @set { <40-byte key> : ip6 daddr . th dport }`, so that rule is tested
/// separately (`ip6_affinity_update_loads_although_nft_cannot_write_it`).
fn ip6_case() -> (Table, &'static str) {
    use Field::*;
    let t = TableBuilder::default()
        .set(
            "backends",
            def(
                tof(&[Daddr, L4proto, ThDport, Numgen(65536)]),
                Some(tof(&[Daddr, ThDport])),
                fl(false, false, false),
            ),
            vec![mel(
                vec![ip("fd30::10"), TCP, Value::Port(80), Value::Slot(0)],
                vec![ip("fd00:1::1"), Value::Port(8080)],
            )],
        )
        .set(
            "cnt",
            def(ty(&[V6, PROTO, SVC]), None, fl(false, false, true)),
            vec![el(vec![ip("fd30::30"), TCP, Value::Port(443)])],
        )
        .set(
            "fw-allow",
            def(ty(&[V6, PROTO, SVC, V6]), None, fl(true, false, false)),
            vec![el(vec![
                ip("2001:db8::10"),
                TCP,
                Value::Port(80),
                pfx("2001:db8:ffff::/48"),
            ])],
        )
        .set(
            "hairpin",
            def(ty(&[V6, V6]), None, fl(false, false, false)),
            vec![el(vec![ip("fd00:1::1"), ip("fd00:1::1")])],
        )
        .set(
            "pod-cidrs",
            def(ty(&[V6]), None, fl(true, false, false)),
            vec![
                el(vec![pfx("fd00::/8")]),
                el(vec![pfx("2001:db8:1::/64")]),
                el(vec![pfx("ffff:ffff:ffff:ffff::/64")]),
            ],
        )
        .set(
            "svc-map",
            def(
                ty(&[V6, PROTO, SVC]),
                Some(ty(&[V6, SVC])),
                fl(false, false, false),
            ),
            vec![mel(
                vec![ip("fd30::40"), UDP, Value::Port(53)],
                vec![ip("fd00:3::1"), Value::Port(5353)],
            )],
        )
        .chain(
            "filter-checks",
            None,
            vec![
                rule(
                    vec![lookup(&[Daddr, L4proto, ThDport], "cnt", false)],
                    Action::Reject,
                ),
                rule(vec![Match::FibSaddrLocal], Action::Return),
            ],
        )
        .chain(
            "filter-forward",
            base(ChainType::Filter, Hook::Forward, 0),
            vec![rule(
                vec![Match::CtStateNew],
                Action::Jump("filter-checks".into()),
            )],
        )
        .chain(
            "filter-prerouting",
            base(ChainType::Filter, Hook::Prerouting, -110),
            vec![rule(
                vec![
                    Match::CtStateNew,
                    lookup(&[Daddr, L4proto, ThDport, Saddr], "fw-allow", true),
                ],
                Action::Drop,
            )],
        )
        .chain(
            "nat-postrouting",
            base(ChainType::Nat, Hook::Postrouting, 100),
            vec![
                rule(
                    vec![
                        Match::CtStatusDnat,
                        lookup(&[Saddr, Daddr], "hairpin", false),
                    ],
                    Action::Masquerade,
                ),
                rule(vec![Match::MarkUnset(0x4000)], Action::Return),
                rule(vec![], Action::MarkXor(0x4000)),
                rule(vec![], Action::Masquerade),
            ],
        )
        .chain(
            "nat-output",
            base(ChainType::Nat, Hook::Output, -100),
            vec![rule(vec![], Action::Jump("services".into()))],
        )
        .chain(
            "nat-prerouting",
            base(ChainType::Nat, Hook::Prerouting, -100),
            vec![rule(vec![], Action::Jump("services".into()))],
        )
        .chain(
            "services",
            None,
            vec![
                rule(
                    vec![lookup(&[Saddr], "pod-cidrs", true)],
                    Action::MarkOr(0x4000),
                ),
                rule(vec![Match::FibDaddrLocal], Action::Goto("local".into())),
                rule(
                    vec![],
                    Action::DnatMap {
                        key: vec![Daddr, L4proto, ThDport, Numgen(3)],
                        map: "backends".into(),
                    },
                ),
                rule(
                    vec![],
                    Action::DnatMap {
                        key: vec![Daddr, L4proto, ThDport],
                        map: "svc-map".into(),
                    },
                ),
            ],
        )
        .chain("local", None, vec![rule(vec![], Action::Return)])
        .t;
    let text = r#"
table ip6 nftproxy {
	map backends {
		typeof ip6 daddr . meta l4proto . th dport . numgen random mod 65536 : ip6 daddr . th dport
		elements = { fd30::10 . tcp . 80 . 0 : fd00:1::1 . 8080 }
	}
	set cnt {
		type ipv6_addr . inet_proto . inet_service
		counter
		elements = { fd30::30 . tcp . 443 }
	}
	set fw-allow {
		type ipv6_addr . inet_proto . inet_service . ipv6_addr
		flags interval
		elements = { 2001:db8::10 . tcp . 80 . 2001:db8:ffff::/48 }
	}
	set hairpin {
		type ipv6_addr . ipv6_addr
		elements = { fd00:1::1 . fd00:1::1 }
	}
	set pod-cidrs {
		type ipv6_addr
		flags interval
		elements = { fd00::/8, 2001:db8:1::/64, ffff:ffff:ffff:ffff::/64 }
	}
	map svc-map {
		type ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service
		elements = { fd30::40 . udp . 53 : fd00:3::1 . 5353 }
	}
	chain filter-checks {
		ip6 daddr . meta l4proto . th dport @cnt reject
		fib saddr type local return
	}
	chain filter-forward {
		type filter hook forward priority 0; policy accept;
		ct state new jump filter-checks
	}
	chain filter-prerouting {
		type filter hook prerouting priority -110; policy accept;
		ct state new ip6 daddr . meta l4proto . th dport . ip6 saddr != @fw-allow drop
	}
	chain local {
		return
	}
	chain nat-output {
		type nat hook output priority -100; policy accept;
		jump services
	}
	chain nat-postrouting {
		type nat hook postrouting priority 100; policy accept;
		ct status dnat ip6 saddr . ip6 daddr @hairpin masquerade fully-random
		meta mark & 0x00004000 == 0x00000000 return
		meta mark set meta mark ^ 0x00004000
		masquerade fully-random
	}
	chain nat-prerouting {
		type nat hook prerouting priority -100; policy accept;
		jump services
	}
	chain services {
		ip6 saddr != @pod-cidrs meta mark set meta mark | 0x00004000
		fib daddr type local goto local
		dnat ip6 to ip6 daddr . meta l4proto . th dport . numgen random mod 3 map @backends
		dnat ip6 to ip6 daddr . meta l4proto . th dport map @svc-map
	}
}
"#;
    (t, text)
}

/// Elements as `list_elements` returns them, compared with the IR (counters dropped).
fn listed(a: &mut NetlinkApplier, family: Family, set: &str) -> BTreeSet<Element> {
    a.list_elements(family, set)
        .unwrap_or_else(|e| panic!("list {set}: {e}"))
        .into_iter()
        .map(|(e, _)| e)
        .collect()
}

#[test]
#[ignore = "privileged (root, network namespaces): cargo test -- --ignored, or `just test-privileged`"]
fn conformance_ip_every_construct_matches_nft() {
    require_root();
    let (t, text) = ip_case();
    let (ours, by_nft) = load_both(Family::Ip, text, create_tx(Family::Ip, &t));
    assert_same(&ours, &by_nft);
    // The listing shows what the canonical text says, e.g. typeof and named priorities.
    assert!(ours.listing.contains("typeof ip daddr . meta l4proto . th dport . numgen random mod 65536 : ip daddr . th dport"), "{}", ours.listing);
    assert!(
        ours.listing
            .contains("type nat hook output priority -100; policy accept;"),
        "{}",
        ours.listing
    );
    assert!(
        ours.listing
            .contains("type nat hook prerouting priority dstnat; policy accept;"),
        "{}",
        ours.listing
    );
}

#[test]
#[ignore = "privileged (root, network namespaces): cargo test -- --ignored, or `just test-privileged`"]
fn conformance_ip6_every_construct_matches_nft() {
    require_root();
    let (t, text) = ip6_case();
    let (ours, by_nft) = load_both(Family::Ip6, text, create_tx(Family::Ip6, &t));
    assert_same(&ours, &by_nft);
}

#[test]
#[ignore = "privileged (root, network namespaces): cargo test -- --ignored, or `just test-privileged`"]
fn list_elements_reads_back_every_set_kind() {
    require_root();
    for (family, (t, _)) in [(Family::Ip, ip_case()), (Family::Ip6, ip6_case())] {
        in_netns(move || {
            let mut a = NetlinkApplier::new().unwrap();
            a.apply(&create_tx(family, &t)).unwrap();
            for (name, want) in &t.elements {
                assert_eq!(
                    listed(&mut a, family, name),
                    want.iter().cloned().collect::<BTreeSet<_>>(),
                    "set {name}"
                );
            }
            for (name, d) in &t.sets {
                let got = a.list_elements(family, name).unwrap();
                assert!(
                    got.iter().all(|(_, c)| c.is_some() == d.flags.counter),
                    "counters of {name}"
                );
            }
            assert!(matches!(
                a.list_elements(family, "missing"),
                Err(ApplyError::NotFound { .. })
            ));
        });
    }
}

#[test]
#[ignore = "privileged (root, network namespaces): cargo test -- --ignored, or `just test-privileged`"]
fn ip6_affinity_update_loads_although_nft_cannot_write_it() {
    require_root();
    use Field::*;
    let t = TableBuilder::default()
        .set(
            "affinity",
            def(
                ty(&[V6, V6, PROTO, SVC]),
                Some(ty(&[V6, SVC])),
                fl(false, true, false),
            ),
            vec![],
        )
        .chain(
            "affinity-update",
            None,
            vec![rule(
                vec![Match::L4protoIs(Proto::Udp)],
                Action::UpdateTimeout {
                    set: "affinity".into(),
                    key: vec![CtOrigSaddr, CtOrigDaddr, L4proto, CtOrigProtoDst],
                    timeout_secs: 10800,
                    value: vec![Daddr, ThDport],
                },
            )],
        )
        .t;
    let listing = in_netns(move || {
        NetlinkApplier::new()
            .unwrap()
            .apply(&create_tx(Family::Ip6, &t))
            .unwrap();
        let rules = nl::Socket::open()
            .unwrap()
            .dump_rules(NFPROTO_IPV6, "nftproxy")
            .unwrap();
        assert_eq!(
            rules[0].1.last().unwrap(),
            "[ dynset update reg_key 1 set affinity sreg_data 18 timeout 10800000ms ]",
            "data follows the 40-byte key in 32-bit registers"
        );
        nft_ok(&["list", "table", "ip6", "nftproxy"], None)
    });
    assert!(
        listing.contains("update @affinity { ct original ip6 saddr . ct original ip6 daddr . meta l4proto . ct original proto-dst timeout 3h : ip6 daddr . udp dport }"),
        "{listing}"
    );
}

// ---------------------------------------------------------------------------------------------
// Batches: size, atomicity, errors
// ---------------------------------------------------------------------------------------------

fn backends_table() -> (Table, SetDef) {
    use Field::*;
    let d = def(
        tof(&[Daddr, L4proto, ThDport, Numgen(65536)]),
        Some(tof(&[Daddr, ThDport])),
        fl(false, false, false),
    );
    let t = TableBuilder::default()
        .set("cluster-backends", d.clone(), vec![])
        .chain(
            "services",
            None,
            vec![rule(
                vec![],
                Action::DnatMap {
                    key: vec![Daddr, L4proto, ThDport, Numgen(3)],
                    map: "cluster-backends".into(),
                },
            )],
        )
        .chain(
            "nat-prerouting",
            base(ChainType::Nat, Hook::Prerouting, -100),
            vec![rule(vec![], Action::Jump("services".into()))],
        )
        .chain("unused", None, vec![])
        .t;
    (t, d)
}

fn backend(i: u32) -> Element {
    let svc = std::net::Ipv4Addr::from(0xac1e_0000 + i / 3); // 172.30.x.y
    let ep = std::net::Ipv4Addr::from(0x0a00_0000 + i); // 10.x.y.z
    mel(
        vec![
            Value::Addr(svc.into()),
            TCP,
            Value::Port(80),
            Value::Slot(i % 3),
        ],
        vec![Value::Addr(ep.into()), Value::Port(8080)],
    )
}

#[test]
#[ignore = "privileged (root, network namespaces): cargo test -- --ignored, or `just test-privileged`"]
fn one_batch_of_100k_elements() {
    require_root();
    let (t, d) = backends_table();
    in_netns(move || {
        let mut a = NetlinkApplier::new().unwrap();
        let mut tx = create_tx(Family::Ip, &t);
        let elements: Vec<Element> = (0..100_000).map(backend).collect();
        tx.ops.push(Op::AddElements {
            family: Family::Ip,
            set: "cluster-backends".into(),
            def: d.clone(),
            elements: elements.clone().into(),
        });
        let start = Instant::now();
        a.apply(&tx).unwrap();
        let applied = start.elapsed();
        let stats = a.last_stats().unwrap();
        assert_eq!(stats.ops, tx.ops.len());
        let start = Instant::now();
        let got = a.list_elements(Family::Ip, "cluster-backends").unwrap();
        let listed_in = start.elapsed();
        let start = Instant::now();
        let raw = nl::Socket::open()
            .unwrap()
            .dump_elems(NFPROTO_IPV4, "nftproxy", "cluster-backends")
            .unwrap();
        let dumped_in = start.elapsed();
        assert_eq!(raw.len(), 100_000);
        let start = Instant::now();
        let listing = nft_ok(&["list", "map", "ip", "nftproxy", "cluster-backends"], None);
        let nft_listed_in = start.elapsed();
        assert!(listing.contains("10.1.134.159 . 8080"));
        assert_eq!(got.len(), 100_000);
        let got: BTreeSet<Element> = got.into_iter().map(|(e, _)| e).collect();
        assert_eq!(got, elements.into_iter().collect());
        // A second batch of 100k deletions (the same path in reverse).
        let dels: Vec<Element> = (0..100_000).map(backend).collect();
        let start = Instant::now();
        a.apply(&Transaction {
            ops: vec![Op::DeleteElements {
                family: Family::Ip,
                set: "cluster-backends".into(),
                def: d,
                elements: dels.into(),
            }],
        })
        .unwrap();
        let deleted = start.elapsed();
        assert!(a
            .list_elements(Family::Ip, "cluster-backends")
            .unwrap()
            .is_empty());
        eprintln!(
            "100k elements: apply {applied:?} ({} messages, {} bytes in one sendmsg; build {:?}, kernel {:?}), list_elements {listed_in:?} (raw dump {dumped_in:?}; `nft list map` {nft_listed_in:?}), delete {deleted:?}",
            stats.messages, stats.bytes, stats.build, stats.kernel
        );
    });
}

#[test]
#[ignore = "privileged (root, network namespaces): cargo test -- --ignored, or `just test-privileged`"]
fn failed_batch_changes_nothing() {
    require_root();
    let (t, d) = backends_table();
    in_netns(move || {
        let mut a = NetlinkApplier::new().unwrap();
        let mut tx = create_tx(Family::Ip, &t);
        tx.ops.push(Op::AddElements {
            family: Family::Ip,
            set: "cluster-backends".into(),
            def: d.clone(),
            elements: (0..10).map(backend).collect(),
        });
        a.apply(&tx).unwrap();
        let gen = a.generation().unwrap();
        let before = nft_ok(&["list", "ruleset"], None);
        let bad = Transaction {
            ops: vec![
                Op::AddChain {
                    family: Family::Ip,
                    name: "new-chain".into(),
                    base: None,
                },
                Op::AddRule {
                    family: Family::Ip,
                    chain: "new-chain".into(),
                    rule: rule(vec![], Action::Drop),
                },
                Op::FlushChain {
                    family: Family::Ip,
                    name: "services".into(),
                },
                Op::AddElements {
                    family: Family::Ip,
                    set: "cluster-backends".into(),
                    def: d.clone(),
                    elements: (10..5000).map(backend).collect(),
                },
                Op::DeleteElements {
                    family: Family::Ip,
                    set: "cluster-backends".into(),
                    def: d,
                    elements: vec![backend(0)].into(),
                },
                Op::DeleteChain {
                    family: Family::Ip,
                    name: "missing".into(),
                },
            ],
        };
        let err = a.apply(&bad).unwrap_err();
        assert_eq!(
            format!("{:?}", err),
            format!(
                "{:?}",
                ApplyError::NotFound {
                    what: "delete chain ip nftproxy missing".into()
                }
            )
        );
        assert_eq!(a.generation().unwrap(), gen, "generation must not move");
        assert_eq!(
            nft_ok(&["list", "ruleset"], None),
            before,
            "ruleset must not change"
        );
        assert!(a.table_exists(Family::Ip).unwrap());
        assert!(!a.table_exists(Family::Ip6).unwrap());
    });
}

#[test]
#[ignore = "privileged (root, network namespaces): cargo test -- --ignored, or `just test-privileged`"]
fn kernel_errors_are_classified_and_name_their_op() {
    require_root();
    let (t, d) = backends_table();
    in_netns(move || {
        let mut a = NetlinkApplier::new().unwrap();
        let mut tx = create_tx(Family::Ip, &t);
        tx.ops.push(Op::AddElements {
            family: Family::Ip,
            set: "cluster-backends".into(),
            def: d.clone(),
            elements: (0..10).map(backend).collect(),
        });
        a.apply(&tx).unwrap();
        let gen = a.generation().unwrap();
        let set = || "cluster-backends".to_string();

        // Duplicate element: EEXIST, and extended ack names the element.
        let dup = Transaction {
            ops: vec![Op::AddElements {
                family: Family::Ip,
                set: set(),
                def: d.clone(),
                elements: (10..20).chain(5..6).map(backend).collect(),
            }],
        };
        let err = a.apply(&dup).unwrap_err();
        let ApplyError::Exists { what } = &err else {
            panic!("{err:?}")
        };
        assert!(
            what.starts_with("add element to set ip nftproxy cluster-backends"),
            "{what}"
        );
        assert!(
            what.contains("172.30.0.1 . tcp . 80 . 2 : 10.0.0.5 . 8080"),
            "{what}"
        );

        // Deleting a missing element: ENOENT.
        let missing = Transaction {
            ops: vec![Op::DeleteElements {
                family: Family::Ip,
                set: set(),
                def: d.clone(),
                elements: vec![backend(99)].into(),
            }],
        };
        let err = a.apply(&missing).unwrap_err();
        assert!(
            matches!(&err, ApplyError::NotFound { what } if what.starts_with("delete element from set ip nftproxy cluster-backends")),
            "{err:?}"
        );

        // Deleting a chain that is still jumped to: EBUSY.
        let busy = Transaction {
            ops: vec![Op::DeleteChain {
                family: Family::Ip,
                name: "services".into(),
            }],
        };
        assert_eq!(
            format!("{:?}", a.apply(&busy).unwrap_err()),
            format!(
                "{:?}",
                ApplyError::Busy {
                    what: "delete chain ip nftproxy services".into()
                }
            )
        );

        // A rule referring to a set that does not exist: ENOENT on the rule.
        let no_set = Transaction {
            ops: vec![Op::AddRule {
                family: Family::Ip,
                chain: "unused".into(),
                rule: rule(vec![lookup(&[Field::Daddr], "nope", false)], Action::Drop),
            }],
        };
        assert_eq!(
            format!("{:?}", a.apply(&no_set).unwrap_err()),
            format!(
                "{:?}",
                ApplyError::NotFound {
                    what: "add rule to chain ip nftproxy unused".into()
                }
            )
        );

        // A statement the hook does not allow (masquerade in a chain reached from prerouting).
        let masq = Transaction {
            ops: vec![Op::AddRule {
                family: Family::Ip,
                chain: "services".into(),
                rule: rule(vec![], Action::Masquerade),
            }],
        };
        let err = a.apply(&masq).unwrap_err();
        assert!(
            matches!(&err, ApplyError::Unsupported { what, .. } if what == "add rule to chain ip nftproxy services"),
            "{err:?}"
        );

        // Errors found while validating values never reach the kernel.
        let wrong = Transaction {
            ops: vec![Op::AddElements {
                family: Family::Ip,
                set: set(),
                def: d.clone(),
                elements: vec![el(vec![ip("10.0.0.1")])].into(),
            }],
        };
        assert!(matches!(
            a.apply(&wrong).unwrap_err(),
            ApplyError::Lower {
                source: LowerError::Encode(_),
                ..
            }
        ));

        assert_eq!(a.generation().unwrap(), gen);
        assert_eq!(listed(&mut a, Family::Ip, "cluster-backends").len(), 10);
    });
}

#[test]
#[ignore = "privileged (root, network namespaces): cargo test -- --ignored, or `just test-privileged`"]
fn adds_are_idempotent_and_flush_chain_empties_a_chain() {
    require_root();
    let (t, _) = backends_table();
    in_netns(move || {
        let mut a = NetlinkApplier::new().unwrap();
        a.apply(&create_tx(Family::Ip, &t)).unwrap();
        // Table, chains and sets again (no rules): like `nft add`, no error and no change.
        let skeleton = Transaction {
            ops: create_tx(Family::Ip, &t)
                .ops
                .into_iter()
                .filter(|op| !matches!(op, Op::AddRule { .. }))
                .collect(),
        };
        a.apply(&skeleton).unwrap();
        let count = |chain: &str| {
            nl::Socket::open()
                .unwrap()
                .dump_rules(NFPROTO_IPV4, "nftproxy")
                .unwrap()
                .iter()
                .filter(|(c, _)| c == chain)
                .count()
        };
        assert_eq!(count("services"), 1);
        a.apply(&Transaction {
            ops: vec![Op::FlushChain {
                family: Family::Ip,
                name: "services".into(),
            }],
        })
        .unwrap();
        assert_eq!(count("services"), 0);
        assert_eq!(count("nat-prerouting"), 1);
        // The chain exists and can take rules again.
        a.apply(&Transaction {
            ops: vec![Op::AddRule {
                family: Family::Ip,
                chain: "services".into(),
                rule: rule(vec![], Action::Return),
            }],
        })
        .unwrap();
        assert_eq!(count("services"), 1);
        // Delete order: flush, then the chain once nothing jumps to it.
        a.apply(&Transaction {
            ops: vec![
                Op::FlushChain {
                    family: Family::Ip,
                    name: "nat-prerouting".into(),
                },
                Op::FlushChain {
                    family: Family::Ip,
                    name: "services".into(),
                },
                Op::DeleteChain {
                    family: Family::Ip,
                    name: "services".into(),
                },
            ],
        })
        .unwrap();
        assert!(!nft_ok(&["list", "table", "ip", "nftproxy"], None).contains("chain services"));
    });
}

#[test]
#[ignore = "privileged (root, network namespaces): cargo test -- --ignored, or `just test-privileged`"]
fn map_value_changes_by_delete_and_add_in_one_batch() {
    require_root();
    let (t, d) = backends_table();
    in_netns(move || {
        let mut a = NetlinkApplier::new().unwrap();
        let mut tx = create_tx(Family::Ip, &t);
        tx.ops.push(Op::AddElements {
            family: Family::Ip,
            set: "cluster-backends".into(),
            def: d.clone(),
            elements: (0..3).map(backend).collect(),
        });
        a.apply(&tx).unwrap();
        let old = backend(1);
        let new = mel(old.key().to_vec(), vec![ip("10.9.9.9"), Value::Port(9090)]);
        a.apply(&Transaction {
            ops: vec![
                Op::DeleteElements {
                    family: Family::Ip,
                    set: "cluster-backends".into(),
                    def: d.clone(),
                    elements: vec![old.clone()].into(),
                },
                Op::AddElements {
                    family: Family::Ip,
                    set: "cluster-backends".into(),
                    def: d.clone(),
                    elements: vec![new.clone()].into(),
                },
            ],
        })
        .unwrap();
        let got = listed(&mut a, Family::Ip, "cluster-backends");
        assert!(
            got.contains(&new) && !got.contains(&old) && got.len() == 3,
            "{got:?}"
        );
        // Adding the new value without deleting the old one is EEXIST: values do not replace.
        let err = a
            .apply(&Transaction {
                ops: vec![Op::AddElements {
                    family: Family::Ip,
                    set: "cluster-backends".into(),
                    def: d,
                    elements: vec![backend(2)].into(),
                }],
            })
            .unwrap_err();
        assert!(matches!(err, ApplyError::Exists { .. }));
    });
}

#[test]
#[ignore = "privileged (root, network namespaces): cargo test -- --ignored, or `just test-privileged`"]
fn interval_elements_delete_like_nft() {
    require_root();
    let (t, text) = ip_case();
    let pod = t.sets["pod-cidrs"].clone();
    let fw = t.sets["fw-allow"].clone();
    let dels = Transaction {
        ops: vec![
            Op::DeleteElements {
                family: Family::Ip,
                set: "pod-cidrs".into(),
                def: pod.clone(),
                elements: vec![
                    el(vec![pfx("192.168.1.0/24")]),
                    el(vec![pfx("255.255.255.0/24")]),
                ]
                .into(),
            },
            Op::DeleteElements {
                family: Family::Ip,
                set: "fw-allow".into(),
                def: fw.clone(),
                elements: vec![el(vec![
                    ip("192.0.2.10"),
                    TCP,
                    Value::Port(80),
                    pfx("203.0.113.0/24"),
                ])]
                .into(),
            },
            Op::AddElements {
                family: Family::Ip,
                set: "pod-cidrs".into(),
                def: pod,
                elements: vec![el(vec![pfx("172.16.0.0/12")])].into(),
            },
            Op::AddElements {
                family: Family::Ip,
                set: "fw-allow".into(),
                def: fw,
                elements: vec![el(vec![
                    ip("192.0.2.12"),
                    SCTP,
                    Value::Port(9),
                    pfx("0.0.0.0/0"),
                ])]
                .into(),
            },
        ],
    };
    let nft_cmds = "delete element ip nftproxy pod-cidrs { 192.168.1.0/24, 255.255.255.0/24 }
delete element ip nftproxy fw-allow { 192.0.2.10 . tcp . 80 . 203.0.113.0/24 }
add element ip nftproxy pod-cidrs { 172.16.0.0/12 }
add element ip nftproxy fw-allow { 192.0.2.12 . sctp . 9 . 0.0.0.0/0 }
";
    let text = text.to_string();
    let t2 = t.clone();
    let by_nft = in_netns(move || {
        nft_ok(&["-f", "-"], Some(&text));
        nft_ok(&["-f", "-"], Some(nft_cmds));
        snapshot(Family::Ip)
    });
    let ours = in_netns(move || {
        let mut a = NetlinkApplier::new().unwrap();
        a.apply(&create_tx(Family::Ip, &t2)).unwrap();
        a.apply(&dels).unwrap();
        assert_eq!(
            listed(&mut a, Family::Ip, "pod-cidrs"),
            [pfx("10.0.0.0/8"), pfx("172.16.0.0/12")]
                .into_iter()
                .map(|p| el(vec![p]))
                .collect()
        );
        snapshot(Family::Ip)
    });
    assert_same(&ours, &by_nft);
}

/// nft adds an `interval end` element at 0 when filling an empty rbtree set; we do the same for
/// sets created or flushed in the same batch, and must not fail when the set turns out to hold
/// intervals already (including one that starts at 0).
#[test]
#[ignore = "privileged (root, network namespaces): cargo test -- --ignored, or `just test-privileged`"]
fn leading_interval_end_is_harmless_on_existing_sets() {
    require_root();
    in_netns(|| {
        let d = def(ty(&[V4]), None, fl(true, false, false));
        let add_set = |elems: Vec<Element>| Transaction {
            ops: vec![
                Op::AddTable(Family::Ip),
                Op::AddSet {
                    family: Family::Ip,
                    name: "cidrs".into(),
                    def: d.clone(),
                },
                Op::AddElements {
                    family: Family::Ip,
                    set: "cidrs".into(),
                    def: d.clone(),
                    elements: elems.into(),
                },
            ],
        };
        let mut a = NetlinkApplier::new().unwrap();
        a.apply(&add_set(vec![el(vec![pfx("0.0.0.0/8")])])).unwrap();
        a.apply(&add_set(vec![el(vec![pfx("10.0.0.0/8")])]))
            .unwrap();
        a.apply(&add_set(vec![el(vec![pfx("11.0.0.0/8")])]))
            .unwrap();
        assert_eq!(
            listed(&mut a, Family::Ip, "cidrs"),
            [pfx("0.0.0.0/8"), pfx("10.0.0.0/8"), pfx("11.0.0.0/8")]
                .into_iter()
                .map(|p| el(vec![p]))
                .collect()
        );
        // Flush, then refill: the end-at-0 element comes back like nft would add it.
        a.apply(&Transaction {
            ops: vec![
                Op::FlushSet {
                    family: Family::Ip,
                    name: "cidrs".into(),
                },
                Op::AddElements {
                    family: Family::Ip,
                    set: "cidrs".into(),
                    def: d.clone(),
                    elements: vec![el(vec![pfx("10.0.0.0/8")])].into(),
                },
            ],
        })
        .unwrap();
        let raw = nl::Socket::open()
            .unwrap()
            .dump_elems(NFPROTO_IPV4, "nftproxy", "cidrs")
            .unwrap();
        assert_eq!(
            raw.iter()
                .filter(|e| e.key == vec![0; 4] && e.flags == 1)
                .count(),
            1,
            "{raw:?}"
        );
        assert_eq!(
            listed(&mut a, Family::Ip, "cidrs"),
            [el(vec![pfx("10.0.0.0/8")])].into_iter().collect()
        );
    });
}

#[test]
#[ignore = "privileged (root, network namespaces): cargo test -- --ignored, or `just test-privileged`"]
fn counters_are_read_back() {
    require_root();
    use Field::*;
    in_netns(|| {
        let out = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(out.success());
        let d = def(ty(&[V4, PROTO, SVC]), None, fl(false, false, true));
        let t = TableBuilder::default()
            .set(
                "no-endpoints",
                d.clone(),
                vec![
                    el(vec![ip("127.0.0.1"), UDP, Value::Port(9999)]),
                    el(vec![ip("127.0.0.1"), TCP, Value::Port(9999)]),
                ],
            )
            .chain(
                "filter-output",
                base(ChainType::Filter, Hook::Output, 0),
                vec![rule(
                    vec![lookup(&[Daddr, L4proto, ThDport], "no-endpoints", false)],
                    Action::Drop,
                )],
            )
            .t;
        let mut a = NetlinkApplier::new().unwrap();
        a.apply(&create_tx(Family::Ip, &t)).unwrap();
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..2 {
            // Dropped in OUTPUT: the send itself fails with EPERM, which is the point.
            let _ = sock.send_to(&[0u8; 10], "127.0.0.1:9999");
        }
        let got = a.list_elements(Family::Ip, "no-endpoints").unwrap();
        let by_proto = |p: Value| {
            got.iter()
                .find(|(e, _)| e.key()[1] == p)
                .and_then(|(_, c)| *c)
                .unwrap()
        };
        assert_eq!(by_proto(UDP), (2, 2 * 38), "two 38-byte IPv4/UDP packets");
        assert_eq!(by_proto(TCP), (0, 0));
    });
}

#[test]
#[ignore = "privileged (root, network namespaces): cargo test -- --ignored, or `just test-privileged`"]
fn cleanup_deletes_both_families_and_is_idempotent() {
    require_root();
    in_netns(|| {
        let mut a = NetlinkApplier::new().unwrap();
        a.apply(&Transaction {
            ops: vec![Op::AddTable(Family::Ip), Op::AddTable(Family::Ip6)],
        })
        .unwrap();
        nft_ok(&["add", "table", "ip", "kube-proxy"], None);
        let g0 = a.generation().unwrap();
        assert_eq!(delete_nftproxy_tables().unwrap(), 2);
        assert!(a.generation().unwrap() != g0);
        assert!(!a.table_exists(Family::Ip).unwrap() && !a.table_exists(Family::Ip6).unwrap());
        assert_eq!(delete_nftproxy_tables().unwrap(), 0);
        assert_eq!(
            delete_tables(&[(Family::Ip, "kube-proxy"), (Family::Ip6, "kube-proxy")]).unwrap(),
            1
        );
        assert_eq!(nft_ok(&["list", "tables"], None).trim(), "");
    });
}

#[test]
fn dumped_expressions_compare_with_built_ones() {
    assert_eq!(
        canonical_expr("[ lookup reg 1 set clusterip 0x0 ]"),
        "[ lookup reg 1 set clusterip ]"
    );
    assert_eq!(
        canonical_expr("[ lookup reg 1 set clusterip 0x1 ]"),
        "[ lookup reg 1 set clusterip 0x1 ]",
        "an inverted lookup stays distinct"
    );
    assert_eq!(
        canonical_expr(
            "[ nat dnat ip addr_min reg 1 addr_max reg 1 proto_min reg 9 proto_max reg 9 flags 0x3 ]"
        ),
        "[ nat dnat ip addr_min reg 1 proto_min reg 9 ]"
    );
    // A real range or other flags are kept.
    assert_eq!(
        canonical_expr("[ nat dnat ip addr_min reg 1 addr_max reg 2 flags 0x1 ]"),
        "[ nat dnat ip addr_min reg 1 addr_max reg 2 ]"
    );
    assert_eq!(
        canonical_expr("[ nat dnat ip addr_min reg 1 flags 0x5 ]"),
        "[ nat dnat ip addr_min reg 1 flags 0x5 ]"
    );
}

#[test]
#[ignore = "privileged (root, network namespaces): cargo test -- --ignored, or `just test-privileged`"]
fn a_split_cold_start_reaches_the_kernel_piece_by_piece() {
    require_root();
    let objs = crate::testutil::cluster_objects();
    let node = objs.node_info(Some("node-a"));
    let cfg = crate::testutil::proxy_config("node-a");
    let out = crate::pipeline::from_objects(&objs, &cfg, &node).expect("compile");
    let full = crate::nft::plan::full(&out.ruleset);
    assert!(crate::nft::plan::splittable(&full, true));
    let owners = crate::nft::compile::Owners::new([&out.state]);
    in_netns(move || {
        let mut a = NetlinkApplier::new().unwrap();
        let before = a.generation().unwrap();
        // As the sync loop commits them: cut on one thread while the pieces before are sent.
        let (give, take) = std::sync::mpsc::sync_channel(2);
        let counted = std::sync::atomic::AtomicUsize::new(0);
        let (full, owners) = (&full, &owners);
        let cut = std::thread::scope(|s| {
            // `move`: the sender goes away when the cutting ends, which ends the pieces.
            let cutter = s.spawn(move || {
                crate::nft::plan::split(full, &|_, set, e| owners.group(set, e), 3, &mut |t| {
                    give.send(t)
                })
            });
            for t in take {
                a.apply(&t).unwrap();
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            cutter.join().unwrap().unwrap()
        });
        let sent = counted.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(sent, cut);
        assert!(sent > 3, "{sent} transactions");
        // One generation per transaction: each was its own commit.
        assert_eq!(a.generation().unwrap(), before.wrapping_add(sent as u32));
        for (family, t) in &out.ruleset.tables {
            for (name, want) in &t.elements {
                assert_eq!(
                    listed(&mut a, *family, name),
                    want.iter().cloned().collect::<BTreeSet<_>>(),
                    "{family:?} set {name}"
                );
            }
            let k = a.read_table(*family, t, None).unwrap().expect("table");
            assert!(
                k.changed_chains.is_empty() && k.missing_sets.is_empty(),
                "{k:?}"
            );
        }
    });
}

#[test]
#[ignore = "privileged (root, network namespaces): cargo test -- --ignored, or `just test-privileged`"]
fn a_failing_piece_stops_the_pieces_after_it() {
    require_root();
    let (t, d) = backends_table();
    in_netns(move || {
        let mut a = NetlinkApplier::new().unwrap();
        let adds = |r: std::ops::Range<u32>| Transaction {
            ops: vec![Op::AddElements {
                family: Family::Ip,
                set: "cluster-backends".into(),
                def: d.clone(),
                elements: r.map(backend).collect(),
            }],
        };
        // The table, two good pieces, one adding an element that exists (EEXIST), one more.
        let pieces = [
            create_tx(Family::Ip, &t),
            adds(0..10),
            adds(10..20),
            adds(15..30),
            adds(30..40),
        ];
        // As the sync loop commits them: in order, stopping at the first failure.
        let mut counted = 0;
        let result = pieces.iter().try_for_each(|p| {
            a.apply(p)?;
            counted += 1;
            Ok::<_, ApplyError>(())
        });
        assert!(
            matches!(result, Err(ApplyError::Exists { .. })),
            "{result:?}"
        );
        assert_eq!(counted, 3);
        // What went in stays, the failed piece changed nothing, the last never went.
        assert_eq!(
            listed(&mut a, Family::Ip, "cluster-backends"),
            (0..20).map(backend).collect::<BTreeSet<_>>()
        );
        // The socket's sequence numbers are still in step: the next commit works.
        a.apply(&adds(20..40)).unwrap();
        assert_eq!(listed(&mut a, Family::Ip, "cluster-backends").len(), 40);
    });
}
