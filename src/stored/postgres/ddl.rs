//! A table's definition inside the change log (`S` records): capture writes one when a
//! Relation message shows the table changed (`source::postgres::ddl`), restore creates or
//! alters the table at that point of the replay.

use serde::{Deserialize, Serialize};

use super::schema::{DomainType, EnumType, Sequence, Table};

/// A table's definition at one point of the change stream, and the types and sequences it
/// may need that the restored database might not have yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchemaChange {
    pub table: Table,
    /// Sequences owned by the table (serial and identity).
    #[serde(default)]
    pub sequences: Vec<Sequence>,
    /// Every user enum and domain type in the catalog when captured.
    #[serde(default)]
    pub enums: Vec<EnumType>,
    #[serde(default)]
    pub domains: Vec<DomainType>,
    /// Namespaces other than `public` these objects live in.
    #[serde(default)]
    pub schemas: Vec<String>,
}
