//! Shared memory: the one region every nginx worker maps, and the only place (with
//! `src/ffi`) that touches raw pointers.
//!
//! The region is an anonymous `MAP_SHARED` mapping created before nginx forks its
//! workers (in `init_by_lua`, which runs in the master), so every worker inherits the
//! same physical pages. Its layout is in [`layout`]. Counters and learned state are
//! lock-free atomics; configuration changes take a process-shared writer lock
//! ([`Region::lock`]) that records its owner's pid, so a holder killed with SIGKILL is
//! detected and the lock taken over instead of being held forever.
//!
//! In-flight accounting survives dead workers: every attached process owns a row of
//! per-node "shares" beside the pool-wide totals. When a process attaches, the shares
//! of every dead owner are subtracted from the totals and cleared, so a killed worker
//! leaves no phantom in-flight count behind.

pub mod clock;
pub mod layout;
pub mod owned;
#[cfg(any(test, feature = "test-support"))]
pub mod process;

use std::ptr::NonNull;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use layout::{
    Capacity, Header, NodeSlot, NodeTally, Offsets, PoolSlot, PoolTally, QueueEntry, QueuePool, WorkerSlot,
    LAYOUT_VERSION, MAGIC,
};

/// What a report touches of one node ([`Region::node_row`]).
pub struct NodeRow<'a> {
    pub slot: &'a NodeSlot,
    /// Its statistics in the caller's tally row.
    pub tally: &'a NodeTally,
    /// The highest concurrency it served ([`Region::served`]).
    pub served: &'a AtomicU32,
    /// The caller's worker's share of its in-flight count ([`Region::share`]).
    pub share: Option<&'a AtomicU32>,
}

/// Why a region operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShmError {
    Map(String),
    LockTimeout { owner: i32 },
    TextTooLarge { len: usize, cap: u32 },
    NoWorkerSlot { max_workers: u32 },
}

impl std::fmt::Display for ShmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShmError::Map(e) => write!(f, "cannot map shared memory: {e}"),
            ShmError::LockTimeout { owner } => {
                write!(f, "shared writer lock held by live pid {owner}: timed out")
            }
            ShmError::TextTooLarge { len, cap } => write!(
                f,
                "shm.config_bytes: {cap} is too small for a config of {len} bytes"
            ),
            ShmError::NoWorkerSlot { max_workers } => write!(
                f,
                "shm.max_workers: all {max_workers} worker slots are owned by live processes"
            ),
        }
    }
}

impl std::error::Error for ShmError {}

/// What the layers above keep per worker slot besides in-flight shares (admission
/// shares, queue entries): `reap(region, worker slot, owner pid)` gives it back when
/// the owner is gone. The shared region knows none of it: the pool registers one
/// ([`Region::set_reaper`]) for this process's mapping.
pub type Reaper = fn(&Region, u32, i32);

/// A mapped region. Dropping it unmaps it in this process only.
pub struct Region {
    base: NonNull<u8>,
    cap: Capacity,
    off: Offsets,
    reaper: std::sync::OnceLock<Reaper>,
}

// SAFETY: the mapping is only accessed through atomics (and plain fields written once
// before the region is shared), so references to it may cross threads freely.
unsafe impl Send for Region {}
// SAFETY: as above: every shared mutation is an atomic operation.
unsafe impl Sync for Region {}

