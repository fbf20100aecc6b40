//! Numbers the C ABI, the Lua wrapper and the Rust core share, defined once here.
//!
//! Each is a `#[repr(u32)]` enum that cbindgen exports into `include/rsbalancer.h`
//! under an `rsb_` name (`cbindgen.toml` `[export] include` and `[export.rename]`),
//! its variants qualified with that name (`Weight::Max` is `RSB_WEIGHT_MAX`). `make
//! header` also writes the header's declarations as `lua/resty/rsbalancer/cdef.lua`,
//! so the Lua code reads the same numbers through the FFI namespace
//! (`ffi.C.RSB_WEIGHT_MAX`) instead of retyping them; `tests/header.rs` fails when
//! either file is stale. Enums rather than `const`s: cbindgen would export every
//! public `const` of the crate, and LuaJIT's `ffi.cdef` reads enum constants but not
//! `#define`s.
//!
//! The other shared codes live with their owners and are exported the same way:
//! `rsb_result` (`ffi`), `rsb_verdict` (`admission::Verdict`), `rsb_retry_denied`
//! (`balancer::RetryDenied`).

use std::ops::RangeInclusive;

/// Bounds of a node's base weight (config, admin API, `set_weight`, `rsb_set_weight`).
/// cbindgen:rename-all=QualifiedScreamingSnakeCase
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weight {
    Min = 1,
    Max = 10_000,
}

/// Base weights accepted anywhere: `Weight::Min..=Weight::Max`.
pub const WEIGHT_RANGE: RangeInclusive<u32> = Weight::Min as u32..=Weight::Max as u32;

/// Bounds of a request's admission priority (`rsb_admit`, `admit()`).
/// cbindgen:rename-all=QualifiedScreamingSnakeCase
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    Min = 1,
    Max = 10,
}

/// Priorities accepted anywhere: `Priority::Min..=Priority::Max`.
pub const PRIORITY_RANGE: RangeInclusive<u32> = Priority::Min as u32..=Priority::Max as u32;

/// Bits of `rsb_pick_prefer`'s `prefer` argument.
/// cbindgen:rename-all=QualifiedScreamingSnakeCase
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreferFlag {
    /// Nodes at their probe first (a request let in with `RSB_VERDICT_GO_PROBE`).
    Probe = 1,
    /// Only primaries that are not slow (`limit.slow_factor`).
    NotSlow = 2,
}

impl PreferFlag {
    /// Every bit `rsb_pick_prefer` accepts.
    pub const ALL: u32 = PreferFlag::Probe as u32 | PreferFlag::NotSlow as u32;
}

/// Bits of `rsb_signals.flags` (what `rsb_report_llm` is told of a try's answer) and
/// of `rsb_tail.flags` (what `rsb_answer_tail` read at its end).
/// cbindgen:rename-all=QualifiedScreamingSnakeCase
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignalFlag {
    /// The answer's `usage.completion_tokens` is known (`out_tokens`).
    Usage = 1,
    /// A stream that ended without `[DONE]` or a `finish_reason`: cut by its node.
    Cut = 2,
    /// The tail holds a `finish_reason` with a string value.
    Finished = 4,
    /// The tail holds `data: [DONE]`.
    Done = 8,
}

/// The scale of a canary share (`rsb_canary`, `set_canary_share`): parts per 10,000.
/// cbindgen:rename-all=QualifiedScreamingSnakeCase
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Share {
    Parts = 10_000,
}
