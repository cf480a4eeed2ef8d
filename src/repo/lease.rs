//! One writer at a time: an expiring lease built from create-only writes (docs/FORMAT.md §5).
//!
//! Each acquisition or renewal creates the next generation of `leases/<scope>/`; of two
//! writers racing for the same generation exactly one create succeeds. Only create-only puts
//! are needed, which every store supports (the local file store has no compare-and-swap
//! update). A holder that dies simply stops renewing: its lease expires and the next writer
//! takes over, with no lock file to clean by hand.
//!
//! Across replicas, a writer must win the lease on at least `write_quorum` replicas and see no
//! live holder on any replica it can reach. With a write quorum below a majority of replicas, a
//! network partition could let two writers each hold a disjoint part: set the quorum to a
//! majority where that matters.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{layout, Repository};
use crate::archive::Kind;
use crate::error::{Error, ErrorKind, Result};

/// The lease scope of a source: the daemon capturing it holds this one.
pub fn source_lease_scope(source: &str) -> String {
    format!("source-{source}")
}

/// The source leases a repository handle holds, with their expiry (shared by its clones).
///
/// A writer whose process stalled (a long pause, a suspended VM) may wake after its lease
/// expired and another writer took it; renewal notices only at its next turn. So each
/// manifest of a source (snapshot, segment, scan root) is checked against the expiry this
/// handle last secured for the source's lease: past it, or after a renewal found the lease
/// taken, the write is refused (`Locked`) and the job fails before it writes anything under a
/// lease it may no longer hold. Sources written without a lease (a library caller, tests)
/// are not fenced.
#[derive(Debug, Clone, Default)]
pub(super) struct Fence {
    held: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Held>>>,
}

/// A lease this handle holds: until when, and under which epoch.
#[derive(Debug, Clone, Copy)]
struct Held {
    expires_at: DateTime<Utc>,
    epoch: u64,
}

impl Fence {
    fn set(&self, scope: &str, held: Option<(DateTime<Utc>, u64)>) {
        let mut map = self.held.lock().unwrap_or_else(|p| p.into_inner());
        match held {
            Some((expires_at, epoch)) => map.insert(scope.to_string(), Held { expires_at, epoch }),
            None => map.remove(scope),
        };
    }

    /// Mark a lease lost: every later manifest under it is refused until it is acquired again.
    fn lose(&self, scope: &str) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = held.get_mut(scope) {
            h.expires_at = DateTime::<Utc>::MIN_UTC;
        }
    }

    /// The epoch of the lease this handle holds on `scope`, if it holds one.
    pub(super) fn epoch(&self, scope: &str) -> Option<u64> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.get(scope).map(|h| h.epoch)
    }

    /// Refuse a manifest of a source whose lease this handle held and no longer holds.
    pub(super) fn check(&self, key: &str) -> Result<()> {
        let Some(source) = layout::source_of(key) else {
            return Ok(());
        };
        let scope = source_lease_scope(source);
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        match held.get(&scope) {
            Some(h) if h.expires_at <= Utc::now() => Err(Error::new(
                ErrorKind::Locked,
                format!(
                    "the lease {scope} is no longer held (expired or taken by another writer): {key} is not written"
                ),
            )
            .with_hint("the job is retried once the lease is renewed; a second writer may be running")),
            _ => Ok(()),
        }
    }
}

/// The content of one lease generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub holder: String,
    pub host: String,
    pub pid: u32,
    pub acquired_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub released: bool,
    /// What the holder reports about its work (the daemon's last job results), shown by
    /// `status`.
    #[serde(default)]
    pub note: Option<serde_json::Value>,
    /// The holder's kernel boot id (`/proc/sys/kernel/random/boot_id`): a pid means this
    /// process only on the machine, and since the boot, that wrote it. Absent in older records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// The holder process's start time (clock ticks since boot, `/proc/<pid>/stat` field 22):
    /// a pid reused by another process has another start time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_ticks: Option<u64>,
}

impl LeaseRecord {
    fn live_at(&self, now: DateTime<Utc>) -> bool {
        !self.released && self.expires_at > now && !self.holder_died_here()
    }

