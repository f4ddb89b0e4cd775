//! The `nftnl_udata` TLV format: `[type: u8][len: u8][value; len]`, values of integers in host
//! byte order, nesting by putting a TLV list as a value. nft stores set metadata in it
//! (`NFTA_SET_USERDATA`: key/data byte order, `typeof` expressions) and `nft list` reads it back
//! to decide between `type …` and `typeof …`; the kernel only stores the bytes.
//!
//! Written in plain Rust (no FFI) so the exact bytes are easy to unit-test against what nft
//! produces.

use super::NlError;

/// `enum nftnl_udata_set_types`.
pub const SET_KEYBYTEORDER: u8 = 0;
pub const SET_DATABYTEORDER: u8 = 1;
pub const SET_KEY_TYPEOF: u8 = 3;
pub const SET_DATA_TYPEOF: u8 = 4;
pub const SET_DATA_INTERVAL: u8 = 6;
/// `enum nftnl_udata_set_elem_types`.
pub const SET_ELEM_FLAGS: u8 = 1;
/// `NFTNL_SET_ELEM_F_INTERVAL_OPEN`: the interval has no end element (it runs to the top of the
/// key space).
pub const SET_ELEM_F_INTERVAL_OPEN: u32 = 1;

/// A TLV list under construction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Udata {
    buf: Vec<u8>,
}

impl Udata {
    pub fn new() -> Udata {
        Udata::default()
    }

    /// Append raw bytes as one TLV.
    pub fn put(&mut self, ty: u8, value: &[u8]) -> Result<&mut Udata, NlError> {
        let len = u8::try_from(value.len()).map_err(|_| NlError::TooLong {
            what: "udata value",
            len: value.len(),
            max: 255,
        })?;
        self.buf.push(ty);
        self.buf.push(len);
        self.buf.extend_from_slice(value);
        Ok(self)
    }

    /// Append a u32 in host byte order (what `nftnl_udata_put_u32` writes).
    pub fn put_u32(&mut self, ty: u8, v: u32) -> Result<&mut Udata, NlError> {
        self.put(ty, &v.to_ne_bytes())
    }

    /// Append a nested list.
    pub fn put_nest(&mut self, ty: u8, inner: &Udata) -> Result<&mut Udata, NlError> {
        self.put(ty, &inner.buf)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

/// Split a TLV list into `(type, value)` pairs. Trailing garbage is an error.
pub fn parse(buf: &[u8]) -> Result<Vec<(u8, &[u8])>, NlError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        if pos + 2 > buf.len() {
            return Err(NlError::Malformed("truncated udata header".into()));
        }
        let (ty, len) = (buf[pos], buf[pos + 1] as usize);
        let end = pos + 2 + len;
        if end > buf.len() {
            return Err(NlError::Malformed("truncated udata value".into()));
        }
        out.push((ty, &buf[pos + 2..end]));
        pos = end;
    }
    Ok(out)
}

/// The value of the first TLV of type `ty`.
pub fn find(list: &[(u8, &'_ [u8])], ty: u8) -> Option<Vec<u8>> {
    list.iter().find(|(t, _)| *t == ty).map(|(_, v)| v.to_vec())
}

/// A u32 value (host byte order).
pub fn as_u32(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_and_parse_roundtrip() {
        let mut inner = Udata::new();
        inner.put_u32(0, 12).unwrap().put_u32(1, 11).unwrap();
        let mut outer = Udata::new();
        outer
            .put_u32(SET_KEYBYTEORDER, 2)
            .unwrap()
            .put_nest(SET_KEY_TYPEOF, &inner)
            .unwrap();
        let b = outer.as_bytes();
        assert_eq!(b.len(), 6 + 2 + 12);
        let list = parse(b).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(as_u32(list[0].1), Some(2));
        let nested = parse(list[1].1).unwrap();
        assert_eq!(
            nested
                .iter()
                .map(|(t, v)| (*t, as_u32(v).unwrap()))
                .collect::<Vec<_>>(),
            vec![(0, 12), (1, 11)]
        );
    }

    #[test]
    fn rejects_oversized_and_truncated() {
        assert!(Udata::new().put(0, &[0u8; 256]).is_err());
        assert!(parse(&[1, 4, 0, 0]).is_err());
        assert!(parse(&[1]).is_err());
        assert_eq!(parse(&[]).unwrap(), vec![]);
    }
}
