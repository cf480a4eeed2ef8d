//! The payload of PostgreSQL change-log segments: format `postgres-changes/1`.
//!
//! One JSON object per line (docs/FORMAT.md, "PostgreSQL"), in the slot's commit order. A
//! transaction is `B`, its changes, `C`; `R` lines describe the relations the changes refer to
//! (repeated in every segment, so each segment decodes on its own); an `S` line before an `R`
//! line carries the table's new definition when it changed (see `ddl`). Lines are never split
//! across chunks, and a segment always ends after a `C`.

use serde::{Deserialize, Serialize};

use super::ddl::SchemaChange;
use super::Lsn;

/// Payload format name stored in the segment manifest (version 2 added `S` records).
pub const CHANGES_FORMAT: &str = "postgres-changes/2";

/// Every payload format restore reads.
pub const CHANGES_FORMATS_READ: &[&str] = &["postgres-changes/1", CHANGES_FORMAT];

/// A relation (table) as the change stream describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelationRecord {
    pub id: u32,
    pub schema: String,
    pub name: String,
    pub columns: Vec<String>,
    /// Indexes into `columns` of the replica identity key.
    pub key: Vec<usize>,
}

/// One tuple: `null`, a value's text form, or (in `unchanged`) a TOASTed value the update did
/// not send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tuple {
    pub values: Vec<Option<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unchanged: Vec<usize>,
}

/// One line of the payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "r")]
pub enum Record {
    /// The table's definition from here on (written before its `R` record when it changed).
    #[serde(rename = "S")]
    Schema(Box<SchemaChange>),
    #[serde(rename = "R")]
    Relation(RelationRecord),
    #[serde(rename = "B")]
    Begin {
        xid: u32,
        final_lsn: Lsn,
        /// Commit timestamp, µs since the Unix epoch.
        commit_us: i64,
    },
    #[serde(rename = "I")]
    Insert { rel: u32, new: Tuple },
    #[serde(rename = "U")]
    Update {
        rel: u32,
        /// The old key (`K`, when the key changed) or old row (`O`, REPLICA IDENTITY FULL).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        old: Option<Tuple>,
        new: Tuple,
    },
    #[serde(rename = "D")]
    Delete {
        rel: u32,
        old: Tuple,
        /// True when `old` is the whole row (REPLICA IDENTITY FULL), false for the key only.
        full: bool,
    },
    #[serde(rename = "T")]
    Truncate {
        rels: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    #[serde(rename = "M")]
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: String,
    },
    #[serde(rename = "C")]
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_us: i64,
    },
}

impl Record {
    /// One payload line (JSON and a newline).
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("records serialize");
        line.push(b'\n');
        line
    }
}

/// Split a chunk of payload into records.
pub fn parse_lines(chunk: &[u8]) -> Result<Vec<Record>, String> {
    chunk
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).map_err(|e| format!("bad change record: {e}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_lines() {
        let records = vec![
            Record::Begin {
                xid: 7,
                final_lsn: Lsn::parse("0/16B3748").unwrap(),
                commit_us: 1_700_000_000_000_000,
            },
            Record::Update {
                rel: 1,
                old: None,
                new: Tuple {
                    values: vec![Some("1".into()), None, Some("a\nb\"c".into())],
                    unchanged: vec![1],
                },
            },
            Record::Delete {
                rel: 1,
                old: Tuple {
                    values: vec![Some("1".into())],
                    unchanged: vec![],
                },
                full: false,
            },
            Record::Commit {
                commit_lsn: Lsn::parse("0/16B3748").unwrap(),
                end_lsn: Lsn::parse("0/16B3778").unwrap(),
                commit_us: 1_700_000_000_000_000,
            },
        ];
        let mut payload = Vec::new();
        for r in &records {
            payload.extend(r.to_line());
        }
        assert_eq!(parse_lines(&payload).unwrap(), records);
        assert!(parse_lines(b"{\"r\":\"Z\"}\n").is_err());
    }
}
