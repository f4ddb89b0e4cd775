//! Stale UDP conntrack cleanup over ctnetlink (DESIGN §2 "Sync", last bullet).
//!
//! UDP has no teardown: DNAT is decided on the first packet of a flow and recorded in its conntrack
//! entry, and every later packet of the same 5-tuple follows that entry until it times out. Chatty
//! clients (a resolver reusing its source port, statsd) refresh the entry forever, so when a UDP
//! service port loses endpoints their traffic stays pinned to the dead pod. The sync loop therefore
//! hands a [`Conntrack`] the affected service ports ([`StaleFlow`]) and it deletes the entries whose
//! ORIGINAL destination is the service address and port and whose REPLY source (the endpoint the
//! flow was DNATed to, or the service address itself when it was not DNATed at all) is not an
//! endpoint that still serves.
//!
//! [`NetlinkConntrack`] speaks ctnetlink on one `NETLINK_NETFILTER` socket, no `conntrack` binary:
//! per call it dumps the table once per address family involved (asking the kernel to send only
//! UDP entries), selects in user space, and deletes each selected entry by its original tuple, its
//! zone and its conntrack id. Sending the id makes the kernel refuse (ENOENT) when the tuple now
//! belongs to a *new* entry created between the dump and the delete, which may well point at a
//! healthy endpoint: only the exact entries that were judged stale are ever deleted.
//!
//! Messages are built and parsed by hand on byte buffers with safe code; the socket itself is
//! `nftproxy-nl`'s `RawSocket`.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::net::Family;

pub mod stale;

/// A UDP flow steering rule to clean: conntrack entries whose ORIGINAL destination is `dst:port`
/// (a ClusterIP/externalIP/LB IP with its service port, or any local address with a NodePort when
/// `dst` is None) and whose REPLY source address is NOT in `keep` (the endpoints still serving).
///
/// When one call carries both a flow with a concrete `dst` and a wildcard (`dst: None`) flow on the
/// same port, an entry whose destination equals that `dst` is judged by the concrete flow only (the
/// way kube-proxy gives service IPs precedence over NodePorts): a NodePort that happens to equal
/// another service's port must not kill that service's healthy flows. Several flows with the same
/// (`dst`, `port`) keep the union of their `keep` lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleFlow {
    pub dst: Option<IpAddr>,
    pub port: u16,
    pub family: Family,
    pub keep: Vec<IpAddr>,
}

/// Errors of [`Conntrack::delete_stale`].
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    /// A caller bug caught before anything was deleted.
    #[error("invalid stale flow {flow:?}: {reason}")]
    InvalidFlow {
        flow: StaleFlow,
        reason: &'static str,
    },
    #[error("conntrack netlink {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("conntrack netlink: no reply from the kernel within {0} s")]
    Timeout(u64),
    #[error("kernel refused conntrack {op}: {} (errno {errno})", std::io::Error::from_raw_os_error(*.errno))]
    Kernel { op: &'static str, errno: i32 },
    #[error("malformed ctnetlink message: {0}")]
    Malformed(String),
}

/// Deletes stale UDP conntrack entries. `Send` so the sync loop can own it on any thread.
pub trait Conntrack: Send {
    /// Deletes the conntrack entries selected by `flows` (see [`StaleFlow`]) and returns how many
    /// were deleted. Entries that vanish before they can be deleted are not counted and are not
    /// an error.
    fn delete_stale(&mut self, flows: &[StaleFlow]) -> Result<usize, ConntrackError>;
}

/// Records calls, for the sync loop tests. Deletes nothing and always answers `Ok(0)`.
#[derive(Debug, Default, Clone)]
pub struct FakeConntrack {
    pub calls: Vec<Vec<StaleFlow>>,
}

impl FakeConntrack {
    pub fn new() -> FakeConntrack {
        FakeConntrack::default()
    }
}

impl Conntrack for FakeConntrack {
    fn delete_stale(&mut self, flows: &[StaleFlow]) -> Result<usize, ConntrackError> {
        self.calls.push(flows.to_vec());
        Ok(0)
    }
}

/// Conntrack cleanup switched off (no ctnetlink on this node): keeps nothing, deletes nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct DisabledConntrack;

impl Conntrack for DisabledConntrack {
    fn delete_stale(&mut self, _flows: &[StaleFlow]) -> Result<usize, ConntrackError> {
        Ok(0)
    }
}

