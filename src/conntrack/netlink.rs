//! The ctnetlink client: dump, select, delete by tuple, zone and id, over one socket.

use super::*;

// Netlink implementation.

/// Receive buffer for one datagram: dump chunks are at most 32 KiB, acks far smaller.
pub(super) const RECV_BUF_LEN: usize = 64 * 1024;
/// A blocking read gives up after this long: never hang the sync loop on the kernel.
pub(super) const RECV_TIMEOUT_SECS: u64 = 30;
/// Deletes sent per `send`. Their acks are queued on the socket all at once (the kernel processes
/// the datagram synchronously), and acks that do not fit the receive buffer are dropped: 128 acks
/// of at most ~170 bytes each stay far below the default 208 KiB.
pub(super) const DELETE_CHUNK: usize = 128;

/// [`Conntrack`] over one `NETLINK_NETFILTER` socket, opened in the network namespace of the
/// thread that calls [`NetlinkConntrack::new`]. After an I/O or protocol error the socket is
/// dropped (a dump may be left half-read) and a fresh one is opened by the next call.
pub struct NetlinkConntrack {
    sock: Option<sock::NlSocket>,
    pub(super) seq: u32,
    /// Cleared when the kernel rejects the UDP-only dump filter; later dumps go unfiltered.
    pub(super) filter_ok: bool,
    pub(super) buf: Vec<u8>,
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

    pub(super) fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Dumps the table of family `l3` and returns the entries `sel` selects.
    pub(super) fn dump_selected(
        &mut self,
        l3: u8,
        sel: &Selector,
    ) -> Result<Vec<CtEntry>, ConntrackError> {
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

    pub(super) fn dump(
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
    pub(super) fn delete(&mut self, entries: &[CtEntry]) -> Result<usize, ConntrackError> {
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

    pub(super) fn run(&mut self, sel: &Selector) -> Result<usize, ConntrackError> {
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