impl Region {
    /// Map a new zeroed region of the given capacity and write its header.
    pub fn create(cap: Capacity) -> Result<Region, ShmError> {
        let off = cap.offsets();
        // SAFETY: anonymous shared mapping with no address hint; the result is checked
        // against MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                off.total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(ShmError::Map(format!(
                "mmap of {} bytes: {}",
                off.total,
                std::io::Error::last_os_error()
            )));
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| ShmError::Map("null".into()))?;
        // SAFETY: the mapping is fresh, page-aligned, at least size_of::<Header>() long,
        // and no other process or thread can see it yet.
        unsafe {
            let h = base.as_ptr().cast::<Header>();
            std::ptr::addr_of_mut!((*h).magic).write(MAGIC);
            std::ptr::addr_of_mut!((*h).layout_version).write(LAYOUT_VERSION);
            std::ptr::addr_of_mut!((*h).max_pools).write(cap.max_pools);
            std::ptr::addr_of_mut!((*h).max_nodes).write(cap.max_nodes);
            std::ptr::addr_of_mut!((*h).max_workers).write(cap.max_workers);
            std::ptr::addr_of_mut!((*h).config_bytes).write(cap.config_bytes);
        }
        fork::install();
        Ok(Region {
            base,
            cap,
            off,
            reaper: std::sync::OnceLock::new(),
        })
    }

    /// Register what a dead worker's slot also gives back (the first registration
    /// stays).
    pub fn set_reaper(&self, reap: Reaper) {
        let _ = self.reaper.set(reap);
    }

    fn reap(&self, w: u32, pid: i32) {
        if let Some(reap) = self.reaper.get() {
            reap(self, w, pid);
        }
    }

    pub fn capacity(&self) -> Capacity {
        self.cap
    }

    pub fn header(&self) -> &Header {
        // SAFETY: the header lies at offset 0 of a live mapping, is 64-byte aligned
        // (page-aligned base) and all its mutable fields are atomics.
        unsafe { &*self.base.as_ptr().cast::<Header>() }
    }

    /// Slot `i` of an array of `T` at byte offset `at`, `None` past `len`.
    fn slot<T>(&self, at: usize, i: u32, len: u32) -> Option<&T> {
        if i >= len {
            return None;
        }
        // SAFETY: `i < len`, and `Capacity::offsets` reserved `len` slots of `T` at `at`,
        // 64-byte aligned; `T` is one of the layout structs whose mutable fields are
        // atomics and for which all-zero bytes are valid.
        Some(unsafe { &*self.base.as_ptr().add(at).cast::<T>().add(i as usize) })
    }

    pub fn pool(&self, i: u32) -> Option<&PoolSlot> {
        self.slot(self.off.pools, i, self.cap.max_pools)
    }

    pub fn node(&self, i: u32) -> Option<&NodeSlot> {
        self.slot(self.off.nodes, i, self.cap.max_nodes)
    }

    /// Asks the CPU to bring into cache the two lines of node `i`'s slot that a pick
    /// reads (see `NodeSlot`), so that their misses overlap with other work; a hint
    /// only (nothing when `i` is out of range or on other CPUs than x86-64).
    #[inline(always)]
    pub fn prefetch_node(&self, i: u32) {
        #[cfg(target_arch = "x86_64")]
        if let Some(n) = self.node(i) {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let p = (n as *const NodeSlot).cast::<i8>();
            // SAFETY: a prefetch reads nothing and never faults; both addresses lie in
            // the slot `n` refers to (448 bytes, lines 1 and 2 at 0 and 64).
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(p);
                _mm_prefetch::<_MM_HINT_T0>(p.add(64));
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = i;
    }

    pub fn worker(&self, i: u32) -> Option<&WorkerSlot> {
        self.slot(self.off.workers, i, self.cap.max_workers)
    }

    /// The in-flight share worker `w` holds on node `n`.
    pub fn share(&self, w: u32, n: u32) -> Option<&AtomicU32> {
        if w >= self.cap.max_workers || n >= self.cap.max_nodes {
            return None;
        }
        let idx = w as usize * self.cap.max_nodes as usize + n as usize;
        // SAFETY: idx < max_workers * max_nodes, the number of AtomicU32 reserved at
        // `shares`, which is 64-byte aligned; zero is a valid AtomicU32.
        Some(unsafe {
            &*self
                .base
                .as_ptr()
                .add(self.off.shares)
                .cast::<AtomicU32>()
                .add(idx)
        })
    }

    /// The admission queue entries of pool `p` (`max_waiters` of them).
    pub fn queue_entries(&self, p: u32) -> Option<&[QueueEntry]> {
        if p >= self.cap.max_pools {
            return None;
        }
        let n = self.cap.max_waiters as usize;
        // SAFETY: `p < max_pools`; `Capacity::offsets` reserved `max_pools * max_waiters`
        // 64-byte entries at `queue` (64-byte aligned), pool-major; entries are atomics
        // for which all-zero bytes are valid, and are only handed out as `&`.
        Some(unsafe {
            std::slice::from_raw_parts(
                self.base
                    .as_ptr()
                    .add(self.off.queue)
                    .cast::<QueueEntry>()
                    .add(p as usize * n),
                n,
            )
        })
    }

    /// The admission state of pool `p`.
    pub fn queue_pool(&self, p: u32) -> Option<&QueuePool> {
        self.slot(self.off.queue_pools, p, self.cap.max_pools)
    }

    /// The admissions worker `w` holds in pool `p`.
    pub fn admit_share(&self, w: u32, p: u32) -> Option<&AtomicU32> {
        if w >= self.cap.max_workers || p >= self.cap.max_pools {
            return None;
        }
        let idx = w as usize * self.cap.max_pools as usize + p as usize;
        // SAFETY: idx < max_workers * max_pools, the number of AtomicU32 reserved at
        // `admit_shares` (64-byte aligned); zero is a valid AtomicU32.
        Some(unsafe {
            &*self
                .base
                .as_ptr()
                .add(self.off.admit_shares)
                .cast::<AtomicU32>()
                .add(idx)
        })
    }

    /// The highest concurrency node `n` answered a success at.
    pub fn served(&self, n: u32) -> Option<&AtomicU32> {
        if n >= self.cap.max_nodes {
            return None;
        }
        // SAFETY: n < max_nodes, the number of AtomicU32 reserved at `served` (64-byte
        // aligned); zero is a valid AtomicU32.
        Some(unsafe {
            &*self
                .base
                .as_ptr()
                .add(self.off.served)
                .cast::<AtomicU32>()
                .add(n as usize)
        })
    }

    /// Node `n`'s statistics in tally row `row` (a worker slot, or `max_workers` for
    /// the shared row).
    pub fn node_tally(&self, row: u32, n: u32) -> Option<&NodeTally> {
        self.row_slot(self.off.node_tallies, row, n, self.cap.max_nodes)
    }

    /// Pool `p`'s statistics in tally row `row`.
    pub fn pool_tally(&self, row: u32, p: u32) -> Option<&PoolTally> {
        self.row_slot(self.off.pool_tallies, row, p, self.cap.max_pools)
    }

    /// What a report touches of node `n` (its slot, its statistics in tally row `row`,
    /// its served concurrency and worker `w`'s share of its in-flight count) from one
    /// check of `n`, `row` and `w`; `None` when `n` or `row` is out of range.
    pub fn node_row(&self, row: u32, n: u32, w: Option<u32>) -> Option<NodeRow<'_>> {
        if n >= self.cap.max_nodes || row >= self.cap.tally_rows() {
            return None;
        }
        let nodes = self.cap.max_nodes as usize;
        let (n, at) = (n as usize, row as usize * nodes + n as usize);
        let share = w
            .filter(|&w| w < self.cap.max_workers)
            .map(|w| w as usize * nodes + n);
        let base = self.base.as_ptr();
        // SAFETY: `n < max_nodes`, `row < tally_rows` and `w < max_workers`:
        // `Capacity::offsets` reserved `max_nodes` node slots at `nodes`, `max_nodes`
        // AtomicU32 at `served`, `tally_rows * max_nodes` node tallies at
        // `node_tallies` and `max_workers * max_nodes` AtomicU32 at `shares` (so `at`
        // and `share` are in range), each array 64-byte aligned; all-zero bytes are
        // valid for each and their mutable fields are atomics (as in `slot`).
        unsafe {
            Some(NodeRow {
                slot: &*base.add(self.off.nodes).cast::<NodeSlot>().add(n),
                tally: &*base.add(self.off.node_tallies).cast::<NodeTally>().add(at),
                served: &*base.add(self.off.served).cast::<AtomicU32>().add(n),
                share: share.map(|i| &*base.add(self.off.shares).cast::<AtomicU32>().add(i)),
            })
        }
    }

    /// Pool `p`'s slot and its statistics in tally row `row`, from one check of both.
    pub fn pool_row(&self, row: u32, p: u32) -> Option<(&PoolSlot, &PoolTally)> {
        if p >= self.cap.max_pools || row >= self.cap.tally_rows() {
            return None;
        }
        let (p, at) = (
            p as usize,
            row as usize * self.cap.max_pools as usize + p as usize,
        );
        let base = self.base.as_ptr();
        // SAFETY: `p < max_pools` and `row < tally_rows`: `Capacity::offsets` reserved
        // `max_pools` pool slots at `pools` and `tally_rows * max_pools` pool tallies at
        // `pool_tallies`, 64-byte aligned; valid all-zero, atomics (as in `slot`).
        unsafe {
            Some((
                &*base.add(self.off.pools).cast::<PoolSlot>().add(p),
                &*base.add(self.off.pool_tallies).cast::<PoolTally>().add(at),
            ))
        }
    }

    /// Pool `p`'s statistics in each row of [`tally_rows`](Self::tally_rows), in that
    /// order (none for a pool slot out of range): the per-request sums' walk, with one
    /// bounds check for all rows rather than two per row.
    pub fn pool_tallies(&self, p: u32) -> impl Iterator<Item = &PoolTally> + '_ {
        let ok = p < self.cap.max_pools;
        let rows = self.tally_rows().filter(move |_| ok);
        let per_row = self.cap.max_pools as usize;
        rows.map(move |row| {
            // SAFETY: `p < max_pools` (no row otherwise) and every row `tally_rows`
            // yields is below `tally_rows()` (the worker rows are capped at
            // `max_workers`, the shared row is `max_workers`), so the index is inside
            // the `tally_rows() * max_pools` slots `Capacity::offsets` reserved at
            // `pool_tallies`, 64-byte aligned; `PoolTally`'s fields are atomics, valid
            // as all-zero bytes.
            unsafe {
                &*self
                    .base
                    .as_ptr()
                    .add(self.off.pool_tallies)
                    .cast::<PoolTally>()
                    .add(row as usize * per_row + p as usize)
            }
        })
    }

    /// Slot `i` of tally row `row` in an array of `T` at `at`, rows of `per_row`.
    fn row_slot<T>(&self, at: usize, row: u32, i: u32, per_row: u32) -> Option<&T> {
        if row >= self.cap.tally_rows() || i >= per_row {
            return None;
        }
        self.slot(at, row * per_row + i, self.cap.tally_rows() * per_row)
    }

    /// The tally rows that may hold counts: every worker row ever attached, then the
    /// shared row.
    pub fn tally_rows(&self) -> impl Iterator<Item = u32> {
        let used = self
            .header()
            .tally_rows
            // Relaxed: a bound on the rows to sum, whose cells are atomics read on their
            // own; a row beyond a stale bound holds only counts that raced the read.
            .load(Ordering::Relaxed)
            .min(self.cap.max_workers);
        (0..used).chain(std::iter::once(self.cap.max_workers))
    }

    /// Take the process-shared writer lock, waiting at most `timeout`. A holder whose
    /// process is gone is replaced (and counted in `lock_steals`).
    pub fn lock(&self, timeout: Duration) -> Result<LockGuard<'_>, ShmError> {
        let me = std::process::id() as i32;
        let owner_cell = &self.header().lock_owner;
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            // Acquire pairs with the Release in `LockGuard::drop`: everything the previous
            // holder wrote is visible once we own the lock.
            match owner_cell.compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return Ok(LockGuard { region: self, me }),
                Err(owner) if owner != me && !pid_alive(owner) => {
                    // Acquire: the dead holder's CAS continues the release sequence of
                    // the last `LockGuard::drop`, so this pairs with that Release; what
                    // the dead holder wrote itself has no Release (it never unlocked),
                    // which is why writers keep the region consistent at every step
                    // (`write_text`'s double buffer).
                    if owner_cell
                        .compare_exchange(owner, me, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                    {
                        self.header().lock_steals.fetch_add(1, Ordering::Relaxed);
                        return Ok(LockGuard { region: self, me });
                    }
                }
                Err(owner) => {
                    if start.elapsed() >= timeout {
                        return Err(ShmError::LockTimeout { owner });
                    }
                }
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// The active config text (copied out). Call with the lock held.
    pub fn read_text(&self, _guard: &LockGuard<'_>) -> Vec<u8> {
        let h = self.header();
        // Acquire pairs with the Release flip in `write_text`: the lock already orders us
        // after a writer that unlocked, this covers one that died holding it (the lock
        // stolen), so a flipped buffer is never read before its bytes and length.
        let which = h.active_text.load(Ordering::Acquire) as usize & 1;
        // Relaxed: written before the flip, so the Acquire above makes it visible.
        let len = (h.text_len[which].load(Ordering::Relaxed) as usize).min(self.cap.config_bytes as usize);
        let at = self.off.text + which * self.cap.config_bytes as usize;
        let mut out = vec![0u8; len];
        // SAFETY: `at..at+len` lies inside the text buffer `which` (len <= config_bytes);
        // writers only touch the inactive buffer, and we hold the lock, so no one writes
        // these bytes during the copy.
        unsafe { std::ptr::copy_nonoverlapping(self.base.as_ptr().add(at), out.as_mut_ptr(), len) };
        out
    }

    /// Write `text` to the inactive buffer and make it active. Call with the lock held.
    /// A writer killed half-way leaves the active buffer untouched.
    pub fn write_text(&self, _guard: &LockGuard<'_>, text: &[u8]) -> Result<(), ShmError> {
        if text.len() > self.cap.config_bytes as usize {
            return Err(ShmError::TextTooLarge {
                len: text.len(),
                cap: self.cap.config_bytes,
            });
        }
        let h = self.header();
        // Acquire pairs with the Release flip of the previous writer (below), which
        // matters when it died holding the lock: we write the buffer it left inactive.
        let next = (h.active_text.load(Ordering::Acquire) as usize & 1) ^ 1;
        let at = self.off.text + next * self.cap.config_bytes as usize;
        // SAFETY: the destination is the inactive buffer, sized config_bytes >= len;
        // only lock holders write text and we hold the lock; readers read the active one.
        unsafe { std::ptr::copy_nonoverlapping(text.as_ptr(), self.base.as_ptr().add(at), text.len()) };
        // Relaxed: published by the flip below.
        h.text_len[next].store(text.len() as u32, Ordering::Relaxed);
        // Release pairs with the Acquire in `read_text` (and in the next `write_text`):
        // the bytes and length above are visible before the flip.
        h.active_text.store(next as u32, Ordering::Release);
        // Release pairs with the Acquire loads in `Balancer::sync` (balancer/local.rs),
        // which then read the text under the lock; the generation bump that follows a
        // config change (`Balancer::configure`) carries the same writes.
        h.config_version.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Claim a worker slot for this process, preferring `want`, after reclaiming the
    /// in-flight shares of every dead owner (and, through the [`Reaper`], whatever
    /// else the layers above keep per worker). Returns the slot index.
    pub fn attach_worker(&self, want: u32) -> Result<u32, ShmError> {
        let me = std::process::id() as i32;
        self.reap_dead_workers();
        let n = self.cap.max_workers;
        let order = (0..n).map(|k| (want.min(n - 1) + k) % n);
        for w in order {
            let slot = self.worker(w).expect("w < max_workers");
            // A slot this process already owns belongs to another handle: not ours.
            // Relaxed: only a pre-check; the CAS below is what claims and synchronizes.
            let cur = slot.pid.load(Ordering::Relaxed);
            if cur == 0
                && slot
                    .pid
                    // Acquire pairs with the Release store of 0 in `detach_worker` and
                    // `reap_dead_workers`: the zeroed shares and the reaped queue entries
                    // of the previous owner are visible before we use the slot. The
                    // Release half is kept (nothing is written before it; in doubt).
                    .compare_exchange(0, me, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                slot.attached_ms.store(clock::now_ms(), Ordering::Relaxed);
                // Relaxed: a bound only (see `tally_rows`); the rows are atomics.
                self.header().tally_rows.fetch_max(w + 1, Ordering::Relaxed);
                return Ok(w);
            }
        }
        Err(ShmError::NoWorkerSlot { max_workers: n })
    }

    /// Give up a worker slot held by this process (its shares are folded back).
    pub fn detach_worker(&self, w: u32) {
        let me = std::process::id() as i32;
        if let Some(slot) = self.worker(w) {
            // Relaxed: only this process stores its own pid here.
            if slot.pid.load(Ordering::Relaxed) == me {
                self.release_shares(w);
                self.reap(w, me);
                // Release pairs with the Acquire CAS in `attach_worker`: the next owner
                // sees the shares and queue entries given back above.
                slot.pid.store(0, Ordering::Release);
            }
        }
    }

    /// Subtract the shares of every worker slot whose owner died, and free the slot.
    /// Returns how many slots were reclaimed.
    pub fn reap_dead_workers(&self) -> u32 {
        let me = std::process::id() as i32;
        let mut reaped = 0;
        for w in 0..self.cap.max_workers {
            let slot = self.worker(w).expect("w < max_workers");
            // Relaxed: only a pre-check; the CAS below is what claims and synchronizes.
            let pid = slot.pid.load(Ordering::Relaxed);
            // A negative pid marks a slot being reaped by process -pid; a reaper that
            // died half-way is replaced (releasing shares is idempotent: swap to 0).
            let owner = pid.abs();
            if pid != 0 && owner != me && !pid_alive(owner) {
                // Only the process that wins this CAS reclaims, so shares are folded
                // back exactly once; the marker keeps others from claiming the slot
                // until its shares are gone.
                // AcqRel: the Acquire half pairs with the Release of the owner's claim
                // (`attach_worker`) or of a dead reaper's marker, so the reclaim below
                // comes after them; kept in doubt, the reclaim is RMWs anyway.
                if slot
                    .pid
                    .compare_exchange(pid, -me, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    self.release_shares(w);
                    self.reap(w, owner);
                    // Release pairs with the Acquire CAS in `attach_worker`, as in
                    // `detach_worker`.
                    slot.pid.store(0, Ordering::Release);
                    reaped += 1;
                }
            }
        }
        reaped
    }

    fn release_shares(&self, w: u32) {
        for n in 0..self.cap.max_nodes {
            let share = self.share(w, n).expect("in range");
            // Relaxed: the share is a count and the swap's value the only data; the
            // RMW alone makes it fold back once.
            let held = share.swap(0, Ordering::Relaxed);
            if held > 0 {
                let node = self.node(n).expect("in range");
                saturating_sub(&node.inflight, held);
                self.header()
                    .reclaimed_tries
                    .fetch_add(held as u64, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `base`/`total` are exactly what mmap returned; no reference into the
        // region outlives `self` (all accessors borrow `self`).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.off.total) };
    }
}

/// Held writer lock; released on drop.
pub struct LockGuard<'a> {
    region: &'a Region,
    me: i32,
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        // Release pairs with the Acquire in `Region::lock`. If the lock was taken over
        // (we were presumed dead), leave the new owner alone.
        let _ = self.region.header().lock_owner.compare_exchange(
            self.me,
            0,
            Ordering::Release,
            Ordering::Relaxed,
        );
    }
}

/// Decrement without going below zero; returns the value before.
pub fn saturating_sub(cell: &AtomicU32, by: u32) -> u32 {
    // AcqRel, kept in doubt: the counts it takes down (in-flight, shares, admissions,
    // queue lengths) are their own data, except that the node in-flight count is read
    // with Acquire by the slot-reuse check in `Balancer::configure` (`reusable`), which
    // this Release pairs with; the report's writes after its decrement are covered by
    // the reuse grace, not by this.
    match cell.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(by))
    }) {
        Ok(v) | Err(v) => v,
    }
}

