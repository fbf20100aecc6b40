//! Safe wrappers over the C ABI (`rsbalancer::ffi::rsb_*`): the only `unsafe` of the
//! `abi` target. Each wrapper answers the call's `rsb_result` and its outputs, which
//! start as [`UNSET`] so that the harness can see what a call wrote. Inputs and outputs
//! can be NULL on purpose ([`Buf::Null`], the `nulls` bit masks), to check that the ABI
//! refuses them with `RSB_NULL_ARGUMENT` and writes nothing.

use std::ffi::c_char;
use std::ptr::{self, NonNull};

use rsbalancer::balancer::Balancer;
pub use rsbalancer::ffi::rsb_result;
use rsbalancer::ffi::{self, rsb_node_stats};

/// What an output holds when the call did not write it.
pub const UNSET: u32 = 0xDEAD_BEEF;
/// [`UNSET`] for 64-bit outputs.
pub const UNSET64: u64 = 0xDEAD_BEEF_DEAD_BEEF;

/// An input array: a slice, or NULL with a length (misuse).
#[derive(Clone, Copy, Debug)]
pub enum Buf<'a, T> {
    Slice(&'a [T]),
    Null(usize),
}

impl<T> Buf<'_, T> {
    fn raw(self) -> (*const T, usize) {
        match self {
            Buf::Slice(s) => (s.as_ptr(), s.len()),
            Buf::Null(n) => (ptr::null(), n),
        }
    }

    /// NULL with a non-zero length: the call must answer `RSB_NULL_ARGUMENT`.
    pub fn null_nonempty(self) -> bool {
        matches!(self, Buf::Null(n) if n > 0)
    }
}

/// `out` as a pointer, or NULL when bit `bit` of `nulls` is set.
fn out<T>(out: &mut T, nulls: u8, bit: u8) -> *mut T {
    if nulls & (1 << bit) != 0 {
        ptr::null_mut()
    } else {
        out
    }
}

/// A handle from `rsb_balancer_new`, freed by `rsb_balancer_free` on drop.
pub struct Handle(NonNull<Balancer>);

// SAFETY: the handle is only used behind a Mutex (one thread at a time), and the
// `Balancer` it points to is itself `Send + Sync` (the mlua module shares it).
unsafe impl Send for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the pointer came from `rsb_balancer_new` and is freed once, here.
        unsafe { ffi::rsb_balancer_free(self.0.as_ptr()) }
    }
}

impl Handle {
    /// `rsb_balancer_new` from `json`.
    pub fn new(json: &str) -> (rsb_result, Option<Handle>) {
        let mut raw: *mut Balancer = ptr::null_mut();
        // SAFETY: `json` is `len` readable bytes; `raw` is a writable local.
        let rc = unsafe { ffi::rsb_balancer_new(json.as_ptr().cast(), json.len(), &mut raw) };
        (rc, NonNull::new(raw).map(Handle))
    }

    /// `rsb_balancer_new` with a NULL out-pointer (and `json` NULL or not).
    pub fn new_null_out(json: Buf<u8>) -> rsb_result {
        let (p, n) = json.raw();
        // SAFETY: `p` is NULL (checked by the ABI before any read) or `n` readable
        // bytes; a NULL `out` is checked before anything is created.
        unsafe { ffi::rsb_balancer_new(p.cast(), n, ptr::null_mut()) }
    }

    fn ptr(&self) -> *const Balancer {
        self.0.as_ptr()
    }

    /// The same handle through the Rust API, for the state the C ABI has no getter of.
    pub fn rust(&self) -> &Balancer {
        // SAFETY: the handle is live until `self` drops, and the ABI only ever takes
        // it as `*const` (shared), so a shared borrow tied to `&self` is sound.
        unsafe { self.0.as_ref() }
    }

