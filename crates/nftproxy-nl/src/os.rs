//! The few plain libc calls nftproxy makes outside netlink, each behind a safe function.

use std::io;

/// Hand the heap pages freed so far back to the kernel (glibc keeps freed pages mapped; after a
/// full sync, the agent's peak, that would keep the resident size near the peak for good).
/// A no-op where the C library is not glibc.
pub fn malloc_trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas; it takes no pointers from us.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Whether the process runs with effective user id 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Move the calling thread into a new, empty network namespace (`unshare(CLONE_NEWNET)`).
/// Only this thread changes namespace; it stays there until it exits.
pub fn unshare_net() -> io::Result<()> {
    // SAFETY: unshare only changes the namespaces of the calling thread.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
