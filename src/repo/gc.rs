//! The storage side of chunk garbage collection: marks, keep records and the sweep marker.
//!
//! Chunks are shared by every snapshot, segment and scan of every source, and a writer
//! deduplicates against the chunks it believes exist without telling anyone. Deleting a chunk
//! that no manifest references is therefore only safe in two phases (docs/ARCHITECTURE.md,
//! "Pruning"):
//!
//! 1. **Mark.** A prune records the chunks it found unreferenced (`catalog/gc/marks/<time>`).
//! 2. **Sweep.** A later prune, once a mark is older than `retention.chunk_grace`, deletes the
//!    marked chunks that are still unreferenced and that no writer has claimed.
//!
//! A writer claims a marked chunk before relying on it: it writes a keep record and then checks
//! that no sweep is running. The sweep holds a marker (`catalog/gc/sweeping`) carrying a random
//! token and a heartbeat that a task of its own renews while the sweep runs ([`Sweep`]); a
//! marker is live while its heartbeat is younger than [`STALE_SWEEP`], however long the sweep
//! has been running. The sweep deletes in batches, and before each batch it re-reads the marker
//! (still there, still its token, heartbeat renewed: else it stops, deleting nothing more) and
//! then the keep records. So for every claim either the sweep's next read sees the keep record,
//! or the writer's check comes after that renewal and sees a live marker, and the writer fails
//! its job (retried later) instead of referencing a chunk that may vanish. A sweep deletes only
//! while its own last heartbeat is younger than [`DELETE_WINDOW`] (half the stale limit), so a
//! sweep that stalled (a paused process) renews and re-reads before it deletes again. A claimed
//! chunk is written again (create-only: a copy still there stays), in case a sweep deleted it
//! after the writer loaded its index.
//!
//! A writer's chunk index, which holds the marks it knows, is reloaded at least every
//! `chunk_grace / 2` (and before a manifest is written once it is older than that); each
//! reload re-checks the chunks deduplicated against the previous index: still present (else
//! the next manifest fails), and claimed when marked meanwhile (`repo::chunks`). So a writer
//! that deduplicates against a chunk marked after its index was loaded claims it or writes its
//! manifest before any sweep may delete it, as long as its job finishes within the grace
//! period (the default grace is a day).
//!
//! Residual race, accepted: the marker is renewed by a read then an overwrite (the local file
//! store has no conditional update), so a prune that replaces a stale marker between the two
//! is overwritten in turn; its own next check then finds a foreign token and it stops. A sweep
//! process frozen between its last clock check and a delete request longer than the stale
//! limit could still delete one chunk claimed meanwhile; the heartbeat makes that a freeze of
//! more than half an hour, not a long sweep.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::{layout, Repository};
use crate::archive::Kind;
use crate::error::{Error, ErrorKind, Result};
use crate::time;

/// Chunks a prune found unreferenced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkMark {
    pub marked_at: DateTime<Utc>,
    pub chunks: Vec<String>,
}

/// A sweep marker whose heartbeat is older than this was left by a crashed (or frozen) prune:
/// writers ignore it and the next prune replaces it.
pub const STALE_SWEEP: Duration = Duration::hours(1);

/// A running sweep renews its heartbeat once it is this old.
const HEARTBEAT_EVERY: Duration = Duration::minutes(15);

/// How often the heartbeat task looks at the clock (real time; no request unless due).
const HEARTBEAT_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// A sweep deletes only while its last heartbeat is younger than this.
pub const DELETE_WINDOW: Duration = Duration::minutes(30);

/// The random token that tells one sweep's marker from another's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SweepToken(String);

impl SweepToken {
    fn generate() -> Self {
        SweepToken(uuid::Uuid::new_v4().simple().to_string())
    }
}

impl std::fmt::Display for SweepToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The sweep marker's content (docs/FORMAT.md §6). `token` and `heartbeat_at` are absent in
/// markers written before heartbeats: such a marker is judged by `started_at`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SweepRecord {
    started_at: DateTime<Utc>,
    pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token: Option<SweepToken>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    heartbeat_at: Option<DateTime<Utc>>,
}

impl SweepRecord {
    fn last_heartbeat(&self) -> DateTime<Utc> {
        self.heartbeat_at.unwrap_or(self.started_at)
    }

    fn is_live(&self, now: DateTime<Utc>) -> bool {
        now - self.last_heartbeat() < STALE_SWEEP
    }

