//! State owned by one thread, with a locked copy for every other thread.
//!
//! A [`Balancer`](crate::balancer::Balancer) keeps per-process tables (the selectors,
//! the random generator) that every pick reads and updates. An nginx worker runs all
//! its Lua on one thread, so a mutex around those tables costs two locked
//! instructions per call (about 11 ns measured here) and never excludes anybody.
//! [`Owned`] holds two copies instead: one for the first thread that uses it (its
//! owner), reached with no atomic read-modify-write at all, and one behind a mutex for
//! every other thread and for a nested call on the owner thread. The two copies are
//! caches that each rebuild themselves from the shared region, so which one a call
//! gets changes nothing it computes.
//!
//! A thread is known by its thread pointer (x86-64 Linux; elsewhere by the address of
//! a thread-local byte). Ownership is claimed once and never handed over. If the owner
//! thread exits and a later thread happens to get the same address, that thread
//! becomes the owner: the old one can no longer touch the copy. After `fork`, the child's only thread has the forking thread's address,
//! so a child forked by the owner (an nginx worker forked by the master) keeps owning
//! its own copy of the memory.

use std::cell::{Cell, UnsafeCell};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::{Mutex, MutexGuard};

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
thread_local! {
    static TAG: u8 = const { 0 };
}

/// This thread's tag: the address of its thread-local byte (never 0).
#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn current_thread() -> usize {
    TAG.with(|t| t as *const u8 as usize)
}

/// This thread's tag: on x86-64 Linux its thread pointer, one load (a dlopen-ed
/// library's thread-local costs a call to `__tls_get_addr` on every call of the
/// per-request path). It has the tag's properties: never 0, distinct for every live
/// thread, reused only after a thread exits, and kept by a forked child's thread.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn current_thread() -> usize {
    let tp: usize;
    // SAFETY: the x86-64 ELF TLS ABI (glibc and musl alike) has `fs` point at the
    // thread's control block, whose first word points to itself: a plain load of
    // memory that lives as long as the thread, with no side effect.
    unsafe {
        std::arch::asm!(
            "mov {}, qword ptr fs:[0]",
            out(reg) tp,
            options(nostack, readonly, preserves_flags, pure)
        );
    }
    tp
}

/// A value with a lock-free copy for its owner thread (see the module documentation).
pub struct Owned<T> {
    /// The owner's thread tag; 0 until the first call claims it.
    owner: AtomicUsize,
    /// The owner's copy is lent out (a nested call on the owner thread).
    lent: Cell<bool>,
    fast: UnsafeCell<T>,
    slow: Mutex<T>,
}

// SAFETY: `fast` and `lent` are only touched by the owner thread (checked against the
// calling thread's tag in `with`; ownership never moves to a live thread other than the
// owner), so sharing `&Owned<T>` between threads gives no two threads access to them;
// `slow` is behind a mutex. `T: Send` because the owner may not be the creating thread.
unsafe impl<T: Send> Sync for Owned<T> {}

impl<T> Owned<T> {
    /// `owner_copy` for the owner thread, `shared_copy` for everybody else.
    pub fn new(owner_copy: T, shared_copy: T) -> Self {
        Owned {
            owner: AtomicUsize::new(0),
            lent: Cell::new(false),
            fast: UnsafeCell::new(owner_copy),
            slow: Mutex::new(shared_copy),
        }
    }

    /// Is the calling thread the owner? The first thread to ask becomes it.
    pub fn is_owner(&self) -> bool {
        let me = current_thread();
        // Relaxed: the value is only compared with the caller's own tag; `fast` is
        // never published through it.
        match self.owner.load(Ordering::Relaxed) {
            o if o == me => true,
            0 => self
                .owner
                .compare_exchange(0, me, Ordering::Relaxed, Ordering::Relaxed)
                .map_or_else(|o| o == me, |_| true),
            _ => false,
        }
    }

    /// The calling thread's copy, until the guard drops.
    pub fn lock(&self) -> Guard<'_, T> {
        if self.is_owner() && !self.lent.get() {
            self.lent.set(true);
            // SAFETY: only the owner thread gets here, and `lent` (owner-only, set just
            // above and cleared when the guard drops, also on unwind) rules out a second
            // `&mut` from a nested call on this thread, which takes the mutex instead.
            // The guard cannot leave this thread: it holds `&Cell`, which is not `Send`.
            let value = unsafe { &mut *self.fast.get() };
            return Guard(Inner::Owner {
                value,
                lent: &self.lent,
            });
        }
        Guard(Inner::Shared(self.slow.lock()))
    }
}

/// Access to one copy of an [`Owned`] value.
pub struct Guard<'a, T>(Inner<'a, T>);

impl<T> Guard<'_, T> {
    /// Is this the owner's copy (so the calling thread is the owner)? What
    /// [`Owned::is_owner`] would answer, without asking again.
    pub fn is_owner_copy(&self) -> bool {
        matches!(self.0, Inner::Owner { .. })
    }
}

enum Inner<'a, T> {
    Owner { value: &'a mut T, lent: &'a Cell<bool> },
    Shared(MutexGuard<'a, T>),
}

impl<T> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        if let Inner::Owner { lent, .. } = &self.0 {
            lent.set(false);
        }
    }
}

impl<T> Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        match &self.0 {
            Inner::Owner { value, .. } => value,
            Inner::Shared(g) => g,
        }
    }
}

impl<T> DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        match &mut self.0 {
            Inner::Owner { value, .. } => value,
            Inner::Shared(g) => g,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_and_others_use_separate_copies() {
        let o = Owned::new(0u32, 100u32);
        *o.lock() += 1;
        assert!(o.is_owner());
        std::thread::scope(|s| {
            s.spawn(|| {
                assert!(!o.is_owner());
                *o.lock() += 1;
            });
        });
        assert_eq!(*o.lock(), 1, "the owner's copy");
        assert_eq!(*o.slow.lock(), 101, "the other thread's copy");
    }

    #[test]
    fn threads_have_distinct_steady_tags() {
        let me = current_thread();
        assert_ne!(me, 0);
        assert_eq!(current_thread(), me);
        let other = std::thread::spawn(current_thread).join().unwrap();
        assert_ne!(other, 0);
        assert_ne!(other, me);
    }

    #[test]
    fn a_nested_call_takes_the_shared_copy() {
        let o = Owned::new(0u32, 100u32);
        {
            let mut outer = o.lock();
            *outer += 1;
            *o.lock() += 10;
        }
        assert_eq!(*o.lock(), 1);
        assert_eq!(*o.slow.lock(), 110);
    }
}
