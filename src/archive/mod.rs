//! The object format: header, zstd, AES-256-GCM STREAM segments, and the keys behind them.
//!
//! Every byte timevault stores (except the repository config) passes through here, so that
//! compression, encryption and authentication are decided in one place and written down in
//! docs/FORMAT.md. Objects are bound to their kind and name: a renamed or swapped object fails
//! to open. Both directions stream with memory bounded by one segment plus the zstd window.

mod header;
pub mod keys;
pub mod record;
mod segments;

use std::io::{self, Read, Write};

use rand::RngCore;

pub use header::{Codec, Header, Kind, HEADER_LEN, SEGMENT_LOG2};
pub use keys::{KdfParams, KeySet, MasterKey};

use crate::error::{Error, ErrorKind};
use segments::{Opener, Sealer};

/// Why an object could not be opened. Every variant means the bytes are not what timevault
/// wrote under this name with this key: corruption, tampering, or a misplaced object.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("not a timevault object (bad magic)")]
    NotAnObject,
    #[error("unsupported format version {0} (this timevault reads version 1)")]
    UnsupportedVersion(u16),
    #[error("unknown object kind {0}")]
    UnknownKind(u8),
    #[error("expected a {expected} object, found a {found} object")]
    WrongKind { expected: Kind, found: Kind },
    #[error("unknown codec {0}")]
    UnknownCodec(u8),
    #[error("unknown cipher {0}")]
    UnknownCipher(u8),
    #[error("segment size 2^{0} is out of range")]
    BadSegmentSize(u8),
    #[error("reserved header bytes are not zero")]
    ReservedBytes,
    #[error("object was encrypted under key id {found}, the repository key is {expected}")]
    UnknownKeyId { found: String, expected: String },
    #[error("authentication failed at segment {segment}")]
    Authentication { segment: u64 },
    #[error("object is truncated")]
    Truncated,
    #[error("data follows the final segment")]
    TrailingData,
    #[error("decompression failed: {0}")]
    Decompress(io::Error),
    #[error("read failed: {0}")]
    Io(io::Error),
}

impl OpenError {
    fn into_io(self) -> io::Error {
        io::Error::other(self)
    }

    /// Recover an `OpenError` carried through `io::Error` by the reader stack.
    pub fn from_io(err: io::Error) -> OpenError {
        if err.get_ref().is_some_and(|e| e.is::<OpenError>()) {
            let inner = err.into_inner().expect("checked above");
            return *inner.downcast::<OpenError>().expect("checked above");
        }
        OpenError::Decompress(err)
    }

    /// Convert to the public error, naming the object.
    pub fn into_error(self, name: &str) -> Error {
        let kind = match self {
            OpenError::Io(_) => ErrorKind::Other,
            _ => ErrorKind::Corrupt,
        };
        Error::new(kind, format!("object {name}: {self}"))
            .with_hint("run `timevault verify --read-data`; `timevault replicas sync` repairs from a healthy replica")
    }
}

/// Options for writing one object.
#[derive(Debug, Clone, Copy)]
pub struct SealOptions {
    pub codec: Codec,
    pub level: i32,
}

fn associated_data(header: &[u8; HEADER_LEN], name: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(HEADER_LEN + name.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(name.as_bytes());
    aad
}

enum Body<W: Write> {
    Plain(Sealer<W>),
    Zstd(zstd::stream::write::Encoder<'static, Sealer<W>>),
}

/// Write a fresh header (new random salt) to `inner` and return the sealer for the body.
fn start_object<W: Write>(
    mut inner: W,
    keys: &KeySet,
    kind: Kind,
    name: &str,
    codec: Codec,
) -> io::Result<Sealer<W>> {
    let mut salt = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let header = Header {
        kind,
        codec,
        segment_log2: SEGMENT_LOG2,
        key_id: keys.key_id(),
        salt,
    };
    let header_bytes = header.to_bytes();
    inner.write_all(&header_bytes)?;
    let key = keys.object_key(&salt, kind.code(), name);
    Ok(Sealer::new(
        inner,
        &key,
        associated_data(&header_bytes, name),
        header.segment_size(),
    ))
}

/// Streams one object into `inner`: header, then compressed and sealed segments.
pub struct ObjectWriter<W: Write> {
    body: Body<W>,
}

impl<W: Write> ObjectWriter<W> {
    pub fn new(
        inner: W,
        keys: &KeySet,
        kind: Kind,
        name: &str,
        options: SealOptions,
    ) -> io::Result<Self> {
        let sealer = start_object(inner, keys, kind, name, options.codec)?;
        let body = match options.codec {
            Codec::None => Body::Plain(sealer),
            Codec::Zstd => Body::Zstd(zstd::stream::write::Encoder::new(sealer, options.level)?),
        };
        Ok(ObjectWriter { body })
    }

    /// Flush the codec, seal the final segment, and return the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self.body {
            Body::Plain(sealer) => sealer.finish(),
            Body::Zstd(encoder) => encoder.finish()?.finish(),
        }
    }
}

impl<W: Write> Write for ObjectWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match &mut self.body {
            Body::Plain(s) => s.write(data),
            Body::Zstd(e) => e.write(data),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.body {
            Body::Plain(s) => s.flush(),
            Body::Zstd(e) => e.flush(),
        }
    }
}