    /// A holder on this very machine and boot whose process is gone (or whose pid now
    /// belongs to a process started at another time) cannot renew: its lease is void at once,
    /// so a daemon restarted after a crash need not wait for expiry. Only the boot id says
    /// "this machine": host names repeat (containers, a fallback name), and a pid on another
    /// machine says nothing here; without a boot id the lease runs out on its own.
    fn holder_died_here(&self) -> bool {
        let Some(boot) = self.boot_id.as_deref() else {
            return false;
        };
        if Some(boot) != boot_id().as_deref() || self.pid == std::process::id() {
            return false;
        }
        match process_start_ticks(self.pid) {
            None => true,
            Some(started) => self.start_ticks.is_some_and(|recorded| recorded != started),
        }
    }
}

/// A held lease. Renew it before `ttl` passes; release it when done.
#[derive(Debug)]
pub struct Lease {
    scope: String,
    note: Option<serde_json::Value>,
    holder: String,
    acquired_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    /// The generation the acquisition created: higher than any generation an earlier holder
    /// wrote on the replicas it could reach. Change-log segments written under this lease carry
    /// it in their key, so the catalog can set aside a segment a superseded holder wrote.
    epoch: u64,
}

impl Lease {
    pub fn scope(&self) -> &str {
        &self.scope
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn expires_at(&self) -> DateTime<Utc> {
        self.expires_at
    }

    /// Set the note written with the next renewal.
    pub fn set_note(&mut self, note: serde_json::Value) {
        self.note = Some(note);
    }
}

/// This boot of this machine (Linux); `None` elsewhere.
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// When process `pid` started (clock ticks since boot); `None` when there is no such process.
fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

pub(super) fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

/// How a lease write chooses its generation and epoch.
#[derive(Debug, Clone, Copy)]
enum Epoch {
    /// A new holder: generations from `floor` up; the epoch is the highest one created.
    Acquire { floor: u64 },
    /// A renewal or release of a held lease: its epoch stays.
    Keep(u64),
}

/// Newest generation of a scope on one replica, with its record.
struct Current {
    generation: u64,
    record: Option<LeaseRecord>,
    /// Every generation listed (so pruning needs no second listing).
    generations: Vec<u64>,
}

impl Repository {
    /// Acquire the lease for `scope` (`repository`, or a source name).
    pub async fn acquire_lease(&self, scope: &str) -> Result<Lease> {
        let holder = uuid::Uuid::new_v4().to_string();
        // The epoch: above every generation any replica that answers holds, so with a write
        // quorum over half the replicas it exceeds every earlier holder's epoch.
        let mut floor = 0;
        for i in 0..self.replicas.replicas().len() {
            if let Ok(current) = self.current_lease(i, scope).await {
                floor = floor.max(current.generation + 1);
            }
        }
        self.write_lease(
            scope,
            &holder,
            Utc::now(),
            false,
            None,
            Epoch::Acquire { floor },
        )
        .await
    }

    /// Extend a held lease by another `lease_ttl`. Fails if it was lost (expired and taken).
    pub async fn renew_lease(&self, lease: &mut Lease) -> Result<()> {
        let renewed = self
            .write_lease(
                &lease.scope,
                &lease.holder,
                lease.acquired_at,
                false,
                lease.note.clone(),
                Epoch::Keep(lease.epoch),
            )
            .await?;
        lease.expires_at = renewed.expires_at;
        Ok(())
    }

