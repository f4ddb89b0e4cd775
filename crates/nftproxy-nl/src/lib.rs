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
pub mod os;
pub mod socket;
pub mod udata;

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

// ---------------------------------------------------------------------------------------------
// Objects
// ---------------------------------------------------------------------------------------------

macro_rules! owned {
    ($name:ident, $raw:ty, $free:path, $what:literal) => {
        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: `ptr` came from the matching libnftnl allocator and is owned by us; it
                // is never freed elsewhere (ownership transfers go through `into_raw`).
                unsafe { $free(self.ptr.as_ptr()) }
            }
        }
        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct($what).finish_non_exhaustive()
            }
        }
        // SAFETY: libnftnl objects are plain heap data with no thread affinity; we never share
        // them (no `Sync`), only move them.
        unsafe impl Send for $name {}
        impl $name {
            fn alloc_raw(ptr: *mut $raw) -> Result<NonNull<$raw>, NlError> {
                NonNull::new(ptr).ok_or(NlError::Alloc($what))
            }
        }
    };
}

/// `nftnl_table`.
pub struct Table {
    ptr: NonNull<sys::nftnl_table>,
}
owned!(Table, sys::nftnl_table, sys::nftnl_table_free, "table");

impl Table {
    pub fn new(family: u16, name: &str) -> Result<Table, NlError> {
        let name = cstring(name)?;
        // SAFETY: allocation result checked; setters copy the string.
        unsafe {
            let ptr = Self::alloc_raw(sys::nftnl_table_alloc())?;
            let t = Table { ptr };
            sys::nftnl_table_set_u32(
                t.ptr.as_ptr(),
                sys::NFTNL_TABLE_FAMILY as u16,
                u32::from(family),
            );
            if sys::nftnl_table_set_str(t.ptr.as_ptr(), sys::NFTNL_TABLE_NAME as u16, name.as_ptr())
                < 0
            {
                return Err(NlError::Alloc("table name"));
            }
            Ok(t)
        }
    }

    /// Table flags (nft sends 0 explicitly when creating a table).
    pub fn set_flags(&mut self, flags: u32) {
        // SAFETY: valid object, u32 attribute.
        unsafe { sys::nftnl_table_set_u32(self.ptr.as_ptr(), sys::NFTNL_TABLE_FLAGS as u16, flags) }
    }

    fn bound(&self) -> usize {
        MSG_BASE + 64
    }

    /// Parse a NEWTABLE message (reply to GETTABLE).
    ///
    /// # Safety
    /// `nlh` must point to a complete netlink message.
    unsafe fn from_nlmsg(nlh: *const libc::nlmsghdr) -> Result<Table, NlError> {
        let ptr = Self::alloc_raw(sys::nftnl_table_alloc())?;
        let t = Table { ptr };
        if sys::nftnl_table_nlmsg_parse(nlh, t.ptr.as_ptr()) < 0 {
            return Err(NlError::Malformed("table".into()));
        }
        Ok(t)
    }

    pub fn name(&self) -> Option<String> {
        // SAFETY: returns NULL or a NUL-terminated string owned by the object.
        unsafe {
            opt_str(sys::nftnl_table_get_str(
                self.ptr.as_ptr(),
                sys::NFTNL_TABLE_NAME as u16,
            ))
        }
    }
}

/// # Safety
/// `p` must be NULL or a valid NUL-terminated string.
unsafe fn opt_str(p: *const c_char) -> Option<String> {
    if p.is_null() {
        None
    } else {
        Some(CStr::from_ptr(p).to_string_lossy().into_owned())
    }
}

/// `nftnl_chain`.
pub struct Chain {
    ptr: NonNull<sys::nftnl_chain>,
}
owned!(Chain, sys::nftnl_chain, sys::nftnl_chain_free, "chain");

impl Chain {
    pub fn new(family: u16, table: &str, name: &str) -> Result<Chain, NlError> {
        let table = cstring(table)?;
        let name = cstring(name)?;
        // SAFETY: allocation checked; setters copy strings.
        unsafe {
            let ptr = Self::alloc_raw(sys::nftnl_chain_alloc())?;
            let c = Chain { ptr };
            let p = c.ptr.as_ptr();
            sys::nftnl_chain_set_u32(p, sys::NFTNL_CHAIN_FAMILY as u16, u32::from(family));
            if sys::nftnl_chain_set_str(p, sys::NFTNL_CHAIN_TABLE as u16, table.as_ptr()) < 0
                || sys::nftnl_chain_set_str(p, sys::NFTNL_CHAIN_NAME as u16, name.as_ptr()) < 0
            {
                return Err(NlError::Alloc("chain name"));
            }
            Ok(c)
        }
    }

    /// Make it a base chain: hook, priority, type (`"filter"`, `"nat"`) and policy verdict.
    pub fn set_base(
        &mut self,
        hooknum: u32,
        priority: i32,
        chain_type: &str,
        policy: i32,
    ) -> Result<(), NlError> {
        let ty = cstring(chain_type)?;
        let p = self.ptr.as_ptr();
        // SAFETY: valid object; hooknum/prio/policy are u32/s32 attributes; type string copied.
        unsafe {
            sys::nftnl_chain_set_u32(p, sys::NFTNL_CHAIN_HOOKNUM as u16, hooknum);
            sys::nftnl_chain_set_s32(p, sys::NFTNL_CHAIN_PRIO as u16, priority);
            sys::nftnl_chain_set_u32(p, sys::NFTNL_CHAIN_POLICY as u16, policy as u32);
            if sys::nftnl_chain_set_str(p, sys::NFTNL_CHAIN_TYPE as u16, ty.as_ptr()) < 0 {
                return Err(NlError::Alloc("chain type"));
            }
        }
        Ok(())
    }

    fn bound(&self) -> usize {
        MSG_BASE + 128
    }
}

/// `nftnl_expr`: one expression of a rule (or a set/element statement such as `counter`).
pub struct Expr {
    ptr: NonNull<sys::nftnl_expr>,
    bound: usize,
}
owned!(Expr, sys::nftnl_expr, sys::nftnl_expr_free, "expression");

/// Registers, verdict codes and the other parameters are plain numbers (see [`consts`]); the
/// constructors only guarantee that every attribute is set with the width libnftnl expects.
impl Expr {
    fn new(name: &CStr) -> Result<Expr, NlError> {
        // SAFETY: name is a valid C string; result checked.
        let ptr = unsafe { Self::alloc_raw(sys::nftnl_expr_alloc(name.as_ptr()))? };
        // Generous: the largest fixed-size expression (nat, dynset without names) is < 128 bytes.
        Ok(Expr { ptr, bound: 160 })
    }

    fn p(&self) -> *mut sys::nftnl_expr {
        self.ptr.as_ptr()
    }

    fn u32(&mut self, attr: u32, v: u32) {
        // SAFETY: valid object; attribute is a 32-bit field in libnftnl.
        unsafe { sys::nftnl_expr_set_u32(self.p(), attr as u16, v) }
    }

    fn u8(&mut self, attr: u32, v: u8) {
        // SAFETY: valid object; attribute is an 8-bit field in libnftnl.
        unsafe { sys::nftnl_expr_set_u8(self.p(), attr as u16, v) }
    }

    fn u64(&mut self, attr: u32, v: u64) {
        // SAFETY: valid object; attribute is a 64-bit field in libnftnl.
        unsafe { sys::nftnl_expr_set_u64(self.p(), attr as u16, v) }
    }

    fn str(&mut self, attr: u32, s: &str) -> Result<(), NlError> {
        let c = cstring(s)?;
        self.bound += str_attr(s.len());
        // SAFETY: valid object; string is copied.
        if unsafe { sys::nftnl_expr_set_str(self.p(), attr as u16, c.as_ptr()) } < 0 {
            return Err(NlError::Alloc("expression string"));
        }
        Ok(())
    }

    fn data(&mut self, attr: u32, d: &[u8]) -> Result<(), NlError> {
        check_len("expression data", d.len(), MAX_VALUE_LEN)?;
        self.bound += data_attr(d.len());
        // SAFETY: valid object; libnftnl copies `len` bytes into a 64-byte register image, and
        // `len` was checked against that size above.
        if unsafe { sys::nftnl_expr_set(self.p(), attr as u16, d.as_ptr().cast(), d.len() as u32) }
            < 0
        {
            return Err(NlError::Alloc("expression data"));
        }
        Ok(())
    }

