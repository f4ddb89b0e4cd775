//! ctnetlink messages built and parsed on byte buffers with safe code: tuples, entries,
//! dump and delete requests, datagram and attribute walking.

use super::*;

/// Kernel ABI numbers (from the stable uAPI headers `linux/netlink.h`,
/// `linux/netfilter/nfnetlink.h`, `linux/netfilter/nfnetlink_conntrack.h`).
pub(super) mod abi {
    pub const NLMSG_HDRLEN: usize = 16;
    pub const NLMSG_NOOP: u16 = 1;
    pub const NLMSG_ERROR: u16 = 2;
    pub const NLMSG_DONE: u16 = 3;
    pub const NLMSG_OVERRUN: u16 = 4;
    pub const NLM_F_REQUEST: u16 = 0x1;
    pub const NLM_F_ACK: u16 = 0x4;
    /// `NLM_F_ROOT | NLM_F_MATCH`.
    pub const NLM_F_DUMP: u16 = 0x300;

    pub const NLA_HDRLEN: usize = 4;
    pub const NLA_F_NESTED: u16 = 1 << 15;
    pub const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
    pub const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

    /// `struct nfgenmsg`: family (u8), version (u8), res_id (be16).
    pub const NFGENMSG_LEN: usize = 4;
    pub const NFNETLINK_V0: u8 = 0;
    pub const NFNL_SUBSYS_CTNETLINK: u16 = 1;

    pub const IPCTNL_MSG_CT_NEW: u16 = 0;
    pub const IPCTNL_MSG_CT_GET: u16 = 1;
    pub const IPCTNL_MSG_CT_DELETE: u16 = 2;

    // enum ctattr_type
    pub const CTA_TUPLE_ORIG: u16 = 1;
    pub const CTA_TUPLE_REPLY: u16 = 2;
    pub const CTA_ID: u16 = 12;
    pub const CTA_ZONE: u16 = 18;
    pub const CTA_FILTER: u16 = 25;
    // enum ctattr_tuple
    pub const CTA_TUPLE_IP: u16 = 1;
    pub const CTA_TUPLE_PROTO: u16 = 2;
    pub const CTA_TUPLE_ZONE: u16 = 3;
    // enum ctattr_ip
    pub const CTA_IP_V4_SRC: u16 = 1;
    pub const CTA_IP_V4_DST: u16 = 2;
    pub const CTA_IP_V6_SRC: u16 = 3;
    pub const CTA_IP_V6_DST: u16 = 4;
    // enum ctattr_l4proto
    pub const CTA_PROTO_NUM: u16 = 1;
    pub const CTA_PROTO_SRC_PORT: u16 = 2;
    pub const CTA_PROTO_DST_PORT: u16 = 3;
    // enum ctattr_filter
    pub const CTA_FILTER_ORIG_FLAGS: u16 = 1;
    /// `CTA_FILTER_FLAG(CTA_PROTO_NUM)`. Defined in the kernel's `nf_internals.h`, not in uAPI,
    /// but part of the ABI (libnetfilter_conntrack carries the same value).
    pub const CTA_FILTER_F_CTA_PROTO_NUM: u32 = 1 << 3;

    pub const AF_INET: u8 = libc::AF_INET as u8;
    pub const AF_INET6: u8 = libc::AF_INET6 as u8;
    pub const IPPROTO_UDP: u8 = libc::IPPROTO_UDP as u8;

    /// nfnetlink message type: subsystem in the high byte, message in the low byte.
    pub const fn ct_msg(msg: u16) -> u16 {
        (NFNL_SUBSYS_CTNETLINK << 8) | msg
    }
}

pub(super) use abi::*;

pub(super) fn l3_of(family: Family) -> u8 {
    match family {
        Family::Ip => AF_INET,
        Family::Ip6 => AF_INET6,
    }
}

pub(super) fn family_of_addr(a: &IpAddr) -> Family {
    match a {
        IpAddr::V4(_) => Family::Ip,
        IpAddr::V6(_) => Family::Ip6,
    }
}

pub(super) const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

pub(super) fn malformed(what: impl Into<String>) -> ConntrackError {
    ConntrackError::Malformed(what.into())
}

