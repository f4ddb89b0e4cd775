//! Fields and set layouts: how each IR field and set key is laid out in netlink.

use super::*;

// ---------------------------------------------------------------------------------------------
// Fields and set layouts
// ---------------------------------------------------------------------------------------------

pub(super) fn nfproto(f: Family) -> u16 {
    match f {
        Family::Ip => NFPROTO_IPV4,
        Family::Ip6 => NFPROTO_IPV6,
    }
}

pub(super) fn addr_len(f: Family) -> usize {
    match f {
        Family::Ip => 4,
        Family::Ip6 => 16,
    }
}

/// Bytes a field occupies in a register (before padding).
pub(super) fn field_len(f: Field, fam: Family) -> usize {
    match f {
        Field::Saddr | Field::Daddr | Field::CtOrigSaddr | Field::CtOrigDaddr => addr_len(fam),
        Field::L4proto => 1,
        Field::ThDport | Field::CtOrigProtoDst => 2,
        Field::Numgen(_) => 4,
        Field::Iifname => 16,
    }
}

/// Fields nft treats as host byte order.
pub(super) fn host_endian(f: Field) -> bool {
    matches!(f, Field::L4proto | Field::Numgen(_))
}

pub(super) fn field_value_type(f: Field, fam: Family) -> FieldType {
    match f {
        Field::Saddr | Field::Daddr | Field::CtOrigSaddr | Field::CtOrigDaddr => {
            FieldType::addr(fam)
        }
        Field::L4proto => FieldType::InetProto,
        Field::ThDport | Field::CtOrigProtoDst => FieldType::InetService,
        Field::Numgen(_) => FieldType::Slot,
        Field::Iifname => FieldType::Ifname,
    }
}

pub(super) fn ct_addr_key(f: Field, fam: Family) -> u32 {
    match (f, fam) {
        (Field::CtOrigSaddr, Family::Ip) => NFT_CT_SRC_IP,
        (Field::CtOrigSaddr, Family::Ip6) => NFT_CT_SRC_IP6,
        (_, Family::Ip) => NFT_CT_DST_IP,
        (_, Family::Ip6) => NFT_CT_DST_IP6,
    }
}

/// One component of a set key or map value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Comp {
    pub(super) ty: FieldType,
    /// nft datatype id for `NFTA_SET_KEY_TYPE`.
    pub(super) type_id: u32,
    pub(super) len: usize,
    /// Byte order nft records for a lone key of this component.
    pub(super) byteorder: u32,
    /// The `typeof` expression, if declared that way.
    pub(super) field: Option<Field>,
}

impl Comp {
    pub(super) fn of_type(ty: FieldType) -> Result<Comp, LowerError> {
        let (type_id, byteorder) = match ty {
            FieldType::Ipv4Addr => (TYPE_IPADDR, BYTEORDER_BIG),
            FieldType::Ipv6Addr => (TYPE_IP6ADDR, BYTEORDER_BIG),
            // nft's inet_proto datatype has no byte order of its own.
            FieldType::InetProto => (TYPE_INET_PROTOCOL, BYTEORDER_INVALID),
            FieldType::InetService => (TYPE_INET_SERVICE, BYTEORDER_BIG),
            // A NUL-padded string; nft records it as host order (checked with nft 1.0.6).
            FieldType::Ifname => (TYPE_IFNAME, BYTEORDER_HOST),
            FieldType::Slot => return Err(LowerError::Encode(
                "a Slot component can only be declared with typeof (nft has no type name for it)"
                    .into(),
            )),
        };
        Ok(Comp {
            ty,
            type_id,
            len: ty.len(),
            byteorder,
            field: None,
        })
    }