    /// `[ payload load LEN @ BASE + OFFSET => reg DREG ]`
    pub fn payload_load(base: u32, offset: u32, len: u32, dreg: u32) -> Result<Expr, NlError> {
        let mut e = Expr::new(c"payload")?;
        e.u32(sys::NFTNL_EXPR_PAYLOAD_DREG, dreg);
        e.u32(sys::NFTNL_EXPR_PAYLOAD_BASE, base);
        e.u32(sys::NFTNL_EXPR_PAYLOAD_OFFSET, offset);
        e.u32(sys::NFTNL_EXPR_PAYLOAD_LEN, len);
        Ok(e)
    }

    /// `[ meta load KEY => reg DREG ]`
    pub fn meta_load(key: u32, dreg: u32) -> Result<Expr, NlError> {
        let mut e = Expr::new(c"meta")?;
        e.u32(sys::NFTNL_EXPR_META_KEY, key);
        e.u32(sys::NFTNL_EXPR_META_DREG, dreg);
        Ok(e)
    }

    /// `[ meta set KEY with reg SREG ]`
    pub fn meta_set(key: u32, sreg: u32) -> Result<Expr, NlError> {
        let mut e = Expr::new(c"meta")?;
        e.u32(sys::NFTNL_EXPR_META_KEY, key);
        e.u32(sys::NFTNL_EXPR_META_SREG, sreg);
        Ok(e)
    }

    /// `[ ct load KEY => reg DREG (, dir DIR) ]`
    pub fn ct_load(key: u32, dir: Option<u8>, dreg: u32) -> Result<Expr, NlError> {
        let mut e = Expr::new(c"ct")?;
        e.u32(sys::NFTNL_EXPR_CT_KEY, key);
        e.u32(sys::NFTNL_EXPR_CT_DREG, dreg);
        if let Some(d) = dir {
            e.u8(sys::NFTNL_EXPR_CT_DIR, d);
        }
        Ok(e)
    }

    /// `[ cmp OP reg SREG DATA ]`
    pub fn cmp(sreg: u32, op: u32, data: &[u8]) -> Result<Expr, NlError> {
        let mut e = Expr::new(c"cmp")?;
        e.u32(sys::NFTNL_EXPR_CMP_SREG, sreg);
        e.u32(sys::NFTNL_EXPR_CMP_OP, op);
        e.data(sys::NFTNL_EXPR_CMP_DATA, data)?;
        Ok(e)
    }

    /// `[ bitwise reg DREG = ( reg SREG & MASK ) ^ XOR ]` (the mask/xor boolean form).
    pub fn bitwise(sreg: u32, dreg: u32, mask: &[u8], xor: &[u8]) -> Result<Expr, NlError> {
        if mask.len() != xor.len() {
            return Err(NlError::Malformed(
                "bitwise mask and xor differ in length".into(),
            ));
        }
        let mut e = Expr::new(c"bitwise")?;
        e.u32(sys::NFTNL_EXPR_BITWISE_SREG, sreg);
        e.u32(sys::NFTNL_EXPR_BITWISE_DREG, dreg);
        // NFT_BITWISE_BOOL; nft sends the op attribute explicitly.
        e.u32(sys::NFTNL_EXPR_BITWISE_OP, 0);
        e.u32(sys::NFTNL_EXPR_BITWISE_LEN, mask.len() as u32);
        e.data(sys::NFTNL_EXPR_BITWISE_MASK, mask)?;
        e.data(sys::NFTNL_EXPR_BITWISE_XOR, xor)?;
        Ok(e)
    }

    /// `[ byteorder reg DREG = OP(reg SREG, SIZE, LEN) ]`
    pub fn byteorder(sreg: u32, dreg: u32, op: u32, len: u32, size: u32) -> Result<Expr, NlError> {
        let mut e = Expr::new(c"byteorder")?;
        e.u32(sys::NFTNL_EXPR_BYTEORDER_SREG, sreg);
        e.u32(sys::NFTNL_EXPR_BYTEORDER_DREG, dreg);
        e.u32(sys::NFTNL_EXPR_BYTEORDER_OP, op);
        e.u32(sys::NFTNL_EXPR_BYTEORDER_LEN, len);
        e.u32(sys::NFTNL_EXPR_BYTEORDER_SIZE, size);
        Ok(e)
    }

    /// `[ lookup reg SREG set NAME (dreg DREG) (0x1) ]`. `set_id` refers to a set created earlier
    /// in the same batch (the kernel resolves the name only against committed sets).
    pub fn lookup(
        sreg: u32,
        dreg: Option<u32>,
        set: &str,
        set_id: Option<u32>,
        invert: bool,
    ) -> Result<Expr, NlError> {
        let mut e = Expr::new(c"lookup")?;
        e.u32(sys::NFTNL_EXPR_LOOKUP_SREG, sreg);
        if let Some(d) = dreg {
            e.u32(sys::NFTNL_EXPR_LOOKUP_DREG, d);
        }
        e.str(sys::NFTNL_EXPR_LOOKUP_SET, set)?;
        if let Some(id) = set_id {
            e.u32(sys::NFTNL_EXPR_LOOKUP_SET_ID, id);
        }
        if invert {
            e.u32(sys::NFTNL_EXPR_LOOKUP_FLAGS, consts::NFT_LOOKUP_F_INV);
        }
        Ok(e)
    }

    /// `[ immediate reg 0 VERDICT (-> CHAIN) ]`
    pub fn verdict(code: i32, chain: Option<&str>) -> Result<Expr, NlError> {
        let mut e = Expr::new(c"immediate")?;
        e.u32(sys::NFTNL_EXPR_IMM_DREG, consts::NFT_REG_VERDICT);
        e.u32(sys::NFTNL_EXPR_IMM_VERDICT, code as u32);
        if let Some(c) = chain {
            e.str(sys::NFTNL_EXPR_IMM_CHAIN, c)?;
        }
        Ok(e)
    }

    /// `[ fib FLAGS RESULT => reg DREG ]`
    pub fn fib(flags: u32, result: u32, dreg: u32) -> Result<Expr, NlError> {
        let mut e = Expr::new(c"fib")?;
        e.u32(sys::NFTNL_EXPR_FIB_FLAGS, flags);
        e.u32(sys::NFTNL_EXPR_FIB_RESULT, result);
        e.u32(sys::NFTNL_EXPR_FIB_DREG, dreg);
        Ok(e)
    }

    /// `[ numgen reg DREG = TYPE mod MODULUS (offset OFFSET) ]`
    pub fn numgen(dreg: u32, modulus: u32, ng_type: u32, offset: u32) -> Result<Expr, NlError> {
        let mut e = Expr::new(c"numgen")?;
        e.u32(sys::NFTNL_EXPR_NG_DREG, dreg);
        e.u32(sys::NFTNL_EXPR_NG_MODULUS, modulus);
        e.u32(sys::NFTNL_EXPR_NG_TYPE, ng_type);
        e.u32(sys::NFTNL_EXPR_NG_OFFSET, offset);
        Ok(e)
    }

    /// `[ masq flags FLAGS ]`
    pub fn masq(flags: u32) -> Result<Expr, NlError> {
        let mut e = Expr::new(c"masq")?;
        e.u32(sys::NFTNL_EXPR_MASQ_FLAGS, flags);
        Ok(e)
    }

    /// `[ nat TYPE FAMILY addr_min reg A (proto_min reg P) ]`
    pub fn nat(
        nat_type: u32,
        family: u16,
        reg_addr_min: u32,
        reg_proto_min: Option<u32>,
    ) -> Result<Expr, NlError> {
        let mut e = Expr::new(c"nat")?;
        e.u32(sys::NFTNL_EXPR_NAT_TYPE, nat_type);
        e.u32(sys::NFTNL_EXPR_NAT_FAMILY, u32::from(family));
        e.u32(sys::NFTNL_EXPR_NAT_REG_ADDR_MIN, reg_addr_min);
        if let Some(p) = reg_proto_min {
            e.u32(sys::NFTNL_EXPR_NAT_REG_PROTO_MIN, p);
        }
        Ok(e)
    }

    /// `[ dynset OP reg_key K set NAME (sreg_data D) (timeout T ms) ]`
    pub fn dynset(
        op: u32,
        sreg_key: u32,
        sreg_data: Option<u32>,
        timeout_ms: Option<u64>,
        set: &str,
        set_id: Option<u32>,
    ) -> Result<Expr, NlError> {
        let mut e = Expr::new(c"dynset")?;
        e.u32(sys::NFTNL_EXPR_DYNSET_SREG_KEY, sreg_key);
        if let Some(d) = sreg_data {
            e.u32(sys::NFTNL_EXPR_DYNSET_SREG_DATA, d);
        }
        e.u32(sys::NFTNL_EXPR_DYNSET_OP, op);
        if let Some(t) = timeout_ms {
            e.u64(sys::NFTNL_EXPR_DYNSET_TIMEOUT, t);
        }
        e.str(sys::NFTNL_EXPR_DYNSET_SET_NAME, set)?;
        if let Some(id) = set_id {
            e.u32(sys::NFTNL_EXPR_DYNSET_SET_ID, id);
        }
        Ok(e)
    }

