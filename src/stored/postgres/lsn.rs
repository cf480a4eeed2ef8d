//! A position in PostgreSQL's write-ahead log.

use std::fmt;

/// An LSN (`XXXXXXXX/XXXXXXXX` in text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    pub fn parse(text: &str) -> Option<Lsn> {
        let (hi, lo) = text.split_once('/')?;
        let hi = u64::from_str_radix(hi, 16).ok()?;
        let lo = u64::from_str_radix(lo, 16).ok()?;
        (hi <= u32::MAX as u64 && lo <= u32::MAX as u64).then_some(Lsn(hi << 32 | lo))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

/// Stored as its text (`16/B374D848`), as PostgreSQL writes it: manifests and change records
/// stay readable, and a position that does not parse is a corrupt object, never LSN 0.
impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Lsn, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Lsn::parse(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("`{text}` is not an LSN (X/X in hex)")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_round_trips() {
        let lsn = Lsn::parse("16/B374D848").unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!(Lsn::parse("0/0"), Some(Lsn(0)));
        assert_eq!(Lsn::parse("nonsense"), None);
        assert!(Lsn::parse("0/1") < Lsn::parse("1/0"));
    }

    /// Stored LSNs are the text PostgreSQL writes; one that does not parse fails the read
    /// (before, positions were strings parsed where used, and one such use read a bad one as
    /// LSN 0).
    #[test]
    fn a_stored_lsn_is_text_and_a_bad_one_is_an_error() {
        let lsn = Lsn::parse("16/B374D848").unwrap();
        assert_eq!(serde_json::to_string(&lsn).unwrap(), "\"16/B374D848\"");
        assert_eq!(serde_json::from_str::<Lsn>("\"16/B374D848\"").unwrap(), lsn);
        let err = serde_json::from_str::<Lsn>("\"16-B374D848\"").unwrap_err();
        assert!(err.to_string().contains("not an LSN"), "{err}");
        assert!(serde_json::from_str::<Lsn>("0").is_err());
    }
}
