//! Tests of the ctnetlink client: wire format against hand-rolled messages, selection, and a
//! privileged run against the kernel's conntrack table in a fresh namespace.
use super::*;
use crate::testutil::{in_netns, require_root};

// ---- hand-rolled wire helpers, independent of the encoder under test ----

fn h16(v: u16) -> [u8; 2] {
    v.to_ne_bytes()
}

/// One attribute, padded to 4 bytes.
fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&h16((4 + payload.len()) as u16));
    v.extend_from_slice(&h16(ty));
    v.extend_from_slice(payload);
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
    v
}

/// A nested attribute with NLA_F_NESTED, as the kernel emits them.
fn nest(ty: u16, children: &[Vec<u8>]) -> Vec<u8> {
    nest_flags(ty | NLA_F_NESTED, children)
}

/// A nested attribute with the raw type given (older kernels sent nests without the flag).
fn nest_flags(raw_ty: u16, children: &[Vec<u8>]) -> Vec<u8> {
    let body: Vec<u8> = children.concat();
    let mut v = Vec::new();
    v.extend_from_slice(&h16((4 + body.len()) as u16));
    v.extend_from_slice(&h16(raw_ty));
    v.extend_from_slice(&body);
    v
}

/// One netlink message: header + payload.
fn nlmsg(ty: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
    v.extend_from_slice(&h16(ty));
    v.extend_from_slice(&h16(flags));
    v.extend_from_slice(&seq.to_ne_bytes());
    v.extend_from_slice(&0x1234u32.to_ne_bytes()); // our port id, as the kernel fills it
    v.extend_from_slice(payload);
    v
}

fn tuple_v4(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, dport: u16) -> Vec<Vec<u8>> {
    vec![
        nest(
            CTA_TUPLE_IP,
            &[attr(CTA_IP_V4_SRC, &src), attr(CTA_IP_V4_DST, &dst)],
        ),
        nest(
            CTA_TUPLE_PROTO,
            &[
                attr(CTA_PROTO_NUM, &[proto]),
                attr(CTA_PROTO_SRC_PORT, &sport.to_be_bytes()),
                attr(CTA_PROTO_DST_PORT, &dport.to_be_bytes()),
            ],
        ),
    ]
}

/// A conntrack dump message shaped like what the kernel sends (with the attributes this
/// module ignores mixed in).
fn dump_entry_v4(orig: Vec<Vec<u8>>, reply: Vec<Vec<u8>>, extra: &[Vec<u8>]) -> Vec<u8> {
    let mut p = vec![AF_INET, 0, 0, 0];
    p.extend(nest(CTA_TUPLE_ORIG, &orig));
    p.extend(nest(CTA_TUPLE_REPLY, &reply));
    p.extend(attr(3, &0x18eu32.to_be_bytes())); // CTA_STATUS
    p.extend(attr(7, &29u32.to_be_bytes())); // CTA_TIMEOUT
    p.extend(attr(8, &0u32.to_be_bytes())); // CTA_MARK
    p.extend(nest(
        9,
        &[attr(1, &3u64.to_be_bytes()), attr(2, &180u64.to_be_bytes())],
    )); // CTA_COUNTERS_ORIG
    for e in extra {
        p.extend_from_slice(e);
    }
    p.extend(attr(11, &1u32.to_be_bytes())); // CTA_USE
    nlmsg(ct_msg(IPCTNL_MSG_CT_NEW), 0x2, 99, &p) // NLM_F_MULTI
}

