//! The payload of PostgreSQL change-log segments: format `postgres-changes/3`.
//!
//! One JSON object per line (docs/FORMAT.md, "PostgreSQL"), in the slot's commit order. A
//! transaction is `B`, its changes, `C`; `R` lines describe the relations the changes refer to
//! (repeated in every segment, so each segment decodes on its own); an `S` line before an `R`
//! line carries the table's new definition when it changed (see `ddl`); an `X` line is a row
//! change of a tenant sealed under the tenant's own key (`[tenancy] tenant_keys`): its plaintext
//! is the `I`, `U` or `D` line, or (`z`) a zstd frame of runs of them; with `p`, the frame holds
//! several runs of that tenant, the first standing at the `X` and each next one at a `Y` line
//! naming it, later in the same chunk. Lines are never split across chunks, and a segment always
//! ends after a `C`.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::archive::record::RecordSeal;

use super::ddl::SchemaChange;
use super::Lsn;

/// Payload format name stored in the segment manifest (version 2 added `S` records, version 3
/// `X` records, version 4 `X` records of several runs (`p`) and `Y` records).
pub const CHANGES_FORMAT: &str = "postgres-changes/4";

/// Every payload format restore reads.
pub const CHANGES_FORMATS_READ: &[&str] = &[
    "postgres-changes/1",
    "postgres-changes/2",
    "postgres-changes/3",
    CHANGES_FORMAT,
];

/// Row changes of one tenant sealed under its key (`archive::record`): the key id (16 hex
/// digits), the sealer's salt (base64), the record's counter, and the ciphertext (base64): of
/// one record's line without its newline, or (`z`) of a zstd frame of one or more consecutive
/// records' lines of that tenant. With `p` (version 4), the frame holds several runs of the
/// tenant, `p` their byte lengths in order: the first run stands here, each next one at a `Y`
/// line naming this record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedRecord {
    pub k: String,
    pub s: String,
    pub n: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub z: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub p: Vec<u64>,
    pub c: String,
}

/// Where the next run of a sealed record of several runs (`X` with `p`) stands: the record's
/// key id, salt and counter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedPart {
    pub k: String,
    pub s: String,
    pub n: u64,
}

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
    /// A tenant's `I`, `U` or `D` record sealed under the tenant's key.
    #[serde(rename = "X")]
    Sealed(SealedRecord),
    /// The next run of an earlier `X` record of several runs.
    #[serde(rename = "Y")]
    SealedPart(SealedPart),
    #[serde(rename = "C")]
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_us: i64,
    },
}

impl SealedRecord {
    /// The stored form of lines sealed uncompressed by `archive::record::RecordSealer` (a short
    /// run; before runs, one record without its newline): what serde writes, for tests (the
    /// writer writes lines directly, [`SealedRecord::run_line`]).
    #[cfg(test)]
    pub fn new(seal: &RecordSeal, ciphertext: &[u8]) -> SealedRecord {
        SealedRecord {
            k: hex::encode(seal.key_id),
            s: BASE64.encode(seal.salt),
            n: seal.counter,
            z: false,
            p: Vec::new(),
            c: BASE64.encode(ciphertext),
        }
    }

    /// The stored form of a sealed run: a zstd frame of consecutive lines (for tests).
    #[cfg(test)]
    pub fn run(seal: &RecordSeal, ciphertext: &[u8]) -> SealedRecord {
        SealedRecord {
            z: true,
            ..SealedRecord::new(seal, ciphertext)
        }
    }

    /// The `X` line of a sealed frame of runs whose byte lengths are `parts` (one run: no `p`):
    /// what `Record::Sealed(..).to_line()` writes, written directly. A run's ciphertext is most
    /// of a sealed batch's bytes; base64 and hex never need JSON's escaping, and no
    /// intermediate strings are made.
    pub fn run_line(seal: &RecordSeal, parts: &[u64], ciphertext: &[u8]) -> Vec<u8> {
        let mut line = Vec::with_capacity(128 + parts.len() * 8 + ciphertext.len() / 3 * 4);
        line.extend_from_slice(b"{\"r\":\"X\",");
        seal_fields(&mut line, seal);
        line.extend_from_slice(b",\"z\":true");
        if parts.len() > 1 {
            let listed: Vec<String> = parts.iter().map(u64::to_string).collect();
            line.extend_from_slice(format!(",\"p\":[{}]", listed.join(",")).as_bytes());
        }
        line.extend_from_slice(b",\"c\":\"");
        base64_into(&mut line, ciphertext);
        line.extend_from_slice(b"\"}\n");
        line
    }

    /// Its seal and ciphertext; `Err` names what does not decode.
    pub fn parts(&self) -> Result<(RecordSeal, Vec<u8>), String> {
        let seal = decode_seal(&self.k, &self.s, self.n)?;
        let ciphertext = BASE64
            .decode(&self.c)
            .map_err(|e| format!("sealed record: the ciphertext is not base64: {e}"))?;
        Ok((seal, ciphertext))
    }
}

