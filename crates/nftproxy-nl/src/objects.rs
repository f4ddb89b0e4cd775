//! libnftnl objects (tables, chains, expressions, rules, sets, elements) that free themselves
//! on drop, and what dumps of them carry back.

use super::*;

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
    pub(crate) ptr: NonNull<sys::nftnl_table>,
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

    pub(crate) fn bound(&self) -> usize {
        MSG_BASE + 64
    }

    /// Parse a NEWTABLE message (reply to GETTABLE).
    ///
    /// # Safety
    /// `nlh` must point to a complete netlink message.
    pub(crate) unsafe fn from_nlmsg(nlh: *const libc::nlmsghdr) -> Result<Table, NlError> {
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
pub(crate) unsafe fn opt_str(p: *const c_char) -> Option<String> {
    if p.is_null() {
        None
    } else {
        Some(CStr::from_ptr(p).to_string_lossy().into_owned())
    }
}

/// `nftnl_chain`.
pub struct Chain {
    pub(crate) ptr: NonNull<sys::nftnl_chain>,
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

    pub(crate) fn bound(&self) -> usize {
        MSG_BASE + 128
    }

    /// Parse a NEWCHAIN message (reply to GETCHAIN).
    ///
    /// # Safety
    /// `nlh` must point to a complete netlink message.
    pub(crate) unsafe fn from_nlmsg(nlh: *const libc::nlmsghdr) -> Result<Chain, NlError> {
        let ptr = Self::alloc_raw(sys::nftnl_chain_alloc())?;
        let c = Chain { ptr };
        if sys::nftnl_chain_nlmsg_parse(nlh, c.ptr.as_ptr()) < 0 {
            return Err(NlError::Malformed("chain".into()));
        }
        Ok(c)
    }

    pub fn name(&self) -> Option<String> {
        // SAFETY: NULL or a string owned by the object.
        unsafe {
            opt_str(sys::nftnl_chain_get_str(
                self.ptr.as_ptr(),
                sys::NFTNL_CHAIN_NAME as u16,
            ))
        }
    }

    pub fn table(&self) -> Option<String> {
        // SAFETY: NULL or a string owned by the object.
        unsafe {
            opt_str(sys::nftnl_chain_get_str(
                self.ptr.as_ptr(),
                sys::NFTNL_CHAIN_TABLE as u16,
            ))
        }
    }
}

/// `nftnl_expr`: one expression of a rule (or a set/element statement such as `counter`).
pub struct Expr {
    pub(crate) ptr: NonNull<sys::nftnl_expr>,
    pub(crate) bound: usize,
}
owned!(Expr, sys::nftnl_expr, sys::nftnl_expr_free, "expression");

/// Registers, verdict codes and the other parameters are plain numbers (see [`consts`]); the
/// constructors only guarantee that every attribute is set with the width libnftnl expects.
impl Expr {
    pub(crate) fn new(name: &CStr) -> Result<Expr, NlError> {
        // SAFETY: name is a valid C string; result checked.
        let ptr = unsafe { Self::alloc_raw(sys::nftnl_expr_alloc(name.as_ptr()))? };
        // Generous: the largest fixed-size expression (nat, dynset without names) is < 128 bytes.
        Ok(Expr { ptr, bound: 160 })
    }

    pub(crate) fn p(&self) -> *mut sys::nftnl_expr {
        self.ptr.as_ptr()
    }

    pub(crate) fn u32(&mut self, attr: u32, v: u32) {
        // SAFETY: valid object; attribute is a 32-bit field in libnftnl.
        unsafe { sys::nftnl_expr_set_u32(self.p(), attr as u16, v) }
    }

    pub(crate) fn u8(&mut self, attr: u32, v: u8) {
        // SAFETY: valid object; attribute is an 8-bit field in libnftnl.
        unsafe { sys::nftnl_expr_set_u8(self.p(), attr as u16, v) }
    }

    pub(crate) fn u64(&mut self, attr: u32, v: u64) {
        // SAFETY: valid object; attribute is a 64-bit field in libnftnl.
        unsafe { sys::nftnl_expr_set_u64(self.p(), attr as u16, v) }
    }

    pub(crate) fn str(&mut self, attr: u32, s: &str) -> Result<(), NlError> {
        let c = cstring(s)?;
        self.bound += str_attr(s.len());
        // SAFETY: valid object; string is copied.
        if unsafe { sys::nftnl_expr_set_str(self.p(), attr as u16, c.as_ptr()) } < 0 {
            return Err(NlError::Alloc("expression string"));
        }
        Ok(())
    }

    pub(crate) fn data(&mut self, attr: u32, d: &[u8]) -> Result<(), NlError> {
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

    pub(crate) fn into_raw(self) -> *mut sys::nftnl_expr {
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
pub(crate) unsafe fn expr_text(e: *const sys::nftnl_expr) -> String {
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
    pub(crate) ptr: NonNull<sys::nftnl_rule>,
    pub(crate) bound: usize,
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
    pub(crate) unsafe fn from_nlmsg(nlh: *const libc::nlmsghdr) -> Result<Rule, NlError> {
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
    pub(crate) ptr: NonNull<sys::nftnl_set>,
    pub(crate) bound: usize,
    pub(crate) elems: usize,
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

    pub(crate) fn p(&self) -> *mut sys::nftnl_set {
        self.ptr.as_ptr()
    }

    pub(crate) fn set_u32(&mut self, attr: u16, v: u32) {
        // SAFETY: valid object; u32 attribute.
        unsafe { sys::nftnl_set_set_u32(self.p(), attr, v) }
    }

    pub(crate) fn get_u32(&self, attr: u16) -> Option<u32> {
        // SAFETY: valid object; attribute presence checked first.
        unsafe {
            sys::nftnl_set_is_set(self.p(), attr).then(|| sys::nftnl_set_get_u32(self.p(), attr))
        }
    }

    pub(crate) fn get_bytes(&self, attr: u16) -> Option<Vec<u8>> {
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
    pub(crate) unsafe fn from_nlmsg(nlh: *const libc::nlmsghdr) -> Result<Set, NlError> {
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

    pub(crate) fn expr_names(&self) -> Vec<String> {
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
    pub(crate) unsafe fn elems_from_nlmsg(
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

pub(crate) unsafe extern "C" fn collect_expr_name(
    e: *mut sys::nftnl_expr,
    data: *mut c_void,
) -> c_int {
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
    pub(crate) ptr: NonNull<sys::nftnl_set_elem>,
    pub(crate) bound: usize,
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

    pub(crate) fn value(&mut self, attr: u32, v: &[u8]) -> Result<(), NlError> {
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
    pub(crate) unsafe fn read(e: *mut sys::nftnl_set_elem) -> ElemInfo {
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

pub(crate) unsafe extern "C" fn collect_elem(
    e: *mut sys::nftnl_set_elem,
    data: *mut c_void,
) -> c_int {
    // SAFETY (caller): `data` is the `&mut Vec<ElemInfo>` passed to the foreach call.
    let out = &mut *data.cast::<Vec<ElemInfo>>();
    out.push(ElemInfo::read(e));
    0
}

pub(crate) unsafe extern "C" fn collect_counter(
    e: *mut sys::nftnl_expr,
    data: *mut c_void,
) -> c_int {
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
