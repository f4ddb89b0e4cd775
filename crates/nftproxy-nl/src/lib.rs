//! The only `unsafe` code in nftproxy: a small, safe wrapper over libnftnl (`nftnl-sys`) and libmnl
//! (`mnl-sys`).
//!
//! What it offers, and nothing more:
//! - owned libnftnl objects ([`Table`], [`Chain`], [`Rule`], [`Expr`], [`Set`], [`SetElem`]) that free
//!   themselves on drop. Adding a child (an expression to a rule, an element to a set) hands the
//!   child's allocation to libnftnl, so those methods take the child by value;
//! - a [`Batch`]: one contiguous, 4-byte aligned buffer holding `NFNL_MSG_BATCH_BEGIN`, the
//!   messages and `NFNL_MSG_BATCH_END`, with a record of which caller tag produced which sequence
//!   number (so kernel errors can be traced back to the operation that caused them);
//! - a [`Socket`] that sends a batch with ONE `sendmsg` and collects the kernel's error reports,
//!   and answers the few get/dump requests the applier needs;
//! - the `NFTNL_UDATA` TLV format (module [`udata`]) nft uses for set metadata;
//! - a [`RawSocket`] for callers that build their own netlink messages (ctnetlink, nf_tables
//!   notifications), and the few plain libc calls of module [`os`].
//!
//! It knows nothing about nftproxy's IR; `apply::netlink` in the main crate lowers the IR into it.
//! The main crate forbids `unsafe_code`: every unsafe line of nftproxy is in this crate.
//!
//! Why not libnftnl's own `nftnl_batch`: it splits the batch into pages, and sending page by page
//! breaks above 128 KiB; nft itself sends all pages in one `sendmsg` with an iovec. A single flat
//! buffer is simpler and gives one `sendmsg` by construction.
//!
//! Memory safety of message building: libnftnl/libmnl write attributes without any bounds check
//! (`mnl_attr_put` trusts the caller). Every object therefore tracks a conservative upper bound of
//! its encoded size ([`Table::bound`] etc.), every variable-length input is length-checked when it
//! is set, and [`Batch`] reserves (zero-initialised) room for that bound before letting libnftnl
//! write.

pub mod alloc;
mod batch;
mod nfsocket;
mod objects;
pub mod os;
pub mod socket;
pub mod udata;

pub use batch::*;
pub use nfsocket::*;
pub use objects::*;
pub use socket::{RawSocket, Received};

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int, c_void};
use std::ptr::NonNull;

use mnl_sys as mnl;
use nftnl_sys as sys;

/// Kernel ABI numbers that `nftnl-sys` does not export (from `linux/netfilter/nf_tables.h`,
/// `linux/netfilter.h`, `linux/netlink.h`). They are part of the stable uAPI.
pub mod consts {
    pub const NFPROTO_UNSPEC: u16 = 0;
    pub const NFPROTO_IPV4: u16 = 2;
    pub const NFPROTO_IPV6: u16 = 10;

    // netfilter hooks
    pub const NF_INET_PRE_ROUTING: u32 = 0;
    pub const NF_INET_LOCAL_IN: u32 = 1;
    pub const NF_INET_FORWARD: u32 = 2;
    pub const NF_INET_LOCAL_OUT: u32 = 3;
    pub const NF_INET_POST_ROUTING: u32 = 4;

    // verdicts
    pub const NF_DROP: i32 = 0;
    pub const NF_ACCEPT: i32 = 1;
    pub const NFT_JUMP: i32 = -3;
    pub const NFT_GOTO: i32 = -4;
    pub const NFT_RETURN: i32 = -5;

    // registers
    pub const NFT_REG_VERDICT: u32 = 0;
    pub const NFT_REG_1: u32 = 1;
    pub const NFT_REG32_00: u32 = 8;
    /// Number of 32-bit data registers.
    pub const NFT_REG32_COUNT: u32 = 16;

