//! Change records from pgoutput messages: what capture writes into `postgres-changes`
//! segments (the record types and their codec are `stored::postgres::changes`).

use super::pgoutput::{Datum, Message};
pub use crate::stored::postgres::changes::*;

impl Record {
    /// The record for a pgoutput message; `None` for messages restore does not need.
    pub fn from_message(message: Message) -> Option<Record> {
        Some(match message {
            Message::Begin {
                final_lsn,
                commit_us,
                xid,
            } => Record::Begin {
                xid,
                final_lsn,
                commit_us,
            },
            Message::Commit {
                commit_lsn,
                end_lsn,
                commit_us,
            } => Record::Commit {
                commit_lsn,
                end_lsn,
                commit_us,
            },
            Message::Relation {
                id,
                schema,
                name,
                columns,
                ..
            } => Record::Relation(RelationRecord {
                id,
                schema,
                name,
                key: columns
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.key)
                    .map(|(i, _)| i)
                    .collect(),
                columns: columns.into_iter().map(|c| c.name).collect(),
            }),
            Message::Insert { relation, new } => Record::Insert {
                rel: relation,
                new: tuple(new),
            },
            Message::Update { relation, old, new } => Record::Update {
                rel: relation,
                old: old.map(|(_, t)| tuple(t)),
                new: tuple(new),
            },
            Message::Delete { relation, old } => Record::Delete {
                rel: relation,
                full: old.0 == b'O',
                old: tuple(old.1),
            },
            Message::Truncate {
                relations,
                cascade,
                restart_identity,
            } => Record::Truncate {
                rels: relations,
                cascade,
                restart_identity,
            },
            Message::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => Record::Message {
                transactional,
                lsn,
                prefix,
                content: String::from_utf8_lossy(&content).into_owned(),
            },
            Message::Origin { .. } | Message::Type { .. } => return None,
        })
    }
}

/// A tuple's values as the change log stores them.
fn tuple(datums: Vec<Datum>) -> Tuple {
    let mut unchanged = Vec::new();
    let values = datums
        .into_iter()
        .enumerate()
        .map(|(i, d)| match d {
            Datum::Null => None,
            Datum::Unchanged => {
                unchanged.push(i);
                None
            }
            Datum::Text(t) => Some(t),
        })
        .collect();
    Tuple { values, unchanged }
}
