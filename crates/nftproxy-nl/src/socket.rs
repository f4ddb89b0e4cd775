//! A raw `NETLINK_NETFILTER` socket for the callers that build and parse their messages
//! themselves with safe code: the ctnetlink client (conntrack cleanup) and the nf_tables
//! notification listener (drift detection). It sends and receives whole datagrams, nothing more.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// One `AF_NETLINK`/`NETLINK_NETFILTER` socket, closed on drop.
#[derive(Debug)]
pub struct RawSocket {
    fd: OwnedFd,
}

/// What one receive delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// A datagram of this many bytes is in the buffer.
    Datagram(usize),
    /// The datagram was larger than the buffer (its full size): its tail was cut off.
    Truncated(usize),
    /// The kernel dropped messages because the socket's queue was full (`ENOBUFS`).
    Overflow,
}

impl RawSocket {
    /// Open an unbound socket (the first send autobinds a port id; an unconnected netlink socket
    /// sends to the kernel).
    pub fn open() -> io::Result<RawSocket> {
        // SAFETY: plain syscall with integer arguments.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a valid descriptor just returned to us and owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(RawSocket { fd })
    }

    /// Open a socket subscribed to the multicast groups in the bit mask `groups`
    /// (bit `n - 1` for group `n`, as `sockaddr_nl.nl_groups` wants).
    pub fn subscribe(groups: u32) -> io::Result<RawSocket> {
        let s = RawSocket::open()?;
        // SAFETY: sockaddr_nl is plain old data; all-zero is its documented "any" value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = groups;
        // SAFETY: `addr` is a live sockaddr_nl and the length passed is its size.
        let rc = unsafe {
            libc::bind(
                s.fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(s)
    }

    /// Join (`member`) or leave the multicast group `group` (a group number, not a mask).
    pub fn set_membership(&self, group: u32, member: bool) -> io::Result<()> {
        let opt = if member {
            libc::NETLINK_ADD_MEMBERSHIP
        } else {
            libc::NETLINK_DROP_MEMBERSHIP
        };
        self.set_opt_at(libc::SOL_NETLINK, opt, &group)
    }

    fn set_opt<T>(&self, opt: libc::c_int, value: &T) -> io::Result<()> {
        self.set_opt_at(libc::SOL_SOCKET, opt, value)
    }

    fn set_opt_at<T>(&self, level: libc::c_int, opt: libc::c_int, value: &T) -> io::Result<()> {
        // SAFETY: `value` is a live `T` and the length passed is its size.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                opt,
                (value as *const T).cast(),
                std::mem::size_of::<T>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A receive waits at most `timeout`, then fails with `ErrorKind::WouldBlock`.
    pub fn set_recv_timeout(&self, timeout: Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        self.set_opt(libc::SO_RCVTIMEO, &tv)
    }

    /// Ask for a receive queue of `bytes`: `SO_RCVBUFFORCE` (needs CAP_NET_ADMIN, which the
    /// agent has) and, failing that, `SO_RCVBUF` (capped by net.core.rmem_max).
    pub fn set_recv_buffer(&self, bytes: usize) -> io::Result<()> {
        let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        self.set_opt(libc::SO_RCVBUFFORCE, &v)
            .or_else(|_| self.set_opt(libc::SO_RCVBUF, &v))
    }

    /// Send one datagram (one or more messages), whole.
    pub fn send(&self, buf: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: the pointer and length describe `buf`, which outlives the call.
            let n = unsafe { libc::send(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                // Netlink datagrams are sent whole or not at all; checked anyway.
                if n as usize != buf.len() {
                    return Err(io::Error::other(format!(
                        "short netlink send: {n} of {} bytes",
                        buf.len()
                    )));
                }
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Receive one datagram into `buf`. A datagram larger than `buf` is reported as
    /// [`Received::Truncated`] rather than silently cut, a full queue as [`Received::Overflow`].
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        loop {
            // SAFETY: the pointer and length describe `buf`, writable and alive for the call.
            // MSG_TRUNC makes the return value the datagram's full length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n >= 0 {
                let n = n as usize;
                return Ok(if n > buf.len() {
                    Received::Truncated(n)
                } else {
                    Received::Datagram(n)
                });
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOBUFS) => return Ok(Received::Overflow),
                _ => return Err(err),
            }
        }
    }
}