    // set flags
    pub const NFT_SET_ANONYMOUS: u32 = 0x1;
    pub const NFT_SET_CONSTANT: u32 = 0x2;
    pub const NFT_SET_INTERVAL: u32 = 0x4;
    pub const NFT_SET_MAP: u32 = 0x8;
    pub const NFT_SET_TIMEOUT: u32 = 0x10;
    pub const NFT_SET_EVAL: u32 = 0x20;
    pub const NFT_SET_CONCAT: u32 = 0x80;
    pub const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;

    // expression parameters
    pub const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
    pub const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
    pub const NFT_META_MARK: u32 = 3;
    pub const NFT_META_L4PROTO: u32 = 16;
    pub const NFT_META_IIFNAME: u32 = 6;
    pub const NFT_CT_STATE: u32 = 0;
    pub const NFT_CT_STATUS: u32 = 2;
    pub const NFT_CT_PROTO_DST: u32 = 12;
    pub const NFT_CT_SRC_IP: u32 = 19;
    pub const NFT_CT_DST_IP: u32 = 20;
    pub const NFT_CT_SRC_IP6: u32 = 21;
    pub const NFT_CT_DST_IP6: u32 = 22;
    pub const IP_CT_DIR_ORIGINAL: u8 = 0;
    pub const NFT_CMP_EQ: u32 = 0;
    pub const NFT_CMP_NEQ: u32 = 1;
    pub const NFT_BYTEORDER_HTON: u32 = 1;
    pub const NFT_LOOKUP_F_INV: u32 = 1;
    pub const NFT_DYNSET_OP_UPDATE: u32 = 1;
    pub const NFT_NAT_DNAT: u32 = 1;
    pub const NFT_NG_RANDOM: u32 = 1;
    pub const NFTA_FIB_F_SADDR: u32 = 1;
    pub const NFTA_FIB_F_DADDR: u32 = 2;
    pub const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
    pub const RTN_LOCAL: u32 = 2;
    pub const NFT_REJECT_ICMP_UNREACH: u32 = 0;
    pub const ICMP_PORT_UNREACH: u8 = 3;
    pub const ICMPV6_PORT_UNREACH: u8 = 4;
    pub const NF_NAT_RANGE_PROTO_RANDOM_FULLY: u32 = 0x10;
    /// `ct state new`: `NF_CT_STATE_BIT(IP_CT_NEW)`.
    pub const NF_CT_STATE_NEW_BIT: u32 = 1 << 3;
    /// `ct status dnat`: `IPS_DST_NAT`.
    pub const IPS_DST_NAT: u32 = 1 << 5;
}

/// nf_tables message types (the low byte of `nlmsg_type`; libnftnl adds the subsystem).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Cmd {
    NewTable = 0,
    GetTable = 1,
    DelTable = 2,
    NewChain = 3,
    GetChain = 4,
    DelChain = 5,
    NewRule = 6,
    GetRule = 7,
    DelRule = 8,
    NewSet = 9,
    GetSet = 10,
    DelSet = 11,
    NewSetElem = 12,
    GetSetElem = 13,
    DelSetElem = 14,
    GetGen = 16,
}

/// netlink message flags (`linux/netlink.h`).
pub mod flags {
    pub const NLM_F_REQUEST: u16 = 0x1;
    pub const NLM_F_MULTI: u16 = 0x2;
    pub const NLM_F_ACK: u16 = 0x4;
    pub const NLM_F_DUMP: u16 = 0x300;
    pub const NLM_F_EXCL: u16 = 0x200;
    pub const NLM_F_CREATE: u16 = 0x400;
    pub const NLM_F_APPEND: u16 = 0x800;
    /// In an error report: the original message's payload was left out (`NETLINK_CAP_ACK`).
    pub const NLM_F_CAPPED: u16 = 0x100;
    /// In a dump: the data changed while it was being dumped.
    pub const NLM_F_DUMP_INTR: u16 = 0x10;
    /// In an error report: extended-ack TLVs follow.
    pub const NLM_F_ACK_TLVS: u16 = 0x200;
}

const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSGERR_ATTR_OFFS: u16 = 2;
const SOL_NETLINK: c_int = 270;
const NETLINK_CAP_ACK: c_int = 10;
const NETLINK_EXT_ACK: c_int = 11;
const NETLINK_NETFILTER: c_int = 12;

