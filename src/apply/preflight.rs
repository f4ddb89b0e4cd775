//! Start-up checks: can this kernel and this process do what nftproxy's ruleset needs?
//!
//! Each feature is probed with a tiny transaction in a throwaway table that the same batch
//! deletes again, so nothing is left behind and nothing of ours is touched. The first missing
//! feature is reported in one line that says what is missing and how to fix it.

use crate::apply::ApplyError;
use crate::net::{Family, Proto};
use crate::nft::ir::{
    Action, BaseChain, ChainType, Decl, Field, FieldType, Hook, Match, Rule, SetDef, SetFlags,
    Value,
};
use crate::nft::tx::{Op, Transaction};

/// Name of the throwaway table the probes use.
pub const PROBE_TABLE: &str = "nftproxy-preflight";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreflightError {
    #[error("missing privilege: nftproxy needs CAP_NET_ADMIN (run as root, or add NET_ADMIN and NET_RAW capabilities): {0}")]
    Privilege(String),
    #[error("kernel lacks {feature} ({modules}): {detail}. Load it (modprobe {modules}) or use a kernel built with it")]
    Feature {
        feature: &'static str,
        modules: &'static str,
        detail: String,
    },
}

struct Feature {
    name: &'static str,
    modules: &'static str,
    chain: ChainType,
    hook: Hook,
    sets: Vec<(&'static str, SetDef)>,
    rule: Rule,
}

fn set(key: Vec<FieldType>, data: Option<Vec<FieldType>>, interval: bool, timeout: bool) -> SetDef {
    SetDef {
        key: Decl::Type(key),
        data: data.map(Decl::Type),
        flags: SetFlags {
            interval,
            timeout,
            counter: false,
        },
        size: timeout.then_some(65535),
        constant: false,
    }
}

fn lookup(key: Vec<Field>, set: &str) -> Match {
    Match::Lookup {
        key,
        set: set.into(),
        negate: false,
    }
}

fn features() -> Vec<Feature> {
    use FieldType::*;
    let entry = vec![Ipv4Addr, InetProto, InetService];
    vec![
        Feature {
            name: "nf_tables",
            modules: "nf_tables",
            chain: ChainType::Filter,
            hook: Hook::Input,
            sets: vec![],
            rule: Rule {
                matches: vec![],
                action: Action::Return,
            },
        },
        Feature {
            name: "connection tracking",
            modules: "nf_conntrack nft_ct",
            chain: ChainType::Filter,
            hook: Hook::Input,
            sets: vec![],
            rule: Rule {
                matches: vec![Match::CtStateNew],
                action: Action::Return,
            },
        },
        Feature {
            name: "fib lookups",
            modules: "nft_fib_ipv4 nft_fib_ipv6",
            chain: ChainType::Filter,
            hook: Hook::Input,
            sets: vec![],
            rule: Rule {
                matches: vec![Match::FibDaddrLocal],
                action: Action::Return,
            },
        },
        Feature {
            name: "reject",
            modules: "nft_reject_ipv4 nft_reject_ipv6",
            chain: ChainType::Filter,
            hook: Hook::Input,
            sets: vec![],
            rule: Rule {
                matches: vec![Match::FibSaddrLocal],
                action: Action::Reject,
            },
        },
        Feature {
            name: "concatenated interval sets",
            modules: "nft_set_pipapo",
            chain: ChainType::Filter,
            hook: Hook::Input,
            sets: vec![(
                "s",
                set(
                    vec![Ipv4Addr, InetProto, InetService, Ipv4Addr],
                    None,
                    true,
                    false,
                ),
            )],
            rule: Rule {
                matches: vec![lookup(
                    vec![Field::Daddr, Field::L4proto, Field::ThDport, Field::Saddr],
                    "s",
                )],
                action: Action::Drop,
            },
        },
        Feature {
            name: "NAT with numgen maps",
            modules: "nf_nat nft_chain_nat nft_nat nft_numgen",
            chain: ChainType::Nat,
            hook: Hook::Prerouting,
            sets: vec![
                ("p", SetDef::plain(Decl::Type(vec![InetProto]))),
                (
                    "m",
                    SetDef {
                        key: Decl::Typeof(vec![
                            Field::Daddr,
                            Field::L4proto,
                            Field::ThDport,
                            Field::Numgen(65536),
                        ]),
                        data: Some(Decl::Typeof(vec![Field::Daddr, Field::ThDport])),
                        ..SetDef::plain(Decl::Type(vec![]))
                    },
                ),
            ],
            rule: Rule {
                matches: vec![lookup(vec![Field::L4proto], "p")],
                action: Action::DnatMap {
                    key: vec![
                        Field::Daddr,
                        Field::L4proto,
                        Field::ThDport,
                        Field::Numgen(3),
                    ],
                    map: "m".into(),
                },
            },
        },
        Feature {
            name: "masquerade",
            modules: "nft_masq",
            chain: ChainType::Nat,
            hook: Hook::Postrouting,
            sets: vec![],
            rule: Rule {
                matches: vec![Match::MarkUnset(1)],
                action: Action::Masquerade,
            },
        },
        Feature {
            name: "dynamic timeout maps (session affinity)",
            modules: "nft_dynset",
            chain: ChainType::Nat,
            hook: Hook::Postrouting,
            sets: vec![
                (
                    "a",
                    set(
                        vec![Ipv4Addr, Ipv4Addr, InetProto, InetService],
                        Some(vec![Ipv4Addr, InetService]),
                        false,
                        true,
                    ),
                ),
                ("e", set(entry, None, false, false)),
            ],
            rule: Rule {
                matches: vec![
                    Match::L4protoIs(Proto::Udp),
                    lookup(
                        vec![Field::CtOrigDaddr, Field::L4proto, Field::CtOrigProtoDst],
                        "e",
                    ),
                ],
                action: Action::UpdateTimeout {
                    set: "a".into(),
                    key: vec![
                        Field::CtOrigSaddr,
                        Field::CtOrigDaddr,
                        Field::L4proto,
                        Field::CtOrigProtoDst,
                    ],
                    timeout_secs: 10800,
                    value: vec![Field::Daddr, Field::ThDport],
                },
            },
        },
    ]
}

/// The probe transaction for one feature (applied with an applier for [`PROBE_TABLE`]).
fn probe_tx(f: &Feature) -> Transaction {
    let fam = Family::Ip;
    let mut ops = vec![Op::AddTable(fam)];
    for (name, def) in &f.sets {
        ops.push(Op::AddSet {
            family: fam,
            name: (*name).into(),
            def: def.clone(),
        });
    }
    ops.push(Op::AddChain {
        family: fam,
        name: "probe".into(),
        base: Some(BaseChain {
            kind: f.chain,
            hook: f.hook,
            priority: -100,
        }),
    });
    ops.push(Op::AddRule {
        family: fam,
        chain: "probe".into(),
        rule: f.rule.clone(),
    });
    // An element proves the set type is accepted, not just declared.
    if let Some((name, def)) = f.sets.iter().find(|(_, d)| d.flags.interval) {
        ops.push(Op::AddElements {
            family: fam,
            set: (*name).into(),
            def: def.clone(),
            elements: crate::nft::ir::Elements::unit(crate::nft::ir::Element::new(
                vec![
                    Value::Addr([192, 0, 2, 1].into()),
                    Value::Proto(Proto::Tcp),
                    Value::Port(80),
                    Value::Prefix(
                        "203.0.113.0/24"
                            .parse()
                            .unwrap_or_else(|_| ipnet::IpNet::default()),
                    ),
                ],
                None,
            )),
        });
    }
    ops.push(Op::DeleteTable(fam));
    Transaction { ops }
}

/// Run every probe through `apply` (the real one applies with a netlink applier for
/// [`PROBE_TABLE`]); the first failure is the answer.
pub fn check(
    apply: &mut dyn FnMut(&Transaction) -> Result<(), ApplyError>,
) -> Result<(), PreflightError> {
    for f in features() {
        match apply(&probe_tx(&f)) {
            Ok(()) => {}
            Err(ApplyError::Unsupported { detail, .. })
                if detail.contains("not permitted")
                    || detail.contains("ermission")
                    || detail.contains("EPERM") =>
            {
                return Err(PreflightError::Privilege(detail))
            }
            Err(e @ ApplyError::Unsupported { .. })
            | Err(e @ ApplyError::Invalid { .. })
            | Err(e @ ApplyError::NotFound { .. }) => {
                return Err(PreflightError::Feature {
                    feature: f.name,
                    modules: f.modules,
                    detail: e.to_string(),
                });
            }
            Err(e @ ApplyError::Io { .. }) if e.to_string().contains("ermission") => {
                return Err(PreflightError::Privilege(e.to_string()))
            }
            Err(e) => {
                return Err(PreflightError::Feature {
                    feature: f.name,
                    modules: f.modules,
                    detail: e.to_string(),
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::fake::FakeApplier;
    use crate::apply::Applier;

    #[test]
    fn probes_are_valid_and_leave_nothing() {
        let mut fake = FakeApplier::new();
        check(&mut |tx| fake.apply(tx)).expect("the fake supports everything");
        assert!(fake.state.tables.is_empty());
    }

    #[test]
    fn a_missing_feature_is_named_with_its_fix() {
        let mut fake = FakeApplier::new();
        let err = check(&mut |tx| {
            let numgen = tx.ops.iter().any(|op| matches!(op, Op::AddRule { rule, .. } if matches!(&rule.action, Action::DnatMap { .. })));
            if numgen {
                return Err(ApplyError::Unsupported { what: "add rule ip nftproxy-preflight probe".into(), detail: "Operation not supported (EOPNOTSUPP)".into() });
            }
            fake.apply(tx)
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel lacks NAT with numgen maps (nf_nat nft_chain_nat nft_nat nft_numgen): add rule ip nftproxy-preflight probe: permission denied or unsupported: Operation not supported (EOPNOTSUPP). Load it (modprobe nf_nat nft_chain_nat nft_nat nft_numgen) or use a kernel built with it"
        );
    }

    #[test]
    fn missing_privilege() {
        let err = check(&mut |_| {
            Err(ApplyError::Unsupported {
                what: "add table".into(),
                detail: "Operation not permitted (EPERM)".into(),
            })
        })
        .unwrap_err();
        assert!(matches!(err, PreflightError::Privilege(_)), "{err}");
        assert!(err
            .to_string()
            .starts_with("missing privilege: nftproxy needs CAP_NET_ADMIN"));
    }
}
