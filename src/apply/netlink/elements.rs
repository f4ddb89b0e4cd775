//! Element values: IR elements to kernel bytes and back (dumps decoded).

use super::*;

// ---------------------------------------------------------------------------------------------
// Element values
// ---------------------------------------------------------------------------------------------

/// Bytes of one component value. `big_endian_ints`: host-order integers are stored big-endian
/// (interval sets, see the module docs).
pub(super) fn value_bytes(
    v: &Value,
    c: &Comp,
    big_endian_ints: bool,
) -> Result<Vec<u8>, LowerError> {
    let mut out = Vec::with_capacity(16);
    write_value(&mut out, v, c, big_endian_ints)?;
    Ok(out)
}

/// [`value_bytes`] appended to `out`: a cold start lowers over a million elements, and one
/// buffer for all of them spares ten allocations each.
fn write_value(
    out: &mut Vec<u8>,
    v: &Value,
    c: &Comp,
    big_endian_ints: bool,
) -> Result<(), LowerError> {
    let wrong = || {
        LowerError::Encode(format!(
            "value {} does not fit a {:?} component",
            fmt_value(v),
            c.ty
        ))
    };
    match (v, c.ty) {
        (Value::Addr(IpAddr::V4(a)), FieldType::Ipv4Addr) => out.extend_from_slice(&a.octets()),
        (Value::Addr(IpAddr::V6(a)), FieldType::Ipv6Addr) => out.extend_from_slice(&a.octets()),
        (Value::Proto(p), FieldType::InetProto) => out.push(p.number()),
        (Value::Port(p), FieldType::InetService) => out.extend_from_slice(&p.to_be_bytes()),
        (Value::Slot(s), FieldType::Slot) => out.extend_from_slice(&if big_endian_ints {
            s.to_be_bytes()
        } else {
            s.to_ne_bytes()
        }),
        (Value::Ifname(n), FieldType::Ifname) if !n.ends_with('*') => {
            out.extend_from_slice(&ifname_bytes(n, 0)?)
        }
        (Value::Prefix(_), _) | (Value::Ifname(_), FieldType::Ifname) => {
            return Err(LowerError::Encode(format!(
                "prefix {} outside an interval set",
                fmt_value(v)
            )))
        }
        _ => return Err(wrong()),
    }
    Ok(())
}

/// An interface name as the kernel compares it: its bytes, then `fill` up to 16 bytes (NUL
/// for a name, 0xff for the last value a prefix covers).
fn ifname_bytes(name: &str, fill: u8) -> Result<Vec<u8>, LowerError> {
    let b = name.as_bytes();
    if b.len() > 15 || b.contains(&0) {
        return Err(LowerError::Encode(format!(
            "{name:?} is not an interface name (at most 15 bytes)"
        )));
    }
    let mut out = b.to_vec();
    out.resize(16, fill);
    Ok(out)
}

/// First and last value of a component in an interval set.
pub(super) fn value_range(v: &Value, c: &Comp) -> Result<(Vec<u8>, Vec<u8>), LowerError> {
    match (v, c.ty) {
        (Value::Prefix(ipnet::IpNet::V4(n)), FieldType::Ipv4Addr) => Ok((
            n.network().octets().to_vec(),
            n.broadcast().octets().to_vec(),
        )),
        (Value::Prefix(ipnet::IpNet::V6(n)), FieldType::Ipv6Addr) => Ok((
            n.network().octets().to_vec(),
            n.broadcast().octets().to_vec(),
        )),
        // `"veth*"`: from "veth" NUL-padded to "veth" 0xff-padded (nft encodes it so).
        (Value::Ifname(n), FieldType::Ifname) if n.ends_with('*') => {
            let p = &n[..n.len() - 1];
            Ok((ifname_bytes(p, 0)?, ifname_bytes(p, 0xff)?))
        }
        (Value::Prefix(_), _) => Err(LowerError::Encode(format!(
            "prefix {} does not fit a {:?} component",
            fmt_value(v),
            c.ty
        ))),
        _ => {
            let b = value_bytes(v, c, true)?;
            Ok((b.clone(), b))
        }
    }
}

