//! A decoder for the pgoutput logical replication protocol, version 1.
//!
//! timevault reads a slot through SQL (`pg_logical_slot_peek_binary_changes`), which returns
//! one pgoutput message per row. This module turns those bytes into [`Message`]s; it never
//! touches a connection, so every message layout is unit-tested here. The layouts are those of
//! PostgreSQL's "Logical Replication Message Formats" (protocol version 1, text tuple values).

use std::fmt;

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01 00:00:00 UTC).
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

pub use crate::stored::postgres::Lsn;

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    Null,
    /// An unchanged TOASTed value the update did not send: keep the current one.
    Unchanged,
    /// The value in its text output form.
    Text(String),
}

/// A column of a relation as pgoutput describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity (the key sent with updates and deletes).
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_mod: i32,
}

/// A decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        final_lsn: Lsn,
        /// Microseconds since the Unix epoch.
        commit_us: i64,
        xid: u32,
    },
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_us: i64,
    },
    Relation {
        id: u32,
        schema: String,
        name: String,
        replica_identity: u8,
        columns: Vec<RelationColumn>,
    },
    Insert {
        relation: u32,
        new: Vec<Datum>,
    },
    Update {
        relation: u32,
        /// `K`: the old key (the key changed); `O`: the whole old row (REPLICA IDENTITY FULL).
        old: Option<(u8, Vec<Datum>)>,
        new: Vec<Datum>,
    },
    Delete {
        relation: u32,
        old: (u8, Vec<Datum>),
    },
    Truncate {
        relations: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Vec<u8>,
    },
    Origin {
        lsn: Lsn,
        name: String,
    },
    Type {
        id: u32,
        schema: String,
        name: String,
    },
}

/// Why bytes are not a pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pgoutput: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(DecodeError(format!(
                "truncated message: {n} bytes wanted at offset {} of {}",
                self.at,
                self.bytes.len()
            )));
        };
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8")))
    }

    fn lsn(&mut self) -> Result<Lsn, DecodeError> {
        self.u64().map(Lsn)
    }

    /// A PostgreSQL timestamp (µs since 2000-01-01) as µs since the Unix epoch.
    fn timestamp(&mut self) -> Result<i64, DecodeError> {
        Ok((self.u64()? as i64).saturating_add(PG_EPOCH_OFFSET_US))
    }

    fn cstring(&mut self) -> Result<String, DecodeError> {
        let rest = &self.bytes[self.at..];
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(DecodeError("unterminated string".into()));
        };
        let text = std::str::from_utf8(&rest[..nul])
            .map_err(|e| DecodeError(format!("string is not UTF-8: {e}")))?
            .to_string();
        self.at += nul + 1;
        Ok(text)
    }

    fn tuple(&mut self) -> Result<Vec<Datum>, DecodeError> {
        let n = self.i16()?;
        let mut out = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => Datum::Null,
                b'u' => Datum::Unchanged,
                b't' => {
                    let len = self.i32()?;
                    if len < 0 {
                        return Err(DecodeError(format!("negative value length {len}")));
                    }
                    let bytes = self.take(len as usize)?;
                    Datum::Text(
                        String::from_utf8(bytes.to_vec())
                            .map_err(|e| DecodeError(format!("value is not UTF-8: {e}")))?,
                    )
                }
                b'b' => {
                    return Err(DecodeError(
                        "binary tuple values are not requested by protocol version 1".into(),
                    ))
                }
                other => return Err(DecodeError(format!("unknown tuple value kind {other:#x}"))),
            });
        }
        Ok(out)
    }

    fn done(&self) -> Result<(), DecodeError> {
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(DecodeError(format!(
                "{} unexpected trailing bytes",
                self.bytes.len() - self.at
            )))
        }
    }
}

/// A Relation message after its tag: the table and its columns (an empty namespace is
/// `pg_catalog`).
fn relation(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let id = r.u32()?;
    let schema = r.cstring()?;
    let name = r.cstring()?;
    let replica_identity = r.u8()?;
    let n = r.i16()?;
    let mut columns = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let flags = r.u8()?;
        columns.push(RelationColumn {
            key: flags & 1 == 1,
            name: r.cstring()?,
            type_oid: r.u32()?,
            type_mod: r.i32()?,
        });
    }
    Ok(Message::Relation {
        id,
        schema: if schema.is_empty() {
            "pg_catalog".into()
        } else {
            schema
        },
        name,
        replica_identity,
        columns,
    })
}

