//! timevault: encrypted, compressed, geo-replicated backups with point-in-time restore and
//! per-tenant export for multi-tenant SaaS operators.
//!
//! The library holds everything; the `timevault` binary only parses arguments and prints.
//! Start reading at [`repo::Repository`] (where backups live) and [`archive`] (the object format).

// The daemon's drill future nests a restore, which nests reading a tenant key through a key
// service SDK: its type is deeper than rustc's default query depth in release builds.
#![recursion_limit = "256"]

pub mod allocator;
pub mod archive;
pub mod audit;
pub mod catalog;
pub mod changelog;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod drill;
pub mod error;
pub mod export;
pub mod forget;
pub mod integrity;
pub mod keys;
pub mod metrics;
pub mod nodelay;
pub mod pg_connection;
pub mod prune;
pub mod redact;
pub mod repo;
pub mod restore;
pub mod retention;
pub mod rowsum;
pub mod source;
pub mod stored;
pub mod tenancy;
pub mod time;
pub mod work;

pub use error::{Error, ErrorKind, Result};
