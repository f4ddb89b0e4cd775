//! The one mutex-poisoning policy. nftproxy's mutexes hold plain data (the inbox, the sync
//! status, health-server state) that is valid after any panic, so a poisoned lock is taken as
//! it is: one panicking thread must never stop syncing or health answers for good.
//! `clippy.toml` forbids `Mutex::lock` everywhere else.

use std::sync::{Mutex, MutexGuard};

/// Lock `m`, recovering the data of a poisoned lock.
#[allow(clippy::disallowed_methods)] // the one place that may call Mutex::lock
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