/// Decode one pgoutput message.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { bytes, at: 0 };
    let message = match r.u8()? {
        b'B' => Message::Begin {
            final_lsn: r.lsn()?,
            commit_us: r.timestamp()?,
            xid: r.u32()?,
        },
        b'C' => {
            let _flags = r.u8()?;
            Message::Commit {
                commit_lsn: r.lsn()?,
                end_lsn: r.lsn()?,
                commit_us: r.timestamp()?,
            }
        }
        b'R' => relation(&mut r)?,
        b'I' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'N' => Message::Insert {
                    relation,
                    new: r.tuple()?,
                },
                other => return Err(DecodeError(format!("insert: tuple tag {other:#x}"))),
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let mut old = None;
            let mut tag = r.u8()?;
            if tag == b'K' || tag == b'O' {
                old = Some((tag, r.tuple()?));
                tag = r.u8()?;
            }
            if tag != b'N' {
                return Err(DecodeError(format!("update: tuple tag {tag:#x}")));
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32()?;
            let tag = r.u8()?;
            if tag != b'K' && tag != b'O' {
                return Err(DecodeError(format!("delete: tuple tag {tag:#x}")));
            }
            Message::Delete {
                relation,
                old: (tag, r.tuple()?),
            }
        }
        b'T' => {
            let n = r.u32()?;
            let options = r.u8()?;
            let mut relations = Vec::with_capacity(n.min(1 << 16) as usize);
            for _ in 0..n {
                relations.push(r.u32()?);
            }
            Message::Truncate {
                relations,
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
            }
        }
        b'M' => {
            let flags = r.u8()?;
            let lsn = r.lsn()?;
            let prefix = r.cstring()?;
            let len = r.u32()? as usize;
            Message::Message {
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content: r.take(len)?.to_vec(),
            }
        }
        b'O' => Message::Origin {
            lsn: r.lsn()?,
            name: r.cstring()?,
        },
        b'Y' => Message::Type {
            id: r.u32()?,
            schema: r.cstring()?,
            name: r.cstring()?,
        },
        other => return Err(DecodeError(format!("unknown message type {other:#x}"))),
    };
    r.done()?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cstr(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    fn text(out: &mut Vec<u8>, s: &str) {
        out.push(b't');
        out.extend_from_slice(&(s.len() as i32).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    #[test]
    fn begin_and_commit() {
        let mut b = vec![b'B'];
        b.extend_from_slice(&0x0100_0000_2000u64.to_be_bytes());
        b.extend_from_slice(&1_000_000i64.to_be_bytes()); // 2000-01-01T00:00:01Z
        b.extend_from_slice(&742u32.to_be_bytes());
        assert_eq!(
            decode(&b).unwrap(),
            Message::Begin {
                final_lsn: Lsn(0x0100_0000_2000),
                commit_us: PG_EPOCH_OFFSET_US + 1_000_000,
                xid: 742
            }
        );
        let mut c = vec![b'C', 0];
        c.extend_from_slice(&5u64.to_be_bytes());
        c.extend_from_slice(&9u64.to_be_bytes());
        c.extend_from_slice(&0i64.to_be_bytes());
        assert_eq!(
            decode(&c).unwrap(),
            Message::Commit {
                commit_lsn: Lsn(5),
                end_lsn: Lsn(9),
                commit_us: PG_EPOCH_OFFSET_US
            }
        );
        assert!(decode(&c[..10]).is_err(), "truncated");
    }

    #[test]
    fn relation_and_update_with_unchanged_toast() {
        let mut r = vec![b'R'];
        r.extend_from_slice(&16384u32.to_be_bytes());
        cstr(&mut r, "");
        cstr(&mut r, "docs");
        r.push(b'd');
        r.extend_from_slice(&2i16.to_be_bytes());
        r.push(1);
        cstr(&mut r, "id");
        r.extend_from_slice(&20u32.to_be_bytes());
        r.extend_from_slice(&(-1i32).to_be_bytes());
        r.push(0);
        cstr(&mut r, "body");
        r.extend_from_slice(&25u32.to_be_bytes());
        r.extend_from_slice(&(-1i32).to_be_bytes());
        let Message::Relation {
            schema, columns, ..
        } = decode(&r).unwrap()
        else {
            panic!("not a relation")
        };
        assert_eq!(schema, "pg_catalog");
        assert!(columns[0].key && !columns[1].key);

        let mut u = vec![b'U'];
        u.extend_from_slice(&16384u32.to_be_bytes());
        u.push(b'K');
        u.extend_from_slice(&2i16.to_be_bytes());
        text(&mut u, "7");
        u.push(b'n');
        u.push(b'N');
        u.extend_from_slice(&2i16.to_be_bytes());
        text(&mut u, "8");
        u.push(b'u');
        assert_eq!(
            decode(&u).unwrap(),
            Message::Update {
                relation: 16384,
                old: Some((b'K', vec![Datum::Text("7".into()), Datum::Null])),
                new: vec![Datum::Text("8".into()), Datum::Unchanged],
            }
        );
    }

    #[test]
    fn truncate_message_and_garbage() {
        let mut t = vec![b'T'];
        t.extend_from_slice(&2u32.to_be_bytes());
        t.push(3);
        t.extend_from_slice(&1u32.to_be_bytes());
        t.extend_from_slice(&2u32.to_be_bytes());
        assert_eq!(
            decode(&t).unwrap(),
            Message::Truncate {
                relations: vec![1, 2],
                cascade: true,
                restart_identity: true
            }
        );
        let mut m = vec![b'M', 1];
        m.extend_from_slice(&77u64.to_be_bytes());
        cstr(&mut m, "timevault");
        m.extend_from_slice(&9u32.to_be_bytes());
        m.extend_from_slice(b"heartbeat");
        assert_eq!(
            decode(&m).unwrap(),
            Message::Message {
                transactional: true,
                lsn: Lsn(77),
                prefix: "timevault".into(),
                content: b"heartbeat".to_vec()
            }
        );
        assert!(decode(b"").is_err());
        assert!(decode(b"Z").is_err());
        let mut trailing = t.clone();
        trailing.push(0);
        assert!(decode(&trailing).is_err());
    }
}