/// Concatenate component values, each padded to 4 bytes, or return a lone one as is.
pub(super) fn join(layout: &Layout, parts: &[Vec<u8>]) -> Vec<u8> {
    if !layout.concat() {
        return parts.first().cloned().unwrap_or_default();
    }
    let mut out = Vec::with_capacity(layout.len());
    for p in parts {
        out.extend_from_slice(p);
        out.resize(out.len().div_ceil(4) * 4, 0);
    }
    out
}

pub(super) fn encode_values(
    vals: &[Value],
    layout: &Layout,
    big_endian_ints: bool,
) -> Result<Vec<u8>, LowerError> {
    let mut out = Vec::with_capacity(layout.len());
    encode_values_into(&mut out, vals, layout, big_endian_ints)?;
    Ok(out)
}

/// [`encode_values`] into `out` (cleared first), as [`join`] lays the components out.
fn encode_values_into(
    out: &mut Vec<u8>,
    vals: &[Value],
    layout: &Layout,
    big_endian_ints: bool,
) -> Result<(), LowerError> {
    if vals.len() != layout.comps.len() {
        return Err(LowerError::Encode(format!(
            "{} has {} components, the set wants {}",
            fmt_values(vals),
            vals.len(),
            layout.comps.len()
        )));
    }
    out.clear();
    if !layout.concat() {
        return match (vals.first(), layout.comps.first()) {
            (Some(v), Some(c)) => write_value(out, v, c, big_endian_ints),
            _ => Ok(()),
        };
    }
    for (v, c) in vals.iter().zip(&layout.comps) {
        write_value(out, v, c, big_endian_ints)?;
        out.resize(out.len().div_ceil(4) * 4, 0);
    }
    Ok(())
}

/// Big-endian `x + 1`; `None` on overflow (x was the top of the key space).
pub(super) fn be_increment(x: &[u8]) -> Option<Vec<u8>> {
    let mut out = x.to_vec();
    for b in out.iter_mut().rev() {
        if *b == 0xff {
            *b = 0;
        } else {
            *b += 1;
            return Some(out);
        }
    }
    None
}

pub(super) fn be_decrement(x: &[u8]) -> Option<Vec<u8>> {
    let mut out = x.to_vec();
    for b in out.iter_mut().rev() {
        if *b == 0 {
            *b = 0xff;
        } else {
            *b -= 1;
            return Some(out);
        }
    }
    None
}

/// The kernel elements of one IR element, with the op's element index attached.
pub(super) struct KElem {
    pub(super) elem: nl::SetElem,
    pub(super) origin: Option<usize>,
}

/// User data of an rbtree start element whose interval runs to the top (no end element).
pub(super) fn interval_open_udata() -> Result<Vec<u8>, NlError> {
    let mut u = nl::udata::Udata::new();
    u.put_u32(
        nl::udata::SET_ELEM_FLAGS,
        nl::udata::SET_ELEM_F_INTERVAL_OPEN,
    )?;
    Ok(u.into_bytes())
}

pub(super) fn nlerr(e: NlError) -> LowerError {
    LowerError::Nl(e)
}