    /// Run `work` while renewing `leases` every `lease_ttl / 3`, so a job longer than the ttl
    /// (a large snapshot, a first scan of a big bucket) keeps its leases and no second writer
    /// can take them meanwhile. `work` is never cancelled half way (a source may hold its
    /// database's write lock): a renewal that finds a lease lost to another holder, or the
    /// replicas unreachable past its expiry, is returned after `work` ends, and the caller
    /// must write nothing more under it.
    pub async fn renewing<F: std::future::Future>(
        &self,
        leases: &mut [&mut Lease],
        work: F,
    ) -> (F::Output, Result<()>) {
        let every = (self.lease_ttl / 3).max(std::time::Duration::from_millis(50));
        let mut lost: Result<()> = Ok(());
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return (out, lost),
                _ = tokio::time::sleep(every), if lost.is_ok() => {
                    for lease in leases.iter_mut() {
                        if let Err(e) = self.renew_during_work(lease).await {
                            lost = Err(e);
                        }
                    }
                }
            }
        }
    }

    /// One renewal while a job runs. Unreachable replicas are tolerated as between jobs (the
    /// lease stays this writer's until it expires, and the daemon pauses jobs once it has;
    /// writes meanwhile fail on the quorum anyway); a lease taken by another holder is an error.
    async fn renew_during_work(&self, lease: &mut Lease) -> Result<()> {
        match self.renew_lease(lease).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::Unavailable => {
                tracing::warn!(lease = %lease.scope, error = %e, expires_at = %lease.expires_at, "cannot renew the lease during a job; retrying");
                Ok(())
            }
            Err(e) => Err(Error::new(
                ErrorKind::Locked,
                format!("lost the lease {} during a job: {e}", lease.scope),
            )
            .with_hint(
                "another writer may have taken over; this process writes nothing more for it",
            )),
        }
    }

    /// Give the lease up so the next writer need not wait for expiry.
    pub async fn release_lease(&self, lease: Lease) -> Result<()> {
        self.write_lease(
            &lease.scope,
            &lease.holder,
            lease.acquired_at,
            true,
            lease.note,
            Epoch::Keep(lease.epoch),
        )
        .await
        .map(|_| ())
    }

    async fn write_lease(
        &self,
        scope: &str,
        holder: &str,
        acquired_at: DateTime<Utc>,
        released: bool,
        note: Option<serde_json::Value>,
        epoch: Epoch,
    ) -> Result<Lease> {
        let now = Utc::now();
        let ttl =
            chrono::Duration::from_std(self.lease_ttl).unwrap_or(chrono::Duration::seconds(60));
        let record = LeaseRecord {
            holder: holder.to_string(),
            host: host_name(),
            pid: std::process::id(),
            acquired_at,
            expires_at: if released { now } else { now + ttl },
            released,
            note: note.clone(),
            boot_id: boot_id(),
            start_ticks: process_start_ticks(std::process::id()),
        };
        let plaintext = serde_json::to_vec(&record).expect("lease serializes");
        let mut won = Vec::new();
        let mut unreachable = Vec::new();
        for (i, replica) in self.replicas.replicas().iter().enumerate() {
            let current = match self.current_lease(i, scope).await {
                Ok(c) => c,
                Err(e) => {
                    unreachable.push(format!("replica {}: {e}", replica.name()));
                    continue;
                }
            };
            if let Some(other) = current
                .record
                .as_ref()
                .filter(|r| r.holder != holder && r.live_at(now))
            {
                self.undo_leases(scope, &won).await;
                self.fence.lose(scope);
                return Err(held_error(scope, other));
            }
            let generation = match epoch {
                Epoch::Acquire { floor } => floor.max(current.generation + 1),
                Epoch::Keep(_) => current.generation + 1,
            };
            let key = layout::lease(scope, generation);
            let sealed = self.seal(Kind::Lease, &key, plaintext.clone()).await?;
            match replica.put_create(&key, sealed).await {
                Ok(super::replica::PutOutcome::Created) => {
                    won.push((i, generation));
                    self.prune_generations(i, scope, generation, &current.generations)
                        .await;
                }
                Ok(super::replica::PutOutcome::Existed) => {
                    // Someone else created this generation first.
                    let winner = self
                        .current_lease(i, scope)
                        .await
                        .ok()
                        .and_then(|c| c.record);
                    self.undo_leases(scope, &won).await;
                    self.fence.lose(scope);
                    return Err(match winner {
                        Some(w) => held_error(scope, &w),
                        None => Error::new(
                            ErrorKind::Locked,
                            format!("lease {scope}: lost a race with another writer"),
                        ),
                    });
                }
                Err(e) => unreachable.push(format!("replica {}: {e}", replica.name())),
            }
        }
        if won.len() < self.replicas.quorum() && !released {
            self.undo_leases(scope, &won).await;
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "lease {scope}: held on {} replicas, the write quorum is {}: {}",
                    won.len(),
                    self.replicas.quorum(),
                    unreachable.join("; ")
                ),
            ));
        }
        let epoch = match epoch {
            Epoch::Acquire { floor } => won.iter().map(|(_, g)| *g).max().unwrap_or(floor),
            Epoch::Keep(epoch) => epoch,
        };
        self.fence
            .set(scope, (!released).then_some((record.expires_at, epoch)));
        Ok(Lease {
            scope: scope.to_string(),
            note,
            holder: holder.to_string(),
            acquired_at,
            expires_at: record.expires_at,
            epoch,
        })
    }

    /// The newest lease record of `scope`, from the first replica that answers.
    pub async fn read_lease(&self, scope: &str) -> Result<Option<LeaseRecord>> {
        let mut last = None;
        for i in 0..self.replicas.replicas().len() {
            match self.current_lease(i, scope).await {
                Ok(current) => return Ok(current.record),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::other("no replicas")))
    }

    /// The newest lease generation for `scope` on replica `i`.
    async fn current_lease(&self, i: usize, scope: &str) -> Result<Current> {
        let replica = &self.replicas.replicas()[i];
        let metas = replica
            .list(&layout::lease_prefix(scope))
            .await
            .map_err(|e| Error::new(ErrorKind::Unavailable, e.to_string()))?;
        let generations: Vec<u64> = metas
            .iter()
            .filter_map(|m| layout::lease_generation(m.location.as_ref()))
            .collect();
        let Some((generation, key)) = metas
            .iter()
            .filter_map(|m| {
                layout::lease_generation(m.location.as_ref()).map(|g| (g, m.location.to_string()))
            })
            .max()
        else {
            return Ok(Current {
                generation: 0,
                record: None,
                generations,
            });
        };
        let bytes = replica
            .get(&key)
            .await
            .map_err(|e| Error::new(ErrorKind::Unavailable, e.to_string()))?;
        let record = match bytes {
            Some(bytes) => {
                let plaintext = crate::archive::open(&self.keys, Kind::Lease, &key, &bytes)
                    .map_err(|e| e.into_error(&key))?;
                Some(
                    serde_json::from_slice(&plaintext)
                        .map_err(|e| Error::corrupt(key.to_string()).with_source(e))?,
                )
            }
            None => None,
        };
        Ok(Current {
            generation,
            record,
            generations,
        })
    }

    /// Mark the generations this attempt created as released, so a failed acquisition does not
    /// block the rightful holder until expiry.
    async fn undo_leases(&self, scope: &str, won: &[(usize, u64)]) {
        for &(i, generation) in won {
            let key = layout::lease(scope, generation);
            let _ = self.replicas.replicas()[i].delete(&key).await;
        }
    }

    /// Keep the newest two generations; older ones are history nobody reads. `listed` are the
    /// generations seen just before `newest` was created (no second listing: every renewal
    /// costs requests on every replica).
    async fn prune_generations(&self, i: usize, scope: &str, newest: u64, listed: &[u64]) {
        let replica = &self.replicas.replicas()[i];
        for &g in listed.iter().filter(|&&g| g + 1 < newest) {
            let _ = replica.delete(&layout::lease(scope, g)).await;
        }
    }
}