/// Is there a live (non-zombie) process with this pid?
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 sends nothing; it only checks existence/permission.
    let rc = unsafe { libc::kill(pid, 0) };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return false;
    }
    // A killed worker stays a zombie until nginx reaps it: that is not alive.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .map(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
            .unwrap_or(true),
        Err(_) => true,
    }
}

/// Fork detection, so per-process random generators are reseeded in each worker.
pub mod fork {
    use super::*;
    static EPOCH: AtomicU64 = AtomicU64::new(0);
    static INSTALLED: AtomicI32 = AtomicI32::new(0);

    extern "C" fn on_child() {
        EPOCH.fetch_add(1, Ordering::Relaxed);
    }

    /// Register the `pthread_atfork` child handler (once per process image).
    pub fn install() {
        // Relaxed: decides the one installer; no data rides on the flag.
        if INSTALLED.swap(1, Ordering::Relaxed) == 0 {
            // SAFETY: `on_child` is an `extern "C" fn()` that only touches an atomic, which
            // is async-signal-safe and valid in the child right after fork.
            unsafe { libc::pthread_atfork(None, None, Some(on_child)) };
        }
    }

    /// Changes in a child after every fork.
    pub fn epoch() -> u64 {
        EPOCH.load(Ordering::Relaxed)
    }
}