enum Plain<R: Read> {
    Raw(Opener<R>),
    Zstd(zstd::stream::read::Decoder<'static, io::BufReader<Opener<R>>>),
}

/// Streams the plaintext of one object. A read error (an [`OpenError`] inside an
/// `io::Error`, see [`OpenError::from_io`]) means the object is not authentic: discard
/// whatever was read. End of stream is reported only after the final segment authenticated.
pub struct ObjectReader<R: Read> {
    plain: Plain<R>,
}

impl<R: Read> ObjectReader<R> {
    pub fn new(mut inner: R, keys: &KeySet, kind: Kind, name: &str) -> Result<Self, OpenError> {
        let mut header_bytes = [0u8; HEADER_LEN];
        inner.read_exact(&mut header_bytes).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                OpenError::Truncated
            } else {
                OpenError::Io(e)
            }
        })?;
        let header = Header::parse(&header_bytes, kind)?;
        if header.key_id != keys.key_id() {
            return Err(OpenError::UnknownKeyId {
                found: hex::encode(header.key_id),
                expected: keys.key_id_hex(),
            });
        }
        let key = keys.object_key(&header.salt, kind.code(), name);
        let opener = Opener::new(
            inner,
            &key,
            associated_data(&header_bytes, name),
            header.segment_size(),
        );
        let plain = match header.codec {
            Codec::None => Plain::Raw(opener),
            Codec::Zstd => Plain::Zstd(
                zstd::stream::read::Decoder::new(opener).map_err(OpenError::Decompress)?,
            ),
        };
        Ok(ObjectReader { plain })
    }
}

impl<R: Read> Read for ObjectReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match &mut self.plain {
            Plain::Raw(o) => o.read(out),
            Plain::Zstd(d) => {
                let n = d.read(out)?;
                if n == 0 && !out.is_empty() {
                    // zstd may stop at a frame end before the sealed stream has ended: drain
                    // the opener so truncation or trailing data is still detected.
                    let mut rest = [0u8; 1];
                    if d.get_mut().read(&mut rest)? != 0 {
                        return Err(OpenError::TrailingData.into_io());
                    }
                }
                Ok(n)
            }
        }
    }
}

/// Encode a whole in-memory object (for bounded objects such as chunks and manifests).
/// With `Codec::Zstd`, falls back to `Codec::None` when compression does not help.
pub fn seal(
    keys: &KeySet,
    kind: Kind,
    name: &str,
    plaintext: &[u8],
    options: SealOptions,
) -> Vec<u8> {
    match options.codec {
        Codec::Zstd => with_compressed(plaintext, options.level, |compressed| match compressed {
            Some(body) => seal_body(keys, kind, name, body, Codec::Zstd),
            None => seal_body(keys, kind, name, plaintext, Codec::None),
        }),
        Codec::None => seal_body(keys, kind, name, plaintext, Codec::None),
    }
}

/// Write an already encoded body through a plain sealer, declaring `codec` in the header.
fn seal_body(keys: &KeySet, kind: Kind, name: &str, body: &[u8], codec: Codec) -> Vec<u8> {
    let capacity = HEADER_LEN + body.len() + body.len() / 4096 * 16 + 64;
    let out = Vec::with_capacity(capacity);
    let mut sealer = start_object(out, keys, kind, name, codec).expect("writing to memory");
    sealer.write_all(body).expect("writing to memory");
    sealer.finish().expect("writing to memory")
}

/// A zstd context and output buffer, reused across objects: a fresh context and multi-MiB
/// buffer per chunk cost more than the framing (allocator churn and page faults,
/// docs/BENCHMARKS.md "Write pipeline"). Pooled rather than kept per thread, so memory is
/// bounded by how many objects are sealed at once, not by how many threads ever sealed one.
struct Compression {
    level: i32,
    compressor: zstd::bulk::Compressor<'static>,
    buf: Vec<u8>,
}

static COMPRESSORS: std::sync::Mutex<Vec<Compression>> = std::sync::Mutex::new(Vec::new());

/// Idle contexts kept for reuse.
const POOLED_COMPRESSORS: usize = 4;

/// zstd-compress `plaintext` at `level` into a pooled buffer and hand `f` the result, or
/// `None` when compression does not shrink it. The frame is the same as `zstd::bulk::compress`.
fn with_compressed<R>(plaintext: &[u8], level: i32, f: impl FnOnce(Option<&[u8]>) -> R) -> R {
    let pooled = {
        let mut pool = COMPRESSORS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        pool.iter()
            .position(|c| c.level == level)
            .map(|i| pool.swap_remove(i))
    };
    let mut c = pooled.unwrap_or_else(|| Compression {
        level,
        compressor: zstd::bulk::Compressor::new(level).expect("zstd accepts the configured level"),
        buf: Vec::new(),
    });
    c.buf.clear();
    c.buf
        .reserve(zstd::zstd_safe::compress_bound(plaintext.len()));
    c.compressor
        .compress_to_buffer(plaintext, &mut c.buf)
        .expect("zstd compresses any input in memory");
    let out = if c.buf.len() < plaintext.len() {
        f(Some(&c.buf))
    } else {
        f(None)
    };
    let mut pool = COMPRESSORS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if pool.len() < POOLED_COMPRESSORS {
        pool.push(c);
    }
    out
}

/// Decode a whole in-memory object, authenticating every byte.
pub fn open(keys: &KeySet, kind: Kind, name: &str, bytes: &[u8]) -> Result<Vec<u8>, OpenError> {
    let mut reader = ObjectReader::new(bytes, keys, kind, name)?;
    let mut out = Vec::new();
    reader.read_to_end(&mut out).map_err(OpenError::from_io)?;
    Ok(out)
}

#[cfg(test)]
mod tests;
