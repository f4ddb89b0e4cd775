//! Unit tests of the wrapper that need no privileges: message framing, bounds, expression
//! encoding (checked against the text `nft --debug=netlink` prints), error report parsing.

use super::*;

fn hdr(msg: &[u8]) -> (u32, u16, u16, u32) {
    (
        u32::from_ne_bytes(msg[0..4].try_into().unwrap()),
        u16::from_ne_bytes(msg[4..6].try_into().unwrap()),
        u16::from_ne_bytes(msg[6..8].try_into().unwrap()),
        u32::from_ne_bytes(msg[8..12].try_into().unwrap()),
    )
}

#[test]
fn batch_is_framed_by_begin_and_end_with_consecutive_seqs() {
    let mut b = Batch::new(100);
    let t = Table::new(consts::NFPROTO_IPV4, "nftproxy").unwrap();
    let c = Chain::new(consts::NFPROTO_IPV4, "nftproxy", "services").unwrap();
    let s1 = b
        .push(
            Cmd::NewTable,
            consts::NFPROTO_IPV4,
            flags::NLM_F_CREATE,
            Payload::Table(&t),
            7,
        )
        .unwrap();
    let s2 = b
        .push(
            Cmd::NewChain,
            consts::NFPROTO_IPV4,
            flags::NLM_F_CREATE,
            Payload::Chain(&c),
            8,
        )
        .unwrap();
    b.end();
    assert_eq!((b.begin_seq(), s1, s2), (100, 101, 102));
    assert_eq!(b.seq_span(), 4);
    assert_eq!(b.message_count(), 2);
    assert!(
        b.push(Cmd::NewTable, 2, 0, Payload::Table(&t), 0).is_err(),
        "no push after end"
    );

    let bytes = b.as_bytes();
    assert_eq!(bytes.len() % 4, 0);
    // BEGIN: NFNL_MSG_BATCH_BEGIN (16) with res_id = NFNL_SUBSYS_NFTABLES in network order.
    let (len, ty, _, seq) = hdr(bytes);
    assert_eq!((len, ty, seq), (20, 16, 100));
    assert_eq!(&bytes[16..20], &[0, 0, 0, 10]);
    // The table message: subsystem 10, NEWTABLE, REQUEST|CREATE.
    let rec = b.record(s1).unwrap();
    assert_eq!(rec.tag, 7);
    let msg = b.message_bytes(rec);
    let (len, ty, fl, seq) = hdr(msg);
    assert_eq!(len as usize, msg.len());
    assert_eq!(
        (ty, fl, seq),
        (
            (10 << 8) | Cmd::NewTable as u16,
            flags::NLM_F_REQUEST | flags::NLM_F_CREATE,
            101
        )
    );
    assert_eq!(msg[16], 2, "nfgen_family");
    // NFTA_TABLE_NAME = 1
    let attrs = message_attrs(msg);
    assert_eq!(attrs[0].0, 1);
    assert_eq!(attrs[0].2, b"nftproxy\0");
    // END closes the buffer.
    let end = &bytes[bytes.len() - 20..];
    let (len, ty, _, seq) = hdr(end);
    assert_eq!((len, ty, seq), (20, 17, 103));
    assert_eq!(b.record(s2).unwrap().tag, 8);
    assert!(b.record(100).is_none() && b.record(103).is_none());
}

#[test]
fn names_and_values_are_validated_before_reaching_libnftnl() {
    assert!(matches!(Table::new(2, ""), Err(NlError::BadName(_))));
    assert!(matches!(Table::new(2, "a\0b"), Err(NlError::BadName(_))));
    assert!(matches!(
        Chain::new(2, "t", &"x".repeat(256)),
        Err(NlError::BadName(_))
    ));
    assert!(Chain::new(2, "t", &"x".repeat(255)).is_ok());
    let mut e = SetElem::new().unwrap();
    assert!(matches!(
        e.set_key(&[0u8; 65]),
        Err(NlError::TooLong { .. })
    ));
    assert!(e.set_key(&[0u8; 64]).is_ok());
    assert!(e.set_data(&[]).is_err());
    let mut s = Set::new(2, "t", "s").unwrap();
    assert!(s.set_userdata(&[0u8; 257]).is_err());
    assert!(s.set_desc_concat(&[4; 16]).is_err());
    assert!(s.set_desc_concat(&[4, 0]).is_err());
    assert!(Expr::cmp(1, 0, &[0u8; 65]).is_err());
    assert!(Expr::bitwise(1, 1, &[0u8; 4], &[0u8; 3]).is_err());
}