fn held_error(scope: &str, holder: &LeaseRecord) -> Error {
    let remaining = (holder.expires_at - Utc::now()).num_seconds().max(0);
    Error::new(
        ErrorKind::Locked,
        format!(
            "lease {scope} is held by {} (host {}, pid {}) since {}; it expires at {} (in {remaining}s) unless renewed",
            holder.holder,
            holder.host,
            holder.pid,
            holder.acquired_at.to_rfc3339(),
            holder.expires_at.to_rfc3339()
        ),
    )
    .with_hint("stop the other timevault process, or wait for its lease to expire")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pid: u32, boot: Option<String>, start_ticks: Option<u64>) -> LeaseRecord {
        LeaseRecord {
            holder: "h".into(),
            host: "shared-name".into(),
            pid,
            acquired_at: Utc::now(),
            expires_at: Utc::now() + chrono::Duration::seconds(60),
            released: false,
            note: None,
            boot_id: boot,
            start_ticks,
        }
    }

    /// A pid that no process has now (pids are below 2^22 on Linux).
    const GONE: u32 = 4_194_303;

    #[test]
    fn a_holder_is_dead_only_on_this_boot_and_only_when_its_process_is() {
        let boot = boot_id();
        assert!(boot.is_some(), "Linux has a boot id");
        // Same boot, process gone: void at once.
        assert!(record(GONE, boot.clone(), Some(1)).holder_died_here());
        // Another machine (or boot) with the same host name: only expiry frees it.
        assert!(!record(GONE, Some("another-boot".into()), Some(1)).holder_died_here());
        // An older record without a boot id: only expiry frees it.
        assert!(!record(GONE, None, None).holder_died_here());
        // A live process of this boot, started when recorded: alive.
        let parent = std::os::unix::process::parent_id();
        let started = process_start_ticks(parent);
        assert!(started.is_some());
        assert!(!record(parent, boot.clone(), started).holder_died_here());
        // The same pid, but a process started at another time (the pid was reused): dead.
        assert!(record(parent, boot, started.map(|t| t + 1)).holder_died_here());
    }

    #[test]
    fn start_ticks_read_past_a_command_name_with_spaces() {
        assert!(process_start_ticks(std::process::id()).is_some());
        assert_eq!(process_start_ticks(GONE), None);
    }
}