/// Kernel ABI numbers (from the stable uAPI headers `linux/netlink.h`,
/// `linux/netfilter/nfnetlink.h`, `linux/netfilter/nfnetlink_conntrack.h`).
mod abi {
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

use abi::*;

fn l3_of(family: Family) -> u8 {
    match family {
        Family::Ip => AF_INET,
        Family::Ip6 => AF_INET6,
    }
}

fn family_of_addr(a: &IpAddr) -> Family {
    match a {
        IpAddr::V4(_) => Family::Ip,
        IpAddr::V6(_) => Family::Ip6,
    }
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn malformed(what: impl Into<String>) -> ConntrackError {
    ConntrackError::Malformed(what.into())
}

// ------------------------------------------------------------------------------------------------
// Conntrack entries as far as this module cares.

/// Source and destination address of a tuple; one enum so a tuple can never mix families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Addrs {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

/// One direction of a conntrack entry (`CTA_TUPLE_ORIG` or `CTA_TUPLE_REPLY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tuple {
    addrs: Addrs,
    proto: u8,
    /// (source, destination); absent for protocols without ports (ICMP).
    ports: Option<(u16, u16)>,
    /// `CTA_TUPLE_ZONE`: present only for entries in a directional zone.
    zone: Option<u16>,
}

impl Tuple {
    fn src(&self) -> IpAddr {
        match self.addrs {
            Addrs::V4(s, _) => s.into(),
            Addrs::V6(s, _) => s.into(),
        }
    }
    fn dst(&self) -> IpAddr {
        match self.addrs {
            Addrs::V4(_, d) => d.into(),
            Addrs::V6(_, d) => d.into(),
        }
    }
    fn l3(&self) -> u8 {
        match self.addrs {
            Addrs::V4(..) => AF_INET,
            Addrs::V6(..) => AF_INET6,
        }
    }
}

/// A conntrack entry from a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CtEntry {
    orig: Tuple,
    reply_src: IpAddr,
    /// `CTA_ZONE` (non-default, non-directional zones only).
    zone: Option<u16>,
    /// `CTA_ID`, echoed on delete so the kernel deletes this very entry or nothing.
    id: Option<u32>,
}

// ------------------------------------------------------------------------------------------------
// Encoder.

/// Builds one netlink message (header + nfgenmsg + attributes) on a byte buffer. Header fields
/// and attribute headers are host-endian (netlink's rule); payload byte order is the caller's.
struct MsgBuilder {
    buf: Vec<u8>,
}

