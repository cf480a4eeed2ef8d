//! `manifest.json` and `README.txt`: what the archive holds, for programs and for people.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::files::BlobSourceUsed;
use super::rows::TableFile;
use super::ExportOptions;
use crate::config::SourceKind;
use crate::restore::RestoreSummary;
use crate::stored::blobs::BlobEntry;

/// The manifest format written today.
pub const MANIFEST_FORMAT: &str = "timevault-export/1";

/// `manifest.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    pub format: &'static str,
    pub tenant: String,
    /// The exact instant the data is as of.
    pub as_of: DateTime<Utc>,
    pub generated_at: DateTime<Utc>,
    pub timevault_version: &'static str,
    pub requested_by: String,
    pub reason: Option<String>,
    pub encrypted: bool,
    pub sources: Vec<SourceUsed>,
    pub tables: Vec<TableFile>,
    pub files: Vec<FileRecord>,
}

/// A source and the backup positions the export read.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum SourceUsed {
    Database {
        name: String,
        kind: &'static str,
        /// The chain (snapshot) restored and the change-log segments applied after it.
        snapshot: String,
        segments_applied: usize,
        /// The last capture applied: the state is exactly the source's at this time.
        restored_to: DateTime<Utc>,
    },
    Blobs(BlobSourceUsed),
}

/// One file of the tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    pub source: String,
    /// The key in the blob store.
    pub key: String,
    /// Path inside the archive (`files/<key>`).
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub content_type: Option<String>,
    pub last_modified: DateTime<Utc>,
}

impl FileRecord {
    pub fn new(source: &str, entry: &BlobEntry, path: String) -> FileRecord {
        FileRecord {
            source: source.to_string(),
            key: entry.key.clone(),
            path,
            size: entry.size,
            sha256: entry.sha256.clone(),
            content_type: entry.content_type.clone(),
            last_modified: entry.last_modified,
        }
    }
}

impl Manifest {
    pub fn new(
        options: &ExportOptions,
        as_of: DateTime<Utc>,
        databases: Vec<(SourceKind, RestoreSummary)>,
        blobs: Vec<BlobSourceUsed>,
        tables: &[TableFile],
        files: Vec<FileRecord>,
    ) -> Manifest {
        let mut sources: Vec<SourceUsed> = databases
            .into_iter()
            .map(|(kind, s)| SourceUsed::Database {
                name: s.source,
                kind: kind.as_str(),
                snapshot: s.chain,
                segments_applied: s.segments_applied,
                restored_to: s.restored_to,
            })
            .collect();
        sources.extend(blobs.into_iter().map(SourceUsed::Blobs));
        Manifest {
            format: MANIFEST_FORMAT,
            tenant: options.tenant.clone(),
            as_of,
            generated_at: crate::time::micros(Utc::now()),
            timevault_version: env!("CARGO_PKG_VERSION"),
            requested_by: crate::audit::requester(options.requested_by.clone()),
            reason: options.reason.clone(),
            encrypted: options.encryption.is_some(),
            sources,
            tables: tables.to_vec(),
            files,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut json = serde_json::to_vec_pretty(self).expect("manifest serializes");
        json.push(b'\n');
        json
    }
}

/// The customer-facing explanation of the archive.
pub fn readme(tenant: &str, as_of: DateTime<Utc>) -> String {
    format!(
        "Data export for tenant {tenant}
as of {as_of} (UTC)

This archive holds all of your data as it was at that instant: every record of
every table that belongs to you, and every file you stored.

  manifest.json    what is in the archive: the instant, each table with its
                   columns, types, number of rows and checksum, and each file
                   with its original name, size, checksum, type and date
  tables/          one file per table: JSON Lines (one JSON object per record)
                   or CSV with a header row
  files/           your files, under their original names (see Names)
  SHA256SUMS       a SHA-256 checksum of every file in this archive
  README.txt       this text

Names: a character that cannot safely be part of a file name (%, /, \\, a
control character such as a line break) is written as %XX, the hex value of
each of its UTF-8 bytes (a table \"a/b\" is tables/a%2Fb.jsonl); a name that is
just \".\" or \"..\" is written %2E or %2E%2E; manifest.json gives every table
and file under its real name too.

Values: whole numbers and floating point numbers are JSON numbers; exact
decimal amounts are strings (\"1234.50\") so no digit is lost; dates and times
are text in RFC 3339 form (UTC); binary values are base64; structured
(JSON) values are JSON. In CSV files an empty field is an absent value and
\"\" is empty text. A CSV text value that begins with =, +, -, @, a tab or a
carriage return (and is not a plain number such as -12.50) is written with a
' in front, so that a spreadsheet shows it as text instead of running it as a
formula; the JSON Lines files hold every value exactly as stored.

To check the archive after unpacking it:

  mkdir export && tar --zstd -xf ARCHIVE.tar.zst -C export
  cd export && sha256sum -c SHA256SUMS

If the archive was encrypted for you (ARCHIVE.tar.zst.age), decrypt it first
with age (https://age-encryption.org):

  age -d -i your-key.txt -o ARCHIVE.tar.zst ARCHIVE.tar.zst.age
  (or, for a passphrase: age -d -o ARCHIVE.tar.zst ARCHIVE.tar.zst.age)
",
        as_of = as_of.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    )
}