    /// `[ reject type TYPE code CODE ]`
    pub fn reject(reject_type: u32, code: u8) -> Result<Expr, NlError> {
        let mut e = Expr::new(c"reject")?;
        e.u32(sys::NFTNL_EXPR_REJECT_TYPE, reject_type);
        e.u8(sys::NFTNL_EXPR_REJECT_CODE, code);
        Ok(e)
    }

    /// `[ counter pkts 0 bytes 0 ]` without explicit values (as a set's per-element template).
    pub fn counter() -> Result<Expr, NlError> {
        Expr::new(c"counter")
    }

    fn into_raw(self) -> *mut sys::nftnl_expr {
        let p = self.ptr.as_ptr();
        std::mem::forget(self);
        p
    }

    /// libnftnl's text form, e.g. `[ payload load 4b @ network header + 16 => reg 1 ]` (the form
    /// `nft --debug=netlink` prints).
    pub fn to_text(&self) -> String {
        // SAFETY: valid object.
        unsafe { expr_text(self.ptr.as_ptr()) }
    }
}

/// # Safety
/// `e` must be a valid expression.
unsafe fn expr_text(e: *const sys::nftnl_expr) -> String {
    let mut buf = vec![0u8; 1024];
    let n = sys::nftnl_expr_snprintf(
        buf.as_mut_ptr().cast(),
        buf.len(),
        e,
        sys::NFTNL_OUTPUT_DEFAULT,
        0,
    );
    let n = usize::try_from(n).unwrap_or(0).min(buf.len() - 1);
    let name = opt_str(sys::nftnl_expr_get_str(e, sys::NFTNL_EXPR_NAME as u16)).unwrap_or_default();
    format!(
        "[ {name} {} ]",
        String::from_utf8_lossy(&buf[..n]).trim_end()
    )
}

/// `nftnl_rule`.
pub struct Rule {
    ptr: NonNull<sys::nftnl_rule>,
    bound: usize,
}
owned!(Rule, sys::nftnl_rule, sys::nftnl_rule_free, "rule");

impl Rule {
    pub fn new(family: u16, table: &str, chain: &str) -> Result<Rule, NlError> {
        let table = cstring(table)?;
        let chain = cstring(chain)?;
        // SAFETY: allocation checked; setters copy strings.
        unsafe {
            let ptr = Self::alloc_raw(sys::nftnl_rule_alloc())?;
            let r = Rule {
                ptr,
                bound: MSG_BASE + 16,
            };
            let p = r.ptr.as_ptr();
            sys::nftnl_rule_set_u32(p, sys::NFTNL_RULE_FAMILY as u16, u32::from(family));
            if sys::nftnl_rule_set_str(p, sys::NFTNL_RULE_TABLE as u16, table.as_ptr()) < 0
                || sys::nftnl_rule_set_str(p, sys::NFTNL_RULE_CHAIN as u16, chain.as_ptr()) < 0
            {
                return Err(NlError::Alloc("rule names"));
            }
            Ok(r)
        }
    }

    /// Append an expression; the rule takes ownership of it.
    pub fn push(&mut self, e: Expr) {
        // Expression nest header + name attribute + data nest header, on top of the attributes.
        self.bound += e.bound + 32;
        // SAFETY: valid rule; libnftnl takes ownership of the expression allocation.
        unsafe { sys::nftnl_rule_add_expr(self.ptr.as_ptr(), e.into_raw()) }
    }

    /// Text of every expression (see [`Expr::to_text`]).
    pub fn expr_texts(&self) -> Vec<String> {
        let mut out = Vec::new();
        // SAFETY: the iterator borrows the rule's expression list and is destroyed before return.
        unsafe {
            let it = sys::nftnl_expr_iter_create(self.ptr.as_ptr());
            if it.is_null() {
                return out;
            }
            loop {
                let e = sys::nftnl_expr_iter_next(it);
                if e.is_null() {
                    break;
                }
                out.push(expr_text(e));
            }
            sys::nftnl_expr_iter_destroy(it);
        }
        out
    }

    pub fn chain(&self) -> Option<String> {
        // SAFETY: NULL or a string owned by the object.
        unsafe {
            opt_str(sys::nftnl_rule_get_str(
                self.ptr.as_ptr(),
                sys::NFTNL_RULE_CHAIN as u16,
            ))
        }
    }

    /// # Safety
    /// `nlh` must point to a complete netlink message.
    unsafe fn from_nlmsg(nlh: *const libc::nlmsghdr) -> Result<Rule, NlError> {
        let ptr = Self::alloc_raw(sys::nftnl_rule_alloc())?;
        let r = Rule { ptr, bound: 0 };
        if sys::nftnl_rule_nlmsg_parse(nlh, r.ptr.as_ptr()) < 0 {
            return Err(NlError::Malformed("rule".into()));
        }
        Ok(r)
    }
}

/// `nftnl_set`: a set declaration, or a carrier for a list of elements (NEWSETELEM/DELSETELEM).
pub struct Set {
    ptr: NonNull<sys::nftnl_set>,
    bound: usize,
    elems: usize,
}
owned!(Set, sys::nftnl_set, sys::nftnl_set_free, "set");

impl Set {
    pub fn new(family: u16, table: &str, name: &str) -> Result<Set, NlError> {
        let table = cstring(table)?;
        let name = cstring(name)?;
        // SAFETY: allocation checked; setters copy strings.
        unsafe {
            let ptr = Self::alloc_raw(sys::nftnl_set_alloc())?;
            let s = Set {
                ptr,
                bound: MSG_BASE + 256,
                elems: 0,
            };
            let p = s.ptr.as_ptr();
            sys::nftnl_set_set_u32(p, sys::NFTNL_SET_FAMILY as u16, u32::from(family));
            if sys::nftnl_set_set_str(p, sys::NFTNL_SET_TABLE as u16, table.as_ptr()) < 0
                || sys::nftnl_set_set_str(p, sys::NFTNL_SET_NAME as u16, name.as_ptr()) < 0
            {
                return Err(NlError::Alloc("set names"));
            }
            Ok(s)
        }
    }

    fn p(&self) -> *mut sys::nftnl_set {
        self.ptr.as_ptr()
    }

    fn set_u32(&mut self, attr: u16, v: u32) {
        // SAFETY: valid object; u32 attribute.
        unsafe { sys::nftnl_set_set_u32(self.p(), attr, v) }
    }

    fn get_u32(&self, attr: u16) -> Option<u32> {
        // SAFETY: valid object; attribute presence checked first.
        unsafe {
            sys::nftnl_set_is_set(self.p(), attr).then(|| sys::nftnl_set_get_u32(self.p(), attr))
        }
    }

    fn get_bytes(&self, attr: u16) -> Option<Vec<u8>> {
        let mut len = 0u32;
        // SAFETY: valid object; the returned pointer is valid for `len` bytes while the set lives.
        unsafe {
            if !sys::nftnl_set_is_set(self.p(), attr) {
                return None;
            }
            let d = sys::nftnl_set_get_data(self.p(), attr, &mut len);
            if d.is_null() {
                return None;
            }
            Some(std::slice::from_raw_parts(d.cast::<u8>(), len as usize).to_vec())
        }
    }

    pub fn set_flags(&mut self, flags: u32) {
        self.set_u32(sys::NFTNL_SET_FLAGS as u16, flags)
    }

    pub fn set_key(&mut self, key_type: u32, key_len: u32) {
        self.set_u32(sys::NFTNL_SET_KEY_TYPE as u16, key_type);
        self.set_u32(sys::NFTNL_SET_KEY_LEN as u16, key_len);
    }

    pub fn set_data(&mut self, data_type: u32, data_len: u32) {
        self.set_u32(sys::NFTNL_SET_DATA_TYPE as u16, data_type);
        self.set_u32(sys::NFTNL_SET_DATA_LEN as u16, data_len);
    }

    /// `NFTA_SET_DESC_SIZE`: the maximum number of elements.
    pub fn set_size(&mut self, size: u32) {
        self.bound += 16;
        self.set_u32(sys::NFTNL_SET_DESC_SIZE as u16, size)
    }