/// Longest object name the kernel accepts (`NFT_NAME_MAXLEN` minus the NUL).
pub const MAX_NAME_LEN: usize = 255;
/// Largest key or data value of a set element (`NFT_DATA_VALUE_MAXLEN`); libnftnl copies into a
/// buffer of exactly this size without checking.
pub const MAX_VALUE_LEN: usize = 64;
/// Largest set/element user data the kernel accepts (`NFT_USERDATA_MAXLEN`).
pub const MAX_USERDATA_LEN: usize = 256;
/// Budget for the element list of one NEWSETELEM/DELSETELEM message. Its nest length is a u16,
/// so one message must stay well below 64 KiB; nft splits element lists the same way.
pub const ELEMS_PER_MSG_BUDGET: usize = 48 * 1024;
/// Receive buffer for one datagram: dumps come in chunks of at most 32 KiB, error reports carry
/// at most one 64 KiB original message.
const RECV_BUF_LEN: usize = 128 * 1024;
/// Socket receive buffer requested at open (error reports of a large failed batch must fit).
const SOCKET_RCVBUF: usize = 8 * 1024 * 1024;
/// A blocking read (replies to get/dump requests) gives up after this long: never wait forever.
const RECV_TIMEOUT_SECS: libc::time_t = 30;

/// Errors of the wrapper. Kernel errors of a batch are not errors of `send_batch` (see
/// [`Socket::send_batch`]); they appear here only for get/dump requests.
#[derive(Debug, thiserror::Error)]
pub enum NlError {
    #[error("libnftnl could not allocate a {0}")]
    Alloc(&'static str),
    #[error("invalid name {0:?}: empty, longer than 255 bytes or containing NUL")]
    BadName(String),
    #[error("{what} is {len} bytes, more than the kernel's limit of {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("netlink message of {len} bytes exceeded its computed bound of {bound} bytes")]
    BoundExceeded { len: usize, bound: usize },
    #[error("netlink {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Kernel(KernelError),
    #[error("malformed netlink reply: {0}")]
    Malformed(String),
}

impl NlError {
    pub(crate) fn io(op: &'static str) -> NlError {
        NlError::Io {
            op,
            source: std::io::Error::last_os_error(),
        }
    }
}

/// One `NLMSG_ERROR` report from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelError {
    /// Positive errno.
    pub errno: i32,
    /// Sequence number of the message that failed.
    pub seq: u32,
    /// Extended-ack message text, when the kernel gave one.
    pub msg: Option<String>,
    /// Extended-ack offset of the offending attribute inside the failed message.
    pub bad_attr_offset: Option<u32>,
}

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (errno {})", errno_text(self.errno), self.errno)?;
        if let Some(m) = &self.msg {
            write!(f, ": {m}")?;
        }
        Ok(())
    }
}

/// `strerror` without the thread-safety question.
pub fn errno_text(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

fn cstring(name: &str) -> Result<CString, NlError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(NlError::BadName(name.to_string()));
    }
    CString::new(name).map_err(|_| NlError::BadName(name.to_string()))
}

fn check_len(what: &'static str, len: usize, max: usize) -> Result<(), NlError> {
    if len > max {
        return Err(NlError::TooLong { what, len, max });
    }
    Ok(())
}

/// Encoded size of an attribute with `payload` bytes (header + payload, 4-byte aligned).
const fn attr_size(payload: usize) -> usize {
    4 + ((payload + 3) & !3)
}

/// Bound of a string attribute (name plus NUL).
const fn str_attr(len: usize) -> usize {
    attr_size(len + 1)
}

/// Bound of a nested data attribute (`NFTA_DATA_VALUE` inside a nest).
const fn data_attr(len: usize) -> usize {
    attr_size(0) + attr_size(len)
}

/// Header + nfgenmsg + table/chain/set name attributes: the part every message shares.
const MSG_BASE: usize = NLMSG_HDRLEN + NFGENMSG_LEN + 3 * str_attr(MAX_NAME_LEN) + 64;

#[cfg(test)]
mod tests;
