//! Opening the change log's sealed records (`X`: a tenant's row change under the tenant's
//! key, docs/FORMAT.md §8.2) during replay.
//!
//! A record under a forgotten tenant's key is skipped and counted: its key was destroyed on
//! request. A record under any other key the repository does not hold, or one that does not
//! authenticate, is corruption: the restore fails rather than leave a row out silently.

use std::collections::HashSet;

use crate::archive::record::RecordOpener;
use crate::error::{Error, Result};
use crate::repo::{Forgotten, Repository};
use crate::stored::postgres::changes::{parse_lines, Record, SealedRecord};

pub struct SealedRecords<'a> {
    forgotten: &'a Forgotten,
    /// A restore of one tenant: its key ids; every other tenant's records are passed over
    /// unopened (they are not its rows, and their keys may be locked by their own KEKs).
    only: Option<HashSet<[u8; 8]>>,
    opener: RecordOpener,
    /// Records left out because their tenant was forgotten.
    pub skipped: u64,
}

impl<'a> SealedRecords<'a> {
    pub fn new(forgotten: &'a Forgotten, only: Option<HashSet<[u8; 8]>>) -> SealedRecords<'a> {
        SealedRecords {
            forgotten,
            only,
            opener: RecordOpener::default(),
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
        let Record::Sealed(sealed) = record else {
            return Ok(vec![record]);
        };
        self.open_sealed(repo, &sealed, segment).await
    }

    async fn open_sealed(
        &mut self,
        repo: &Repository,
        sealed: &SealedRecord,
        segment: &str,
    ) -> Result<Vec<Record>> {
        let bad = |why: String| Error::corrupt(format!("{segment}: {why}"));
        let (seal, ciphertext) = sealed.parts().map_err(bad)?;
        if self.forgotten.has_key(&seal.key_id) {
            self.skipped += 1;
            return Ok(Vec::new());
        }
        if self
            .only
            .as_ref()
            .is_some_and(|ids| !ids.contains(&seal.key_id))
        {
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
        let records = parse_lines(&lines).map_err(|e| bad(format!("in a sealed run: {e}")))?;
        if records.is_empty() {
            return Err(bad("a sealed run holds no row change".to_string()));
        }
        for record in &records {
            if !matches!(
                record,
                Record::Insert { .. } | Record::Update { .. } | Record::Delete { .. }
            ) {
                return Err(bad(
                    "a sealed record holds something other than a row change".to_string(),
                ));
            }
        }
        Ok(records)
    }
}