/// Kernel elements for adding (`add == true`) or deleting IR elements.
///
/// Each kernel element goes to `out` as soon as it is made: the caller packs it into the batch
/// right away, so a set of 250,000 elements never exists as 250,000 libnftnl objects at once
/// (about 300 bytes each; that was most of the first commit's memory peak).
pub(super) fn kernel_elements<'e>(
    layout: &SetLayout,
    elements: impl IntoIterator<Item = &'e Element>,
    add: bool,
    out: &mut dyn FnMut(KElem) -> Result<(), LowerError>,
) -> Result<(), LowerError> {
    let data_of = |e: &Element| -> Result<Option<Vec<u8>>, LowerError> {
        match (&layout.data, e.value()) {
            (Some(d), Some(v)) => Ok(Some(encode_values(v, d, false)?)),
            (None, None) => Ok(None),
            (Some(_), None) => Err(LowerError::Encode(format!(
                "map element {} has no value",
                fmt_element(e)
            ))),
            (None, Some(_)) => Err(LowerError::Encode(format!(
                "set element {} has a value",
                fmt_element(e)
            ))),
        }
    };
    if layout.rbtree() {
        // nft sends intervals in ascending order, each start followed by its end.
        let mut ranges = Vec::new();
        for (i, e) in elements.into_iter().enumerate() {
            if e.key().len() != 1 {
                return Err(LowerError::Encode(format!(
                    "{} has {} components, the set wants 1",
                    fmt_element(e),
                    e.key().len()
                )));
            }
            let (lo, hi) = value_range(&e.key()[0], &layout.key.comps[0])?;
            ranges.push((lo, hi, i, if add { data_of(e)? } else { None }));
        }
        ranges.sort();
        for (lo, hi, i, data) in ranges {
            let mut start = nl::SetElem::new().map_err(nlerr)?;
            start.set_key(&lo).map_err(nlerr)?;
            if let Some(d) = &data {
                start.set_data(d).map_err(nlerr)?;
            }
            let end = be_increment(&hi);
            if end.is_none() && add {
                start
                    .set_userdata(&interval_open_udata().map_err(nlerr)?)
                    .map_err(nlerr)?;
            }
            out(KElem {
                elem: start,
                origin: Some(i),
            })?;
            if let Some(end) = end {
                let mut e = nl::SetElem::new().map_err(nlerr)?;
                e.set_key(&end).map_err(nlerr)?;
                e.set_flags(NFT_SET_ELEM_INTERVAL_END);
                out(KElem {
                    elem: e,
                    origin: Some(i),
                })?;
            }
        }
        return Ok(());
    }
    let (mut key, mut data) = (Vec::new(), Vec::new());
    for (i, e) in elements.into_iter().enumerate() {
        let mut k = nl::SetElem::new().map_err(nlerr)?;
        if layout.pipapo() {
            if e.key().len() != layout.key.comps.len() {
                return Err(LowerError::Encode(format!(
                    "{} has {} components, the set wants {}",
                    fmt_element(e),
                    e.key().len(),
                    layout.key.comps.len()
                )));
            }
            let (los, his): (Vec<_>, Vec<_>) = e
                .key()
                .iter()
                .zip(&layout.key.comps)
                .map(|(v, c)| value_range(v, c))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .unzip();
            let (lo, hi) = (join(&layout.key, &los), join(&layout.key, &his));
            k.set_key(&lo).map_err(nlerr)?;
            // nft always sends KEY_END when adding, and only for real ranges when deleting.
            if add || lo != hi {
                k.set_key_end(&hi).map_err(nlerr)?;
            }
        } else {
            encode_values_into(&mut key, e.key(), &layout.key, false)?;
            k.set_key(&key).map_err(nlerr)?;
        }
        if add {
            match (&layout.data, e.value()) {
                (Some(d), Some(v)) => {
                    encode_values_into(&mut data, v, d, false)?;
                    k.set_data(&data).map_err(nlerr)?;
                }
                _ => {
                    if let Some(d) = data_of(e)? {
                        k.set_data(&d).map_err(nlerr)?;
                    }
                }
            }
        }
        out(KElem {
            elem: k,
            origin: Some(i),
        })?;
    }
    Ok(())
}

