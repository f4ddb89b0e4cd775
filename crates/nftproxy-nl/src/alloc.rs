//! A global allocator that counts live heap bytes, for benchmarks that show what each structure
//! costs (`#[global_allocator] static A: CountingAlloc = CountingAlloc;`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

static LIVE: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting.
#[derive(Debug)]
pub struct CountingAlloc;

impl CountingAlloc {
    /// Heap bytes allocated and not yet freed, process-wide.
    pub fn live_bytes() -> usize {
        LIVE.load(Ordering::Relaxed)
    }
}

// SAFETY: every call is passed unchanged to the system allocator, which upholds the contract.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: the caller's layout, as GlobalAlloc::alloc requires.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` above with this layout.
        unsafe { System.dealloc(p, l) }
    }
}