impl SealedPart {
    /// The `Y` line standing for the next run of the record sealed with `seal`: what
    /// `Record::SealedPart(..).to_line()` writes.
    pub fn line(seal: &RecordSeal) -> Vec<u8> {
        let mut line = Vec::with_capacity(112);
        line.extend_from_slice(b"{\"r\":\"Y\",");
        seal_fields(&mut line, seal);
        line.extend_from_slice(b"}\n");
        line
    }

    /// The key id, salt and counter it names; `Err` names what does not decode.
    pub fn seal(&self) -> Result<RecordSeal, String> {
        decode_seal(&self.k, &self.s, self.n)
    }
}

/// The seal a record names: key id `k` (16 hex digits), salt `s` (32 bytes of base64) and
/// counter `n`.
fn decode_seal(k: &str, s: &str, n: u64) -> Result<RecordSeal, String> {
    let key_id = hex::decode(k)
        .ok()
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .ok_or_else(|| format!("sealed record: key id {k:?} is not 16 hex digits"))?;
    let salt = BASE64
        .decode(s)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
        .ok_or_else(|| "sealed record: the salt is not 32 bytes of base64".to_string())?;
    Ok(RecordSeal {
        key_id,
        salt,
        counter: n,
    })
}

/// `"k":"<hex>","s":"<base64>","n":<counter>`.
fn seal_fields(line: &mut Vec<u8>, seal: &RecordSeal) {
    line.extend_from_slice(b"\"k\":\"");
    line.extend_from_slice(hex::encode(seal.key_id).as_bytes());
    line.extend_from_slice(b"\",\"s\":\"");
    base64_into(line, &seal.salt);
    line.extend_from_slice(format!("\",\"n\":{}", seal.counter).as_bytes());
}

fn base64_into(line: &mut Vec<u8>, bytes: &[u8]) {
    let start = line.len();
    let len = base64::encoded_len(bytes.len(), true).expect("a record's length fits");
    line.resize(start + len, 0);
    BASE64
        .encode_slice(bytes, &mut line[start..])
        .expect("sized above");
}

impl Record {
    /// One payload line (JSON and a newline).
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = Vec::with_capacity(128);
        self.write_line(&mut line);
        line
    }

    /// Append the payload line to `out` (a run being gathered: no line of its own to copy).
    pub fn write_line(&self, out: &mut Vec<u8>) {
        serde_json::to_writer(&mut *out, self).expect("records serialize");
        out.push(b'\n');
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
    fn x_and_y_lines_are_the_records_serde_writes_and_reads_back() {
        let seal = RecordSeal {
            key_id: [0xab, 1, 2, 3, 4, 5, 6, 0xff],
            salt: [7; 32],
            counter: u64::MAX,
        };
        for parts in [vec![], vec![7], vec![3, 4, 12]] {
            for ciphertext in [&b""[..], b"x", b"xy", b"\n\"\\ \x00\xff ciphertext"] {
                let line = SealedRecord::run_line(&seal, &parts, ciphertext);
                let mut expected = SealedRecord::run(&seal, ciphertext);
                if parts.len() > 1 {
                    expected.p = parts.clone();
                }
                assert_eq!(line, Record::Sealed(expected.clone()).to_line());
                let Record::Sealed(read) = serde_json::from_slice(&line).unwrap() else {
                    panic!("an X line");
                };
                assert_eq!(read, expected);
                assert_eq!(read.parts().unwrap(), (seal, ciphertext.to_vec()));
            }
        }
        let y = SealedPart::line(&seal);
        let Record::SealedPart(read) = serde_json::from_slice(&y).unwrap() else {
            panic!("a Y line");
        };
        assert_eq!(y, Record::SealedPart(read.clone()).to_line());
        assert_eq!(read.seal().unwrap(), seal);
    }

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
        let sealed = Record::Sealed(SealedRecord::new(
            &RecordSeal {
                key_id: [1; 8],
                salt: [2; 32],
                counter: 3,
            },
            b"ciphertext",
        ));
        payload.extend(sealed.to_line());
        assert_eq!(
            String::from_utf8(sealed.to_line()).unwrap(),
            format!(
                "{{\"r\":\"X\",\"k\":\"0101010101010101\",\"s\":\"{}\",\"n\":3,\"c\":\"Y2lwaGVydGV4dA==\"}}\n",
                BASE64.encode([2u8; 32])
            )
        );
        let mut expected = records.clone();
        expected.push(sealed);
        assert_eq!(parse_lines(&payload).unwrap(), expected);
        let Record::Sealed(s) = &expected[4] else {
            unreachable!()
        };
        assert_eq!(s.parts().unwrap().1, b"ciphertext");
        assert!(parse_lines(b"{\"r\":\"Z\"}\n").is_err());
    }
}