/// [`kernel_elements`] collected (tests look at them one by one).
#[cfg(test)]
pub(super) fn kernel_elements_vec(
    layout: &SetLayout,
    elements: &[Element],
    add: bool,
) -> Result<Vec<KElem>, LowerError> {
    let mut v = Vec::new();
    kernel_elements(layout, elements, add, &mut |k| {
        v.push(k);
        Ok(())
    })?;
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// Decoding dumped elements
// ---------------------------------------------------------------------------------------------

pub(super) fn decode_comp(b: &[u8], c: &Comp, big_endian_ints: bool) -> Result<Value, LowerError> {
    let bad = || LowerError::Decode(format!("{} bytes do not decode as {:?}", b.len(), c.ty));
    Ok(match c.ty {
        FieldType::Ipv4Addr => Value::Addr(IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(b).map_err(|_| bad())?,
        ))),
        FieldType::Ipv6Addr => Value::Addr(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(b).map_err(|_| bad())?,
        ))),
        FieldType::InetProto => {
            let n = *b.first().ok_or_else(bad)?;
            Value::Proto(
                Proto::ALL
                    .into_iter()
                    .find(|p| p.number() == n)
                    .ok_or_else(|| {
                        LowerError::Decode(format!("protocol {n} is not tcp/udp/sctp"))
                    })?,
            )
        }
        FieldType::InetService => Value::Port(u16::from_be_bytes(
            <[u8; 2]>::try_from(b).map_err(|_| bad())?,
        )),
        FieldType::Slot => {
            let a = <[u8; 4]>::try_from(b).map_err(|_| bad())?;
            Value::Slot(if big_endian_ints {
                u32::from_be_bytes(a)
            } else {
                u32::from_ne_bytes(a)
            })
        }
        FieldType::Ifname => {
            let end = b.iter().position(|&x| x == 0).unwrap_or(b.len());
            Value::Ifname(String::from_utf8_lossy(&b[..end]).into())
        }
    })
}

/// A range of one component back to a value: a CIDR for addresses (`as_prefix` also for a single
/// address), the value itself when first == last.
pub(super) fn decode_range(
    lo: &[u8],
    hi: &[u8],
    c: &Comp,
    as_prefix: bool,
) -> Result<Value, LowerError> {
    let is_addr = matches!(c.ty, FieldType::Ipv4Addr | FieldType::Ipv6Addr);
    if lo == hi && !(is_addr && as_prefix) {
        return decode_comp(lo, c, true);
    }
    if c.ty == FieldType::Ifname {
        // A name prefix: the prefix, then NULs up to 0xffs.
        let p = lo.iter().position(|&x| x == 0).unwrap_or(lo.len());
        if lo[p..].iter().all(|&x| x == 0)
            && hi.get(..p) == Some(&lo[..p])
            && hi[p..].iter().all(|&x| x == 0xff)
        {
            return Ok(Value::Ifname(
                format!("{}*", String::from_utf8_lossy(&lo[..p])).into(),
            ));
        }
        return Err(LowerError::Decode(format!(
            "range {lo:02x?}-{hi:02x?} is not an interface name prefix"
        )));
    }
    if !is_addr {
        return Err(LowerError::Decode(format!(
            "range {lo:02x?}-{hi:02x?} of a {:?} component cannot be expressed",
            c.ty
        )));
    }
    // A prefix: lo and hi agree on the leading bits and then lo is all zeros, hi all ones.
    let bits = lo.len() * 8;
    let mut plen = 0;
    while plen < bits {
        let (byte, bit) = (plen / 8, 7 - plen % 8);
        if (lo[byte] >> bit) & 1 != (hi[byte] >> bit) & 1 {
            break;
        }
        plen += 1;
    }
    for i in plen..bits {
        let (byte, bit) = (i / 8, 7 - i % 8);
        if (lo[byte] >> bit) & 1 != 0 || (hi[byte] >> bit) & 1 != 1 {
            return Err(LowerError::Decode(format!(
                "range {lo:02x?}-{hi:02x?} is not a CIDR prefix"
            )));
        }
    }
    let net = match decode_comp(lo, c, true)? {
        Value::Addr(IpAddr::V4(a)) => ipnet::IpNet::V4(
            ipnet::Ipv4Net::new(a, plen as u8).map_err(|e| LowerError::Decode(e.to_string()))?,
        ),
        Value::Addr(IpAddr::V6(a)) => ipnet::IpNet::V6(
            ipnet::Ipv6Net::new(a, plen as u8).map_err(|e| LowerError::Decode(e.to_string()))?,
        ),
        other => return Err(LowerError::Decode(format!("unexpected {other:?}"))),
    };
    Ok(Value::Prefix(net))
}