#[test]
fn element_lists_stay_within_their_bound() {
    // Worst case values everywhere: 64-byte key, key end and data plus user data.
    let mut s = Set::new(consts::NFPROTO_IPV6, &"t".repeat(255), &"s".repeat(255)).unwrap();
    s.set_id(3);
    while s.elems_bound() < ELEMS_PER_MSG_BUDGET {
        let mut e = SetElem::new().unwrap();
        e.set_key(&[0xab; 64]).unwrap();
        e.set_key_end(&[0xcd; 64]).unwrap();
        e.set_data(&[0xef; 64]).unwrap();
        e.set_flags(1);
        e.set_userdata(&[1, 4, 1, 0, 0, 0]).unwrap();
        s.push_elem(e);
    }
    let mut b = Batch::new(1);
    let seq = b
        .push(
            Cmd::NewSetElem,
            consts::NFPROTO_IPV6,
            0,
            Payload::SetElems(&s),
            0,
        )
        .unwrap();
    let rec = *b.record(seq).unwrap();
    assert!(
        rec.len <= s.elems_bound(),
        "{} > {}",
        rec.len,
        s.elems_bound()
    );
    assert!(
        rec.len < 65536,
        "one element list must fit a u16 nest length"
    );
    // NFTA_SET_ELEM_LIST_ELEMENTS holds one nest per element.
    let msg = b.message_bytes(&rec);
    let (_, list_off, _) = message_attrs(msg).into_iter().find(|a| a.0 == 3).unwrap();
    assert_eq!(nested_attrs(msg, list_off).len(), s.elem_count());
}

#[test]
fn rules_with_many_expressions_stay_within_their_bound() {
    let mut r = Rule::new(2, &"t".repeat(255), &"c".repeat(255)).unwrap();
    for i in 0..200 {
        r.push(Expr::lookup(1, Some(1), &"s".repeat(255), Some(i), true).unwrap());
        r.push(Expr::dynset(1, 1, Some(2), Some(1000), &"d".repeat(255), Some(i)).unwrap());
        r.push(Expr::cmp(1, 0, &[0xff; 64]).unwrap());
    }
    let mut b = Batch::new(1);
    let seq = b.push(Cmd::NewRule, 2, 0, Payload::Rule(&r), 0).unwrap();
    assert!(b.record(seq).unwrap().len <= r.bound);
}

