//! A schema image: the whole schema at one instant as `pg_dump --schema-only` wrote it
//! (custom archive format), stored as chunks; a restore applies it with pg_restore.

use serde::{Deserialize, Serialize};

use super::schema::Schema;
use crate::pg_connection::quote_ident;
use crate::repo::ChunkRef;

/// `format` of a schema image: pg_dump's custom archive format.
pub const IMAGE_FORMAT: &str = "pg_dump-custom";

/// The schema at one instant, as pg_dump wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchemaImage {
    /// [`IMAGE_FORMAT`].
    pub format: String,
    /// The pg_dump that wrote it (its archive needs a pg_restore at least as new).
    pub pg_dump_version: String,
    /// When the image's snapshot was taken (µs since the Unix epoch): every DDL committed
    /// before it is in the image.
    pub taken_us: i64,
    /// The catalog fingerprint the image was taken at (`source::postgres::image::fingerprint`).
    pub fingerprint: String,
    /// `pg_current_snapshot()` of the image's transaction (change-log images; a snapshot's
    /// image has the snapshot's): a restore tells by it, by xid as at the handoff, which
    /// replayed transactions the image already has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visibility: Option<String>,
    pub bytes: u64,
    pub chunks: Vec<ChunkRef>,
    /// Materialized views that were populated: a restore refreshes them (a schema-only dump
    /// creates them empty).
    #[serde(default)]
    pub populated: Vec<RelationName>,
    /// The captured-table model at the same instant (images in the change log; a snapshot's
    /// model is its `schema`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Schema>,
}

impl SchemaImage {
    /// When the image was taken.
    pub fn taken_at(&self) -> chrono::DateTime<chrono::Utc> {
        super::from_micros(self.taken_us)
    }
}

/// A relation's namespace and name, unquoted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelationName {
    pub schema: String,
    pub name: String,
}

impl RelationName {
    pub fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}