    pub(super) fn of_field(f: Field, fam: Family) -> Comp {
        let (type_id, byteorder) = match f {
            Field::Saddr | Field::Daddr | Field::CtOrigSaddr | Field::CtOrigDaddr => match fam {
                Family::Ip => (TYPE_IPADDR, BYTEORDER_BIG),
                Family::Ip6 => (TYPE_IP6ADDR, BYTEORDER_BIG),
            },
            Field::L4proto => (TYPE_INET_PROTOCOL, BYTEORDER_HOST),
            Field::ThDport => (TYPE_INET_SERVICE, BYTEORDER_BIG),
            // `ct original proto-dst` has no datatype in nft until a protocol is known.
            Field::CtOrigProtoDst => (TYPE_INVALID, BYTEORDER_BIG),
            Field::Numgen(_) => (TYPE_INTEGER, BYTEORDER_HOST),
            Field::Iifname => (TYPE_IFNAME, BYTEORDER_HOST),
        };
        Comp {
            ty: field_value_type(f, fam),
            type_id,
            len: field_len(f, fam),
            byteorder,
            field: Some(f),
        }
    }

    /// The `typeof` user data of one expression: `{0: expr type, 1: {expr data}}`.
    pub(super) fn typeof_udata(f: Field, fam: Family) -> Result<nl::udata::Udata, NlError> {
        use nl::udata::Udata;
        let mut data = Udata::new();
        let ty = match f {
            Field::Saddr | Field::Daddr | Field::ThDport => {
                let (desc, field) = match (f, fam) {
                    (Field::ThDport, _) => (PROTO_DESC_TH, THDR_DPORT),
                    (Field::Saddr, Family::Ip) => (PROTO_DESC_IP, IPHDR_SADDR),
                    (Field::Saddr, Family::Ip6) => (PROTO_DESC_IP6, IP6HDR_SADDR),
                    (_, Family::Ip) => (PROTO_DESC_IP, IPHDR_DADDR),
                    (_, Family::Ip6) => (PROTO_DESC_IP6, IP6HDR_DADDR),
                };
                data.put_u32(0, desc)?.put_u32(1, field)?;
                EXPR_PAYLOAD
            }
            Field::L4proto => {
                data.put_u32(0, NFT_META_L4PROTO)?;
                EXPR_META
            }
            Field::Iifname => {
                data.put_u32(0, NFT_META_IIFNAME)?;
                EXPR_META
            }
            Field::CtOrigSaddr | Field::CtOrigDaddr | Field::CtOrigProtoDst => {
                let key = if f == Field::CtOrigProtoDst {
                    NFT_CT_PROTO_DST
                } else {
                    ct_addr_key(f, fam)
                };
                data.put_u32(0, key)?
                    .put_u32(1, u32::from(IP_CT_DIR_ORIGINAL))?;
                EXPR_CT
            }
            Field::Numgen(_) => {
                data.put_u32(0, NFT_NG_RANDOM)?
                    .put_u32(1, TYPEOF_NUMGEN_MOD)?
                    .put_u32(2, 0)?;
                EXPR_NUMGEN
            }
        };
        let mut out = Udata::new();
        out.put_u32(0, ty)?.put_nest(1, &data)?;
        Ok(out)
    }
}

/// Register space (in 32-bit slots) of a value of `len` bytes.
pub(super) fn reg_slots(len: usize) -> u32 {
    len.div_ceil(4) as u32
}

/// The key or data layout of a set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Layout {
    pub(super) comps: Vec<Comp>,
    pub(super) typeof_: bool,
}

impl Layout {
    pub(super) fn from_decl(d: &Decl, fam: Family) -> Result<Layout, LowerError> {
        let (comps, typeof_) = match d {
            Decl::Type(ts) => (
                ts.iter()
                    .map(|t| Comp::of_type(*t))
                    .collect::<Result<Vec<_>, _>>()?,
                false,
            ),
            Decl::Typeof(fs) => (fs.iter().map(|f| Comp::of_field(*f, fam)).collect(), true),
        };
        if comps.is_empty() {
            return Err(LowerError::Encode("empty key/data declaration".into()));
        }
        if comps.len() as u32 > NFT_REG32_COUNT - 1 {
            return Err(LowerError::Encode(
                "concatenation has too many components".into(),
            ));
        }
        Ok(Layout { comps, typeof_ })
    }