fn v4(a: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

fn udp_entry(dst: IpAddr, dport: u16, reply_src: IpAddr) -> CtEntry {
    let addrs = match dst {
        IpAddr::V4(d) => Addrs::V4(Ipv4Addr::new(10, 244, 1, 5), d),
        IpAddr::V6(d) => Addrs::V6("fd00:244::5".parse().expect("addr"), d),
    };
    CtEntry {
        orig: Tuple {
            addrs,
            proto: IPPROTO_UDP,
            ports: Some((41000, dport)),
            zone: None,
        },
        reply_src,
        zone: None,
        id: None,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn flow(dst: Option<&str>, port: u16, keep: &[&str]) -> StaleFlow {
    let dst = dst.map(ip);
    let family = match dst {
        Some(IpAddr::V6(_)) => Family::Ip6,
        _ => Family::Ip,
    };
    StaleFlow {
        dst,
        port,
        family,
        keep: keep.iter().map(|k| ip(k)).collect(),
    }
}

// ---- encoder ----

#[test]
fn delete_message_v4_exact_bytes() {
    let e = CtEntry {
        orig: Tuple {
            addrs: Addrs::V4(v4([10, 0, 0, 1]), v4([10, 96, 0, 10])),
            proto: 17,
            ports: Some((40000, 53)),
            zone: None,
        },
        reply_src: ip("10.244.1.7"),
        zone: None,
        id: Some(0x0102_0304),
    };
    let got = encode_delete(7, &e);

    let mut want = Vec::new();
    want.extend_from_slice(&80u32.to_ne_bytes()); // nlmsg_len
    want.extend_from_slice(&h16(0x0102)); // CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE
    want.extend_from_slice(&h16(0x0005)); // NLM_F_REQUEST | NLM_F_ACK
    want.extend_from_slice(&7u32.to_ne_bytes()); // seq
    want.extend_from_slice(&0u32.to_ne_bytes()); // pid
    want.extend_from_slice(&[2, 0, 0, 0]); // nfgenmsg: AF_INET, v0, res_id 0
    want.extend_from_slice(&h16(52)); // CTA_TUPLE_ORIG, nested
    want.extend_from_slice(&h16(0x8001));
    want.extend_from_slice(&h16(20)); //   CTA_TUPLE_IP, nested
    want.extend_from_slice(&h16(0x8001));
    want.extend_from_slice(&h16(8)); //     CTA_IP_V4_SRC
    want.extend_from_slice(&h16(1));
    want.extend_from_slice(&[10, 0, 0, 1]);
    want.extend_from_slice(&h16(8)); //     CTA_IP_V4_DST
    want.extend_from_slice(&h16(2));
    want.extend_from_slice(&[10, 96, 0, 10]);
    want.extend_from_slice(&h16(28)); //   CTA_TUPLE_PROTO, nested
    want.extend_from_slice(&h16(0x8002));
    want.extend_from_slice(&h16(5)); //     CTA_PROTO_NUM (u8, padded)
    want.extend_from_slice(&h16(1));
    want.extend_from_slice(&[17, 0, 0, 0]);
    want.extend_from_slice(&h16(6)); //     CTA_PROTO_SRC_PORT (be16, padded)
    want.extend_from_slice(&h16(2));
    want.extend_from_slice(&[0x9c, 0x40, 0, 0]);
    want.extend_from_slice(&h16(6)); //     CTA_PROTO_DST_PORT
    want.extend_from_slice(&h16(3));
    want.extend_from_slice(&[0x00, 0x35, 0, 0]);
    want.extend_from_slice(&h16(8)); // CTA_ID (be32)
    want.extend_from_slice(&h16(12));
    want.extend_from_slice(&[1, 2, 3, 4]);
    assert_eq!(got, want);
}

#[test]
fn delete_message_v6_with_zones_round_trips() {
    let orig = Tuple {
        addrs: Addrs::V6(ip6("fd00::1"), ip6("fd00::10")),
        proto: 17,
        ports: Some((40001, 53)),
        zone: Some(3),
    };
    let e = CtEntry {
        orig,
        reply_src: ip("fd00::2"),
        zone: Some(7),
        id: None,
    };
    let buf = encode_delete(0xfffffffe, &e);
    let msgs = split_datagram(&buf).expect("one message");
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].ty, ct_msg(IPCTNL_MSG_CT_DELETE));
    assert_eq!(msgs[0].seq, 0xfffffffe);
    assert_eq!(
        u16::from_ne_bytes([buf[6], buf[7]]),
        NLM_F_REQUEST | NLM_F_ACK
    );
    let p = msgs[0].payload;
    assert_eq!(&p[..4], &[AF_INET6, 0, 0, 0]);
    // Raw top-level attribute types (with flags) and payloads.
    let mut top = Vec::new();
    let mut rest = &p[4..];
    while !rest.is_empty() {
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        top.push((u16::from_ne_bytes([rest[2], rest[3]]), &rest[4..len]));
        rest = &rest[align4(len)..];
    }
    assert_eq!(top.len(), 2, "exactly the tuple and the zone: {top:?}");
    assert_eq!(top[0].0, CTA_TUPLE_ORIG | NLA_F_NESTED);
    assert_eq!(parse_tuple(top[0].1).expect("tuple"), orig);
    assert_eq!(top[1], (CTA_ZONE, &[0u8, 7][..]));
    // Ports big-endian inside the nest; the tuple zone too.
    let needle_port = [6u8, 0, 3, 0, 0, 53, 0, 0];
    assert!(top[0].1.windows(8).any(|w| w == needle_port) || cfg!(target_endian = "big"));
    let needle_zone = [6u8, 0, 3, 0, 0, 3, 0, 0]; // CTA_TUPLE_ZONE = 3, be16 3
    assert!(top[0].1.windows(8).any(|w| w == needle_zone) || cfg!(target_endian = "big"));
}

fn ip6(s: &str) -> Ipv6Addr {
    s.parse().expect("test address")
}

#[test]
fn dump_request_bytes() {
    let plain = encode_dump_request(5, AF_INET6, false);
    let mut want = Vec::new();
    want.extend_from_slice(&20u32.to_ne_bytes());
    want.extend_from_slice(&h16(0x0101)); // CTNETLINK << 8 | IPCTNL_MSG_CT_GET
    want.extend_from_slice(&h16(0x0301)); // NLM_F_REQUEST | NLM_F_DUMP
    want.extend_from_slice(&5u32.to_ne_bytes());
    want.extend_from_slice(&0u32.to_ne_bytes());
    want.extend_from_slice(&[10, 0, 0, 0]);
    assert_eq!(plain, want);

    let filtered = encode_dump_request(5, AF_INET, true);
    let mut want = Vec::new();
    want.extend_from_slice(&48u32.to_ne_bytes());
    want.extend_from_slice(&h16(0x0101));
    want.extend_from_slice(&h16(0x0301));
    want.extend_from_slice(&5u32.to_ne_bytes());
    want.extend_from_slice(&0u32.to_ne_bytes());
    want.extend_from_slice(&[2, 0, 0, 0]);
    want.extend(nest(
        CTA_TUPLE_ORIG,
        &[nest(CTA_TUPLE_PROTO, &[attr(CTA_PROTO_NUM, &[17])])],
    ));
    want.extend(nest(
        CTA_FILTER,
        &[attr(CTA_FILTER_ORIG_FLAGS, &8u32.to_ne_bytes())],
    ));
    assert_eq!(filtered, want);
}

// ---- decoder ----

#[test]
fn parses_a_captured_dump_datagram() {
    // 1: UDP 10.244.1.5:41000 -> 10.96.0.10:53, DNATed to 10.244.2.7:53, zone 7, id.
    let udp = dump_entry_v4(
        tuple_v4([10, 244, 1, 5], [10, 96, 0, 10], 17, 41000, 53),
        tuple_v4([10, 244, 2, 7], [10, 244, 1, 5], 17, 53, 41000),
        &[
            attr(CTA_ID, &0xdead_beefu32.to_be_bytes()),
            attr(CTA_ZONE, &7u16.to_be_bytes()),
        ],
    );
    // 2: TCP entry with protoinfo, nests without NLA_F_NESTED (older kernels).
    let mut tcp_orig = tuple_v4([10, 0, 0, 1], [10, 96, 0, 1], 6, 50000, 443);
    tcp_orig[0] = nest_flags(
        CTA_TUPLE_IP,
        &[
            attr(CTA_IP_V4_SRC, &[10, 0, 0, 1]),
            attr(CTA_IP_V4_DST, &[10, 96, 0, 1]),
        ],
    );
    let mut p = vec![AF_INET, 0, 0, 0];
    p.extend(nest_flags(CTA_TUPLE_ORIG, &tcp_orig));
    p.extend(nest_flags(
        CTA_TUPLE_REPLY,
        &tuple_v4([10, 244, 3, 3], [10, 0, 0, 1], 6, 8443, 50000),
    ));
    p.extend(nest(4, &[nest(1, &[attr(1, &[3])])])); // CTA_PROTOINFO{TCP{STATE}}
    let tcp = nlmsg(ct_msg(IPCTNL_MSG_CT_NEW), 0x2, 99, &p);
    // 3: ICMP entry: no ports.
    let icmp_tuple = |s: [u8; 4], d: [u8; 4]| {
        vec![
            nest(
                CTA_TUPLE_IP,
                &[attr(CTA_IP_V4_SRC, &s), attr(CTA_IP_V4_DST, &d)],
            ),
            nest(
                CTA_TUPLE_PROTO,
                &[
                    attr(CTA_PROTO_NUM, &[1]),
                    attr(4, &7u16.to_be_bytes()),
                    attr(5, &[8]),
                    attr(6, &[0]),
                ],
            ),
        ]
    };
    let icmp = dump_entry_v4(
        icmp_tuple([10, 0, 0, 1], [10, 0, 0, 2]),
        icmp_tuple([10, 0, 0, 2], [10, 0, 0, 1]),
        &[],
    );
    let done = nlmsg(NLMSG_DONE, 0x2, 99, &0i32.to_ne_bytes());
    let datagram = [udp, tcp, icmp, done].concat();

    let msgs = split_datagram(&datagram).expect("split");
    assert_eq!(
        msgs.iter().map(|m| m.ty).collect::<Vec<_>>(),
        vec![0x100, 0x100, 0x100, NLMSG_DONE]
    );
    assert!(msgs.iter().all(|m| m.seq == 99));

    let e = parse_entry(msgs[0].payload).expect("udp entry");
    assert_eq!(
        e,
        CtEntry {
            orig: Tuple {
                addrs: Addrs::V4(v4([10, 244, 1, 5]), v4([10, 96, 0, 10])),
                proto: 17,
                ports: Some((41000, 53)),
                zone: None,
            },
            reply_src: ip("10.244.2.7"),
            zone: Some(7),
            id: Some(0xdead_beef),
        }
    );
    let t = parse_entry(msgs[1].payload).expect("tcp entry");
    assert_eq!(t.orig.proto, 6);
    assert_eq!(t.orig.ports, Some((50000, 443)));
    assert_eq!(t.reply_src, ip("10.244.3.3"));
    let i = parse_entry(msgs[2].payload).expect("icmp entry");
    assert_eq!((i.orig.proto, i.orig.ports), (1, None));
    assert_eq!(ack_errno(msgs[3].payload).expect("done"), 0);

    // What the dump loop would keep for a flow on 10.96.0.10:53 keeping another endpoint.
    let sel = Selector::new(&[flow(Some("10.96.0.10"), 53, &["10.244.9.9"])]).expect("sel");
    assert!(sel.selects(&e));
    assert!(!sel.selects(&t) && !sel.selects(&i));
}

#[test]
fn parses_a_v6_entry() {
    let t6 = |s: &str, d: &str, sp: u16, dp: u16| {
        vec![
            nest(
                CTA_TUPLE_IP,
                &[
                    attr(CTA_IP_V6_SRC, &ip6(s).octets()),
                    attr(CTA_IP_V6_DST, &ip6(d).octets()),
                ],
            ),
            nest(
                CTA_TUPLE_PROTO,
                &[
                    attr(CTA_PROTO_NUM, &[17]),
                    attr(CTA_PROTO_SRC_PORT, &sp.to_be_bytes()),
                    attr(CTA_PROTO_DST_PORT, &dp.to_be_bytes()),
                ],
            ),
            attr(CTA_TUPLE_ZONE, &5u16.to_be_bytes()),
        ]
    };
    let mut p = vec![AF_INET6, 0, 0, 0];
    p.extend(nest(CTA_TUPLE_ORIG, &t6("::1", "fd00::10", 40001, 53)));
    p.extend(nest(CTA_TUPLE_REPLY, &t6("fd00::2", "::1", 5353, 40001)));
    let m = nlmsg(ct_msg(IPCTNL_MSG_CT_NEW), 0x2, 1, &p);
    let msgs = split_datagram(&m).expect("split");
    let e = parse_entry(msgs[0].payload).expect("entry");
    assert_eq!(e.orig.addrs, Addrs::V6(ip6("::1"), ip6("fd00::10")));
    assert_eq!(e.orig.ports, Some((40001, 53)));
    assert_eq!(e.orig.zone, Some(5));
    assert_eq!(e.reply_src, ip("fd00::2"));
    assert_eq!((e.zone, e.id), (None, None));
    // Re-encoded for deletion, the tuple zone travels inside the tuple.
    let del = encode_delete(1, &e);
    let dm = split_datagram(&del).expect("split");
    let (ty, tp) = attrs(&dm[0].payload[4..])
        .next()
        .expect("attr")
        .expect("ok");
    assert_eq!(ty, CTA_TUPLE_ORIG);
    assert_eq!(parse_tuple(tp).expect("tuple"), e.orig);
}

#[test]
fn rejects_malformed_input() {
    // Message length beyond the datagram.
    let mut m = nlmsg(NLMSG_DONE, 0, 1, &0i32.to_ne_bytes());
    m[0] = 200;
    assert!(matches!(
        split_datagram(&m),
        Err(ConntrackError::Malformed(_))
    ));
    // Message length below the header size.
    let mut m = nlmsg(NLMSG_DONE, 0, 1, &0i32.to_ne_bytes());
    m[..4].copy_from_slice(&8u32.to_ne_bytes());
    assert!(split_datagram(&m).is_err());
    // Trailing garbage.
    let mut m = nlmsg(NLMSG_DONE, 0, 1, &0i32.to_ne_bytes());
    m.extend_from_slice(&[1, 2, 3]);
    assert!(split_datagram(&m).is_err());
    // Attribute longer than its message, and attribute length below its header.
    let bad_len = [&[AF_INET, 0, 0, 0][..], &[40, 0, 1, 0x80, 0, 0, 0, 0]].concat();
    assert!(parse_entry(&bad_len).is_err());
    let tiny = [&[AF_INET, 0, 0, 0][..], &[2, 0, 1, 0]].concat();
    assert!(parse_entry(&tiny).is_err());
    // Wrong payload size of an address and of a port.
    let t = [nest(
        CTA_TUPLE_IP,
        &[
            attr(CTA_IP_V4_SRC, &[1, 2, 3]),
            attr(CTA_IP_V4_DST, &[1, 2, 3, 4]),
        ],
    )]
    .concat();
    assert!(parse_tuple(&t).is_err());
    let t = [
        nest(
            CTA_TUPLE_IP,
            &[
                attr(CTA_IP_V4_SRC, &[1, 2, 3, 4]),
                attr(CTA_IP_V4_DST, &[1, 2, 3, 4]),
            ],
        ),
        nest(
            CTA_TUPLE_PROTO,
            &[
                attr(CTA_PROTO_NUM, &[17]),
                attr(CTA_PROTO_SRC_PORT, &[0, 0, 53]),
            ],
        ),
    ]
    .concat();
    assert!(parse_tuple(&t).is_err());
    // Mixed families, missing protocol, missing reply tuple, family mismatch with nfgenmsg.
    let t = [nest(
        CTA_TUPLE_IP,
        &[
            attr(CTA_IP_V4_SRC, &[1, 2, 3, 4]),
            attr(CTA_IP_V6_DST, &[0; 16]),
        ],
    )]
    .concat();
    assert!(parse_tuple(&t).is_err());
    let t = [nest(
        CTA_TUPLE_IP,
        &[
            attr(CTA_IP_V4_SRC, &[1, 2, 3, 4]),
            attr(CTA_IP_V4_DST, &[1, 2, 3, 4]),
        ],
    )]
    .concat();
    assert!(parse_tuple(&t).is_err());
    let mut p = vec![AF_INET, 0, 0, 0];
    p.extend(nest(
        CTA_TUPLE_ORIG,
        &tuple_v4([1, 1, 1, 1], [2, 2, 2, 2], 17, 1, 2),
    ));
    assert!(parse_entry(&p).is_err());
    p[0] = AF_INET6;
    p.extend(nest(
        CTA_TUPLE_REPLY,
        &tuple_v4([2, 2, 2, 2], [1, 1, 1, 1], 17, 2, 1),
    ));
    assert!(parse_entry(&p).is_err());
    p[0] = AF_INET;
    assert!(parse_entry(&p).is_ok());
    assert!(parse_entry(&[2, 0]).is_err());
    assert!(ack_errno(&[0, 0]).is_err());
}

#[test]
fn ack_codes() {
    assert_eq!(
        ack_errno(&(-libc::ENOENT).to_ne_bytes()).expect("ack"),
        libc::ENOENT
    );
    let full = nlmsg(
        NLMSG_ERROR,
        0,
        3,
        &[(-libc::EPERM).to_ne_bytes().to_vec(), vec![0; 16]].concat(),
    );
    let m = split_datagram(&full).expect("split");
    assert_eq!((m[0].ty, m[0].seq), (NLMSG_ERROR, 3));
    assert_eq!(ack_errno(m[0].payload).expect("ack"), libc::EPERM);
}

// ---- selection ----

#[test]
fn selects_only_matching_udp_entries() {
    let sel =
        Selector::new(&[flow(Some("10.96.0.10"), 53, &["10.244.1.1", "10.244.1.2"])]).expect("sel");
    let e = |dst: &str, port: u16, reply: &str| udp_entry(ip(dst), port, ip(reply));
    assert!(
        sel.selects(&e("10.96.0.10", 53, "10.244.9.9")),
        "dead endpoint"
    );
    assert!(
        sel.selects(&e("10.96.0.10", 53, "10.96.0.10")),
        "never DNATed (no endpoints then)"
    );
    assert!(
        !sel.selects(&e("10.96.0.10", 53, "10.244.1.2")),
        "kept endpoint"
    );
    assert!(
        !sel.selects(&e("10.96.0.11", 53, "10.244.9.9")),
        "other destination"
    );
    assert!(
        !sel.selects(&e("10.96.0.10", 54, "10.244.9.9")),
        "other port"
    );
    let mut tcp = e("10.96.0.10", 53, "10.244.9.9");
    tcp.orig.proto = 6;
    assert!(!sel.selects(&tcp), "TCP");
    let mut portless = e("10.96.0.10", 53, "10.244.9.9");
    portless.orig.ports = None;
    assert!(!sel.selects(&portless));
    // Source port 53 is not destination port 53.
    let mut swapped = e("10.96.0.10", 9999, "10.244.9.9");
    swapped.orig.ports = Some((53, 9999));
    assert!(!sel.selects(&swapped));
    // Families stay apart even for the same port.
    assert!(!sel.selects(&udp_entry(ip("fd00::10"), 53, ip("fd00::9"))));
    // No flows, nothing selected, no family dumped.
    let none = Selector::new(&[]).expect("sel");
    assert!(!none.selects(&e("10.96.0.10", 53, "10.244.9.9")));
    assert!(none.families().is_empty());
}

#[test]
fn wildcard_destination_and_precedence() {
    let sel = Selector::new(&[
        flow(None, 30053, &["10.244.1.1"]),
        flow(Some("10.96.0.20"), 30053, &["10.244.7.7"]),
        flow(Some("10.96.0.20"), 30053, &["10.244.8.8"]),
    ])
    .expect("sel");
    let e = |dst: &str, reply: &str| udp_entry(ip(dst), 30053, ip(reply));
    assert!(
        sel.selects(&e("192.168.1.10", "10.244.9.9")),
        "NodePort on any address"
    );
    assert!(
        sel.selects(&e("10.0.0.1", "10.0.0.1")),
        "NodePort, not DNATed"
    );
    assert!(
        !sel.selects(&e("192.168.1.10", "10.244.1.1")),
        "NodePort kept endpoint"
    );
    // 10.96.0.20:30053 is judged by its own flows only, whose keep lists are merged.
    assert!(!sel.selects(&e("10.96.0.20", "10.244.7.7")));
    assert!(!sel.selects(&e("10.96.0.20", "10.244.8.8")));
    assert!(sel.selects(&e("10.96.0.20", "10.244.1.1")));
    assert_eq!(sel.families(), vec![AF_INET]);

    let both = Selector::new(&[
        flow(Some("fd00::10"), 53, &[]),
        flow(Some("10.96.0.10"), 53, &[]),
    ])
    .expect("sel");
    assert_eq!(both.families(), vec![AF_INET, AF_INET6]);
    assert!(both.selects(&udp_entry(ip("fd00::10"), 53, ip("fd00::9"))));
}

#[test]
fn invalid_flows_are_rejected_up_front() {
    let mut f = flow(Some("10.96.0.10"), 53, &[]);
    f.family = Family::Ip6;
    assert!(matches!(
        Selector::new(&[flow(None, 1, &[]), f]),
        Err(ConntrackError::InvalidFlow { .. })
    ));
    assert!(Selector::new(&[flow(None, 0, &[])]).is_err());
}

#[test]
fn fake_records_calls() {
    let mut f = FakeConntrack::new();
    let flows = vec![flow(Some("10.96.0.10"), 53, &["10.244.1.1"])];
    assert_eq!(f.delete_stale(&flows).expect("fake"), 0);
    assert_eq!(f.delete_stale(&[]).expect("fake"), 0);
    assert_eq!(f.calls, vec![flows, vec![]]);
    let boxed: Box<dyn Conntrack> = Box::new(FakeConntrack::new());
    drop(boxed);
}
fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd}: {e}"));
    if let Some(s) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(s.as_bytes())
            .expect("write stdin");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One line of `conntrack -L`: protocol, original tuple, reply source, zone.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CtLine {
    proto: String,
    src: String,
    dst: String,
    sport: String,
    dport: String,
    reply_src: String,
    zone: Option<String>,
}