/// The text libnftnl prints for each expression must be what `nft --debug=netlink` showed for
/// the same statement (captured with nft 1.0.6).
#[test]
fn expressions_print_like_nft_debug_output() {
    use consts::*;
    let cases: Vec<(Expr, &str)> = vec![
        (
            Expr::payload_load(NFT_PAYLOAD_NETWORK_HEADER, 16, 4, 1).unwrap(),
            "[ payload load 4b @ network header + 16 => reg 1 ]",
        ),
        (
            Expr::payload_load(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, 10).unwrap(),
            "[ payload load 2b @ transport header + 2 => reg 10 ]",
        ),
        (
            Expr::meta_load(NFT_META_L4PROTO, 9).unwrap(),
            "[ meta load l4proto => reg 9 ]",
        ),
        (
            Expr::meta_set(NFT_META_MARK, 1).unwrap(),
            "[ meta set mark with reg 1 ]",
        ),
        (
            Expr::ct_load(NFT_CT_STATE, None, 1).unwrap(),
            "[ ct load state => reg 1 ]",
        ),
        (
            Expr::ct_load(NFT_CT_SRC_IP, Some(IP_CT_DIR_ORIGINAL), 1).unwrap(),
            "[ ct load src_ip => reg 1 , dir original ]",
        ),
        (
            Expr::ct_load(NFT_CT_PROTO_DST, Some(IP_CT_DIR_ORIGINAL), 11).unwrap(),
            "[ ct load proto_dst => reg 11 , dir original ]",
        ),
        (
            Expr::bitwise(1, 1, &0xffffbfffu32.to_ne_bytes(), &0x4000u32.to_ne_bytes()).unwrap(),
            "[ bitwise reg 1 = ( reg 1 & 0xffffbfff ) ^ 0x00004000 ]",
        ),
        (
            Expr::cmp(1, NFT_CMP_NEQ, &0u32.to_ne_bytes()).unwrap(),
            "[ cmp neq reg 1 0x00000000 ]",
        ),
        (
            Expr::cmp(1, NFT_CMP_EQ, &[6]).unwrap(),
            "[ cmp eq reg 1 0x00000006 ]",
        ),
        (
            Expr::byteorder(9, 9, NFT_BYTEORDER_HTON, 1, 2).unwrap(),
            "[ byteorder reg 9 = hton(reg 9, 2, 1) ]",
        ),
        (
            Expr::lookup(1, None, "pod-cidrs", Some(1), true).unwrap(),
            "[ lookup reg 1 set pod-cidrs 0x1 ]",
        ),
        (
            Expr::lookup(1, Some(1), "backends", Some(2), false).unwrap(),
            "[ lookup reg 1 set backends dreg 1 ]",
        ),
        (
            Expr::verdict(NFT_JUMP, Some("services")).unwrap(),
            "[ immediate reg 0 jump -> services ]",
        ),
        (
            Expr::verdict(NFT_GOTO, Some("masq")).unwrap(),
            "[ immediate reg 0 goto -> masq ]",
        ),
        (
            Expr::verdict(NFT_RETURN, None).unwrap(),
            "[ immediate reg 0 return ]",
        ),
        (
            Expr::verdict(NF_DROP, None).unwrap(),
            "[ immediate reg 0 drop ]",
        ),
        (
            Expr::fib(NFTA_FIB_F_DADDR, NFT_FIB_RESULT_ADDRTYPE, 1).unwrap(),
            "[ fib daddr type => reg 1 ]",
        ),
        (
            Expr::numgen(11, 3, NFT_NG_RANDOM, 0).unwrap(),
            "[ numgen reg 11 = random mod 3 ]",
        ),
        (
            Expr::masq(NF_NAT_RANGE_PROTO_RANDOM_FULLY).unwrap(),
            "[ masq flags 0x10 ]",
        ),
        (
            Expr::nat(NFT_NAT_DNAT, NFPROTO_IPV4, 1, Some(9)).unwrap(),
            "[ nat dnat ip addr_min reg 1 proto_min reg 9 ]",
        ),
        (
            Expr::nat(NFT_NAT_DNAT, NFPROTO_IPV6, 1, Some(2)).unwrap(),
            "[ nat dnat ip6 addr_min reg 1 proto_min reg 2 ]",
        ),
        (
            Expr::dynset(
                NFT_DYNSET_OP_UPDATE,
                1,
                Some(2),
                Some(10_800_000),
                "affinity",
                Some(3),
            )
            .unwrap(),
            "[ dynset update reg_key 1 set affinity sreg_data 2 timeout 10800000ms ]",
        ),
        (
            Expr::reject(NFT_REJECT_ICMP_UNREACH, ICMP_PORT_UNREACH).unwrap(),
            "[ reject type 0 code 3 ]",
        ),
        (
            Expr::reject(NFT_REJECT_ICMP_UNREACH, ICMPV6_PORT_UNREACH).unwrap(),
            "[ reject type 0 code 4 ]",
        ),
    ];
    for (e, want) in cases {
        assert_eq!(e.to_text(), want);
    }
}

#[test]
fn rule_owns_its_expressions_and_lists_them_in_order() {
    let mut r = Rule::new(2, "nftproxy", "c").unwrap();
    r.push(Expr::meta_load(consts::NFT_META_L4PROTO, 1).unwrap());
    r.push(Expr::cmp(1, consts::NFT_CMP_EQ, &[17]).unwrap());
    assert_eq!(
        r.expr_texts(),
        vec![
            "[ meta load l4proto => reg 1 ]",
            "[ cmp eq reg 1 0x00000011 ]"
        ]
    );
}