    pub(super) fn concat(&self) -> bool {
        self.comps.len() > 1
    }

    /// `NFTA_SET_KEY_LEN`: a lone component's own size, a concatenation's padded size.
    pub(super) fn len(&self) -> usize {
        if self.concat() {
            self.comps
                .iter()
                .map(|c| reg_slots(c.len) as usize * 4)
                .sum()
        } else {
            self.comps[0].len
        }
    }

    pub(super) fn type_id(&self) -> u32 {
        self.comps
            .iter()
            .fold(0, |acc, c| (acc << TYPE_BITS) | c.type_id)
    }

    pub(super) fn byteorder(&self) -> u32 {
        if self.concat() {
            BYTEORDER_INVALID
        } else {
            self.comps[0].byteorder
        }
    }

    /// The `KEY_TYPEOF`/`DATA_TYPEOF` user data, if nft writes one for this declaration.
    pub(super) fn typeof_udata(&self, fam: Family) -> Result<Option<nl::udata::Udata>, NlError> {
        use nl::udata::Udata;
        if !self.concat() {
            return match (self.typeof_, self.comps[0].field) {
                (true, Some(f)) => Ok(Some(Comp::typeof_udata(f, fam)?)),
                _ => Ok(None),
            };
        }
        // A concatenation always gets an entry; declared with `type`, its list stays empty.
        let mut list = Udata::new();
        if self.typeof_ {
            for (i, c) in self.comps.iter().enumerate() {
                if let Some(f) = c.field {
                    list.put_nest(i as u8, &Comp::typeof_udata(f, fam)?)?;
                }
            }
        }
        let mut out = Udata::new();
        out.put_u32(0, EXPR_CONCAT)?.put_nest(1, &list)?;
        Ok(Some(out))
    }

    /// Split `bytes` (a key or data value as stored) into components.
    pub(super) fn split<'a>(&self, bytes: &'a [u8]) -> Result<Vec<&'a [u8]>, LowerError> {
        if bytes.len() != self.len() {
            return Err(LowerError::Decode(format!(
                "value of {} bytes, layout wants {}",
                bytes.len(),
                self.len()
            )));
        }
        if !self.concat() {
            return Ok(vec![bytes]);
        }
        let mut out = Vec::with_capacity(self.comps.len());
        let mut pos = 0;
        for c in &self.comps {
            out.push(&bytes[pos..pos + c.len]);
            pos += reg_slots(c.len) as usize * 4;
        }
        Ok(out)
    }
}

/// Everything about a set that its encoding depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SetLayout {
    pub(super) family: Family,
    pub(super) key: Layout,
    pub(super) data: Option<Layout>,
    pub(super) interval: bool,
}

impl SetLayout {
    pub(super) fn from_def(family: Family, def: &SetDef) -> Result<SetLayout, LowerError> {
        let key = Layout::from_decl(&def.key, family)?;
        let data = def
            .data
            .as_ref()
            .map(|d| Layout::from_decl(d, family))
            .transpose()?;
        Ok(SetLayout {
            family,
            key,
            data,
            interval: def.flags.interval,
        })
    }

    pub(super) fn rbtree(&self) -> bool {
        self.interval && !self.key.concat()
    }

    pub(super) fn pipapo(&self) -> bool {
        self.interval && self.key.concat()
    }