fn ct_list(family: &str) -> Vec<CtLine> {
    run("conntrack", &["-L", "-f", family], None)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let toks: Vec<&str> = l.split_whitespace().collect();
            let vals = |key: &str| -> Vec<String> {
                toks.iter()
                    .filter_map(|t| t.strip_prefix(key))
                    .map(str::to_string)
                    .collect()
            };
            let get = |key: &str, i: usize| vals(key).get(i).cloned().unwrap_or_default();
            CtLine {
                proto: toks[0].to_string(),
                src: get("src=", 0),
                dst: get("dst=", 0),
                sport: get("sport=", 0),
                dport: get("dport=", 0),
                reply_src: get("src=", 1),
                zone: vals("zone=").first().cloned(),
            }
        })
        .collect()
}

/// (proto, orig dst, orig sport, orig dport) of every listed entry.
fn keys(lines: &[CtLine]) -> Vec<(String, String, String, String)> {
    let mut k: Vec<_> = lines
        .iter()
        .map(|l| {
            (
                l.proto.clone(),
                l.dst.clone(),
                l.sport.clone(),
                l.dport.clone(),
            )
        })
        .collect();
    k.sort();
    k
}

fn key(proto: &str, dst: &str, sport: u16, dport: u16) -> (String, String, String, String) {
    (
        proto.into(),
        dst.into(),
        sport.to_string(),
        dport.to_string(),
    )
}

