//! Opening the change log's sealed records (`X`: a tenant's row change under the tenant's
//! key, docs/FORMAT.md §8.2) during replay.
//!
//! A record under a forgotten tenant's key is skipped and counted: its key was destroyed on
//! request. A record under any other key the repository does not hold, or one that does not
//! authenticate, is corruption: the restore fails rather than leave a row out silently.
//!
//! An `X` record of several runs (`p`) gives its first run at once and keeps the others until
//! the `Y` lines naming it come, later in the same chunk; a chunk that ends with runs still
//! kept, or a `Y` that names no record before it, is corruption too.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::archive::record::{RecordOpener, RecordSeal};
use crate::error::{Error, Result};
use crate::repo::{Forgotten, Repository};
use crate::stored::postgres::changes::{parse_lines, Record, SealedPart, SealedRecord};

pub struct SealedRecords<'a> {
    forgotten: &'a Forgotten,
    /// A restore of one tenant: its key ids; every other tenant's records are passed over
    /// unopened (they are not its rows, and their keys may be locked by their own KEKs).
    only: Option<HashSet<[u8; 8]>>,
    opener: RecordOpener,
    /// Runs of a record of several runs not given yet, by the record's seal: their lines.
    kept: HashMap<RecordSeal, VecDeque<Vec<u8>>>,
    /// Runs of a record left unopened (forgotten, or another tenant's) still to come.
    passed: HashMap<RecordSeal, usize>,
    /// Runs left out because their tenant was forgotten.
    pub skipped: u64,
}

impl<'a> SealedRecords<'a> {
    pub fn new(forgotten: &'a Forgotten, only: Option<HashSet<[u8; 8]>>) -> SealedRecords<'a> {
        SealedRecords {
            forgotten,
            only,
            opener: RecordOpener::default(),
            kept: HashMap::new(),
            passed: HashMap::new(),
            skipped: 0,
        }
    }

    /// `record` itself, or the records sealed inside it (none for a forgotten tenant's, or
    /// another tenant's in a restore of one tenant).
    pub async fn open(
        &mut self,
        repo: &Repository,
        record: Record,
        segment: &str,
    ) -> Result<Vec<Record>> {
        match record {
            Record::Sealed(sealed) => self.open_sealed(repo, &sealed, segment).await,
            Record::SealedPart(part) => self.next_run(&part, segment),
            record => Ok(vec![record]),
        }
    }

    /// At the end of a chunk read whole: every run of its records of several runs was given.
    pub fn end_chunk(&mut self, segment: &str) -> Result<()> {
        if self.kept.is_empty() && self.passed.is_empty() {
            return Ok(());
        }
        self.kept.clear();
        self.passed.clear();
        Err(Error::corrupt(format!(
            "{segment}: a chunk ends before the runs its sealed records announce (`p`)"
        )))
    }

    async fn open_sealed(
        &mut self,
        repo: &Repository,
        sealed: &SealedRecord,
        segment: &str,
    ) -> Result<Vec<Record>> {
        let bad = |why: String| Error::corrupt(format!("{segment}: {why}"));
        let (seal, ciphertext) = sealed.parts().map_err(bad)?;
        let later = sealed.p.len().saturating_sub(1);
        let forgotten = self.forgotten.has_key(&seal.key_id);
        let other = self
            .only
            .as_ref()
            .is_some_and(|ids| !ids.contains(&seal.key_id));
        if forgotten || other {
            if forgotten {
                self.skipped += 1;
            }
            if later > 0 {
                self.passed.insert(seal, later);
            }
            return Ok(Vec::new());
        }
        let keys = repo.keys_for_id(seal.key_id).await?;
        if keys.key_id() != seal.key_id {
            return Err(bad(format!(
                "a row change is sealed under key {}, which the repository does not hold and no `tenant forget` destroyed",
                sealed.k
            ))
            .with_hint("run `timevault verify`; restore from another replica if one holds keys/tenants/"));
        }
        let plain = self.opener.open(&keys, &seal, &ciphertext).ok_or_else(|| {
            bad(format!(
                "a row change sealed under key {} does not authenticate",
                sealed.k
            ))
        })?;
        // `z`: a zstd frame of lines; otherwise the lines themselves (a short run; one record
        // without its newline from writers before runs).
        let lines = if sealed.z {
            zstd::stream::decode_all(plain.as_slice())
                .map_err(|e| bad(format!("a sealed run does not decompress: {e}")))?
        } else {
            plain
        };
        if later == 0 {
            return row_changes(&lines).map_err(bad);
        }
        let mut runs = split_runs(lines, &sealed.p).map_err(bad)?;
        let first = runs.pop_front().expect("two runs or more");
        self.kept.insert(seal, runs);
        row_changes(&first).map_err(bad)
    }

    /// The next run of the record a `Y` line names.
    fn next_run(&mut self, part: &SealedPart, segment: &str) -> Result<Vec<Record>> {
        let bad = |why: String| Error::corrupt(format!("{segment}: {why}"));
        let seal = part.seal().map_err(bad)?;
        if let Some(left) = self.passed.get_mut(&seal) {
            if self.forgotten.has_key(&seal.key_id) {
                self.skipped += 1;
            }
            *left -= 1;
            if *left == 0 {
                self.passed.remove(&seal);
            }
            return Ok(Vec::new());
        }
        let Some(runs) = self.kept.get_mut(&seal) else {
            return Err(bad(format!(
                "a `Y` line names sealed record {}/{} that no `X` line before it in the chunk announced",
                part.k, part.n
            )));
        };
        let run = runs.pop_front().expect("kept runs are never empty");
        if runs.is_empty() {
            self.kept.remove(&seal);
        }
        row_changes(&run).map_err(bad)
    }
}

/// A frame's lines cut into the runs whose lengths `parts` gives (which must add up to it).
fn split_runs(lines: Vec<u8>, parts: &[u64]) -> std::result::Result<VecDeque<Vec<u8>>, String> {
    let total: u64 = parts.iter().sum();
    if total != lines.len() as u64 || parts.contains(&0) {
        return Err(format!(
            "a sealed record's runs ({parts:?}) do not add up to its {} bytes",
            lines.len()
        ));
    }
    let mut runs = VecDeque::with_capacity(parts.len());
    let mut at = 0usize;
    for &len in parts {
        let len = usize::try_from(len).expect("within the frame's length");
        runs.push_back(lines[at..at + len].to_vec());
        at += len;
    }
    Ok(runs)
}

/// A run's records, which must be row changes.
fn row_changes(lines: &[u8]) -> std::result::Result<Vec<Record>, String> {
    let records = parse_lines(lines).map_err(|e| format!("in a sealed run: {e}"))?;
    if records.is_empty() {
        return Err("a sealed run holds no row change".to_string());
    }
    for record in &records {
        if !matches!(
            record,
            Record::Insert { .. } | Record::Update { .. } | Record::Delete { .. }
        ) {
            return Err("a sealed record holds something other than a row change".to_string());
        }
    }
    Ok(records)
}
