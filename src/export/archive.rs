//! The export archive: tar → zstd → (age) → file, written as a stream.
//!
//! Every entry's SHA-256 is computed while it is written and collected for `SHA256SUMS`, the
//! last entry. The bytes that reach the file are hashed too: that digest is the output
//! checksum the audit record keeps. Entries are appended from files (tables and blobs are
//! spooled to disk first, because a tar header needs the size before the data), so memory stays
//! bounded by the copy buffer whatever the sizes.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// How the customer decrypts the archive.
pub enum Encryption {
    /// An age X25519 recipient (`age1...`).
    Recipient(Box<age::x25519::Recipient>),
    /// A passphrase (age's scrypt recipient).
    Passphrase(age::secrecy::SecretString),
}

/// A writer that hashes and counts what passes through.
pub struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W> Hashing<W> {
    pub fn new(inner: W) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// The inner writer, the hex SHA-256 and the byte count.
    pub fn finish(self) -> (W, String, u64) {
        (self.inner, hex::encode(self.hasher.finalize()), self.bytes)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Below zstd: the file, possibly inside an age stream.
enum Outer {
    Plain(Hashing<io::BufWriter<File>>),
    Age(age::stream::StreamWriter<Hashing<io::BufWriter<File>>>),
}

impl Write for Outer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Outer::Plain(w) => w.write(buf),
            Outer::Age(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Outer::Plain(w) => w.flush(),
            Outer::Age(w) => w.flush(),
        }
    }
}

/// One file of the archive, as listed in `SHA256SUMS`.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

pub struct ArchiveWriter {
    tar: tar::Builder<zstd::stream::write::Encoder<'static, Outer>>,
    entries: Vec<Entry>,
    shown: String,
}

/// What was written: the file's SHA-256 and size.
pub struct Written {
    pub sha256: String,
    pub bytes: u64,
}

impl ArchiveWriter {
    /// Start an archive on `file` (its name `shown` in messages).
    pub fn new(file: File, shown: &str, encryption: Option<&Encryption>) -> Result<Self> {
        let io_err = |e: io::Error| Error::io(shown, e);
        let file = Hashing::new(io::BufWriter::with_capacity(1 << 20, file));
        let outer = match encryption {
            None => Outer::Plain(file),
            Some(e) => {
                let encryptor = match e {
                    Encryption::Recipient(r) => {
                        age::Encryptor::with_recipients(std::iter::once(r.as_ref() as _))
                            .map_err(|e| Error::other("age").with_source(e))?
                    }
                    Encryption::Passphrase(p) => age::Encryptor::with_user_passphrase(p.clone()),
                };
                Outer::Age(encryptor.wrap_output(file).map_err(io_err)?)
            }
        };
        let zstd = zstd::stream::write::Encoder::new(outer, 3).map_err(io_err)?;
        let mut tar = tar::Builder::new(zstd);
        tar.mode(tar::HeaderMode::Deterministic);
        Ok(ArchiveWriter {
            tar,
            entries: Vec::new(),
            shown: shown.to_string(),
        })
    }

    /// Append `bytes` (small: README, manifest, sums) as `path`.
    pub fn append_bytes(&mut self, path: &str, bytes: &[u8], mtime: DateTime<Utc>) -> Result<()> {
        self.append_reader(path, bytes, bytes.len() as u64, mtime)
    }

    /// Append the file at `source` as `path`.
    pub fn append_file(&mut self, path: &str, source: &Path, mtime: DateTime<Utc>) -> Result<()> {
        let file = File::open(source).map_err(|e| Error::io(source.display(), e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(source.display(), e))?
            .len();
        self.append_reader(path, file, len, mtime)
    }

    fn append_reader(
        &mut self,
        path: &str,
        reader: impl Read,
        len: u64,
        mtime: DateTime<Utc>,
    ) -> Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(len);
        header.set_mode(0o644);
        header.set_mtime(mtime.timestamp().max(0) as u64);
        header.set_entry_type(tar::EntryType::Regular);
        let mut hashing = HashingReader {
            inner: reader,
            hasher: Sha256::new(),
            bytes: 0,
        };
        self.tar
            .append_data(&mut header, path, &mut hashing)
            .map_err(|e| Error::io(format!("{}: {path}", self.shown), e))?;
        if hashing.bytes != len {
            return Err(Error::other(format!(
                "{path}: {} bytes read, {len} expected (the file changed while it was archived)",
                hashing.bytes
            )));
        }
        self.entries.push(Entry {
            path: path.to_string(),
            sha256: hex::encode(hashing.hasher.finalize()),
            bytes: len,
        });
        Ok(())
    }

    /// The entries so far.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Append `SHA256SUMS` over every entry, close every layer and flush the file to disk.
    pub fn finish(mut self, mtime: DateTime<Utc>) -> Result<Written> {
        let sums = sha256sums(&self.entries);
        self.append_bytes("SHA256SUMS", sums.as_bytes(), mtime)?;
        let io_err = |e: io::Error| Error::io(&self.shown, e);
        let zstd = self.tar.into_inner().map_err(io_err)?;
        let outer = zstd.finish().map_err(io_err)?;
        let hashing = match outer {
            Outer::Plain(w) => w,
            Outer::Age(w) => w.finish().map_err(io_err)?,
        };
        let (buffered, sha256, bytes) = hashing.finish();
        let file = buffered.into_inner().map_err(|e| io_err(e.into_error()))?;
        file.sync_all().map_err(io_err)?;
        Ok(Written { sha256, bytes })
    }
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// The `sha256sum` text format: `<hex>  <path>`, one per line. A path holding a backslash or a
/// newline is escaped the way `sha256sum` does it (a leading `\` on the line).
pub fn sha256sums(entries: &[Entry]) -> String {
    let mut out = String::new();
    for e in entries {
        if e.path.contains('\\') || e.path.contains('\n') {
            let escaped = e.path.replace('\\', "\\\\").replace('\n', "\\n");
            out.push_str(&format!("\\{}  {escaped}\n", e.sha256));
        } else {
            out.push_str(&format!("{}  {}\n", e.sha256, e.path));
        }
    }
    out
}
