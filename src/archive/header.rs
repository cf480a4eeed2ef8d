//! The 64-byte header at the front of every framed object (docs/FORMAT.md §2.1).
//!
//! The header says what an object is and how it was written, so a reader never guesses a
//! format from content. It is also the associated data of every encrypted segment, so editing
//! any header byte makes the object fail to authenticate.

use std::fmt;

use super::OpenError;

pub const MAGIC: &[u8; 6] = b"TVAULT";
pub const FORMAT_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 64;
/// Segment size used by this version's writers: 64 KiB.
pub const SEGMENT_LOG2: u8 = 16;
const SEGMENT_LOG2_RANGE: std::ops::RangeInclusive<u8> = 12..=24;

/// What an object holds; a reader names the kind it expects and refuses another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Chunk = 1,
    Snapshot = 2,
    Segment = 3,
    Lease = 4,
    Audit = 5,
    Catalog = 6,
    Manifest = 7,
    Drill = 8,
    /// A tenant's data key, or the record that a tenant was forgotten (`keys/tenants/`).
    Key = 9,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Chunk,
        Kind::Snapshot,
        Kind::Segment,
        Kind::Lease,
        Kind::Audit,
        Kind::Catalog,
        Kind::Manifest,
        Kind::Drill,
        Kind::Key,
    ];

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.code() == code)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Chunk => "chunk",
            Kind::Snapshot => "snapshot",
            Kind::Segment => "segment",
            Kind::Lease => "lease",
            Kind::Audit => "audit",
            Kind::Catalog => "catalog",
            Kind::Manifest => "manifest",
            Kind::Drill => "drill",
            Kind::Key => "key",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the body was compressed before encryption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    None = 0,
    Zstd = 1,
}

impl Codec {
    fn from_code(code: u8) -> Option<Codec> {
        match code {
            0 => Some(Codec::None),
            1 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

/// The only cipher of format version 1.
pub const CIPHER_AES256GCM_STREAM: u8 = 1;

/// A parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub codec: Codec,
    pub segment_log2: u8,
    pub key_id: [u8; 8],
    pub salt: [u8; 32],
}

impl Header {
    pub fn segment_size(&self) -> usize {
        1usize << self.segment_log2
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..6].copy_from_slice(MAGIC);
        out[6..8].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
        out[8] = self.kind.code();
        out[9] = self.codec as u8;
        out[10] = CIPHER_AES256GCM_STREAM;
        out[11] = self.segment_log2;
        out[12..20].copy_from_slice(&self.key_id);
        out[20..52].copy_from_slice(&self.salt);
        out
    }

    /// Check then parse: every field is validated before anything is decrypted.
    pub fn parse(bytes: &[u8], expected: Kind) -> Result<Header, OpenError> {
        if bytes.len() < HEADER_LEN {
            return Err(OpenError::Truncated);
        }
        if &bytes[0..6] != MAGIC {
            return Err(OpenError::NotAnObject);
        }
        let version = u16::from_be_bytes([bytes[6], bytes[7]]);
        if version != FORMAT_VERSION {
            return Err(OpenError::UnsupportedVersion(version));
        }
        let kind = Kind::from_code(bytes[8]).ok_or(OpenError::UnknownKind(bytes[8]))?;
        if kind != expected {
            return Err(OpenError::WrongKind {
                expected,
                found: kind,
            });
        }
        let codec = Codec::from_code(bytes[9]).ok_or(OpenError::UnknownCodec(bytes[9]))?;
        if bytes[10] != CIPHER_AES256GCM_STREAM {
            return Err(OpenError::UnknownCipher(bytes[10]));
        }
        let segment_log2 = bytes[11];
        if !SEGMENT_LOG2_RANGE.contains(&segment_log2) {
            return Err(OpenError::BadSegmentSize(segment_log2));
        }
        if bytes[52..64].iter().any(|b| *b != 0) {
            return Err(OpenError::ReservedBytes);
        }
        let mut key_id = [0u8; 8];
        key_id.copy_from_slice(&bytes[12..20]);
        let mut salt = [0u8; 32];
        salt.copy_from_slice(&bytes[20..52]);
        Ok(Header {
            kind,
            codec,
            segment_log2,
            key_id,
            salt,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            kind: Kind::Snapshot,
            codec: Codec::Zstd,
            segment_log2: SEGMENT_LOG2,
            key_id: [7; 8],
            salt: [9; 32],
        }
    }

    #[test]
    fn round_trip() {
        let h = sample();
        assert_eq!(Header::parse(&h.to_bytes(), Kind::Snapshot).unwrap(), h);
    }

    #[test]
    fn each_check_names_its_failure() {
        let good = sample().to_bytes();
        let mut b = good;
        b[0] = b'X';
        assert!(matches!(
            Header::parse(&b, Kind::Snapshot),
            Err(OpenError::NotAnObject)
        ));
        let mut b = good;
        b[7] = 9;
        assert!(matches!(
            Header::parse(&b, Kind::Snapshot),
            Err(OpenError::UnsupportedVersion(9))
        ));
        assert!(matches!(
            Header::parse(&good, Kind::Chunk),
            Err(OpenError::WrongKind { .. })
        ));
        let mut b = good;
        b[60] = 1;
        assert!(matches!(
            Header::parse(&b, Kind::Snapshot),
            Err(OpenError::ReservedBytes)
        ));
        assert!(matches!(
            Header::parse(&good[..10], Kind::Snapshot),
            Err(OpenError::Truncated)
        ));
    }
}