// ------------------------------------------------------------------------------------------------
// Conntrack entries as far as this module cares.

/// Source and destination address of a tuple; one enum so a tuple can never mix families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Addrs {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

/// One direction of a conntrack entry (`CTA_TUPLE_ORIG` or `CTA_TUPLE_REPLY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Tuple {
    pub(super) addrs: Addrs,
    pub(super) proto: u8,
    /// (source, destination); absent for protocols without ports (ICMP).
    pub(super) ports: Option<(u16, u16)>,
    /// `CTA_TUPLE_ZONE`: present only for entries in a directional zone.
    pub(super) zone: Option<u16>,
}

impl Tuple {
    pub(super) fn src(&self) -> IpAddr {
        match self.addrs {
            Addrs::V4(s, _) => s.into(),
            Addrs::V6(s, _) => s.into(),
        }
    }
    pub(super) fn dst(&self) -> IpAddr {
        match self.addrs {
            Addrs::V4(_, d) => d.into(),
            Addrs::V6(_, d) => d.into(),
        }
    }
    pub(super) fn l3(&self) -> u8 {
        match self.addrs {
            Addrs::V4(..) => AF_INET,
            Addrs::V6(..) => AF_INET6,
        }
    }
}

/// A conntrack entry from a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CtEntry {
    pub(super) orig: Tuple,
    pub(super) reply_src: IpAddr,
    /// `CTA_ZONE` (non-default, non-directional zones only).
    pub(super) zone: Option<u16>,
    /// `CTA_ID`, echoed on delete so the kernel deletes this very entry or nothing.
    pub(super) id: Option<u32>,
}

// ------------------------------------------------------------------------------------------------
// Encoder.

/// Builds one netlink message (header + nfgenmsg + attributes) on a byte buffer. Header fields
/// and attribute headers are host-endian (netlink's rule); payload byte order is the caller's.
pub(super) struct MsgBuilder {
    pub(super) buf: Vec<u8>,
}

