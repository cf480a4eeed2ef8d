//! The audit log: who restored or exported what, when and why, kept in the repository itself.
//!
//! An export hands a customer's data out of the backups and a restore brings a database back;
//! operators must be able to show afterwards who did it and why. Each event is one encrypted,
//! write-once object `audit/<compact time>-<8 hex>` (FORMAT.md §8), written through the same
//! quorum write as everything else, so it is replicated to every region and cannot be edited in
//! place; retention keeps `audit/` at least `retention.audit`. The random suffix keeps two
//! events of the same microsecond apart.

use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::archive::Kind;
use crate::error::{Error, Result};
use crate::repo::{layout, Repository};
use crate::time;

/// The current audit record format.
pub const AUDIT_FORMAT: &str = "audit/1";

/// One audited event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub format: String,
    /// When the event finished (UTC, µs).
    pub at: DateTime<Utc>,
    /// `export` or `restore`.
    pub command: String,
    /// Who asked: `--requested-by`, else `$USER`.
    pub requested_by: String,
    /// Why: `--reason`.
    pub reason: Option<String>,
    pub tenant: Option<String>,
    /// The sources read.
    pub sources: Vec<String>,
    /// The instant the data is as of.
    pub instant: Option<DateTime<Utc>>,
    /// Where the result went (file, database, store; URLs masked).
    pub outputs: Vec<String>,
    /// SHA-256 of the output file, for exports.
    pub output_sha256: Option<String>,
    pub host: String,
    pub timevault_version: String,
}

/// What the caller knows about an event; the rest is filled in by [`AuditRecord::new`].
#[derive(Debug, Clone, Default)]
pub struct AuditEvent {
    pub command: String,
    pub requested_by: Option<String>,
    pub reason: Option<String>,
    pub tenant: Option<String>,
    pub sources: Vec<String>,
    pub instant: Option<DateTime<Utc>>,
    pub outputs: Vec<String>,
    pub output_sha256: Option<String>,
}

impl AuditRecord {
    pub fn new(event: AuditEvent) -> AuditRecord {
        AuditRecord {
            format: AUDIT_FORMAT.into(),
            at: time::micros(Utc::now()),
            command: event.command,
            requested_by: requester(event.requested_by),
            reason: event.reason,
            tenant: event.tenant,
            sources: event.sources,
            instant: event.instant,
            outputs: event
                .outputs
                .iter()
                .map(|o| crate::config::mask_url(o))
                .collect(),
            output_sha256: event.output_sha256,
            host: hostname(),
            timevault_version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// `requested_by` if given and not blank, else `$USER`, else `unknown`.
pub fn requester(requested_by: Option<String>) -> String {
    requested_by
        .filter(|s| !s.trim().is_empty())
        .or_else(|| std::env::var("USER").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown".into())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

/// Write `record` at the write quorum; returns its key.
pub async fn write(repo: &Repository, record: &AuditRecord) -> Result<String> {
    let mut suffix = [0u8; 4];
    rand::thread_rng().fill_bytes(&mut suffix);
    let key = layout::audit(&time::compact(record.at), &hex::encode(suffix));
    let json = serde_json::to_vec(record).expect("audit record serializes");
    repo.write_object(Kind::Audit, &key, json)
        .await
        .map_err(|e| e.context("writing the audit record"))?;
    Ok(key)
}

/// Record an event: build the record and write it.
pub async fn record(repo: &Repository, event: AuditEvent) -> Result<(String, AuditRecord)> {
    let record = AuditRecord::new(event);
    let key = write(repo, &record).await?;
    Ok((key, record))
}

/// Every audit record, oldest first, with its key.
pub async fn list(repo: &Repository) -> Result<Vec<(String, AuditRecord)>> {
    let mut out = Vec::new();
    for key in repo.list(layout::AUDIT).await? {
        let bytes = repo.read_object(Kind::Audit, &key).await?;
        let record: AuditRecord = serde_json::from_slice(&bytes).map_err(|e| {
            Error::corrupt(format!("audit record {key}: unreadable")).with_source(e)
        })?;
        out.push((key, record));
    }
    Ok(out)
}