fn error_report(errno: i32, seq: u32, capped: bool, tlvs: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut orig = Vec::new();
    orig.extend_from_slice(&36u32.to_ne_bytes());
    orig.extend_from_slice(&((10u16 << 8) | 12).to_ne_bytes());
    orig.extend_from_slice(&0x601u16.to_ne_bytes());
    orig.extend_from_slice(&seq.to_ne_bytes());
    orig.extend_from_slice(&0u32.to_ne_bytes());
    if !capped {
        orig.extend_from_slice(&[0u8; 20]);
    }
    let mut body = (-errno).to_ne_bytes().to_vec();
    body.extend_from_slice(&orig);
    for (ty, v) in tlvs {
        body.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
        body.extend_from_slice(&ty.to_ne_bytes());
        body.extend_from_slice(v);
        while !body.len().is_multiple_of(4) {
            body.push(0);
        }
    }
    let mut fl = if tlvs.is_empty() {
        0
    } else {
        flags::NLM_F_ACK_TLVS
    };
    if capped {
        fl |= flags::NLM_F_CAPPED;
    }
    let mut msg = ((16 + body.len()) as u32).to_ne_bytes().to_vec();
    msg.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
    msg.extend_from_slice(&fl.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&77u32.to_ne_bytes());
    msg.extend_from_slice(&body);
    msg
}

#[test]
fn error_reports_are_parsed_with_extended_ack() {
    let plain = error_report(libc::EEXIST, 42, false, &[]);
    let e = parse_error(&plain).unwrap().unwrap();
    assert_eq!(
        e,
        KernelError {
            errno: libc::EEXIST,
            seq: 42,
            msg: None,
            bad_attr_offset: None
        }
    );

    let capped = error_report(
        libc::ENOENT,
        43,
        true,
        &[
            (NLMSGERR_ATTR_MSG, b"no such set\0".to_vec()),
            (NLMSGERR_ATTR_OFFS, 44u32.to_ne_bytes().to_vec()),
        ],
    );
    let e = parse_error(&capped).unwrap().unwrap();
    assert_eq!(
        (e.errno, e.seq, e.msg.as_deref(), e.bad_attr_offset),
        (libc::ENOENT, 43, Some("no such set"), Some(44))
    );
    assert!(e.to_string().contains("No such file or directory"));

    let uncapped = error_report(
        libc::EBUSY,
        44,
        false,
        &[(NLMSGERR_ATTR_OFFS, 28u32.to_ne_bytes().to_vec())],
    );
    assert_eq!(
        parse_error(&uncapped).unwrap().unwrap().bad_attr_offset,
        Some(28)
    );

    // An ack (error 0) is not an error.
    let mut ack = error_report(1, 45, true, &[]);
    ack[16..20].copy_from_slice(&0i32.to_ne_bytes());
    assert_eq!(parse_error(&ack).unwrap(), None);

    // Several messages in one datagram are split; garbage lengths are rejected.
    let mut two = plain.clone();
    two.extend_from_slice(&capped);
    let msgs = split_messages(&two).unwrap();
    assert_eq!(
        msgs.iter()
            .map(|m| (m.ty, m.seq, m.portid))
            .collect::<Vec<_>>(),
        vec![(2, 42, 77), (2, 43, 77)]
    );
    let mut bad = plain.clone();
    bad[0..4].copy_from_slice(&1000u32.to_ne_bytes());
    assert!(split_messages(&bad).is_err());
}

#[test]
fn set_declaration_attributes_read_back() {
    let mut s = Set::new(consts::NFPROTO_IPV4, "nftproxy", "fw").unwrap();
    s.set_flags(consts::NFT_SET_INTERVAL | consts::NFT_SET_CONCAT);
    s.set_key(0x1cc347, 16);
    s.set_desc_concat(&[4, 1, 2, 4]).unwrap();
    s.set_userdata(&[0, 4, 0, 0, 0, 0]).unwrap();
    s.push_expr(Expr::counter().unwrap());
    let i = s.info();
    assert_eq!(
        (i.name.as_str(), i.flags, i.key_type, i.key_len),
        ("fw", 0x84, 0x1cc347, 16)
    );
    assert_eq!(i.desc_concat, vec![4, 1, 2, 4]);
    assert_eq!(i.userdata, vec![0, 4, 0, 0, 0, 0]);
    assert_eq!(i.expr_names, vec!["counter".to_string()]);
    assert_eq!((i.data_type, i.data_len), (None, None));
}