    pub fn pool_index(&self, name: Buf<u8>, nulls: u8) -> (rsb_result, u32) {
        let (mut v, (p, n)) = (UNSET, name.raw());
        // SAFETY: live handle; `p` NULL or `n` readable bytes (NULL checked by the ABI);
        // the output is a local or NULL.
        let rc = unsafe { ffi::rsb_pool_index(self.ptr(), p.cast(), n, out(&mut v, nulls, 0)) };
        (rc, v)
    }

    pub fn node_index(&self, pool: Buf<u8>, id: Buf<u8>, nulls: u8) -> (rsb_result, u32) {
        let (mut v, (pp, pn), (ip, in_)) = (UNSET, pool.raw(), id.raw());
        // SAFETY: as `pool_index`, for both names.
        let rc =
            unsafe { ffi::rsb_node_index(self.ptr(), pp.cast(), pn, ip.cast(), in_, out(&mut v, nulls, 0)) };
        (rc, v)
    }

    /// `rsb_attach_worker` (its out-pointer may be NULL).
    pub fn attach_worker(&self, worker: u32, nulls: u8) -> (rsb_result, u32) {
        let mut v = UNSET;
        // SAFETY: live handle; the output is a local or NULL (allowed).
        let rc = unsafe { ffi::rsb_attach_worker(self.ptr(), worker, out(&mut v, nulls, 0)) };
        (rc, v)
    }

    /// `rsb_pick` (`prefer` None) or `rsb_pick_prefer`.
    pub fn pick(
        &self,
        pool: u32,
        key: Buf<u8>,
        tried: Buf<u32>,
        prefer: Option<u32>,
        nulls: u8,
    ) -> (rsb_result, u32) {
        let (mut v, (kp, kn), (tp, tn)) = (UNSET, key.raw(), tried.raw());
        let o = out(&mut v, nulls, 0);
        let (b, kp) = (self.ptr(), kp.cast::<c_char>());
        // SAFETY: live handle; `kp`/`tp` NULL (checked by the ABI) or `kn` bytes / `tn`
        // aligned u32s of live slices; the output is a local or NULL.
        let rc = unsafe {
            match prefer {
                None => ffi::rsb_pick(b, pool, kp, kn, tp, tn, o),
                Some(pr) => ffi::rsb_pick_prefer(b, pool, kp, kn, tp, tn, pr, o),
            }
        };
        (rc, v)
    }

    pub fn report(&self, node: u32, status: u32, latency_us: u32, retry_after_ms: u32) -> rsb_result {
        // SAFETY: live handle; no pointers.
        unsafe { ffi::rsb_report(self.ptr(), node, status, latency_us, retry_after_ms) }
    }

    pub fn may_retry(&self, pool: u32, tried: Buf<u32>, elapsed_ms: u32, nulls: u8) -> (rsb_result, u32) {
        let (mut v, (tp, tn)) = (UNSET, tried.raw());
        // SAFETY: live handle; `tp` NULL (checked by the ABI) or `tn` u32s of a live
        // slice; the output is a local or NULL.
        let rc = unsafe { ffi::rsb_may_retry(self.ptr(), pool, tp, tn, elapsed_ms, out(&mut v, nulls, 0)) };
        (rc, v)
    }

    pub fn available(&self, pool: u32, nulls: u8) -> (rsb_result, u64) {
        let mut v = UNSET64;
        // SAFETY: live handle; the output is a local or NULL.
        let rc = unsafe { ffi::rsb_available(self.ptr(), pool, out(&mut v, nulls, 0)) };
        (rc, v)
    }

    pub fn slow_wait(&self, pool: u32, nulls: u8) -> (rsb_result, [u32; 2]) {
        let (mut ms, mut others) = (UNSET, UNSET);
        let (o0, o1) = (out(&mut ms, nulls, 0), out(&mut others, nulls, 1));
        // SAFETY: live handle; both outputs are locals or NULL.
        let rc = unsafe { ffi::rsb_slow_wait(self.ptr(), pool, o0, o1) };
        (rc, [ms, others])
    }

