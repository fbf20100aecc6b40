//! Service discovery (placeholder until the framework lands).

pub mod consul;