impl SetLayout {
    pub(super) fn decode_data(&self, e: &nl::ElemInfo) -> Result<Option<Vec<Value>>, LowerError> {
        match (&self.data, &e.data) {
            (Some(d), Some(bytes)) => {
                let parts = d.split(bytes)?;
                Ok(Some(
                    parts
                        .iter()
                        .zip(&d.comps)
                        .map(|(b, c)| decode_comp(b, c, false))
                        .collect::<Result<Vec<_>, _>>()?,
                ))
            }
            (Some(_), None) => Err(LowerError::Decode("map element without data".into())),
            (None, _) => Ok(None),
        }
    }

    /// Kernel elements back to IR elements. In interval sets an address component is decoded as
    /// a `Prefix` (a single address as /32 or /128) when it is the set's only component or the
    /// last of a concatenation, the places where nftproxy puts CIDRs.
    pub(super) fn decode(
        &self,
        elems: &[nl::ElemInfo],
        counters: bool,
    ) -> Result<Listed, LowerError> {
        let counter = |e: &nl::ElemInfo| {
            if counters {
                Some(e.counter.unwrap_or((0, 0)))
            } else {
                None
            }
        };
        let mut out = Vec::with_capacity(elems.len());
        if self.rbtree() {
            let c = &self.key.comps[0];
            let mut sorted: Vec<&nl::ElemInfo> = elems.iter().collect();
            // Ascending by key; at equal keys an end (of the previous range) before a start.
            sorted.sort_by(|a, b| {
                let a_start = a.flags & NFT_SET_ELEM_INTERVAL_END == 0;
                let b_start = b.flags & NFT_SET_ELEM_INTERVAL_END == 0;
                a.key.cmp(&b.key).then(a_start.cmp(&b_start))
            });
            let mut i = 0;
            while i < sorted.len() {
                let s = sorted[i];
                i += 1;
                if s.flags & NFT_SET_ELEM_INTERVAL_END != 0 {
                    // A lone end: nft's leading "0.0.0.0 interval end" element.
                    continue;
                }
                let open = s
                    .userdata
                    .as_deref()
                    .and_then(|u| {
                        nl::udata::parse(u)
                            .ok()
                            .and_then(|l| nl::udata::find(&l, nl::udata::SET_ELEM_FLAGS))
                    })
                    .and_then(|v| nl::udata::as_u32(&v))
                    .is_some_and(|f| f & nl::udata::SET_ELEM_F_INTERVAL_OPEN != 0);
                let hi = match sorted.get(i) {
                    Some(e) if !open && e.flags & NFT_SET_ELEM_INTERVAL_END != 0 => {
                        i += 1;
                        be_decrement(&e.key).ok_or_else(|| {
                            LowerError::Decode("interval end at 0 after a start".into())
                        })?
                    }
                    _ => vec![0xff; s.key.len()],
                };
                let key = decode_range(&s.key, &hi, c, true)?;
                out.push((Element::new(vec![key], self.decode_data(s)?), counter(s)));
            }
            return Ok(out);
        }
        for e in elems {
            let key = if self.pipapo() {
                let lo = self.key.split(&e.key)?;
                let hi = match &e.key_end {
                    Some(k) => self.key.split(k)?,
                    None => lo.clone(),
                };
                let last = self.key.comps.len() - 1;
                lo.iter()
                    .zip(&hi)
                    .zip(&self.key.comps)
                    .enumerate()
                    .map(|(i, ((l, h), c))| decode_range(l, h, c, i == last))
                    .collect::<Result<Vec<_>, _>>()?
            } else {
                let parts = self.key.split(&e.key)?;
                parts
                    .iter()
                    .zip(&self.key.comps)
                    .map(|(b, c)| decode_comp(b, c, false))
                    .collect::<Result<Vec<_>, _>>()?
            };
            out.push((Element::new(key, self.decode_data(e)?), counter(e)));
        }
        Ok(out)
    }
}