    pub fn set_weight(&self, node: u32, weight: u32) -> rsb_result {
        // SAFETY: live handle; no pointers.
        unsafe { ffi::rsb_set_weight(self.ptr(), node, weight) }
    }

    /// `rsb_node_get_stats`; `None` when it wrote nothing (its `weight` kept [`UNSET`]).
    pub fn node_stats(&self, node: u32, nulls: u8) -> (rsb_result, Option<rsb_node_stats>) {
        let mut s = rsb_node_stats {
            weight: UNSET,
            ..Default::default()
        };
        // SAFETY: live handle; the output is a local or NULL.
        let rc = unsafe { ffi::rsb_node_get_stats(self.ptr(), node, out(&mut s, nulls, 0)) };
        (rc, (s.weight != UNSET).then_some(s))
    }

    /// `rsb_admit`: (verdict, entry, value).
    pub fn admit(&self, pool: u32, priority: u32, nulls: u8) -> (rsb_result, (u32, u32, u64)) {
        let (mut v, mut e, mut x) = (UNSET, UNSET, UNSET64);
        let (o0, o1, o2) = (
            out(&mut v, nulls, 0),
            out(&mut e, nulls, 1),
            out(&mut x, nulls, 2),
        );
        // SAFETY: live handle; the outputs are locals or NULL.
        let rc = unsafe { ffi::rsb_admit(self.ptr(), pool, priority, o0, o1, o2) };
        (rc, (v, e, x))
    }

    /// `rsb_admit_poll`: (verdict, value).
    pub fn admit_poll(&self, pool: u32, entry: u32, ticket: u64, nulls: u8) -> (rsb_result, (u32, u64)) {
        let (mut v, mut x) = (UNSET, UNSET64);
        let (o0, o1) = (out(&mut v, nulls, 0), out(&mut x, nulls, 1));
        // SAFETY: live handle; the outputs are locals or NULL.
        let rc = unsafe { ffi::rsb_admit_poll(self.ptr(), pool, entry, ticket, o0, o1) };
        (rc, (v, x))
    }

    /// `rsb_admit_leave` (its out-pointer may be NULL).
    pub fn admit_leave(&self, pool: u32, entry: u32, ticket: u64, nulls: u8) -> (rsb_result, u32) {
        let mut v = UNSET;
        // SAFETY: live handle; the output is a local or NULL (allowed).
        let rc = unsafe { ffi::rsb_admit_leave(self.ptr(), pool, entry, ticket, out(&mut v, nulls, 0)) };
        (rc, v)
    }

    pub fn admit_release(&self, pool: u32) -> rsb_result {
        // SAFETY: live handle; no pointers.
        unsafe { ffi::rsb_admit_release(self.ptr(), pool) }
    }
}

/// `rsb_last_error` into a buffer of `cap` bytes (NULL when `cap` is 0): (full length,
/// the bytes written before the NUL).
pub fn last_error(cap: usize) -> (usize, Vec<u8>) {
    let mut buf = vec![0xffu8; cap];
    let p = if cap == 0 {
        ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    // SAFETY: `p` is NULL or writable for `cap` bytes.
    let len = unsafe { ffi::rsb_last_error(p, cap) };
    let end = buf.iter().position(|&c| c == 0).unwrap_or(0);
    buf.truncate(end);
    (len, buf)
}

/// `rsb_retry_after_ms` of `value`.
pub fn retry_after_ms(value: Buf<u8>, nulls: u8) -> (rsb_result, u32) {
    let (mut v, (p, n)) = (UNSET, value.raw());
    // SAFETY: `p` NULL (checked by the ABI) or `n` readable bytes; the output is a
    // local or NULL.
    let rc = unsafe { ffi::rsb_retry_after_ms(p.cast(), n, out(&mut v, nulls, 0)) };
    (rc, v)
}
