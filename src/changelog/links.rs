//! Proof that a chain's change log has no hole: each segment starts exactly where the one
//! before it ended, the first where the snapshot said capture resumes.
//!
//! The catalog already refuses a hole in the sequence numbers (a segment deleted on every
//! replica); this catches what numbering cannot: a segment whose positions do not meet its
//! neighbour's (a chain spliced from two captures, a position rewritten). A segment repeated
//! under the same sequence number (a capture retried after a write that reached too few
//! replicas) must start where the first one did.

use crate::error::{Error, Result};

use super::SegmentManifest;

/// Walks one chain's segments in order.
#[derive(Debug, Clone)]
pub struct Links {
    snapshot: String,
    /// Where the next segment must start.
    expected: serde_json::Value,
    /// The previous segment: (seq, start, key), for repeated sequence numbers.
    previous: Option<(u64, serde_json::Value, String)>,
}

impl Links {
    /// `resume` is the snapshot's resume position, as stored in the snapshot.
    pub fn new(snapshot_key: &str, resume: serde_json::Value) -> Links {
        Links {
            snapshot: snapshot_key.to_string(),
            expected: resume,
            previous: None,
        }
    }

    /// Check the next segment (read from `key`) and move past it.
    pub fn check(&mut self, key: &str, segment: &SegmentManifest) -> Result<()> {
        let repeated = self
            .previous
            .as_ref()
            .filter(|(seq, _, _)| *seq == segment.seq);
        let (expected, after) = match repeated {
            Some((_, start, previous)) => (start, previous.as_str()),
            None => (
                &self.expected,
                self.previous
                    .as_ref()
                    .map_or(self.snapshot.as_str(), |(_, _, k)| k.as_str()),
            ),
        };
        if segment.is_linked() && &segment.start != expected {
            return Err(Error::corrupt(format!(
                "change-log segment {key} does not start where {after} ended (start {}, expected {}): the change log has a hole",
                segment.start, expected
            ))
            .with_hint("restore to an instant before this segment; run `timevault verify` to find every damaged chain"));
        }
        self.previous = Some((segment.seq, segment.start.clone(), key.to_string()));
        self.expected = segment.end.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use serde_json::json;

    fn seg(seq: u64, start: u64, end: u64) -> SegmentManifest {
        SegmentManifest {
            source: "app".into(),
            chain: "c".into(),
            seq,
            captured_at: Utc::now(),
            format: "sqlite-wal-frames/1".into(),
            records: 0,
            transactions: 0,
            bytes: 0,
            chunks: Vec::new(),
            start: json!({ "frames": start }),
            end: json!({ "frames": end }),
            linked: true,
            details: None,
            lease_epoch: None,
        }
    }

    #[test]
    fn contiguous_and_repeated_segments_pass() {
        let mut links = Links::new("snap", json!({ "frames": 0 }));
        links.check("1", &seg(1, 0, 5)).unwrap();
        links.check("2", &seg(2, 5, 9)).unwrap();
        links.check("2b", &seg(2, 5, 12)).unwrap(); // retried: same start, reads further
        links.check("3", &seg(3, 12, 12)).unwrap();
    }

    #[test]
    fn a_segment_that_does_not_meet_its_neighbour_is_corrupt() {
        let mut links = Links::new("snap", json!({ "frames": 0 }));
        links.check("1", &seg(1, 0, 5)).unwrap();
        let err = links.check("3", &seg(3, 7, 9)).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
        assert!(
            err.to_string().contains("3 does not start where 1 ended"),
            "{err}"
        );
        let mut links = Links::new("snap", json!({ "frames": 4 }));
        assert!(
            links.check("1", &seg(1, 0, 5)).is_err(),
            "first segment must start at the snapshot"
        );
    }

    #[test]
    fn unlinked_old_segments_are_not_compared() {
        let mut links = Links::new("snap", json!({ "frames": 0 }));
        let mut old = seg(1, 3, 5);
        old.linked = false;
        links.check("1", &old).unwrap();
        links.check("2", &seg(2, 5, 6)).unwrap();
    }
}
