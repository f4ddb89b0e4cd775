//! Rules: IR matches and actions lowered to libnftnl expressions.

use super::*;

// ---------------------------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------------------------

/// nft's register numbering: slot `n` (1-based, 32-bit slots) is sent as the 128-bit register
/// `NFT_REG_1 + (n-1)/4` when 16-byte aligned, for compatibility with old kernels, and as the
/// 32-bit register `NFT_REG32_00 + (n-1)` otherwise.
pub(super) fn nft_reg(slot: u32) -> u32 {
    let r = slot - 1;
    if r.is_multiple_of(4) {
        NFT_REG_1 + r / 4
    } else {
        NFT_REG32_00 + r
    }
}

/// Slots nft reserves for a key: a concatenation its padded size, anything else a whole 16-byte
/// register.
pub(super) fn key_slots(fields: &[Field], fam: Family) -> u32 {
    if fields.len() > 1 {
        fields.iter().map(|f| reg_slots(field_len(*f, fam))).sum()
    } else {
        4
    }
}

/// How a lookup into some set is encoded.
pub(super) struct SetRef {
    pub(super) id: Option<u32>,
    pub(super) interval: bool,
}

pub(super) struct RuleLowering<'a> {
    pub(super) family: Family,
    pub(super) rule: nl::Rule,
    pub(super) sets: &'a dyn Fn(&str) -> SetRef,
}

impl RuleLowering<'_> {
    pub(super) fn push(&mut self, e: Result<Expr, NlError>) -> Result<(), LowerError> {
        self.rule.push(e.map_err(nlerr)?);
        Ok(())
    }

    pub(super) fn load(&mut self, f: Field, slot: u32) -> Result<(), LowerError> {
        let reg = nft_reg(slot);
        let fam = self.family;
        let e = match f {
            Field::Saddr | Field::Daddr => {
                let off = match (f == Field::Saddr, fam) {
                    (true, Family::Ip) => 12,
                    (false, Family::Ip) => 16,
                    (true, Family::Ip6) => 8,
                    (false, Family::Ip6) => 24,
                };
                Expr::payload_load(NFT_PAYLOAD_NETWORK_HEADER, off, addr_len(fam) as u32, reg)
            }
            Field::ThDport => Expr::payload_load(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, reg),
            Field::L4proto => Expr::meta_load(NFT_META_L4PROTO, reg),
            Field::Iifname => Expr::meta_load(NFT_META_IIFNAME, reg),
            Field::CtOrigSaddr | Field::CtOrigDaddr => {
                Expr::ct_load(ct_addr_key(f, fam), Some(IP_CT_DIR_ORIGINAL), reg)
            }
            Field::CtOrigProtoDst => Expr::ct_load(NFT_CT_PROTO_DST, Some(IP_CT_DIR_ORIGINAL), reg),
            Field::Numgen(n) => {
                if n == 0 {
                    return Err(LowerError::Encode("numgen modulus 0".into()));
                }
                Expr::numgen(reg, n, NFT_NG_RANDOM, 0)
            }
        };
        self.push(e)
    }

    /// Load a (possibly concatenated) key from `slot` on. For interval sets nft converts
    /// host-endian parts to network order right after loading them: always inside a
    /// concatenation, for a lone key only when it is wider than a byte.
    pub(super) fn load_key(
        &mut self,
        fields: &[Field],
        slot: u32,
        interval: bool,
    ) -> Result<(), LowerError> {
        if fields.is_empty() {
            return Err(LowerError::Encode("empty key".into()));
        }
        if slot - 1 + key_slots(fields, self.family) > NFT_REG32_COUNT {
            return Err(LowerError::Encode(
                "key and value do not fit the 16 registers".into(),
            ));
        }
        let mut s = slot;
        for f in fields {
            self.load(*f, s)?;
            let len = field_len(*f, self.family);
            if interval && host_endian(*f) && (fields.len() > 1 || len > 1) {
                let size = if len.is_multiple_of(8) {
                    8
                } else if len.is_multiple_of(4) {
                    4
                } else {
                    2
                };
                self.push(Expr::byteorder(
                    nft_reg(s),
                    nft_reg(s),
                    NFT_BYTEORDER_HTON,
                    len as u32,
                    size,
                ))?;
            }
            s += reg_slots(len);
        }
        Ok(())
    }

    pub(super) fn bit_test(
        &mut self,
        load: Result<Expr, NlError>,
        bits: u32,
        op: u32,
        want: u32,
    ) -> Result<(), LowerError> {
        let r = nft_reg(1);
        self.push(load)?;
        self.push(Expr::bitwise(
            r,
            r,
            &bits.to_ne_bytes(),
            &0u32.to_ne_bytes(),
        ))?;
        self.push(Expr::cmp(r, op, &want.to_ne_bytes()))
    }

    pub(super) fn fib_local(&mut self, flag: u32) -> Result<(), LowerError> {
        let r = nft_reg(1);
        self.push(Expr::fib(flag, NFT_FIB_RESULT_ADDRTYPE, r))?;
        self.push(Expr::cmp(r, NFT_CMP_EQ, &RTN_LOCAL.to_ne_bytes()))
    }

    pub(super) fn mark_set(&mut self, mask: u32, xor: u32) -> Result<(), LowerError> {
        let r = nft_reg(1);
        self.push(Expr::meta_load(NFT_META_MARK, r))?;
        self.push(Expr::bitwise(r, r, &mask.to_ne_bytes(), &xor.to_ne_bytes()))?;
        self.push(Expr::meta_set(NFT_META_MARK, r))
    }

    pub(super) fn lower_match(&mut self, m: &Match) -> Result<(), LowerError> {
        match m {
            Match::CtStateNew => self.bit_test(
                Expr::ct_load(NFT_CT_STATE, None, nft_reg(1)),
                NF_CT_STATE_NEW_BIT,
                NFT_CMP_NEQ,
                0,
            ),
            Match::CtStatusDnat => self.bit_test(
                Expr::ct_load(NFT_CT_STATUS, None, nft_reg(1)),
                IPS_DST_NAT,
                NFT_CMP_NEQ,
                0,
            ),
            Match::MarkUnset(bits) => self.bit_test(
                Expr::meta_load(NFT_META_MARK, nft_reg(1)),
                *bits,
                NFT_CMP_EQ,
                0,
            ),
            Match::L4protoIs(p) => {
                let r = nft_reg(1);
                self.push(Expr::meta_load(NFT_META_L4PROTO, r))?;
                self.push(Expr::cmp(r, NFT_CMP_EQ, &[p.number()]))
            }
            Match::FibDaddrLocal => self.fib_local(NFTA_FIB_F_DADDR),
            Match::FibSaddrLocal => self.fib_local(NFTA_FIB_F_SADDR),
            Match::Lookup { key, set, negate } => {
                let r = (self.sets)(set);
                self.load_key(key, 1, r.interval)?;
                self.push(Expr::lookup(nft_reg(1), None, set, r.id, *negate))
            }
        }
    }

    pub(super) fn lower_action(&mut self, a: &Action) -> Result<(), LowerError> {
        match a {
            Action::Jump(c) => self.push(Expr::verdict(NFT_JUMP, Some(c))),
            Action::Goto(c) => self.push(Expr::verdict(NFT_GOTO, Some(c))),
            Action::Return => self.push(Expr::verdict(NFT_RETURN, None)),
            Action::Drop => self.push(Expr::verdict(NF_DROP, None)),
            Action::Reject => {
                // Plain `reject`: ICMP port unreachable of the table's family.
                let code = match self.family {
                    Family::Ip => ICMP_PORT_UNREACH,
                    Family::Ip6 => ICMPV6_PORT_UNREACH,
                };
                self.push(Expr::reject(NFT_REJECT_ICMP_UNREACH, code))
            }
            Action::MarkOr(bits) => self.mark_set(!bits, *bits),
            Action::MarkXor(bits) => self.mark_set(u32::MAX, *bits),
            Action::Masquerade => self.push(Expr::masq(NF_NAT_RANGE_PROTO_RANDOM_FULLY)),
            Action::DnatMap { key, map } => {
                // The map's value (address . port) lands in the register the key started in;
                // the port follows the address's padded size.
                let r = (self.sets)(map);
                self.load_key(key, 1, r.interval)?;
                let reg = nft_reg(1);
                self.push(Expr::lookup(reg, Some(reg), map, r.id, false))?;
                let proto = nft_reg(1 + reg_slots(addr_len(self.family)));
                self.push(Expr::nat(
                    NFT_NAT_DNAT,
                    nfproto(self.family),
                    reg,
                    Some(proto),
                ))
            }
            Action::UpdateTimeout {
                set,
                key,
                timeout_secs,
                value,
            } => {
                let r = (self.sets)(set);
                self.load_key(key, 1, false)?;
                let data_slot = 1 + key_slots(key, self.family);
                self.load_key(value, data_slot, false)?;
                self.push(Expr::dynset(
                    NFT_DYNSET_OP_UPDATE,
                    nft_reg(1),
                    Some(nft_reg(data_slot)),
                    Some(u64::from(*timeout_secs) * 1000),
                    set,
                    r.id,
                ))
            }
        }
    }
}

