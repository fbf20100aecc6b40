//! rsbalancer: upstream selection for OpenResty / nginx-lua that learns from every
//! response through shared memory all nginx workers see.
//!
//! One cdylib, three faces over one core:
//! - [`ffi`]: the C ABI (`include/rsbalancer.h`), used by LuaJIT's FFI for the
//!   per-request calls (`rsb_pick`, `rsb_report`) and by C programs;
//! - `lua` (feature `lua-module`): the mlua module `require "rsbalancer"` for
//!   everything that is not per request (config, admin, state dumps);
//! - the core: [`config`], [`shm`] (the shared region), [`load`] (peak EWMA and
//!   effective weights), [`select`] (the algorithms) and [`balancer`] (the glue).
//!
//! ```
//! use rsbalancer::{balancer::Balancer, config::Config};
//! let cfg = Config::from_json(r#"{"pools": {"llm": {"algorithm": "p2c_ewma",
//!     "nodes": [{"id": "a", "addr": "127.0.0.1:8001", "weight": 3},
//!               {"id": "b", "addr": "127.0.0.1:8002"}]}}}"#).unwrap();
//! let b = Balancer::create(&cfg).unwrap();
//! let pool = b.pool_index("llm").unwrap();
//! let node = b.pick(pool, b"", &[]).unwrap();
//! b.report(node, 200, 120_000, 0).unwrap(); // 200 OK after 120 ms
//! ```
#![deny(unsafe_op_in_unsafe_fn)]
// Raw pointers, mmap, fork and the C ABI live in two rooms, `shm` and `ffi`, which
// allow `unsafe` for themselves (each block with a `// SAFETY:` comment); everything
// else is safe Rust, and the compiler holds it to that.
#![deny(unsafe_code)]

pub mod abi;
pub mod admin;
pub mod admission;
pub mod ask;
pub mod balancer;
pub mod budget;
pub mod canary;
pub mod cluster;
pub mod config;
pub mod discovery;
pub mod emergency;
#[allow(unsafe_code)]
pub mod ffi;
pub mod fleet;
pub mod headers;
pub mod headroom;
pub mod health;
pub mod limit;
pub mod load;
#[cfg(feature = "lua-module")]
mod lua;
pub mod metrics;
pub mod model;
pub mod node;
pub mod notice;
pub mod params;
pub mod prefix;
pub mod provider;
pub mod retry;
pub mod scrape;
pub mod select;
#[allow(unsafe_code)]
pub mod shm;
pub mod status;
pub mod stream;
mod strict;
pub mod tally;
pub mod topology;
pub mod window;
pub mod writer;
