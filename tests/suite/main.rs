//! The integration tests: one test binary, one module per area (the module doc of each says what it
//! proves). One binary links once and lets the test threads run tests of different areas side by
//! side; thirty binaries ran one after the other, each waiting for its slowest test.
// The async test bodies that wait on a daemon nest deep futures; rustc's default query depth
// (128) overflows on some of them in a non-incremental build (as CI builds).
#![recursion_limit = "256"]

mod common;

mod blobs;
mod conformance;
mod daemon;
mod daemon_sources;
mod deploy;
mod disaster;
mod drill;
mod export;
mod forget;
mod health;
mod keys;
mod keyvault;
mod kms;
mod outage;
mod output;
mod pg_connection;
mod postgres;
mod postgres_app_schema;
mod postgres_continuity;
mod postgres_grouping;
mod postgres_ops;
mod postgres_parallel;
mod postgres_replay;
mod postgres_schema;
mod postgres_streaming;
mod postgres_tenant;
mod postgres_torture;
mod prune_cli;
mod prune_postgres;
mod repository;
mod restore_targets;
mod roles;
mod sqlite;
mod sqlite_continuity;
mod sqlite_pages;
mod sqlite_torture;
mod tenant_kek;
mod tenant_keys;
mod tenant_strict;