    /// The NEWSET message's set object.
    pub(super) fn declaration(
        &self,
        def: &SetDef,
        table: &str,
        name: &str,
        id: u32,
    ) -> Result<nl::Set, NlError> {
        use nl::udata::{self, Udata};
        let mut s = nl::Set::new(nfproto(self.family), table, name)?;
        let mut flags = 0;
        if def.flags.interval {
            flags |= NFT_SET_INTERVAL;
            if self.key.concat() {
                flags |= NFT_SET_CONCAT;
            }
        }
        if self.data.is_some() {
            flags |= NFT_SET_MAP;
        }
        if def.flags.timeout {
            flags |= NFT_SET_TIMEOUT;
        }
        s.set_flags(flags);
        s.set_key(self.key.type_id(), self.key.len() as u32);
        if let Some(d) = &self.data {
            s.set_data(d.type_id(), d.len() as u32);
        }
        s.set_id(id);
        if let Some(size) = def.size {
            s.set_size(size);
        }
        if self.pipapo() {
            let lens: Vec<u8> = self.key.comps.iter().map(|c| c.len as u8).collect();
            s.set_desc_concat(&lens)?;
        }
        let mut ud = Udata::new();
        ud.put_u32(udata::SET_KEYBYTEORDER, self.key.byteorder())?;
        if let Some(d) = &self.data {
            ud.put_u32(udata::SET_DATABYTEORDER, d.byteorder())?;
        }
        if let Some(t) = self.key.typeof_udata(self.family)? {
            ud.put_nest(udata::SET_KEY_TYPEOF, &t)?;
        }
        if let Some(d) = &self.data {
            if let Some(t) = d.typeof_udata(self.family)? {
                ud.put_nest(udata::SET_DATA_TYPEOF, &t)?;
            }
            ud.put_u32(udata::SET_DATA_INTERVAL, 0)?;
        }
        s.set_userdata(ud.as_bytes())?;
        if def.flags.counter {
            s.push_expr(Expr::counter()?);
        }
        Ok(s)
    }

    /// Recover the layout of an existing set from its kernel attributes: the `typeof` user data
    /// when present (it names fields that have no datatype), else the datatype ids.
    pub(super) fn from_kernel(family: Family, info: &nl::SetInfo) -> Result<SetLayout, LowerError> {
        use nl::udata;
        let ud = udata::parse(&info.userdata)?;
        let key = layout_from_kernel(
            family,
            info.key_type,
            info.key_len,
            udata::find(&ud, udata::SET_KEY_TYPEOF).as_deref(),
        )?;
        let data = match (info.data_type, info.data_len) {
            (Some(t), Some(l)) if info.flags & NFT_SET_MAP != 0 => Some(layout_from_kernel(
                family,
                t,
                l,
                udata::find(&ud, udata::SET_DATA_TYPEOF).as_deref(),
            )?),
            _ => None,
        };
        Ok(SetLayout {
            family,
            key,
            data,
            interval: info.flags & NFT_SET_INTERVAL != 0,
        })
    }
}