    /// Batch-local id, so that rules and element lists in the same batch can refer to a set
    /// that is not committed yet.
    pub fn set_id(&mut self, id: u32) {
        self.set_u32(sys::NFTNL_SET_ID as u16, id)
    }

    pub fn set_userdata(&mut self, ud: &[u8]) -> Result<(), NlError> {
        check_len("set user data", ud.len(), MAX_USERDATA_LEN)?;
        self.bound += attr_size(ud.len());
        // SAFETY: valid object; libnftnl copies `len` bytes.
        if unsafe {
            sys::nftnl_set_set_data(
                self.p(),
                sys::NFTNL_SET_USERDATA as u16,
                ud.as_ptr().cast(),
                ud.len() as u32,
            )
        } < 0
        {
            return Err(NlError::Alloc("set user data"));
        }
        Ok(())
    }

    /// Field lengths (bytes, unpadded) of a concatenated key, sent as `NFTA_SET_DESC_CONCAT`.
    pub fn set_desc_concat(&mut self, field_lens: &[u8]) -> Result<(), NlError> {
        // libnftnl copies into `uint8_t field_len[16]` and then counts non-zero entries until the
        // first zero, so at most 15 fields keep that scan inside the array.
        check_len(
            "concatenation",
            field_lens.len(),
            (consts::NFT_REG32_COUNT - 1) as usize,
        )?;
        if field_lens.contains(&0) {
            return Err(NlError::Malformed("zero-length concatenation field".into()));
        }
        self.bound += 16 + field_lens.len() * 16;
        // SAFETY: valid object; length checked against the destination array above.
        if unsafe {
            sys::nftnl_set_set_data(
                self.p(),
                sys::NFTNL_SET_DESC_CONCAT as u16,
                field_lens.as_ptr().cast(),
                field_lens.len() as u32,
            )
        } < 0
        {
            return Err(NlError::Alloc("set concat description"));
        }
        Ok(())
    }

    /// A statement every element carries (e.g. `counter`); the set takes ownership.
    pub fn push_expr(&mut self, e: Expr) {
        self.bound += e.bound + 32;
        // SAFETY: valid set; libnftnl takes ownership of the expression allocation.
        unsafe { sys::nftnl_set_add_expr(self.p(), e.into_raw()) }
    }

    /// Add an element (for NEWSETELEM/DELSETELEM); the set takes ownership.
    pub fn push_elem(&mut self, e: SetElem) {
        self.bound += e.bound;
        self.elems += 1;
        let p = e.ptr.as_ptr();
        std::mem::forget(e);
        // SAFETY: valid set; libnftnl takes ownership of the element allocation.
        unsafe { sys::nftnl_set_elem_add(self.p(), p) }
    }

    pub fn elem_count(&self) -> usize {
        self.elems
    }

    /// Encoded-size bound of the element list (for splitting element lists into messages).
    pub fn elems_bound(&self) -> usize {
        self.bound
    }

    /// # Safety
    /// `nlh` must point to a complete netlink message.
    unsafe fn from_nlmsg(nlh: *const libc::nlmsghdr) -> Result<Set, NlError> {
        let ptr = Self::alloc_raw(sys::nftnl_set_alloc())?;
        let s = Set {
            ptr,
            bound: 0,
            elems: 0,
        };
        if sys::nftnl_set_nlmsg_parse(nlh, s.p()) < 0 {
            return Err(NlError::Malformed("set".into()));
        }
        Ok(s)
    }

    /// A snapshot of the set's declaration attributes (from a GETSET reply).
    pub fn info(&self) -> SetInfo {
        // SAFETY: NULL or a string owned by the object.
        let name = unsafe { opt_str(sys::nftnl_set_get_str(self.p(), sys::NFTNL_SET_NAME as u16)) };
        SetInfo {
            name: name.unwrap_or_default(),
            flags: self.get_u32(sys::NFTNL_SET_FLAGS as u16).unwrap_or(0),
            key_type: self.get_u32(sys::NFTNL_SET_KEY_TYPE as u16).unwrap_or(0),
            key_len: self.get_u32(sys::NFTNL_SET_KEY_LEN as u16).unwrap_or(0),
            data_type: self.get_u32(sys::NFTNL_SET_DATA_TYPE as u16),
            data_len: self.get_u32(sys::NFTNL_SET_DATA_LEN as u16),
            policy: self.get_u32(sys::NFTNL_SET_POLICY as u16),
            userdata: self
                .get_bytes(sys::NFTNL_SET_USERDATA as u16)
                .unwrap_or_default(),
            desc_concat: self
                .get_bytes(sys::NFTNL_SET_DESC_CONCAT as u16)
                .unwrap_or_default(),
            expr_names: self.expr_names(),
        }
    }

    fn expr_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        // SAFETY: the callback only reads the expression name and pushes into `names`, whose
        // pointer stays valid for the duration of the call.
        unsafe {
            sys::nftnl_set_expr_foreach(
                self.p(),
                Some(collect_expr_name),
                (&mut names as *mut Vec<String>).cast(),
            );
        }
        names
    }

    /// # Safety
    /// `nlh` must point to a complete NEWSETELEM message.
    unsafe fn elems_from_nlmsg(
        nlh: *const libc::nlmsghdr,
        out: &mut Vec<ElemInfo>,
    ) -> Result<(), NlError> {
        let ptr = Self::alloc_raw(sys::nftnl_set_alloc())?;
        let s = Set {
            ptr,
            bound: 0,
            elems: 0,
        };
        if sys::nftnl_set_elems_nlmsg_parse(nlh, s.p()) < 0 {
            return Err(NlError::Malformed("set elements".into()));
        }
        // (libnftnl's element iterator repeats the first element when combined with
        // `iter_cur`; foreach has no such trap.)
        sys::nftnl_set_elem_foreach(
            s.p(),
            Some(collect_elem),
            (out as *mut Vec<ElemInfo>).cast(),
        );
        Ok(())
    }
}

unsafe extern "C" fn collect_expr_name(e: *mut sys::nftnl_expr, data: *mut c_void) -> c_int {
    // SAFETY (caller): `data` is the `&mut Vec<String>` passed to the foreach call; `e` is valid.
    let names = &mut *data.cast::<Vec<String>>();
    names
        .push(opt_str(sys::nftnl_expr_get_str(e, sys::NFTNL_EXPR_NAME as u16)).unwrap_or_default());
    0
}

/// Declaration attributes of a set as the kernel reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetInfo {
    pub name: String,
    pub flags: u32,
    pub key_type: u32,
    pub key_len: u32,
    pub data_type: Option<u32>,
    pub data_len: Option<u32>,
    pub policy: Option<u32>,
    pub userdata: Vec<u8>,
    pub desc_concat: Vec<u8>,
    /// Names of the per-element statements (e.g. `["counter"]`).
    pub expr_names: Vec<String>,
}

/// `nftnl_set_elem`.
pub struct SetElem {
    ptr: NonNull<sys::nftnl_set_elem>,
    bound: usize,
}
owned!(
    SetElem,
    sys::nftnl_set_elem,
    sys::nftnl_set_elem_free,
    "set element"
);

impl SetElem {
    pub fn new() -> Result<SetElem, NlError> {
        // SAFETY: allocation checked.
        let ptr = unsafe { Self::alloc_raw(sys::nftnl_set_elem_alloc())? };
        // Element nest header + flags attribute.
        Ok(SetElem {
            ptr,
            bound: attr_size(0) + attr_size(4),
        })
    }

    fn value(&mut self, attr: u32, v: &[u8]) -> Result<(), NlError> {
        check_len("element key/data", v.len(), MAX_VALUE_LEN)?;
        if v.is_empty() {
            return Err(NlError::Malformed("empty element key/data".into()));
        }
        self.bound += data_attr(v.len());
        // SAFETY: valid object; libnftnl copies into a 64-byte buffer; length checked above.
        if unsafe {
            sys::nftnl_set_elem_set(
                self.ptr.as_ptr(),
                attr as u16,
                v.as_ptr().cast(),
                v.len() as u32,
            )
        } < 0
        {
            return Err(NlError::Alloc("element value"));
        }
        Ok(())
    }

    pub fn set_key(&mut self, key: &[u8]) -> Result<(), NlError> {
        self.value(sys::NFTNL_SET_ELEM_KEY, key)
    }

    /// End of the range (`NFTA_SET_ELEM_KEY_END`), for concatenated interval (pipapo) sets.
    pub fn set_key_end(&mut self, key: &[u8]) -> Result<(), NlError> {
        self.value(sys::NFTNL_SET_ELEM_KEY_END, key)
    }

