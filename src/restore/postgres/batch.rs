//! Row changes held back during replay so that many go to the server in one statement.
//!
//! Replay sent one statement per updated row and a BEGIN and COMMIT per source transaction:
//! six round trips for a pgbench transaction of four rows, about 5,000 row changes/s, so a
//! day of changes at 500 transactions/s would have taken hours to replay. Two facts allow
//! much larger statements:
//! - during replay the tables have only their keys: no foreign keys, no triggers, no other
//!   unique indexes (they are built after replay), so changes to different tables commute
//!   and each table's changes only need to keep their own order;
//! - an update that carries the whole new row and keeps the key is, on a table with a unique
//!   key, the same as an upsert of that row, and a later full row of the same key replaces
//!   an earlier one in the batch (an `INSERT ... ON CONFLICT DO UPDATE` may not touch one row
//!   twice, and the later row is the row's state after both).
//!
//! [`Pending`] keeps one batch per relation: full rows (inserted, or upserted by key) or keys
//! to delete. A change of the other kind to the same relation sends that relation's batch
//! first, so each relation's changes stay in order. This module only keeps the batches; the
//! replay decides what may go in one and sends them.

use std::collections::HashMap;

/// A row image: one text value (or NULL) per column of the relation.
pub(crate) type Row = Vec<Option<String>>;

/// Rows per relation's batch (one statement).
pub(crate) const BATCH_ROWS: usize = 1000;

/// Rows held back over all relations before everything is sent.
const PENDING_ROWS: usize = 20_000;

/// Bytes of values held back over all relations before everything is sent.
const PENDING_BYTES: usize = 32 << 20;

/// What a relation's batch holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Full rows to insert (as upserts where the key is unique).
    Rows,
    /// Rows (their key columns matter) to delete.
    Deletes,
}

/// One relation's held-back rows.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub rows: Vec<Row>,
    /// For an upsert batch: where each key's row is, so a later row replaces it.
    by_key: HashMap<Row, usize>,
    bytes: usize,
}

/// The batches of every relation, in the order the relations first appeared.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    batches: Vec<(u32, Kind, Batch)>,
    rows: usize,
    bytes: usize,
}

fn row_bytes(row: &Row) -> usize {
    row.iter()
        .map(|v| v.as_ref().map_or(1, |s| s.len() + 1))
        .sum()
}

impl Pending {
    /// Take `rel`'s batch if it holds the other kind of change than `kind` (to be sent
    /// before a change of `kind` is added).
    pub fn take_unlike(&mut self, rel: u32, kind: Kind) -> Option<(Kind, Batch)> {
        match self.batches.iter().position(|(r, _, _)| *r == rel) {
            Some(i) if self.batches[i].1 != kind => self.remove(i),
            _ => None,
        }
    }

    /// Take `rel`'s batch, whatever it holds.
    pub fn take(&mut self, rel: u32) -> Option<(Kind, Batch)> {
        let i = self.batches.iter().position(|(r, _, _)| *r == rel)?;
        self.remove(i)
    }

    /// Take every batch except `rel`'s.
    pub fn take_others(&mut self, rel: u32) -> Vec<(u32, Kind, Batch)> {
        let (keep, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.batches)
            .into_iter()
            .partition(|(r, _, _)| *r == rel);
        self.batches = keep;
        self.recount();
        others
    }

    /// Take every batch.
    pub fn take_all(&mut self) -> Vec<(u32, Kind, Batch)> {
        self.rows = 0;
        self.bytes = 0;
        std::mem::take(&mut self.batches)
    }

    fn remove(&mut self, i: usize) -> Option<(Kind, Batch)> {
        let (_, kind, batch) = self.batches.remove(i);
        self.recount();
        Some((kind, batch))
    }

    fn recount(&mut self) {
        self.rows = self.batches.iter().map(|(_, _, b)| b.rows.len()).sum();
        self.bytes = self.batches.iter().map(|(_, _, b)| b.bytes).sum();
    }