    fn describe(&self) -> String {
        let token = self.token.as_ref().map_or("none".into(), |t| t.to_string());
        format!(
            "token {token}, pid {}, heartbeat {}",
            self.pid,
            self.last_heartbeat()
        )
    }
}

/// What one sweep knows about itself; shared with its heartbeat task.
#[derive(Debug)]
struct SweepState {
    token: SweepToken,
    started_at: DateTime<Utc>,
    heartbeat_at: std::sync::Mutex<DateTime<Utc>>,
}

impl SweepState {
    fn new(now: DateTime<Utc>) -> Self {
        SweepState {
            token: SweepToken::generate(),
            started_at: now,
            heartbeat_at: std::sync::Mutex::new(now),
        }
    }

    fn record(&self, heartbeat_at: DateTime<Utc>) -> SweepRecord {
        SweepRecord {
            started_at: self.started_at,
            pid: std::process::id(),
            token: Some(self.token.clone()),
            heartbeat_at: Some(heartbeat_at),
        }
    }

    fn heartbeat_age(&self) -> Duration {
        crate::clock::now() - *self.heartbeat_at.lock().expect("heartbeat lock")
    }
}

/// A running sweep: it holds the marker, renewed by a task of its own until
/// [`Repository::end_sweep`] (dropping it only stops the renewal).
#[derive(Debug)]
pub struct Sweep {
    state: Arc<SweepState>,
    heartbeat: JoinHandle<()>,
}

impl Sweep {
    pub fn token(&self) -> &SweepToken {
        &self.state.token
    }

    /// Whether the sweep may delete now: its last heartbeat is younger than [`DELETE_WINDOW`].
    /// Past it, [`Repository::confirm_sweep`] must renew it (and re-read the claims) first.
    pub fn may_delete(&self) -> bool {
        self.state.heartbeat_age() < DELETE_WINDOW
    }
}

impl Drop for Sweep {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// The sweep marker on every replica that answered, as one sweep sees it.
#[derive(Debug, Default)]
struct MarkerView {
    /// Replicas (indices) holding this sweep's marker.
    ours: Vec<usize>,
    /// Other markers found: another sweep's record, or `None` for one that does not open.
    foreign: Vec<Option<SweepRecord>>,
}

impl MarkerView {
    fn is_ours(&self) -> bool {
        !self.ours.is_empty() && self.foreign.is_empty()
    }

    fn foreign_is_live(&self, now: DateTime<Utc>) -> bool {
        self.foreign
            .iter()
            .any(|r| r.as_ref().is_some_and(|r| r.is_live(now)))
    }

    /// Why this is no longer the sweep's marker (for the error that stops it).
    fn lost_reason(&self) -> String {
        match self.foreign.first() {
            Some(Some(other)) => format!("replaced by another prune's ({})", other.describe()),
            Some(None) => "replaced by one that does not authenticate".into(),
            None => "removed".into(),
        }
    }
}

fn marker_lost(view: &MarkerView, token: &SweepToken) -> Error {
    Error::new(
        ErrorKind::Locked,
        format!(
            "the chunk sweep marker {} of this sweep (token {token}) was {}; the sweep stopped",
            layout::GC_SWEEPING,
            view.lost_reason()
        ),
    )
    .with_hint("another prune judged this sweep stale and took over; nothing more was deleted by this one, run prune again later")
}

impl Repository {
    /// Every mark, by key.
    pub async fn chunk_marks(&self) -> Result<BTreeMap<String, ChunkMark>> {
        let mut marks = BTreeMap::new();
        for key in self.list(layout::GC_MARKS).await? {
            let bytes = self.read_object(Kind::Catalog, &key).await?;
            let mark: ChunkMark = serde_json::from_slice(&bytes).map_err(|e| {
                Error::corrupt(format!("chunk mark {key}: unreadable")).with_source(e)
            })?;
            marks.insert(key, mark);
        }
        Ok(marks)
    }

    pub async fn write_chunk_mark(&self, mark: &ChunkMark) -> Result<String> {
        let key = layout::gc_mark(&time::compact(mark.marked_at));
        let json = serde_json::to_vec(mark).expect("mark serializes");
        self.store_object(Kind::Catalog, &key, json).await?;
        Ok(key)
    }

    /// The ids of every marked chunk (what a writer must claim before relying on it).
    pub(super) async fn marked_chunk_ids(&self) -> Result<HashSet<String>> {
        Ok(self
            .chunk_marks()
            .await?
            .into_values()
            .flat_map(|m| m.chunks)
            .collect())
    }