impl MsgBuilder {
    pub(super) fn new(msg_type: u16, flags: u16, seq: u32, l3: u8) -> MsgBuilder {
        let mut buf = Vec::with_capacity(160);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, patched by finish()
        buf.extend_from_slice(&msg_type.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: 0 addresses the kernel
        buf.extend_from_slice(&[l3, NFNETLINK_V0, 0, 0]); // nfgenmsg, res_id 0
        MsgBuilder { buf }
    }

    // Lengths: every message built here is a fixed handful of attributes of at most 16 bytes
    // each (well under 200 bytes), so the `as u16`/`as u32` casts below cannot truncate.

    pub(super) fn put(&mut self, ty: u16, payload: &[u8]) {
        let len = NLA_HDRLEN + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    /// A nested attribute: `NLA_F_NESTED` set, as the kernel itself emits them.
    pub(super) fn nest(&mut self, ty: u16, fill: impl FnOnce(&mut MsgBuilder)) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        fill(self);
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    pub(super) fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// `IPCTNL_MSG_CT_GET` dump of one family. With `udp_only`, `CTA_FILTER` asks the kernel (5.8+;
/// older kernels ignore the attribute) to send only UDP entries: on a busy node TCP dominates the
/// table and need not cross into user space. The selection in user space does not rely on it.
pub(super) fn encode_dump_request(seq: u32, l3: u8, udp_only: bool) -> Vec<u8> {
    let mut m = MsgBuilder::new(
        ct_msg(IPCTNL_MSG_CT_GET),
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        l3,
    );
    if udp_only {
        m.nest(CTA_TUPLE_ORIG, |m| {
            m.nest(CTA_TUPLE_PROTO, |m| m.put(CTA_PROTO_NUM, &[IPPROTO_UDP]));
        });
        m.nest(CTA_FILTER, |m| {
            // A u32 bit mask in host order (NLA_U32 policy), not big-endian.
            m.put(
                CTA_FILTER_ORIG_FLAGS,
                &CTA_FILTER_F_CTA_PROTO_NUM.to_ne_bytes(),
            )
        });
    }
    m.finish()
}

/// `IPCTNL_MSG_CT_DELETE` of one entry, acked. It always carries the full original tuple: a
/// delete WITHOUT a tuple would flush the whole table, which is why this is the only way to build
/// one here.
pub(super) fn encode_delete(seq: u32, e: &CtEntry) -> Vec<u8> {
    let t = &e.orig;
    let mut m = MsgBuilder::new(
        ct_msg(IPCTNL_MSG_CT_DELETE),
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        t.l3(),
    );
    m.nest(CTA_TUPLE_ORIG, |m| {
        m.nest(CTA_TUPLE_IP, |m| match t.addrs {
            Addrs::V4(s, d) => {
                m.put(CTA_IP_V4_SRC, &s.octets());
                m.put(CTA_IP_V4_DST, &d.octets());
            }
            Addrs::V6(s, d) => {
                m.put(CTA_IP_V6_SRC, &s.octets());
                m.put(CTA_IP_V6_DST, &d.octets());
            }
        });
        m.nest(CTA_TUPLE_PROTO, |m| {
            m.put(CTA_PROTO_NUM, &[t.proto]);
            if let Some((sport, dport)) = t.ports {
                m.put(CTA_PROTO_SRC_PORT, &sport.to_be_bytes());
                m.put(CTA_PROTO_DST_PORT, &dport.to_be_bytes());
            }
        });
        if let Some(z) = t.zone {
            m.put(CTA_TUPLE_ZONE, &z.to_be_bytes());
        }
    });
    // The lookup is per zone: without the entry's zone the kernel would look in zone 0.
    if let Some(z) = e.zone {
        m.put(CTA_ZONE, &z.to_be_bytes());
    }
    if let Some(id) = e.id {
        m.put(CTA_ID, &id.to_be_bytes());
    }
    m.finish()
}

// ------------------------------------------------------------------------------------------------
// Decoder.

/// One netlink message of a datagram.
#[derive(Debug, Clone, Copy)]
pub(super) struct NlMsg<'a> {
    pub(super) ty: u16,
    pub(super) seq: u32,
    /// Everything after the 16-byte header.
    pub(super) payload: &'a [u8],
}

/// Splits a received datagram into its netlink messages.
pub(super) fn split_datagram(mut buf: &[u8]) -> Result<Vec<NlMsg<'_>>, ConntrackError> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(malformed(format!(
                "netlink message length {len} with {} bytes left",
                buf.len()
            )));
        }
        out.push(NlMsg {
            ty: u16::from_ne_bytes([buf[4], buf[5]]),
            seq: u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]),
            payload: &buf[NLMSG_HDRLEN..len],
        });
        buf = &buf[align4(len).min(buf.len())..];
    }
    if !buf.is_empty() {
        return Err(malformed(format!(
            "{} trailing bytes after the last message",
            buf.len()
        )));
    }
    Ok(out)
}