    /// Add a row to `rel`'s batch of `kind` (which must not hold the other kind: see
    /// [`Pending::take_unlike`]). With `key` (an upsert batch), a row with the same values in
    /// those columns as one already held replaces it. Returns whether `rel`'s batch is full.
    pub fn push(&mut self, rel: u32, kind: Kind, row: Row, key: Option<&[usize]>) -> bool {
        let i = match self.batches.iter().position(|(r, _, _)| *r == rel) {
            Some(i) => i,
            None => {
                self.batches.push((rel, kind, Batch::default()));
                self.batches.len() - 1
            }
        };
        debug_assert_eq!(self.batches[i].1, kind, "take_unlike first");
        let batch = &mut self.batches[i].2;
        let bytes = row_bytes(&row);
        self.bytes += bytes;
        batch.bytes += bytes;
        let at = key.map(|k| {
            k.iter()
                .map(|&c| row.get(c).cloned().flatten())
                .collect::<Row>()
        });
        match at.as_ref().and_then(|k| batch.by_key.get(k)).copied() {
            Some(j) => {
                let old = row_bytes(&batch.rows[j]);
                self.bytes = self.bytes.saturating_sub(old);
                batch.bytes = batch.bytes.saturating_sub(old);
                batch.rows[j] = row;
            }
            None => {
                if let Some(k) = at {
                    batch.by_key.insert(k, batch.rows.len());
                }
                batch.rows.push(row);
                self.rows += 1;
            }
        }
        batch.rows.len() >= BATCH_ROWS
    }

    /// Whether so much is held back that everything should be sent.
    pub fn over_budget(&self) -> bool {
        self.rows >= PENDING_ROWS || self.bytes >= PENDING_BYTES
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(values: &[&str]) -> Row {
        values.iter().map(|v| Some(v.to_string())).collect()
    }

    #[test]
    fn a_later_row_with_the_same_key_replaces_the_earlier() {
        let mut p = Pending::default();
        p.push(1, Kind::Rows, row(&["1", "a"]), Some(&[0]));
        p.push(1, Kind::Rows, row(&["2", "b"]), Some(&[0]));
        p.push(1, Kind::Rows, row(&["1", "c"]), Some(&[0]));
        let (kind, batch) = p.take(1).unwrap();
        assert_eq!(kind, Kind::Rows);
        assert_eq!(batch.rows, vec![row(&["1", "c"]), row(&["2", "b"])]);
        assert!(p.is_empty());
    }

    #[test]
    fn without_a_key_every_row_is_kept() {
        let mut p = Pending::default();
        p.push(1, Kind::Rows, row(&["1", "a"]), None);
        p.push(1, Kind::Rows, row(&["1", "a"]), None);
        assert_eq!(p.take(1).unwrap().1.rows.len(), 2);
    }

    #[test]
    fn the_other_kind_is_taken_first_and_other_relations_stay() {
        let mut p = Pending::default();
        p.push(1, Kind::Rows, row(&["1"]), Some(&[0]));
        p.push(2, Kind::Deletes, row(&["9"]), None);
        assert!(p.take_unlike(1, Kind::Rows).is_none());
        let (kind, batch) = p.take_unlike(1, Kind::Deletes).unwrap();
        assert_eq!((kind, batch.rows), (Kind::Rows, vec![row(&["1"])]));
        p.push(1, Kind::Deletes, row(&["1"]), None);
        let others = p.take_others(1);
        assert_eq!(others.len(), 1);
        assert_eq!(others[0].0, 2);
        assert_eq!(p.take_all().len(), 1);
        assert!(p.is_empty());
    }

    #[test]
    fn a_batch_is_full_at_batch_rows_and_the_budget_counts_rows_and_bytes() {
        let mut p = Pending::default();
        for i in 0..BATCH_ROWS - 1 {
            assert!(!p.push(1, Kind::Rows, row(&[&i.to_string()]), Some(&[0])));
        }
        assert!(p.push(1, Kind::Rows, row(&["last"]), Some(&[0])));
        assert!(!p.over_budget());
        let big = "x".repeat(PENDING_BYTES);
        p.push(2, Kind::Rows, row(&[&big]), None);
        assert!(p.over_budget());
        p.take(2);
        assert!(!p.over_budget());
        for i in 0..PENDING_ROWS {
            p.push(
                3 + (i / BATCH_ROWS) as u32,
                Kind::Deletes,
                row(&["k"]),
                None,
            );
        }
        assert!(p.over_budget());
        p.take_all();
        assert!(!p.over_budget());
    }
}