pub(super) fn lower_rule(
    family: Family,
    table: &str,
    chain: &str,
    rule: &Rule,
    sets: &dyn Fn(&str) -> SetRef,
) -> Result<nl::Rule, LowerError> {
    let mut l = RuleLowering {
        family,
        rule: nl::Rule::new(nfproto(family), table, chain).map_err(nlerr)?,
        sets,
    };
    for m in &rule.matches {
        l.lower_match(m)?;
    }
    l.lower_action(&rule.action)?;
    Ok(l.rule)
}

pub(super) fn hooknum(h: Hook) -> u32 {
    match h {
        Hook::Prerouting => NF_INET_PRE_ROUTING,
        Hook::Input => NF_INET_LOCAL_IN,
        Hook::Forward => NF_INET_FORWARD,
        Hook::Output => NF_INET_LOCAL_OUT,
        Hook::Postrouting => NF_INET_POST_ROUTING,
    }
}

pub(super) fn chain_object(
    family: Family,
    table: &str,
    name: &str,
    base: Option<&BaseChain>,
) -> Result<nl::Chain, NlError> {
    let mut c = nl::Chain::new(nfproto(family), table, name)?;
    if let Some(b) = base {
        let ty = match b.kind {
            ChainType::Filter => "filter",
            ChainType::Nat => "nat",
        };
        // The priority is always numeric on the wire (nft resolves `dstnat` etc. itself), which
        // also covers the ip-family nat OUTPUT chain that must be created with -100.
        c.set_base(hooknum(b.hook), b.priority, ty, NF_ACCEPT)?;
    }
    Ok(c)
}