/// The positive errno of an `NLMSG_ERROR` message (0 for a plain ack).
pub(super) fn ack_errno(payload: &[u8]) -> Result<i32, ConntrackError> {
    let b = payload
        .get(..4)
        .ok_or_else(|| malformed("NLMSG_ERROR shorter than its error code"))?;
    Ok(-i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// Iterator over a stream of netlink attributes: (type without flag bits, payload).
pub(super) struct Attrs<'a> {
    pub(super) rest: &'a [u8],
}

pub(super) fn attrs(buf: &[u8]) -> Attrs<'_> {
    Attrs { rest: buf }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<(u16, &'a [u8]), ConntrackError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let r = self.rest;
        if r.len() < NLA_HDRLEN {
            self.rest = &[];
            return Some(Err(malformed("truncated attribute header")));
        }
        let len = u16::from_ne_bytes([r[0], r[1]]) as usize;
        let ty = u16::from_ne_bytes([r[2], r[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > r.len() {
            self.rest = &[];
            return Some(Err(malformed(format!(
                "attribute {ty} of length {len} with {} bytes left",
                r.len()
            ))));
        }
        // The last attribute of a message may lack its padding.
        self.rest = &r[align4(len).min(r.len())..];
        Some(Ok((ty, &r[NLA_HDRLEN..len])))
    }
}

pub(super) fn fixed<const N: usize>(what: &str, p: &[u8]) -> Result<[u8; N], ConntrackError> {
    <[u8; N]>::try_from(p)
        .map_err(|_| malformed(format!("{what}: {} bytes, expected {N}", p.len())))
}

/// Ports, zones and ids are big-endian on the wire.
pub(super) fn be16(what: &str, p: &[u8]) -> Result<u16, ConntrackError> {
    fixed::<2>(what, p).map(u16::from_be_bytes)
}

pub(super) fn be32(what: &str, p: &[u8]) -> Result<u32, ConntrackError> {
    fixed::<4>(what, p).map(u32::from_be_bytes)
}

/// Parses the payload of `CTA_TUPLE_ORIG` / `CTA_TUPLE_REPLY`.
pub(super) fn parse_tuple(buf: &[u8]) -> Result<Tuple, ConntrackError> {
    let (mut v4, mut v6) = ((None, None), (None, None));
    let mut proto = None;
    let (mut sport, mut dport) = (None, None);
    let mut zone = None;
    for a in attrs(buf) {
        let (ty, p) = a?;
        match ty {
            CTA_TUPLE_IP => {
                for a in attrs(p) {
                    let (ty, p) = a?;
                    match ty {
                        CTA_IP_V4_SRC => v4.0 = Some(Ipv4Addr::from(fixed::<4>("ipv4 src", p)?)),
                        CTA_IP_V4_DST => v4.1 = Some(Ipv4Addr::from(fixed::<4>("ipv4 dst", p)?)),
                        CTA_IP_V6_SRC => v6.0 = Some(Ipv6Addr::from(fixed::<16>("ipv6 src", p)?)),
                        CTA_IP_V6_DST => v6.1 = Some(Ipv6Addr::from(fixed::<16>("ipv6 dst", p)?)),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for a in attrs(p) {
                    let (ty, p) = a?;
                    match ty {
                        CTA_PROTO_NUM => proto = Some(fixed::<1>("proto num", p)?[0]),
                        CTA_PROTO_SRC_PORT => sport = Some(be16("src port", p)?),
                        CTA_PROTO_DST_PORT => dport = Some(be16("dst port", p)?),
                        _ => {} // ICMP type/code/id
                    }
                }
            }
            CTA_TUPLE_ZONE => zone = Some(be16("tuple zone", p)?),
            _ => {}
        }
    }
    let addrs = match (v4, v6) {
        ((Some(s), Some(d)), (None, None)) => Addrs::V4(s, d),
        ((None, None), (Some(s), Some(d))) => Addrs::V6(s, d),
        _ => return Err(malformed("tuple without exactly one complete address pair")),
    };
    Ok(Tuple {
        addrs,
        proto: proto.ok_or_else(|| malformed("tuple without protocol number"))?,
        ports: sport.zip(dport),
        zone,
    })
}

/// Parses one conntrack message of a dump (payload after the netlink header).
pub(super) fn parse_entry(payload: &[u8]) -> Result<CtEntry, ConntrackError> {
    let (nfgen, rest) = payload
        .split_at_checked(NFGENMSG_LEN)
        .ok_or_else(|| malformed("conntrack message without nfgenmsg"))?;
    let (mut orig, mut reply, mut zone, mut id) = (None, None, None, None);
    for a in attrs(rest) {
        let (ty, p) = a?;
        match ty {
            CTA_TUPLE_ORIG => orig = Some(parse_tuple(p)?),
            CTA_TUPLE_REPLY => reply = Some(parse_tuple(p)?),
            CTA_ZONE => zone = Some(be16("zone", p)?),
            CTA_ID => id = Some(be32("id", p)?),
            _ => {}
        }
    }
    let orig = orig.ok_or_else(|| malformed("conntrack entry without original tuple"))?;
    let reply: Tuple = reply.ok_or_else(|| malformed("conntrack entry without reply tuple"))?;
    if orig.l3() != nfgen[0] || reply.l3() != nfgen[0] {
        return Err(malformed(format!(
            "conntrack entry of family {} with tuples of another family",
            nfgen[0]
        )));
    }
    Ok(CtEntry {
        orig,
        reply_src: reply.src(),
        zone,
        id,
    })
}