    pub fn set_data(&mut self, data: &[u8]) -> Result<(), NlError> {
        self.value(sys::NFTNL_SET_ELEM_DATA, data)
    }

    pub fn set_flags(&mut self, flags: u32) {
        // SAFETY: valid object; u32 attribute.
        unsafe {
            sys::nftnl_set_elem_set_u32(self.ptr.as_ptr(), sys::NFTNL_SET_ELEM_FLAGS as u16, flags)
        }
    }

    pub fn set_userdata(&mut self, ud: &[u8]) -> Result<(), NlError> {
        check_len("element user data", ud.len(), MAX_USERDATA_LEN)?;
        self.bound += attr_size(ud.len());
        // SAFETY: valid object; libnftnl copies `len` bytes.
        if unsafe {
            sys::nftnl_set_elem_set(
                self.ptr.as_ptr(),
                sys::NFTNL_SET_ELEM_USERDATA as u16,
                ud.as_ptr().cast(),
                ud.len() as u32,
            )
        } < 0
        {
            return Err(NlError::Alloc("element user data"));
        }
        Ok(())
    }

    /// The element's attributes, as a dump would report them.
    pub fn info(&self) -> ElemInfo {
        // SAFETY: valid element; `read` only calls getters.
        unsafe { ElemInfo::read(self.ptr.as_ptr()) }
    }

    /// Encoded-size bound of this element.
    pub fn bound(&self) -> usize {
        self.bound
    }
}

/// An element as the kernel dumped it.
#[derive(Debug, Clone, PartialEq, Eq, Default, PartialOrd, Ord)]
pub struct ElemInfo {
    pub key: Vec<u8>,
    pub key_end: Option<Vec<u8>>,
    pub data: Option<Vec<u8>>,
    pub flags: u32,
    pub userdata: Option<Vec<u8>>,
    /// (packets, bytes) of the element's counter statement, if it has one.
    pub counter: Option<(u64, u64)>,
}

impl ElemInfo {
    /// # Safety
    /// `e` must be a valid element.
    unsafe fn read(e: *mut sys::nftnl_set_elem) -> ElemInfo {
        let bytes = |attr: u32| -> Option<Vec<u8>> {
            if !sys::nftnl_set_elem_is_set(e, attr as u16) {
                return None;
            }
            let mut len = 0u32;
            let d = sys::nftnl_set_elem_get(e, attr as u16, &mut len);
            (!d.is_null())
                .then(|| std::slice::from_raw_parts(d.cast::<u8>(), len as usize).to_vec())
        };
        let flags = if sys::nftnl_set_elem_is_set(e, sys::NFTNL_SET_ELEM_FLAGS as u16) {
            sys::nftnl_set_elem_get_u32(e, sys::NFTNL_SET_ELEM_FLAGS as u16)
        } else {
            0
        };
        let mut counter: Option<(u64, u64)> = None;
        sys::nftnl_set_elem_expr_foreach(
            e,
            Some(collect_counter),
            (&mut counter as *mut Option<(u64, u64)>).cast(),
        );
        ElemInfo {
            key: bytes(sys::NFTNL_SET_ELEM_KEY).unwrap_or_default(),
            key_end: bytes(sys::NFTNL_SET_ELEM_KEY_END),
            data: bytes(sys::NFTNL_SET_ELEM_DATA),
            flags,
            userdata: bytes(sys::NFTNL_SET_ELEM_USERDATA),
            counter,
        }
    }
}

unsafe extern "C" fn collect_elem(e: *mut sys::nftnl_set_elem, data: *mut c_void) -> c_int {
    // SAFETY (caller): `data` is the `&mut Vec<ElemInfo>` passed to the foreach call.
    let out = &mut *data.cast::<Vec<ElemInfo>>();
    out.push(ElemInfo::read(e));
    0
}

unsafe extern "C" fn collect_counter(e: *mut sys::nftnl_expr, data: *mut c_void) -> c_int {
    // SAFETY (caller): `data` is the `&mut Option<(u64, u64)>` passed to the foreach call.
    let out = &mut *data.cast::<Option<(u64, u64)>>();
    let name = opt_str(sys::nftnl_expr_get_str(e, sys::NFTNL_EXPR_NAME as u16));
    if name.as_deref() == Some("counter") {
        let pk = sys::nftnl_expr_get_u64(e, sys::NFTNL_EXPR_CTR_PACKETS as u16);
        let by = sys::nftnl_expr_get_u64(e, sys::NFTNL_EXPR_CTR_BYTES as u16);
        *out = Some((pk, by));
    }
    0
}

// ---------------------------------------------------------------------------------------------
// Batch
// ---------------------------------------------------------------------------------------------

/// A growable byte buffer with 4-byte alignment (netlink headers and attributes are 4-aligned)
/// whose whole allocation is always initialised, so libnftnl may write anywhere below `cap()`.
#[derive(Default)]
struct AlignedBuf {
    words: Vec<u32>,
    len: usize,
}

impl AlignedBuf {
    fn cap(&self) -> usize {
        self.words.len() * 4
    }

    /// Make sure at least `extra` bytes past `len` are initialised and writable.
    fn reserve(&mut self, extra: usize) {
        let need = self.len + extra;
        if need > self.cap() {
            let new_cap = need.max(self.cap() * 2).max(4096);
            self.words.resize(new_cap.div_ceil(4), 0);
        }
    }

    fn tail_ptr(&mut self) -> *mut u8 {
        // In bounds: callers reserve before writing.
        self.words.as_mut_ptr().cast::<u8>().wrapping_add(self.len)
    }

    fn as_bytes(&self) -> &[u8] {
        // SAFETY: `len <= cap()` and the whole allocation is initialised u32s, viewed as bytes.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }
}

/// Where a message of the batch came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsgRecord {
    pub seq: u32,
    pub offset: usize,
    pub len: usize,
    /// Caller's tag (the applier uses the index of the transaction op).
    pub tag: usize,
}