impl MsgBuilder {
    fn new(msg_type: u16, flags: u16, seq: u32, l3: u8) -> MsgBuilder {
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

    fn put(&mut self, ty: u16, payload: &[u8]) {
        let len = NLA_HDRLEN + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    /// A nested attribute: `NLA_F_NESTED` set, as the kernel itself emits them.
    fn nest(&mut self, ty: u16, fill: impl FnOnce(&mut MsgBuilder)) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        fill(self);
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// `IPCTNL_MSG_CT_GET` dump of one family. With `udp_only`, `CTA_FILTER` asks the kernel (5.8+;
/// older kernels ignore the attribute) to send only UDP entries: on a busy node TCP dominates the
/// table and need not cross into user space. The selection in user space does not rely on it.
fn encode_dump_request(seq: u32, l3: u8, udp_only: bool) -> Vec<u8> {
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
fn encode_delete(seq: u32, e: &CtEntry) -> Vec<u8> {
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
struct NlMsg<'a> {
    ty: u16,
    seq: u32,
    /// Everything after the 16-byte header.
    payload: &'a [u8],
}

/// Splits a received datagram into its netlink messages.
fn split_datagram(mut buf: &[u8]) -> Result<Vec<NlMsg<'_>>, ConntrackError> {
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
fn ack_errno(payload: &[u8]) -> Result<i32, ConntrackError> {
    let b = payload
        .get(..4)
        .ok_or_else(|| malformed("NLMSG_ERROR shorter than its error code"))?;
    Ok(-i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// Iterator over a stream of netlink attributes: (type without flag bits, payload).
struct Attrs<'a> {
    rest: &'a [u8],
}

fn attrs(buf: &[u8]) -> Attrs<'_> {
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

fn fixed<const N: usize>(what: &str, p: &[u8]) -> Result<[u8; N], ConntrackError> {
    <[u8; N]>::try_from(p)
        .map_err(|_| malformed(format!("{what}: {} bytes, expected {N}", p.len())))
}

/// Ports, zones and ids are big-endian on the wire.
fn be16(what: &str, p: &[u8]) -> Result<u16, ConntrackError> {
    fixed::<2>(what, p).map(u16::from_be_bytes)
}

fn be32(what: &str, p: &[u8]) -> Result<u32, ConntrackError> {
    fixed::<4>(what, p).map(u32::from_be_bytes)
}

/// Parses the payload of `CTA_TUPLE_ORIG` / `CTA_TUPLE_REPLY`.
fn parse_tuple(buf: &[u8]) -> Result<Tuple, ConntrackError> {
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
fn parse_entry(payload: &[u8]) -> Result<CtEntry, ConntrackError> {
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

// ------------------------------------------------------------------------------------------------
// Selection.

/// The stale flows of one call, indexed by (family, port).
#[derive(Debug, Default)]
struct Selector {
    /// Per (l3 family, destination port): keep sets per concrete destination, and the keep set of
    /// the wildcard (`dst: None`) flows.
    by_port: HashMap<(u8, u16), PortRules>,
}

#[derive(Debug, Default)]
struct PortRules {
    exact: HashMap<IpAddr, HashSet<IpAddr>>,
    any: Option<HashSet<IpAddr>>,
}

impl Selector {
    /// Validates every flow first, so a bad one fails the call before anything is deleted.
    fn new(flows: &[StaleFlow]) -> Result<Selector, ConntrackError> {
        let mut sel = Selector::default();
        for f in flows {
            let invalid = |reason| ConntrackError::InvalidFlow {
                flow: f.clone(),
                reason,
            };
            if f.port == 0 {
                return Err(invalid("port 0"));
            }
            if f.dst.is_some_and(|d| family_of_addr(&d) != f.family) {
                return Err(invalid("destination address of the other family"));
            }
            let rules = sel.by_port.entry((l3_of(f.family), f.port)).or_default();
            let keep = match f.dst {
                Some(d) => rules.exact.entry(d).or_default(),
                None => rules.any.get_or_insert_with(HashSet::new),
            };
            // Keep addresses of the other family can never be a reply source here; harmless.
            keep.extend(f.keep.iter().copied());
        }
        Ok(sel)
    }

    fn families(&self) -> Vec<u8> {
        let mut f: Vec<u8> = self.by_port.keys().map(|k| k.0).collect();
        f.sort_unstable();
        f.dedup();
        f
    }

    fn selects(&self, e: &CtEntry) -> bool {
        if e.orig.proto != IPPROTO_UDP {
            return false;
        }
        let Some((_, dport)) = e.orig.ports else {
            return false;
        };
        let Some(rules) = self.by_port.get(&(e.orig.l3(), dport)) else {
            return false;
        };
        // A concrete destination takes precedence over the wildcard (see StaleFlow).
        let keep = match rules.exact.get(&e.orig.dst()) {
            Some(keep) => keep,
            None => match &rules.any {
                Some(keep) => keep,
                None => return false,
            },
        };
        !keep.contains(&e.reply_src)
    }
}

// ------------------------------------------------------------------------------------------------
// Netlink implementation.

/// Receive buffer for one datagram: dump chunks are at most 32 KiB, acks far smaller.
const RECV_BUF_LEN: usize = 64 * 1024;
/// A blocking read gives up after this long: never hang the sync loop on the kernel.
const RECV_TIMEOUT_SECS: u64 = 30;
/// Deletes sent per `send`. Their acks are queued on the socket all at once (the kernel processes
/// the datagram synchronously), and acks that do not fit the receive buffer are dropped: 128 acks
/// of at most ~170 bytes each stay far below the default 208 KiB.
const DELETE_CHUNK: usize = 128;

/// [`Conntrack`] over one `NETLINK_NETFILTER` socket, opened in the network namespace of the
/// thread that calls [`NetlinkConntrack::new`]. After an I/O or protocol error the socket is
/// dropped (a dump may be left half-read) and a fresh one is opened by the next call.
pub struct NetlinkConntrack {
    sock: Option<sock::NlSocket>,
    seq: u32,
    /// Cleared when the kernel rejects the UDP-only dump filter; later dumps go unfiltered.
    filter_ok: bool,
    buf: Vec<u8>,
}

impl NetlinkConntrack {
    /// Opens the socket now, so a missing capability or netlink family shows at startup.
    pub fn new() -> Result<NetlinkConntrack, ConntrackError> {
        Ok(NetlinkConntrack {
            sock: Some(sock::NlSocket::open(RECV_TIMEOUT_SECS)?),
            // Any start works (replies are matched by sequence); a time-derived one merely makes
            // sequences of successive sockets distinct when reading `nlmon` captures.
            seq: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_secs() as u32),
            filter_ok: true,
            buf: vec![0; RECV_BUF_LEN],
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Dumps the table of family `l3` and returns the entries `sel` selects.
    fn dump_selected(&mut self, l3: u8, sel: &Selector) -> Result<Vec<CtEntry>, ConntrackError> {
        if self.filter_ok {
            match self.dump(l3, true, sel) {
                Err(ConntrackError::Kernel { errno, .. })
                    if errno == libc::EINVAL || errno == libc::EOPNOTSUPP =>
                {
                    tracing::info!(
                        errno,
                        "kernel rejects the UDP-only conntrack dump filter; dumping unfiltered"
                    );
                    self.filter_ok = false;
                }
                r => return r,
            }
        }
        self.dump(l3, false, sel)
    }

    fn dump(
        &mut self,
        l3: u8,
        udp_only: bool,
        sel: &Selector,
    ) -> Result<Vec<CtEntry>, ConntrackError> {
        let seq = self.next_seq();
        live(&mut self.sock)?.send(&encode_dump_request(seq, l3, udp_only))?;
        let (mut out, mut skipped) = (Vec::new(), 0usize);
        loop {
            let n = live(&mut self.sock)?.recv(&mut self.buf)?;
            for msg in split_datagram(&self.buf[..n])? {
                if msg.seq != seq {
                    continue; // a leftover of an earlier request
                }
                match msg.ty {
                    NLMSG_DONE => {
                        // A dump that failed midway ends with a negative errno in DONE.
                        let errno = match msg.payload.len() {
                            0 => 0,
                            _ => ack_errno(msg.payload)?,
                        };
                        if errno != 0 {
                            return Err(ConntrackError::Kernel { op: "dump", errno });
                        }
                        if skipped > 0 {
                            tracing::warn!(skipped, "skipped unparsable conntrack entries");
                        }
                        return Ok(out);
                    }
                    NLMSG_ERROR => {
                        let errno = ack_errno(msg.payload)?;
                        if errno != 0 {
                            return Err(ConntrackError::Kernel { op: "dump", errno });
                        }
                    }
                    NLMSG_OVERRUN => return Err(malformed("netlink overrun during dump")),
                    NLMSG_NOOP => {}
                    t if t == ct_msg(IPCTNL_MSG_CT_NEW) || t == ct_msg(IPCTNL_MSG_CT_GET) => {
                        // An entry we cannot parse is never deleted; one bad entry must not
                        // stop the cleanup of the others.
                        match parse_entry(msg.payload) {
                            Ok(e) if sel.selects(&e) => out.push(e),
                            Ok(_) => {}
                            Err(err) => {
                                tracing::debug!(%err, "unparsable conntrack entry");
                                skipped += 1;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Deletes `entries`, [`DELETE_CHUNK`] per datagram, and counts the acked deletes.
    fn delete(&mut self, entries: &[CtEntry]) -> Result<usize, ConntrackError> {
        let (mut deleted, mut gone) = (0usize, 0usize);
        for chunk in entries.chunks(DELETE_CHUNK) {
            let first = self.seq.wrapping_add(1);
            let mut batch = Vec::with_capacity(chunk.len() * 160);
            for e in chunk {
                let seq = self.next_seq();
                batch.extend_from_slice(&encode_delete(seq, e));
            }
            live(&mut self.sock)?.send(&batch)?;
            let mut acked = vec![false; chunk.len()];
            let mut pending = chunk.len();
            let mut failed: Option<i32> = None;
            while pending > 0 {
                let n = live(&mut self.sock)?.recv(&mut self.buf)?;
                for msg in split_datagram(&self.buf[..n])? {
                    let i = msg.seq.wrapping_sub(first) as usize;
                    if msg.ty != NLMSG_ERROR || i >= chunk.len() || acked[i] {
                        continue; // not an ack of this chunk
                    }
                    acked[i] = true;
                    pending -= 1;
                    match ack_errno(msg.payload)? {
                        0 => {
                            deleted += 1;
                            tracing::debug!(entry = ?chunk[i], "deleted stale UDP conntrack entry");
                        }
                        // Gone already (timed out, deleted by someone else), or the tuple now
                        // belongs to a newer entry (id mismatch): nothing to do either way.
                        libc::ENOENT => gone += 1,
                        errno => {
                            failed.get_or_insert(errno);
                        }
                    }
                }
            }
            // All acks of the chunk are read, so the socket stays usable; stop at the first error.
            if let Some(errno) = failed {
                tracing::warn!(
                    deleted,
                    "conntrack delete failed after deleting some entries"
                );
                return Err(ConntrackError::Kernel {
                    op: "delete",
                    errno,
                });
            }
        }
        if gone > 0 {
            tracing::debug!(gone, "stale conntrack entries vanished before their delete");
        }
        Ok(deleted)
    }

    fn run(&mut self, sel: &Selector) -> Result<usize, ConntrackError> {
        let mut deleted = 0;
        for l3 in sel.families() {
            // Dump fully before deleting: a delete sent on the socket during a dump would
            // interleave its ack with the dump.
            let stale = self.dump_selected(l3, sel)?;
            if !stale.is_empty() {
                deleted += self.delete(&stale)?;
            }
        }
        Ok(deleted)
    }
}

/// The socket in `slot`, reopened if an earlier error dropped it. A free function so that callers
/// can borrow the socket and the receive buffer at the same time.
fn live(slot: &mut Option<sock::NlSocket>) -> Result<&sock::NlSocket, ConntrackError> {
    let s = match slot.take() {
        Some(s) => s,
        None => sock::NlSocket::open(RECV_TIMEOUT_SECS)?,
    };
    Ok(slot.insert(s))
}

impl Conntrack for NetlinkConntrack {
    fn delete_stale(&mut self, flows: &[StaleFlow]) -> Result<usize, ConntrackError> {
        let sel = Selector::new(flows)?;
        let r = self.run(&sel);
        if let Err(e) = &r {
            // A refused request leaves the socket in a clean state, anything else may not.
            if !matches!(e, ConntrackError::Kernel { .. }) {
                self.sock = None;
            }
        }
        r
    }
}

/// The ctnetlink socket: `nftproxy-nl`'s raw netfilter socket with this module's errors.
mod sock {
    use std::io;
    use std::time::Duration;

    use nftproxy_nl::{RawSocket, Received};

    use super::ConntrackError;

    pub(super) struct NlSocket {
        raw: RawSocket,
        timeout_secs: u64,
    }

    impl NlSocket {
        pub(super) fn open(timeout_secs: u64) -> Result<NlSocket, ConntrackError> {
            let io = |op| move |source| ConntrackError::Io { op, source };
            let raw = RawSocket::open().map_err(io("socket"))?;
            raw.set_recv_timeout(Duration::from_secs(timeout_secs))
                .map_err(io("setsockopt(SO_RCVTIMEO)"))?;
            Ok(NlSocket { raw, timeout_secs })
        }

        /// Sends one datagram (one or more messages).
        pub(super) fn send(&self, buf: &[u8]) -> Result<(), ConntrackError> {
            self.raw
                .send(buf)
                .map_err(|source| ConntrackError::Io { op: "send", source })
        }

        /// Receives one datagram into `buf`; a datagram larger than `buf` is an error rather than
        /// silently truncated.
        pub(super) fn recv(&self, buf: &mut [u8]) -> Result<usize, ConntrackError> {
            match self.raw.recv(buf) {
                Ok(Received::Datagram(n)) => Ok(n),
                Ok(Received::Truncated(n)) => Err(ConntrackError::Malformed(format!(
                    "netlink datagram of {n} bytes exceeds the {} byte buffer",
                    buf.len()
                ))),
                Ok(Received::Overflow) => Err(ConntrackError::Io {
                    op: "recv",
                    source: io::Error::from_raw_os_error(libc::ENOBUFS),
                }),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    Err(ConntrackError::Timeout(self.timeout_secs))
                }
                Err(source) => Err(ConntrackError::Io { op: "recv", source }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
        let sel = Selector::new(&[flow(Some("10.96.0.10"), 53, &["10.244.1.1", "10.244.1.2"])])
            .expect("sel");
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
}
