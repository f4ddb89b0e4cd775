//! The libmnl socket that sends a batch with ONE `sendmsg`, collects the kernel's error
//! reports, and answers the get/dump requests the applier needs.

use super::*;

// ---------------------------------------------------------------------------------------------
// Socket
// ---------------------------------------------------------------------------------------------

/// A `NETLINK_NETFILTER` socket bound to the network namespace of the thread that opened it.
pub struct Socket {
    pub(crate) nl: NonNull<mnl::mnl_socket>,
    pub(crate) fd: c_int,
    pub(crate) portid: u32,
    pub(crate) seq: u32,
    pub(crate) sndbuf: usize,
    pub(crate) rx: AlignedBuf,
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

    pub(crate) fn setsockopt_int(&self, level: c_int, opt: c_int, v: c_int) -> Result<(), NlError> {
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
    pub(crate) fn set_buf(
        &mut self,
        force: c_int,
        plain: c_int,
        size: usize,
    ) -> Result<(), NlError> {
        let v = c_int::try_from(size).unwrap_or(c_int::MAX);
        if self.setsockopt_int(libc::SOL_SOCKET, force, v).is_ok() {
            return Ok(());
        }
        self.setsockopt_int(libc::SOL_SOCKET, plain, v)
    }

    /// Drop anything left in the receive queue (e.g. the tail of an abandoned dump), so replies
    /// are never confused with stale messages.
    pub(crate) fn drain(&mut self) {
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

    pub(crate) fn send(&mut self, bytes: &[u8]) -> Result<(), NlError> {
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
    pub(crate) fn recv(&mut self, nonblocking: bool) -> Result<Option<usize>, NlError> {
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
    pub(crate) fn request(
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

    pub(crate) fn dump_elems_once(
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

    /// The names of every chain of a table, empty ones included (NFT_MSG_GETCHAIN dump).
    /// The kernel dumps the chains of every table of the family (6.x does not filter a chain
    /// dump by table), so the others are dropped here.
    pub fn dump_chains(&mut self, family: u16, table: &str) -> Result<Vec<String>, NlError> {
        let table_c = cstring(table)?;
        let mut out = Vec::new();
        self.request(
            Cmd::GetChain,
            family,
            true,
            // SAFETY: `nlh` is the request being built; a chain with only a table name.
            |nlh| unsafe {
                let c = sys::nftnl_chain_alloc();
                if !c.is_null() {
                    sys::nftnl_chain_set_str(c, sys::NFTNL_CHAIN_TABLE as u16, table_c.as_ptr());
                    sys::nftnl_chain_nlmsg_build_payload(nlh, c);
                    sys::nftnl_chain_free(c);
                }
            },
            |nlh| {
                // SAFETY: complete, aligned message.
                let c = unsafe { Chain::from_nlmsg(nlh)? };
                if c.table().as_deref() == Some(table) {
                    out.extend(c.name());
                }
                Ok(())
            },
        )?;
        Ok(out)
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
    pub(crate) fn as_bytes_n(&self, n: usize) -> Vec<u8> {
        // SAFETY: `n <= cap()` (checked by `recv`) and the allocation is initialised.
        unsafe {
            std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), n.min(self.cap())).to_vec()
        }
    }
}

pub(crate) struct RawMsg<'a> {
    pub(crate) ty: u16,
    pub(crate) flags: u16,
    pub(crate) seq: u32,
    pub(crate) portid: u32,
    /// The whole message including its header.
    pub(crate) bytes: &'a [u8],
}

pub(crate) fn split_messages(data: &[u8]) -> Result<Vec<RawMsg<'_>>, NlError> {
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
pub(crate) fn parse_error(msg: &[u8]) -> Result<Option<KernelError>, NlError> {
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