/// What a batch message carries.
pub enum Payload<'a> {
    Table(&'a Table),
    Chain(&'a Chain),
    Rule(&'a Rule),
    Set(&'a Set),
    /// The set's name, table and id, plus its element list (possibly empty: "all elements").
    SetElems(&'a Set),
}

/// One transaction: `BATCH_BEGIN`, messages, `BATCH_END`, in one flat buffer.
pub struct Batch {
    buf: AlignedBuf,
    begin_seq: u32,
    next_seq: u32,
    records: Vec<MsgRecord>,
    ended: bool,
}

impl Batch {
    /// Start a batch whose messages are numbered from `first_seq` (the BEGIN marker gets it).
    pub fn new(first_seq: u32) -> Batch {
        let mut b = Batch {
            buf: AlignedBuf::default(),
            begin_seq: first_seq,
            next_seq: first_seq,
            records: Vec::new(),
            ended: false,
        };
        b.marker(true);
        b
    }

    fn marker(&mut self, begin: bool) {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.buf.reserve(64);
        let p = self.buf.tail_ptr().cast::<c_char>();
        // SAFETY: 64 initialised bytes are reserved at `p`; a batch marker is 20 bytes.
        let len = unsafe {
            let nlh = if begin {
                sys::nftnl_batch_begin(p, seq)
            } else {
                sys::nftnl_batch_end(p, seq)
            };
            (*nlh).nlmsg_len as usize
        };
        self.buf.len += nlmsg_align(len);
    }

    /// How many sequence numbers the batch uses (markers included).
    pub fn seq_span(&self) -> u32 {
        self.next_seq.wrapping_sub(self.begin_seq)
    }

    /// Sequence number of the BEGIN marker (the kernel reports commit-time errors against it).
    pub fn begin_seq(&self) -> u32 {
        self.begin_seq
    }

    /// Append one message; returns its sequence number.
    pub fn push(
        &mut self,
        cmd: Cmd,
        family: u16,
        flags: u16,
        payload: Payload<'_>,
        tag: usize,
    ) -> Result<u32, NlError> {
        if self.ended {
            return Err(NlError::Malformed("batch already ended".into()));
        }
        let bound = match &payload {
            Payload::Table(t) => t.bound(),
            Payload::Chain(c) => c.bound(),
            Payload::Rule(r) => r.bound,
            Payload::Set(s) | Payload::SetElems(s) => s.bound,
        };
        // A message longer than a u16-length nest cannot be right, whatever its bound says.
        if bound > 4 * 65536 {
            return Err(NlError::TooLong {
                what: "netlink message bound",
                len: bound,
                max: 4 * 65536,
            });
        }
        let seq = self.next_seq;
        self.buf.reserve(bound);
        let offset = self.buf.len;
        let p = self.buf.tail_ptr().cast::<c_char>();
        // SAFETY: `bound` initialised bytes are reserved at `p` and `bound` is a conservative
        // upper limit of what libnftnl writes for this object (see the module docs).
        let len = unsafe {
            let nlh = sys::nftnl_nlmsg_build_hdr(p, cmd as u16, family, flags, seq);
            match payload {
                Payload::Table(t) => sys::nftnl_table_nlmsg_build_payload(nlh, t.ptr.as_ptr()),
                Payload::Chain(c) => sys::nftnl_chain_nlmsg_build_payload(nlh, c.ptr.as_ptr()),
                Payload::Rule(r) => sys::nftnl_rule_nlmsg_build_payload(nlh, r.ptr.as_ptr()),
                Payload::Set(s) => sys::nftnl_set_nlmsg_build_payload(nlh, s.ptr.as_ptr()),
                Payload::SetElems(s) => {
                    sys::nftnl_set_elems_nlmsg_build_payload(nlh, s.ptr.as_ptr())
                }
            }
            (*nlh).nlmsg_len as usize
        };
        if offset + len > self.buf.cap() {
            // libnftnl wrote past memory we own: the bound computation is wrong and the heap may
            // be corrupt. Continuing would be undefined behaviour.
            std::process::abort();
        }
        if len > bound {
            return Err(NlError::BoundExceeded { len, bound });
        }
        self.buf.len += nlmsg_align(len);
        self.next_seq = self.next_seq.wrapping_add(1);
        self.records.push(MsgRecord {
            seq,
            offset,
            len,
            tag,
        });
        Ok(seq)
    }

    /// Append BATCH_END. Further pushes fail.
    pub fn end(&mut self) {
        if !self.ended {
            self.marker(false);
            self.ended = true;
        }
    }

    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Number of messages between the markers.
    pub fn message_count(&self) -> usize {
        self.records.len()
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.buf.as_bytes()
    }

    pub fn len(&self) -> usize {
        self.buf.len
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The message with sequence number `seq`.
    pub fn record(&self, seq: u32) -> Option<&MsgRecord> {
        let first = self.records.first()?.seq;
        let idx = seq.wrapping_sub(first) as usize;
        self.records.get(idx).filter(|r| r.seq == seq)
    }

    /// The encoded bytes of a message (for locating an extended-ack attribute offset).
    pub fn message_bytes(&self, rec: &MsgRecord) -> &[u8] {
        self.as_bytes()
            .get(rec.offset..rec.offset + rec.len)
            .unwrap_or(&[])
    }
}

const fn nlmsg_align(len: usize) -> usize {
    (len + 3) & !3
}

/// The attribute payloads of a nf_tables message (after the nlmsghdr and nfgenmsg), as
/// `(type, offset of the attribute in the message, payload)`.
pub fn message_attrs(msg: &[u8]) -> Vec<(u16, usize, &[u8])> {
    attrs_at(msg, NLMSG_HDRLEN + NFGENMSG_LEN)
}

/// The attributes nested in the attribute starting at `offset` of `msg`.
pub fn nested_attrs(msg: &[u8], offset: usize) -> Vec<(u16, usize, &[u8])> {
    match msg.get(offset..offset + 4) {
        Some(h) => {
            let len = u16::from_ne_bytes([h[0], h[1]]) as usize;
            let end = (offset + len).min(msg.len());
            attrs_range(msg, offset + 4, end)
        }
        None => Vec::new(),
    }
}

fn attrs_at(msg: &[u8], start: usize) -> Vec<(u16, usize, &[u8])> {
    attrs_range(msg, start, msg.len())
}

fn attrs_range(msg: &[u8], mut pos: usize, end: usize) -> Vec<(u16, usize, &[u8])> {
    let mut out = Vec::new();
    while pos + 4 <= end {
        let len = u16::from_ne_bytes([msg[pos], msg[pos + 1]]) as usize;
        let ty = u16::from_ne_bytes([msg[pos + 2], msg[pos + 3]]) & 0x3fff;
        if len < 4 || pos + len > end {
            break;
        }
        out.push((ty, pos, &msg[pos + 4..pos + len]));
        pos += (len + 3) & !3;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Socket
// ---------------------------------------------------------------------------------------------

/// A `NETLINK_NETFILTER` socket bound to the network namespace of the thread that opened it.
pub struct Socket {
    nl: NonNull<mnl::mnl_socket>,
    fd: c_int,
    portid: u32,
    seq: u32,
    sndbuf: usize,
    rx: AlignedBuf,
}

// SAFETY: the socket is an fd plus libmnl's small struct with no thread affinity; it is used by
// one thread at a time (`&mut self`), never shared.
unsafe impl Send for Socket {}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: we own the mnl socket; closing it closes the fd.
        unsafe {
            mnl::mnl_socket_close(self.nl.as_ptr());
        }
    }
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field("fd", &self.fd)
            .field("portid", &self.portid)
            .finish()
    }
}

impl Socket {
    /// Open and bind a socket. Its receive buffer is raised (so the error reports of a large
    /// failed batch are not dropped) and extended acks are enabled with capped payloads (an error
    /// report then carries only the failed message's header, not up to 64 KiB of elements).
    pub fn open() -> Result<Socket, NlError> {
        // SAFETY: plain libmnl calls; the result is checked and owned by the returned Socket.
        unsafe {
            let nl = NonNull::new(mnl::mnl_socket_open(NETLINK_NETFILTER))
                .ok_or_else(|| NlError::io("socket"))?;
            let fd = mnl::mnl_socket_get_fd(nl.as_ptr());
            let mut s = Socket {
                nl,
                fd,
                portid: 0,
                seq: 0,
                sndbuf: 0,
                rx: AlignedBuf::default(),
            };
            if mnl::mnl_socket_bind(nl.as_ptr(), 0, mnl::MNL_SOCKET_AUTOPID as libc::pid_t) < 0 {
                return Err(NlError::io("bind"));
            }
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            s.portid = mnl::mnl_socket_get_portid(nl.as_ptr());
            s.seq = (libc::time(std::ptr::null_mut()) as u32).wrapping_mul(0x9e37_79b9) | 1;
            s.set_buf(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, SOCKET_RCVBUF)?;
            // Both are best effort: without them errors still arrive, just larger or terser.
            s.setsockopt_int(SOL_NETLINK, NETLINK_CAP_ACK, 1).ok();
            s.setsockopt_int(SOL_NETLINK, NETLINK_EXT_ACK, 1).ok();
            let tv = libc::timeval {
                tv_sec: RECV_TIMEOUT_SECS,
                tv_usec: 0,
            };
            if libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            ) < 0
            {
                return Err(NlError::io("setsockopt SO_RCVTIMEO"));
            }
            s.rx.reserve(RECV_BUF_LEN);
            Ok(s)
        }
    }

    pub fn portid(&self) -> u32 {
        self.portid
    }

    /// The sequence number the next batch should start at (reserve what it used with
    /// [`Socket::reserve_seqs`] before sending).
    pub fn peek_seq(&self) -> u32 {
        self.seq
    }

    /// A fresh sequence number.
    pub fn next_seq(&mut self) -> u32 {
        self.reserve_seqs(1)
    }

    /// Reserve `n` consecutive sequence numbers; returns the first.
    pub fn reserve_seqs(&mut self, n: u32) -> u32 {
        let first = self.seq;
        self.seq = self.seq.wrapping_add(n.max(1));
        first
    }

    fn setsockopt_int(&self, level: c_int, opt: c_int, v: c_int) -> Result<(), NlError> {
        // SAFETY: valid fd; option value is a c_int.
        let r = unsafe {
            libc::setsockopt(
                self.fd,
                level,
                opt,
                (&v as *const c_int).cast(),
                std::mem::size_of::<c_int>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(NlError::io("setsockopt"));
        }
        Ok(())
    }

    /// The FORCE variants ignore `rmem_max`/`wmem_max` (needs CAP_NET_ADMIN, which we have when we
    /// can program nftables at all); fall back to the capped variants otherwise.
    fn set_buf(&mut self, force: c_int, plain: c_int, size: usize) -> Result<(), NlError> {
        let v = c_int::try_from(size).unwrap_or(c_int::MAX);
        if self.setsockopt_int(libc::SOL_SOCKET, force, v).is_ok() {
            return Ok(());
        }
        self.setsockopt_int(libc::SOL_SOCKET, plain, v)
    }

    /// Drop anything left in the receive queue (e.g. the tail of an abandoned dump), so replies
    /// are never confused with stale messages.
    fn drain(&mut self) {
        loop {
            // SAFETY: receiving into our own initialised buffer of `cap()` bytes.
            let n = unsafe {
                libc::recv(
                    self.fd,
                    self.rx.words.as_mut_ptr().cast(),
                    self.rx.cap(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                let err = std::io::Error::last_os_error();
                if n == 0 || err.raw_os_error() != Some(libc::ENOBUFS) {
                    break;
                }
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), NlError> {
        if bytes.len() + 4096 > self.sndbuf {
            // netlink refuses a message larger than the send buffer (EMSGSIZE), and a batch is one
            // message as far as the socket is concerned: size the buffer to the batch (never
            // below 1 MiB, so small batches do not shrink it and big ones rarely resize it).
            let size = (bytes.len() + 4096).max(1 << 20);
            self.set_buf(libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, size)?;
            self.sndbuf = size;
        }
        // SAFETY: zeroed sockaddr_nl is valid; family set below; pid 0 = the kernel.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut c_void,
            iov_len: bytes.len(),
        };
        // SAFETY: zeroed msghdr is valid; all pointers reference live locals.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut addr as *mut libc::sockaddr_nl).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        // SAFETY: valid fd and msghdr.
        let n = unsafe { libc::sendmsg(self.fd, &msg, 0) };
        if n < 0 {
            return Err(NlError::io("sendmsg"));
        }
        if n as usize != bytes.len() {
            return Err(NlError::Malformed(format!(
                "short netlink send: {n} of {} bytes",
                bytes.len()
            )));
        }
        Ok(())
    }

    /// Receive one datagram into `self.rx`; `Ok(None)` when nothing is queued (non-blocking).
    fn recv(&mut self, nonblocking: bool) -> Result<Option<usize>, NlError> {
        let flags = libc::MSG_TRUNC | if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        loop {
            // SAFETY: receiving into our own initialised buffer of `cap()` bytes.
            let n = unsafe {
                libc::recv(
                    self.fd,
                    self.rx.words.as_mut_ptr().cast(),
                    self.rx.cap(),
                    flags,
                )
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) if nonblocking => return Ok(None),
                    Some(libc::EAGAIN) => {
                        return Err(NlError::Io {
                            op: "recv (timed out waiting for the kernel)",
                            source: err,
                        });
                    }
                    _ => {
                        return Err(NlError::Io {
                            op: "recv",
                            source: err,
                        })
                    }
                }
            }
            let n = n as usize;
            if n > self.rx.cap() {
                return Err(NlError::Malformed(format!(
                    "datagram of {n} bytes truncated"
                )));
            }
            return Ok(Some(n));
        }
    }

    /// Send a finished batch with one `sendmsg` and return the kernel's error reports.
    ///
    /// nfnetlink processes the whole batch inside `sendmsg`, so when it returns every error
    /// report is already queued on this socket: reading them non-blockingly until the queue is
    /// empty is enough, and needs no per-message acks (which would overflow the receive queue at
    /// 100k messages). The kernel keeps processing after an error so that all errors are
    /// reported; any error means the batch was aborted as a whole. An empty result means it was
    /// committed.
    pub fn send_batch(&mut self, batch: &Batch) -> Result<Vec<KernelError>, NlError> {
        if !batch.is_ended() {
            return Err(NlError::Malformed("batch not ended".into()));
        }
        self.drain();
        self.send(batch.as_bytes())?;
        let mut errors = Vec::new();
        while let Some(n) = self.recv(true)? {
            for m in split_messages(&self.rx.as_bytes_n(n))? {
                if m.portid != self.portid {
                    continue;
                }
                if m.ty == NLMSG_ERROR {
                    if let Some(e) = parse_error(m.bytes)? {
                        errors.push(e);
                    }
                }
            }
        }
        errors.sort_by_key(|e| e.seq.wrapping_sub(batch.begin_seq()));
        Ok(errors)
    }

    /// Send one request and feed every reply message (not errors/acks/done) to `on_msg`.
    /// With `dump`, the reply ends with NLMSG_DONE; otherwise the request asks for an ack and
    /// the reply ends with it.
    fn request(
        &mut self,
        cmd: Cmd,
        family: u16,
        dump: bool,
        build: impl FnOnce(*mut libc::nlmsghdr),
        mut on_msg: impl FnMut(*const libc::nlmsghdr) -> Result<(), NlError>,
    ) -> Result<bool, NlError> {
        self.drain();
        let mut interrupted = false;
        let seq = self.next_seq();
        let mut buf = AlignedBuf::default();
        buf.reserve(MSG_BASE + 256);
        let flags = if dump {
            flags::NLM_F_DUMP
        } else {
            flags::NLM_F_ACK
        };
        // SAFETY: MSG_BASE+256 initialised bytes reserved; requests carry only names and ids.
        let len = unsafe {
            let nlh =
                sys::nftnl_nlmsg_build_hdr(buf.tail_ptr().cast(), cmd as u16, family, flags, seq);
            build(nlh);
            (*nlh).nlmsg_len as usize
        };
        if len > buf.cap() {
            std::process::abort();
        }
        buf.len = len;
        self.send(buf.as_bytes())?;
        loop {
            let n = self.recv(false)?.unwrap_or(0);
            let data = self.rx.as_bytes_n(n);
            for m in split_messages(&data)? {
                if m.seq != seq || m.portid != self.portid {
                    continue;
                }
                interrupted |= m.flags & flags::NLM_F_DUMP_INTR != 0;
                match m.ty {
                    NLMSG_NOOP => {}
                    NLMSG_ERROR => {
                        return match parse_error(m.bytes)? {
                            Some(e) => Err(NlError::Kernel(e)),
                            None => Ok(interrupted),
                        };
                    }
                    NLMSG_DONE => {
                        // Newer kernels put a (negative) errno in DONE when a dump failed.
                        let err = m
                            .bytes
                            .get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                        return match err {
                            Some(e) if e < 0 => Err(NlError::Kernel(KernelError {
                                errno: -e,
                                seq,
                                msg: None,
                                bad_attr_offset: None,
                            })),
                            _ => Ok(interrupted),
                        };
                    }
                    _ => {
                        // Parse from an aligned copy: libnftnl reads through `nlmsghdr` pointers.
                        let mut copy = AlignedBuf::default();
                        copy.reserve(m.bytes.len());
                        // SAFETY: `copy` has at least `m.bytes.len()` initialised bytes.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                m.bytes.as_ptr(),
                                copy.tail_ptr(),
                                m.bytes.len(),
                            )
                        };
                        copy.len = m.bytes.len();
                        on_msg(copy.words.as_ptr().cast())?;
                    }
                }
            }
        }
    }

    /// The ruleset generation id (NFT_MSG_GETGEN).
    pub fn generation(&mut self) -> Result<u32, NlError> {
        let mut gen = None;
        self.request(
            Cmd::GetGen,
            consts::NFPROTO_UNSPEC,
            false,
            |_| {},
            |nlh| {
                // SAFETY: `nlh` is a complete, aligned message; the gen object is freed below.
                unsafe {
                    let g = sys::nftnl_gen_alloc();
                    if g.is_null() {
                        return Err(NlError::Alloc("generation"));
                    }
                    let ok = sys::nftnl_gen_nlmsg_parse(nlh, g) >= 0;
                    if ok {
                        gen = Some(sys::nftnl_gen_get_u32(g, sys::NFTNL_GEN_ID as u16));
                    }
                    sys::nftnl_gen_free(g);
                    if !ok {
                        return Err(NlError::Malformed("generation".into()));
                    }
                }
                Ok(())
            },
        )?;
        gen.ok_or_else(|| NlError::Malformed("no generation in reply".into()))
    }

    /// Whether table `name` of `family` exists (NFT_MSG_GETTABLE).
    pub fn table_exists(&mut self, family: u16, name: &str) -> Result<bool, NlError> {
        let t = Table::new(family, name)?;
        let mut found = false;
        let r = self.request(
            Cmd::GetTable,
            family,
            false,
            // SAFETY: `nlh` is the request being built in a reserved buffer.
            |nlh| unsafe { sys::nftnl_table_nlmsg_build_payload(nlh, t.ptr.as_ptr()) },
            |nlh| {
                // SAFETY: complete, aligned message.
                let got = unsafe { Table::from_nlmsg(nlh)? };
                found = got.name().as_deref() == Some(name);
                Ok(())
            },
        );
        match r {
            Ok(_) => Ok(found),
            Err(NlError::Kernel(e)) if e.errno == libc::ENOENT => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The declaration of one set (NFT_MSG_GETSET).
    pub fn get_set(&mut self, family: u16, table: &str, name: &str) -> Result<SetInfo, NlError> {
        let s = Set::new(family, table, name)?;
        let mut info = None;
        self.request(
            Cmd::GetSet,
            family,
            false,
            // SAFETY: `nlh` is the request being built in a reserved buffer; an unconfigured set
            // encodes only table and name.
            |nlh| unsafe { sys::nftnl_set_nlmsg_build_payload(nlh, s.ptr.as_ptr()) },
            |nlh| {
                // SAFETY: complete, aligned message.
                let got = unsafe { Set::from_nlmsg(nlh)? };
                info = Some(got.info());
                Ok(())
            },
        )?;
        info.ok_or_else(|| NlError::Malformed(format!("no set {name} in reply")))
    }

    /// Every set of a table (NFT_MSG_GETSET dump).
    pub fn dump_sets(&mut self, family: u16, table: &str) -> Result<Vec<SetInfo>, NlError> {
        let table_c = cstring(table)?;
        let mut out = Vec::new();
        self.request(
            Cmd::GetSet,
            family,
            true,
            // SAFETY: `nlh` is the request being built; a set with only a table name scopes the
            // dump to that table.
            |nlh| unsafe {
                let s = sys::nftnl_set_alloc();
                if !s.is_null() {
                    sys::nftnl_set_set_str(s, sys::NFTNL_SET_TABLE as u16, table_c.as_ptr());
                    sys::nftnl_set_nlmsg_build_payload(nlh, s);
                    sys::nftnl_set_free(s);
                }
            },
            |nlh| {
                // SAFETY: complete, aligned message.
                let got = unsafe { Set::from_nlmsg(nlh)? };
                out.push(got.info());
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// All elements of one set (NFT_MSG_GETSETELEM dump).
    ///
    /// A dump arrives in several reads, and the kernel walks a hash set afresh for each one,
    /// skipping what it already sent. When the hash table is resized in between (which the
    /// kernel does in the background after large additions), a dump repeats some elements and
    /// misses as many others. A consistent set never holds the same element twice, so a dump
    /// with a repeat (or flagged NLM_F_DUMP_INTR) is taken again, after a pause that lets the
    /// resize finish.
    pub fn dump_elems(
        &mut self,
        family: u16,
        table: &str,
        set: &str,
    ) -> Result<Vec<ElemInfo>, NlError> {
        const ATTEMPTS: u32 = 20;
        for attempt in 1..=ATTEMPTS {
            let (elems, interrupted) = self.dump_elems_once(family, table, set)?;
            let mut seen = std::collections::HashSet::with_capacity(elems.len());
            let repeated = elems.iter().any(|e| {
                !seen.insert((
                    &e.key,
                    &e.key_end,
                    e.flags & consts::NFT_SET_ELEM_INTERVAL_END,
                ))
            });
            if !repeated && !interrupted {
                return Ok(elems);
            }
            tracing::debug!(
                set,
                attempt,
                repeated,
                interrupted,
                "inconsistent set element dump, retrying"
            );
            std::thread::sleep(std::time::Duration::from_millis(10 * u64::from(attempt)));
        }
        Err(NlError::Malformed(format!(
            "set {set}: {ATTEMPTS} dumps in a row were inconsistent (set changing or being resized)"
        )))
    }

    fn dump_elems_once(
        &mut self,
        family: u16,
        table: &str,
        set: &str,
    ) -> Result<(Vec<ElemInfo>, bool), NlError> {
        let s = Set::new(family, table, set)?;
        let mut out = Vec::new();
        let interrupted = self.request(
            Cmd::GetSetElem,
            family,
            true,
            // SAFETY: `nlh` is the request being built; a set without elements encodes only its
            // table and name.
            |nlh| unsafe { sys::nftnl_set_elems_nlmsg_build_payload(nlh, s.ptr.as_ptr()) },
            // SAFETY: complete, aligned message.
            |nlh| unsafe { Set::elems_from_nlmsg(nlh, &mut out) },
        )?;
        Ok((out, interrupted))
    }

    /// Every rule of a table as (chain, expression texts), in kernel order (NFT_MSG_GETRULE dump).
    pub fn dump_rules(
        &mut self,
        family: u16,
        table: &str,
    ) -> Result<Vec<(String, Vec<String>)>, NlError> {
        let table_c = cstring(table)?;
        let mut out = Vec::new();
        self.request(
            Cmd::GetRule,
            family,
            true,
            // SAFETY: `nlh` is the request being built; a rule with only a table scopes the dump.
            |nlh| unsafe {
                let r = sys::nftnl_rule_alloc();
                if !r.is_null() {
                    sys::nftnl_rule_set_str(r, sys::NFTNL_RULE_TABLE as u16, table_c.as_ptr());
                    sys::nftnl_rule_nlmsg_build_payload(nlh, r);
                    sys::nftnl_rule_free(r);
                }
            },
            |nlh| {
                // SAFETY: complete, aligned message.
                let r = unsafe { Rule::from_nlmsg(nlh)? };
                out.push((r.chain().unwrap_or_default(), r.expr_texts()));
                Ok(())
            },
        )?;
        Ok(out)
    }
}

impl AlignedBuf {
    /// The first `n` received bytes.
    fn as_bytes_n(&self, n: usize) -> Vec<u8> {
        // SAFETY: `n <= cap()` (checked by `recv`) and the allocation is initialised.
        unsafe {
            std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), n.min(self.cap())).to_vec()
        }
    }
}

struct RawMsg<'a> {
    ty: u16,
    flags: u16,
    seq: u32,
    portid: u32,
    /// The whole message including its header.
    bytes: &'a [u8],
}

fn split_messages(data: &[u8]) -> Result<Vec<RawMsg<'_>>, NlError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + NLMSG_HDRLEN <= data.len() {
        let h = &data[pos..pos + NLMSG_HDRLEN];
        let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
        if len < NLMSG_HDRLEN || pos + len > data.len() {
            return Err(NlError::Malformed(format!(
                "message length {len} at offset {pos} of {}",
                data.len()
            )));
        }
        out.push(RawMsg {
            ty: u16::from_ne_bytes([h[4], h[5]]),
            flags: u16::from_ne_bytes([h[6], h[7]]),
            seq: u32::from_ne_bytes([h[8], h[9], h[10], h[11]]),
            portid: u32::from_ne_bytes([h[12], h[13], h[14], h[15]]),
            bytes: &data[pos..pos + len],
        });
        pos += nlmsg_align(len);
    }
    Ok(out)
}

/// Parse an NLMSG_ERROR message; `None` for an ack (error 0).
fn parse_error(msg: &[u8]) -> Result<Option<KernelError>, NlError> {
    let flags = u16::from_ne_bytes([msg[6], msg[7]]);
    let body = &msg[NLMSG_HDRLEN..];
    if body.len() < 4 + NLMSG_HDRLEN {
        return Err(NlError::Malformed("short error report".into()));
    }
    let err = i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
    if err == 0 {
        return Ok(None);
    }
    let orig = &body[4..4 + NLMSG_HDRLEN];
    let orig_len = u32::from_ne_bytes([orig[0], orig[1], orig[2], orig[3]]) as usize;
    let seq = u32::from_ne_bytes([orig[8], orig[9], orig[10], orig[11]]);
    let mut e = KernelError {
        errno: -err,
        seq,
        msg: None,
        bad_attr_offset: None,
    };
    if flags & flags::NLM_F_ACK_TLVS != 0 {
        let echoed = if flags & flags::NLM_F_CAPPED != 0 {
            NLMSG_HDRLEN
        } else {
            nlmsg_align(orig_len)
        };
        let tlv_start = NLMSG_HDRLEN + 4 + echoed;
        for (ty, _, payload) in attrs_at(msg, tlv_start) {
            match ty {
                NLMSGERR_ATTR_MSG => {
                    let s = payload.split(|b| *b == 0).next().unwrap_or(&[]);
                    e.msg = Some(String::from_utf8_lossy(s).into_owned());
                }
                NLMSGERR_ATTR_OFFS if payload.len() >= 4 => {
                    e.bad_attr_offset = Some(u32::from_ne_bytes([
                        payload[0], payload[1], payload[2], payload[3],
                    ]));
                }
                _ => {}
            }
        }
    }
    Ok(Some(e))
}

#[cfg(test)]
mod tests;
