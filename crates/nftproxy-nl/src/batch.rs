//! A batch: one contiguous, 4-byte aligned buffer of netlink messages between BATCH_BEGIN and
//! BATCH_END, recording which caller tag produced which sequence number.

use super::*;

// ---------------------------------------------------------------------------------------------
// Batch
// ---------------------------------------------------------------------------------------------

/// A growable byte buffer with 4-byte alignment (netlink headers and attributes are 4-aligned)
/// whose whole allocation is always initialised, so libnftnl may write anywhere below `cap()`.
#[derive(Default)]
pub(crate) struct AlignedBuf {
    pub(crate) words: Vec<u32>,
    pub(crate) len: usize,
}

impl AlignedBuf {
    pub(crate) fn cap(&self) -> usize {
        self.words.len() * 4
    }

    /// Make sure at least `extra` bytes past `len` are initialised and writable.
    pub(crate) fn reserve(&mut self, extra: usize) {
        let need = self.len + extra;
        if need > self.cap() {
            let new_cap = need.max(self.cap() * 2).max(4096);
            self.words.resize(new_cap.div_ceil(4), 0);
        }
    }

    pub(crate) fn tail_ptr(&mut self) -> *mut u8 {
        // In bounds: callers reserve before writing.
        self.words.as_mut_ptr().cast::<u8>().wrapping_add(self.len)
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
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
    pub(crate) buf: AlignedBuf,
    pub(crate) begin_seq: u32,
    pub(crate) next_seq: u32,
    pub(crate) records: Vec<MsgRecord>,
    pub(crate) ended: bool,
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

    pub(crate) fn marker(&mut self, begin: bool) {
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

pub(crate) const fn nlmsg_align(len: usize) -> usize {
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

pub(crate) fn attrs_at(msg: &[u8], start: usize) -> Vec<(u16, usize, &[u8])> {
    attrs_range(msg, start, msg.len())
}

pub(crate) fn attrs_range(msg: &[u8], mut pos: usize, end: usize) -> Vec<(u16, usize, &[u8])> {
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