const RULESET: &str = r#"
table ip nftproxy_ct_test {
chain raw {
    type filter hook output priority raw; policy accept;
    udp sport 40003 ct zone set 7
}
chain out {
    type filter hook output priority 0; policy accept;
    ct state new accept
}
chain nat {
    type nat hook output priority -100; policy accept;
    ip daddr 10.96.0.10 udp dport 53 udp sport 40001 dnat to 127.0.0.2:5353
    ip daddr 10.96.0.10 udp dport 53 udp sport 40002 dnat to 127.0.0.3:5353
    ip daddr 10.96.0.10 udp dport 53 udp sport 40003 dnat to 127.0.0.2:5353
}
}
table ip6 nftproxy_ct_test {
chain out {
    type filter hook output priority 0; policy accept;
    ct state new accept
}
chain nat {
    type nat hook output priority -100; policy accept;
    ip6 daddr fd00::10 udp dport 53 udp sport 40001 dnat to [fd00::2]:5353
    ip6 daddr fd00::10 udp dport 53 udp sport 40002 dnat to [fd00::3]:5353
}
}
"#;

#[test]
#[ignore = "privileged (root, network namespaces): cargo test -- --ignored, or `just test-privileged`"]
fn privileged_deletes_exactly_the_stale_udp_entries() {
    require_root();
    in_netns(|| {
        use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
        run("ip", &["link", "set", "lo", "up"], None);
        run("ip", &["addr", "add", "10.96.0.10/32", "dev", "lo"], None);
        for a in ["fd00::10/128", "fd00::2/128", "fd00::3/128"] {
            run("ip", &["-6", "addr", "add", a, "dev", "lo", "nodad"], None);
        }
        run("nft", &["-f", "-"], Some(RULESET));

        // Receivers, so no ICMP errors muddle the table (127.0.0.0/8 is all local on lo).
        let receivers: Vec<UdpSocket> = [
            "127.0.0.2:5353",
            "127.0.0.3:5353",
            "10.96.0.10:53",
            "10.96.0.10:54",
            "127.0.0.4:30053",
            "127.0.0.5:30053",
            "[fd00::2]:5353",
            "[fd00::3]:5353",
            "[fd00::10]:54",
        ]
        .iter()
        .map(|a| UdpSocket::bind(a).unwrap_or_else(|e| panic!("bind {a}: {e}")))
        .collect();
        let send = |src: &str, dst: &str| {
            let s = UdpSocket::bind(src).unwrap_or_else(|e| panic!("bind {src}: {e}"));
            s.send_to(b"x", dst)
                .unwrap_or_else(|e| panic!("send {src} -> {dst}: {e}"));
        };
        send("127.0.0.1:40001", "10.96.0.10:53"); // DNAT -> .2: stale
        send("127.0.0.1:40002", "10.96.0.10:53"); // DNAT -> .3: kept
        send("127.0.0.1:40003", "10.96.0.10:53"); // zone 7, DNAT -> .2: stale
        send("127.0.0.1:40004", "10.96.0.10:53"); // not DNATed (reply src = VIP): stale
        send("127.0.0.1:40011", "127.0.0.4:30053"); // "NodePort", reply .4: stale
        send("127.0.0.1:40012", "127.0.0.5:30053"); // "NodePort", reply .5: kept
        send("127.0.0.1:40021", "127.0.0.2:5353"); // other port: untouched
        send("127.0.0.1:40031", "10.96.0.10:54"); // same VIP, other port: untouched
        send("[::1]:40001", "[fd00::10]:53"); // DNAT -> fd00::2: stale (v6 call)
        send("[::1]:40002", "[fd00::10]:53"); // DNAT -> fd00::3: kept
        send("[::1]:40031", "[fd00::10]:54"); // other port: untouched
                                              // TCP to the service address and port: never touched.
        let listener = TcpListener::bind("10.96.0.10:53").expect("tcp listen");
        let tcp_addr: SocketAddr = "10.96.0.10:53".parse().expect("addr");
        let _tcp = TcpStream::connect_timeout(&tcp_addr, std::time::Duration::from_secs(5))
            .expect("tcp connect");
        let _accepted = listener.accept().expect("tcp accept");

        let before = ct_list("ipv4");
        let stale_v4 = [
            key("udp", "10.96.0.10", 40001, 53),
            key("udp", "10.96.0.10", 40003, 53),
            key("udp", "10.96.0.10", 40004, 53),
            key("udp", "127.0.0.4", 40011, 30053),
        ];
        let kept_v4 = [
            key("udp", "10.96.0.10", 40002, 53),
            key("udp", "127.0.0.5", 40012, 30053),
            key("udp", "127.0.0.2", 40021, 5353),
            key("udp", "10.96.0.10", 40031, 54),
        ];
        let kb = keys(&before);
        for k in stale_v4.iter().chain(&kept_v4) {
            assert!(
                kb.contains(k),
                "setup: {k:?} missing from conntrack -L: {before:#?}"
            );
        }
        assert!(before
            .iter()
            .any(|l| l.proto == "tcp" && l.dst == "10.96.0.10" && l.dport == "53"));
        let zoned = before
            .iter()
            .find(|l| l.sport == "40003")
            .expect("zoned entry");
        assert_eq!(zoned.zone.as_deref(), Some("7"));
        let dnat = before
            .iter()
            .find(|l| l.sport == "40001")
            .expect("dnat entry");
        assert_eq!(dnat.reply_src, "127.0.0.2");
        let v6_before = ct_list("ipv6");
        assert_eq!(keys(&v6_before).len(), 3, "{v6_before:#?}");

        let mut ct = NetlinkConntrack::new().expect("netlink socket");
        // A delete whose id does not match (as when the tuple was reused by a newer entry
        // since the dump) and one of a tuple that does not exist: the kernel answers ENOENT
        // to both, which is neither an error nor a deletion, and the live entry survives.
        let mut reused = udp_entry(ip("10.96.0.10"), 53, ip("127.0.0.3"));
        reused.orig.addrs = Addrs::V4(v4([127, 0, 0, 1]), v4([10, 96, 0, 10]));
        reused.orig.ports = Some((40002, 53));
        reused.id = Some(1);
        let mut missing = reused.clone();
        missing.orig.ports = Some((40099, 53));
        missing.id = None;
        assert_eq!(
            ct.delete(&[reused, missing]).expect("ENOENT is no error"),
            0
        );
        assert_eq!(keys(&ct_list("ipv4")), kb, "nothing deleted");
        let flows_v4 = vec![
            StaleFlow {
                dst: Some(ip("10.96.0.10")),
                port: 53,
                family: Family::Ip,
                keep: vec![ip("127.0.0.3")],
            },
            StaleFlow {
                dst: None,
                port: 30053,
                family: Family::Ip,
                keep: vec![ip("127.0.0.5")],
            },
        ];
        assert_eq!(ct.delete_stale(&flows_v4).expect("delete v4"), 4);
        assert!(ct.filter_ok, "this kernel accepts the UDP-only dump filter");

        let after = ct_list("ipv4");
        let mut want: Vec<_> = before
            .iter()
            .filter(|l| !stale_v4.contains(&key_of(l)))
            .cloned()
            .collect();
        want.sort_by_key(key_of);
        let mut got = after.clone();
        got.sort_by_key(key_of);
        assert_eq!(
            keys(&got),
            keys(&want),
            "exactly the stale v4 entries are gone"
        );
        assert_eq!(
            keys(&ct_list("ipv6")),
            keys(&v6_before),
            "a v4 call leaves v6 alone"
        );

        // Idempotent: nothing left to delete.
        assert_eq!(ct.delete_stale(&flows_v4).expect("delete v4 again"), 0);
        assert_eq!(keys(&ct_list("ipv4")), keys(&after));

        // IPv6, through the unfiltered dump path this time.
        ct.filter_ok = false;
        let flows_v6 = vec![StaleFlow {
            dst: Some(ip("fd00::10")),
            port: 53,
            family: Family::Ip6,
            keep: vec![ip("fd00::3")],
        }];
        assert_eq!(ct.delete_stale(&flows_v6).expect("delete v6"), 1);
        let v6_after = keys(&ct_list("ipv6"));
        assert_eq!(
            v6_after,
            vec![
                key("udp", "fd00::10", 40002, 53),
                key("udp", "fd00::10", 40031, 54),
            ],
            "exactly the stale v6 entry is gone"
        );
        assert_eq!(
            keys(&ct_list("ipv4")),
            keys(&after),
            "a v6 call leaves v4 alone"
        );
        // Empty call: no socket traffic, nothing deleted.
        assert_eq!(ct.delete_stale(&[]).expect("empty"), 0);
        drop(receivers);
    });
}

fn key_of(l: &CtLine) -> (String, String, String, String) {
    (
        l.proto.clone(),
        l.dst.clone(),
        l.sport.clone(),
        l.dport.clone(),
    )
}