    /// Claim a marked chunk for a reference about to be written; fails while a sweep runs.
    pub(super) async fn keep_marked_chunk(&self, id: &str) -> Result<()> {
        let key = layout::gc_keep(id, &format!("{:08x}", rand::random::<u32>()));
        let json = serde_json::to_vec(&serde_json::json!({"kept_at": crate::clock::now()}))
            .expect("keep record serializes");
        self.store_object(Kind::Catalog, &key, json).await?;
        if self.sweep_running().await? {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!("chunk {id} is being garbage-collected by a running prune"),
            )
            .with_hint("the job is retried on the next schedule; run it again after the prune"));
        }
        Ok(())
    }

    /// Whether any reachable replica holds a live sweep marker.
    async fn sweep_running(&self) -> Result<bool> {
        let mut answered = false;
        for replica in self.replicas.replicas() {
            match replica.get(layout::GC_SWEEPING).await {
                Ok(Some(bytes)) if self.sweep_is_live(&bytes) => return Ok(true),
                Ok(Some(_)) => answered = true,
                Ok(None) => answered = true,
                Err(e) => {
                    tracing::warn!(replica = %replica.name(), error = %e, "cannot check for a running chunk sweep")
                }
            }
        }
        if answered {
            Ok(false)
        } else {
            Err(Error::new(
                ErrorKind::Unavailable,
                "no replica answered whether a chunk sweep is running",
            ))
        }
    }

    /// A sweep marker that authenticates and whose heartbeat is younger than [`STALE_SWEEP`].
    /// One that does not authenticate counts as live: never guess in the unsafe direction.
    fn sweep_is_live(&self, bytes: &[u8]) -> bool {
        self.open_sweep_record(bytes)
            .is_none_or(|r| r.is_live(crate::clock::now()))
    }

    fn open_sweep_record(&self, bytes: &[u8]) -> Option<SweepRecord> {
        crate::archive::open(&self.keys, Kind::Catalog, layout::GC_SWEEPING, bytes)
            .ok()
            .and_then(|b| serde_json::from_slice::<SweepRecord>(&b).ok())
    }

    /// The marker on every replica that answers, sorted into this sweep's and others'.
    async fn read_marker(&self, token: &SweepToken) -> Result<MarkerView> {
        let mut view = MarkerView::default();
        let mut last_error = None;
        let mut answered = false;
        for (i, replica) in self.replicas.replicas().iter().enumerate() {
            match replica.get(layout::GC_SWEEPING).await {
                Ok(found) => {
                    answered = true;
                    let Some(bytes) = found else { continue };
                    match self.open_sweep_record(&bytes) {
                        Some(r) if r.token.as_ref() == Some(token) => view.ours.push(i),
                        other => view.foreign.push(other),
                    }
                }
                Err(e) => {
                    tracing::warn!(replica = %replica.name(), error = %e, "cannot read the chunk sweep marker");
                    last_error = Some(e);
                }
            }
        }
        match (answered, last_error) {
            (false, Some(e)) => Err(Error::new(
                ErrorKind::Unavailable,
                "no replica answered for the chunk sweep marker",
            )
            .with_source(e)),
            _ => Ok(view),
        }
    }

    /// Write `state`'s marker create-only (a replica holding any marker keeps it).
    async fn create_sweep_marker(&self, state: &SweepState) -> Result<()> {
        let json =
            serde_json::to_vec(&state.record(state.started_at)).expect("sweep record serializes");
        self.store_object(Kind::Catalog, layout::GC_SWEEPING, json)
            .await
            .map(|_| ())
    }

    /// Start a sweep: write the marker and start its heartbeat. `None` when another sweep's
    /// marker is live; a stale one (its heartbeat stopped: a crashed prune) is replaced.
    pub async fn begin_sweep(&self) -> Result<Option<Sweep>> {
        let state = Arc::new(SweepState::new(crate::clock::now()));
        for attempt in 0..2 {
            self.create_sweep_marker(&state).await?;
            let view = self.read_marker(&state.token).await?;
            if view.is_ours() {
                return Ok(Some(self.start_heartbeat(state)));
            }
            if view.foreign_is_live(crate::clock::now()) || attempt == 1 {
                self.remove_marker_copies(&view.ours).await;
                return Ok(None);
            }
            tracing::warn!(
                "replacing a chunk sweep marker whose heartbeat stopped (a crashed prune)"
            );
            self.remove_marker_copies(&(0..self.replicas.replicas().len()).collect::<Vec<_>>())
                .await;
        }
        Ok(None)
    }

    fn start_heartbeat(&self, state: Arc<SweepState>) -> Sweep {
        let repo = self.clone();
        let renewing = state.clone();
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(HEARTBEAT_POLL).await;
                if renewing.heartbeat_age() < HEARTBEAT_EVERY {
                    continue;
                }
                match repo.renew_sweep(&renewing).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::Locked => {
                        tracing::warn!(error = %e, "chunk sweep heartbeat stopped");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot renew the chunk sweep heartbeat; retrying")
                    }
                }
            }
        });
        Sweep { state, heartbeat }
    }

    /// Check that the marker is still this sweep's and renew its heartbeat: the sweep calls
    /// it before each delete batch, then reads the claims. An error (the marker was removed or
    /// replaced, or no replica could be renewed) means the sweep must delete nothing more.
    pub async fn confirm_sweep(&self, sweep: &Sweep) -> Result<()> {
        self.renew_sweep(&sweep.state).await
    }

    /// Overwrite the marker with a new heartbeat on the replicas that hold this sweep's own.
    async fn renew_sweep(&self, state: &SweepState) -> Result<()> {
        let view = self.read_marker(&state.token).await?;
        if !view.is_ours() {
            return Err(marker_lost(&view, &state.token));
        }
        let now = crate::clock::now();
        let json = serde_json::to_vec(&state.record(now)).expect("sweep record serializes");
        let sealed = self.seal(Kind::Catalog, layout::GC_SWEEPING, json).await?;
        let mut last_error = None;
        let mut renewed = false;
        for &i in &view.ours {
            let replica = &self.replicas.replicas()[i];
            match replica
                .put_overwrite(layout::GC_SWEEPING, sealed.clone())
                .await
            {
                Ok(()) => renewed = true,
                Err(e) => {
                    tracing::warn!(replica = %replica.name(), error = %e, "cannot renew the chunk sweep marker");
                    last_error = Some(e);
                }
            }
        }
        match (renewed, last_error) {
            (false, Some(e)) => Err(Error::new(
                ErrorKind::Unavailable,
                "could not renew the chunk sweep marker's heartbeat on any replica",
            )
            .with_source(e)),
            _ => {
                *state.heartbeat_at.lock().expect("heartbeat lock") = now;
                Ok(())
            }
        }
    }

    /// End a sweep: stop its heartbeat and remove its marker where it is still this sweep's
    /// (never another prune's). A replica that is down keeps its copy until it turns stale.
    pub async fn end_sweep(&self, sweep: Sweep) {
        sweep.heartbeat.abort();
        match self.read_marker(&sweep.state.token).await {
            Ok(view) => self.remove_marker_copies(&view.ours).await,
            Err(e) => {
                tracing::warn!(error = %e, "could not remove the chunk sweep marker; it expires by itself")
            }
        }
    }

    /// Delete the marker on the replicas `replicas` (indices).
    async fn remove_marker_copies(&self, replicas: &[usize]) {
        for &i in replicas {
            let replica = &self.replicas.replicas()[i];
            if let Err(error) = replica.delete(layout::GC_SWEEPING).await {
                tracing::warn!(replica = %replica.name(), %error, "could not remove the chunk sweep marker; it expires by itself");
            }
        }
    }

    /// Keep records: the claimed chunk ids and the records' keys.
    pub async fn chunk_keeps(&self) -> Result<(HashSet<String>, Vec<String>)> {
        let keys = self.list(layout::GC_KEEPS).await?;
        let ids = keys
            .iter()
            .filter_map(|k| k.strip_prefix(layout::GC_KEEPS)?.split('/').next())
            .map(str::to_string)
            .collect();
        Ok((ids, keys))
    }

    /// Every chunk id on any reachable replica.
    pub async fn chunk_ids(&self) -> Result<Vec<String>> {
        Ok(self
            .list(layout::CHUNKS)
            .await?
            .iter()
            .filter_map(|k| layout::chunk_id_of(k).map(str::to_string))
            .collect())
    }

    /// Forget what the chunk index knows (after a prune deleted chunks): the next chunk write
    /// lists the replicas and reads the marks again.
    pub async fn invalidate_chunk_index(&self) {
        self.chunk_index.invalidate().await;
    }

    /// Delete `key` on every replica; the replicas that failed, with why. Absent is success.
    pub async fn delete_on_replicas(&self, key: &str) -> Vec<(String, String)> {
        let mut failed = Vec::new();
        for replica in self.replicas.replicas() {
            if let Err(e) = replica.delete(key).await {
                failed.push((replica.name().to_string(), e.to_string()));
            }
        }
        failed
    }
}