pub(super) fn layout_from_kernel(
    family: Family,
    type_id: u32,
    len: u32,
    typeof_ud: Option<&[u8]>,
) -> Result<Layout, LowerError> {
    if let Some(ud) = typeof_ud {
        if let Some(fields) = typeof_fields(ud, family)? {
            let layout = Layout {
                comps: fields.iter().map(|f| Comp::of_field(*f, family)).collect(),
                typeof_: true,
            };
            if layout.len() != len as usize {
                return Err(LowerError::Encode(format!(
                    "typeof user data does not match key length {len}"
                )));
            }
            return Ok(layout);
        }
    }
    let mut ids = Vec::new();
    let mut t = type_id;
    while t != 0 {
        ids.push(t & ((1 << TYPE_BITS) - 1));
        t >>= TYPE_BITS;
    }
    ids.reverse();
    let comps = ids
        .iter()
        .map(|id| match *id {
            TYPE_IPADDR => Comp::of_type(FieldType::Ipv4Addr),
            TYPE_IP6ADDR => Comp::of_type(FieldType::Ipv6Addr),
            TYPE_INET_PROTOCOL => Comp::of_type(FieldType::InetProto),
            TYPE_INET_SERVICE => Comp::of_type(FieldType::InetService),
            TYPE_IFNAME => Comp::of_type(FieldType::Ifname),
            TYPE_INTEGER => Ok(Comp {
                ty: FieldType::Slot,
                type_id: TYPE_INTEGER,
                len: 4,
                byteorder: BYTEORDER_HOST,
                field: None,
            }),
            other => Err(LowerError::Encode(format!(
                "datatype {other} is not one nftproxy uses"
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if comps.is_empty() {
        return Err(LowerError::Encode(format!(
            "cannot decode datatype {type_id:#x}"
        )));
    }
    let layout = Layout {
        comps,
        typeof_: false,
    };
    if layout.len() != len as usize {
        return Err(LowerError::Encode(format!(
            "datatype {type_id:#x} does not match length {len}"
        )));
    }
    Ok(layout)
}

/// Parse `typeof` user data back to fields; `None` for an empty (type-declared) concatenation.
pub(super) fn typeof_fields(ud: &[u8], family: Family) -> Result<Option<Vec<Field>>, LowerError> {
    use nl::udata::{as_u32, find, parse};
    let top = parse(ud)?;
    let ty = find(&top, 0)
        .and_then(|v| as_u32(&v))
        .ok_or_else(|| LowerError::Decode("typeof without expression type".into()))?;
    let data = find(&top, 1).unwrap_or_default();
    if ty == EXPR_CONCAT {
        let comps = parse(&data)?;
        if comps.is_empty() {
            return Ok(None);
        }
        let fields = comps
            .iter()
            .map(|(_, c)| typeof_field(c, family))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Some(fields));
    }
    Ok(Some(vec![typeof_field(ud, family)?]))
}

pub(super) fn typeof_field(ud: &[u8], family: Family) -> Result<Field, LowerError> {
    use nl::udata::{as_u32, find, parse};
    let top = parse(ud)?;
    let ty = find(&top, 0)
        .and_then(|v| as_u32(&v))
        .ok_or_else(|| LowerError::Decode("typeof without expression type".into()))?;
    let raw = find(&top, 1).unwrap_or_default();
    let data = parse(&raw)?;
    let a = |i: u8| find(&data, i).and_then(|v| as_u32(&v));
    let unknown = || {
        LowerError::Decode(format!(
            "typeof expression {ty} {:?} is not one nftproxy uses",
            data
        ))
    };
    Ok(match ty {
        EXPR_PAYLOAD => match (a(0), a(1), family) {
            (Some(PROTO_DESC_TH), Some(THDR_DPORT), _) => Field::ThDport,
            (Some(PROTO_DESC_IP), Some(IPHDR_SADDR), Family::Ip)
            | (Some(PROTO_DESC_IP6), Some(IP6HDR_SADDR), Family::Ip6) => Field::Saddr,
            (Some(PROTO_DESC_IP), Some(IPHDR_DADDR), Family::Ip)
            | (Some(PROTO_DESC_IP6), Some(IP6HDR_DADDR), Family::Ip6) => Field::Daddr,
            _ => return Err(unknown()),
        },
        EXPR_META if a(0) == Some(NFT_META_L4PROTO) => Field::L4proto,
        EXPR_META if a(0) == Some(NFT_META_IIFNAME) => Field::Iifname,
        EXPR_CT => match a(0) {
            Some(NFT_CT_PROTO_DST) => Field::CtOrigProtoDst,
            Some(NFT_CT_SRC_IP) | Some(NFT_CT_SRC_IP6) => Field::CtOrigSaddr,
            Some(NFT_CT_DST_IP) | Some(NFT_CT_DST_IP6) => Field::CtOrigDaddr,
            _ => return Err(unknown()),
        },
        EXPR_NUMGEN => Field::Numgen(a(1).unwrap_or(TYPEOF_NUMGEN_MOD)),
        _ => return Err(unknown()),
    })
}
