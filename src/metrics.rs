//! What the daemon knows about itself, as Prometheus text and as a health verdict.
//!
//! The daemon updates a [`Telemetry`] as jobs finish (no object store request is made for a
//! scrape: a scrape must stay cheap and must not fail because a replica is slow). Rendering is
//! hand-written text exposition: every value is a gauge or counter read at scrape time from
//! state the daemon already keeps, so a metrics registry (and a global recorder) would add
//! nothing. [`render`] and [`health`] are pure functions of a [`View`] and the time.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::SourceKind;
use crate::daemon::jobs::{JobOutcome, JobTotals, Jobs};
use crate::drill::DrillRecord;
use crate::repo::{Replica, ReplicaHealth};

/// Per source: the restorable window's edges and the newest snapshot (or scan).
#[derive(Debug, Clone, PartialEq)]
pub struct SourceGauges {
    pub kind: SourceKind,
    pub oldest: Option<DateTime<Utc>>,
    pub newest: Option<DateTime<Utc>>,
    pub last_snapshot: Option<DateTime<Utc>>,
    /// PostgreSQL: whether capture streams (`Some(true)`) or polls (`Some(false)`); `None`
    /// before the first pass and for other kinds.
    pub streaming: Option<bool>,
    /// PostgreSQL with `tenant_keys`: row changes of tenant tables whose tenant capture could
    /// not find, kept under the repository key (`None`: none counted yet).
    pub tenant_unresolved: Option<u64>,
}

/// Thresholds beyond which `/healthz` fails.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub max_capture_lag: Duration,
    pub max_snapshot_age: Duration,
}

/// Per source: the continuity losses the daemon detected (a hole in the change log).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Continuity {
    /// Losses since the daemon started.
    pub losses: u64,
    pub last_reason: Option<String>,
    pub last_at: Option<DateTime<Utc>>,
    /// When the new chain after the last loss started; `None` while it has not.
    pub recovered_at: Option<DateTime<Utc>>,
}

impl Continuity {
    /// Unhealthy from the loss until `hold` after the new chain started, so that a monitor
    /// polling less often than the daemon heals still sees it (the counter keeps it forever).
    fn alarm(&self, now: DateTime<Utc>, hold: Duration) -> Option<String> {
        let reason = self.last_reason.as_deref()?;
        match self.recovered_at {
            None => Some(format!("continuity lost: {reason}; no new chain yet")),
            Some(at) if age(now, at) <= hold.as_secs_f64() => Some(format!(
                "continuity lost at {}: {reason}; a new chain started at {}",
                self.last_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
                at.to_rfc3339()
            )),
            Some(_) => None,
        }
    }
}

/// Everything a scrape shows, copied out of the live state.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub sources: BTreeMap<String, SourceGauges>,
    pub continuity: BTreeMap<String, Continuity>,
    pub drills: BTreeMap<String, DrillRecord>,
    /// (name, region, health)
    pub replicas: Vec<(String, String, ReplicaHealth)>,
    pub jobs: Vec<(JobOutcome, JobTotals)>,
    /// Tenants with a KEK of their own that this process used: `None` when it was Enabled at
    /// the last check, else why it is not usable.
    pub tenant_keks: BTreeMap<String, Option<String>>,
    /// What this daemon does not do, by design, and why (`drill: needs the restore role`):
    /// `/healthz` prints them under `ok`; they never make it unhealthy.
    pub notes: Vec<String>,
}

/// Live state shared by the daemon's tasks and the HTTP endpoint.
pub struct Telemetry {
    jobs: Jobs,
    sources: Mutex<BTreeMap<String, SourceGauges>>,
    continuity: Mutex<BTreeMap<String, Continuity>>,
    drills: Mutex<BTreeMap<String, DrillRecord>>,
    tenant_keks: Mutex<BTreeMap<String, Option<String>>>,
    notes: Mutex<Vec<String>>,
    replicas: Vec<Arc<Replica>>,
    pub limits: Limits,
}

impl Telemetry {
    pub fn new(replicas: Vec<Arc<Replica>>, limits: Limits) -> Telemetry {
        Telemetry {
            jobs: Jobs::default(),
            sources: Mutex::default(),
            continuity: Mutex::default(),
            drills: Mutex::default(),
            tenant_keks: Mutex::default(),
            notes: Mutex::default(),
            replicas,
            limits,
        }
    }

    pub fn jobs(&self) -> &Jobs {
        &self.jobs
    }

    /// Replace a source's gauges (after reading its catalog); the capture method the source's
    /// task reported stays.
    pub fn set_source(&self, name: &str, mut gauges: SourceGauges) {
        let mut sources = self.sources.lock().expect("sources lock");
        if let Some(old) = sources.get(name) {
            gauges.streaming = gauges.streaming.or(old.streaming);
            gauges.tenant_unresolved = gauges.tenant_unresolved.or(old.tenant_unresolved);
        }
        sources.insert(name.to_string(), gauges);
    }

    /// How the source's last pass read its slot (PostgreSQL).
    pub fn note_capture_method(&self, name: &str, streaming: bool) {
        if let Some(g) = self.sources.lock().expect("sources lock").get_mut(name) {
            g.streaming = Some(streaming);
        }
    }

    /// The row changes of tenant tables this run kept under the repository key because their
    /// tenant was not found (counted, so a later `tenant forget` is never silently partial).
    pub fn note_tenant_unresolved(&self, name: &str, total: u64) {
        if let Some(g) = self.sources.lock().expect("sources lock").get_mut(name) {
            g.tenant_unresolved = Some(total);
        }
    }

    /// A job made `newest` restorable, or took a snapshot (or scan) at `snapshot`.
    pub fn note_progress(
        &self,
        name: &str,
        newest: Option<DateTime<Utc>>,
        snapshot: Option<DateTime<Utc>>,
    ) {
        let mut sources = self.sources.lock().expect("sources lock");
        let Some(g) = sources.get_mut(name) else {
            return;
        };
        let newest = newest.max(snapshot);
        g.newest = g.newest.max(newest);
        g.oldest = g.oldest.or(newest);
        g.last_snapshot = g.last_snapshot.max(snapshot);
    }

    /// The source's change log has a hole: `/healthz` fails and the counter grows.
    pub fn continuity_lost(&self, name: &str, reason: &str, at: DateTime<Utc>) {
        let mut all = self.continuity.lock().expect("continuity lock");
        let c = all.entry(name.to_string()).or_default();
        c.losses += 1;
        c.last_reason = Some(reason.to_string());
        c.last_at = Some(at);
        c.recovered_at = None;
    }

    /// A new chain started after a loss.
    pub fn continuity_recovered(&self, name: &str, at: DateTime<Utc>) {
        let mut all = self.continuity.lock().expect("continuity lock");
        if let Some(c) = all.get_mut(name).filter(|c| c.recovered_at.is_none()) {
            c.recovered_at = Some(at);
        }
    }

    /// The source's continuity record, if it ever lost continuity in this run.
    pub fn continuity(&self, name: &str) -> Option<Continuity> {
        self.continuity
            .lock()
            .expect("continuity lock")
            .get(name)
            .cloned()
    }

    pub fn set_drill(&self, record: DrillRecord) {
        self.drills
            .lock()
            .expect("drills lock")
            .insert(record.source.clone(), record);
    }

    pub fn view(&self) -> View {
        View {
            sources: self.sources.lock().expect("sources lock").clone(),
            continuity: self.continuity.lock().expect("continuity lock").clone(),
            drills: self.drills.lock().expect("drills lock").clone(),
            replicas: self
                .replicas
                .iter()
                .map(|r| (r.name().to_string(), r.region().to_string(), r.health()))
                .collect(),
            jobs: self.jobs.snapshot(),
            tenant_keks: self.tenant_keks.lock().expect("tenant keks lock").clone(),
            notes: self.notes.lock().expect("notes lock").clone(),
        }
    }

    /// Something this daemon does not do by design (see [`View::notes`]).
    pub fn note(&self, line: impl Into<String>) {
        self.notes.lock().expect("notes lock").push(line.into());
    }

    /// What the repository last saw of the tenants' own KEKs (`Repository::tenant_kek_states`).
    pub fn set_tenant_keks(&self, states: BTreeMap<String, Option<String>>) {
        *self.tenant_keks.lock().expect("tenant keks lock") = states;
    }
}

/// A replica whose most recent request failed.
pub fn replica_failing(h: &ReplicaHealth) -> bool {
    h.last_error_at
        .is_some_and(|e| h.last_ok.is_none_or(|ok| e > ok))
}

fn seconds(t: DateTime<Utc>) -> f64 {
    t.timestamp_micros() as f64 / 1e6
}

fn age(now: DateTime<Utc>, t: DateTime<Utc>) -> f64 {
    ((now - t).num_milliseconds() as f64 / 1000.0).max(0.0)
}

/// Why the daemon is unhealthy; empty when healthy.
pub fn health(view: &View, limits: &Limits, now: DateTime<Utc>) -> Vec<String> {
    let mut reasons = Vec::new();
    for (name, c) in &view.continuity {
        if let Some(alarm) = c.alarm(now, limits.max_capture_lag) {
            reasons.push(format!("source {name}: {alarm}"));
        }
    }
    for (name, s) in &view.sources {
        let Some(newest) = s.newest else {
            reasons.push(format!("source {name}: nothing restorable yet"));
            continue;
        };
        let lag = age(now, newest);
        if !s.kind.captures_by_scan() && lag > limits.max_capture_lag.as_secs_f64() {
            reasons.push(format!(
                "source {name}: capture lag {lag:.0}s exceeds max_capture_lag {}s",
                limits.max_capture_lag.as_secs()
            ));
        }
        if let Some(snap) = s.last_snapshot {
            let a = age(now, snap);
            if a > limits.max_snapshot_age.as_secs_f64() {
                reasons.push(format!(
                    "source {name}: last snapshot is {a:.0}s old, more than max_snapshot_age {}s",
                    limits.max_snapshot_age.as_secs()
                ));
            }
        }
    }
    for (name, _, h) in &view.replicas {
        if replica_failing(h) {
            reasons.push(format!(
                "replica {name} failing: {}",
                h.last_error.as_deref().unwrap_or("error")
            ));
        }
    }
    for (outcome, _) in &view.jobs {
        if outcome.job == "schema-image" && !outcome.ok {
            reasons.push(format!(
                "source {}: schema image failing (last try {}): {}; a restore after the schema change uses the previous image",
                outcome.source,
                outcome.finished_at.to_rfc3339(),
                outcome.error.as_deref().unwrap_or("?")
            ));
        }
    }
    for (tenant, problem) in &view.tenant_keks {
        if let Some(why) = problem {
            reasons.push(format!(
                "tenant {tenant}: its key-encryption key is not usable ({why}); its new data is sealed under the key this daemon holds, which a restart cannot unwrap"
            ));
        }
    }
    for (name, d) in &view.drills {
        if !d.ok {
            reasons.push(format!(
                "source {name}: last restore drill FAILED: {}",
                d.error.as_deref().unwrap_or("?")
            ));
        }
    }
    reasons
}

fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes one metric family at a time.
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", label(v)))
            .collect();
        let _ = writeln!(self.out, "{name}{{{}}} {value}", labels.join(","));
    }
}

/// Prometheus text exposition (version 0.0.4) of `view` at `now`.
pub fn render(view: &View, limits: &Limits, now: DateTime<Utc>) -> String {
    let mut x = Exposition { out: String::new() };
    render_sources(&mut x, view, now);
    render_continuity(&mut x, view, limits, now);
    render_jobs(&mut x, view);
    render_replicas(&mut x, view, now);
    render_drills(&mut x, view);
    render_kms(&mut x, &crate::keys::telemetry::snapshot());
    render_tenant_keks(&mut x, view);
    x.family("timevault_healthy", "gauge", "1 when /healthz answers 200.");
    let healthy = health(view, limits, now).is_empty();
    let _ = writeln!(x.out, "timevault_healthy {}", u8::from(healthy));
    x.out
}

fn render_tenant_keks(x: &mut Exposition, view: &View) {
    let name = "timevault_tenant_kek_usable";
    x.family(
        name,
        "gauge",
        "1 when the tenant's own key-encryption key ([tenancy.keys]) was Enabled at the last check, 0 when not.",
    );
    for (tenant, problem) in &view.tenant_keks {
        x.sample(
            name,
            &[("tenant", tenant)],
            f64::from(u8::from(problem.is_none())),
        );
    }
}

fn render_sources(x: &mut Exposition, view: &View, now: DateTime<Utc>) {
    type Pick = fn(&SourceGauges, DateTime<Utc>) -> Option<f64>;
    let families: [(&str, &str, Pick); 5] = [
        (
            "timevault_window_oldest_timestamp_seconds",
            "Oldest restorable instant (Unix seconds).",
            |s, _| s.oldest.map(seconds),
        ),
        (
            "timevault_window_newest_timestamp_seconds",
            "Newest restorable instant (Unix seconds).",
            |s, _| s.newest.map(seconds),
        ),
        (
            "timevault_capture_lag_seconds",
            "Seconds since the newest restorable instant.",
            |s, now| s.newest.map(|t| age(now, t)),
        ),
        (
            "timevault_last_snapshot_timestamp_seconds",
            "Newest snapshot or blob scan (Unix seconds).",
            |s, _| s.last_snapshot.map(seconds),
        ),
        (
            "timevault_last_snapshot_age_seconds",
            "Seconds since the newest snapshot or blob scan.",
            |s, now| s.last_snapshot.map(|t| age(now, t)),
        ),
    ];
    for (name, help, pick) in families {
        x.family(name, "gauge", help);
        for (source, s) in &view.sources {
            if let Some(v) = pick(s, now) {
                x.sample(name, &[("source", source), ("kind", s.kind.as_str())], v);
            }
        }
    }
    type Reported = fn(&SourceGauges) -> Option<f64>;
    let reported: [(&str, &str, &str, Reported); 2] = [
        (
            "timevault_capture_streaming",
            "gauge",
            "PostgreSQL: 1 when capture streams over a replication connection, 0 when it polls over SQL.",
            |s| s.streaming.map(|on| f64::from(u8::from(on))),
        ),
        (
            "timevault_capture_tenant_unresolved_total",
            "counter",
            "PostgreSQL with tenant_keys: row changes of tenant tables whose tenant was not found (parent row gone, value not sent), kept under the repository key; tenant forget cannot erase them.",
            |s| s.tenant_unresolved.map(|n| n as f64),
        ),
    ];
    for (name, kind, help, pick) in reported {
        x.family(name, kind, help);
        for (source, s) in &view.sources {
            if let Some(v) = pick(s) {
                let labels = [("source", source.as_str()), ("kind", s.kind.as_str())];
                x.sample(name, &labels, v);
            }
        }
    }
}

fn render_continuity(x: &mut Exposition, view: &View, limits: &Limits, now: DateTime<Utc>) {
    let name = "timevault_continuity_lost_total";
    x.family(
        name,
        "counter",
        "Holes detected in a source's change log since the daemon started (a new chain starts at once).",
    );
    for source in view.sources.keys() {
        let n = view.continuity.get(source).map_or(0, |c| c.losses);
        x.sample(name, &[("source", source)], n as f64);
    }
    let name = "timevault_continuity_lost";
    x.family(
        name,
        "gauge",
        "1 from a continuity loss until max_capture_lag after its new chain started.",
    );
    for source in view.sources.keys() {
        let alarm = view
            .continuity
            .get(source)
            .and_then(|c| c.alarm(now, limits.max_capture_lag));
        x.sample(
            name,
            &[("source", source)],
            f64::from(u8::from(alarm.is_some())),
        );
    }
}

fn render_jobs(x: &mut Exposition, view: &View) {
    let name = "timevault_job_last_duration_seconds";
    x.family(name, "gauge", "Wall time of the last run of each job.");
    for (j, _) in &view.jobs {
        x.sample(name, &[("source", &j.source), ("job", &j.job)], j.seconds);
    }
    let name = "timevault_job_last_success";
    x.family(
        name,
        "gauge",
        "1 when the last run of the job succeeded, else 0.",
    );
    for (j, _) in &view.jobs {
        x.sample(
            name,
            &[("source", &j.source), ("job", &j.job)],
            f64::from(u8::from(j.ok)),
        );
    }
    let name = "timevault_job_last_start_timestamp_seconds";
    x.family(
        name,
        "gauge",
        "When the last run of the job started (Unix seconds).",
    );
    for (j, _) in &view.jobs {
        x.sample(
            name,
            &[("source", &j.source), ("job", &j.job)],
            seconds(j.started_at),
        );
    }
    let name = "timevault_jobs_total";
    x.family(
        name,
        "counter",
        "Job runs since the daemon started, by outcome.",
    );
    for (j, t) in &view.jobs {
        for (outcome, n) in [("ok", t.ok), ("error", t.failed)] {
            x.sample(
                name,
                &[("source", &j.source), ("job", &j.job), ("outcome", outcome)],
                n as f64,
            );
        }
    }
}

fn render_replicas(x: &mut Exposition, view: &View, now: DateTime<Utc>) {
    type Pick = fn(&ReplicaHealth, DateTime<Utc>) -> f64;
    let families: [(&str, &str, &str, Pick); 8] = [
        (
            "timevault_replica_bytes_written_total",
            "counter",
            "Bytes written to the replica.",
            |h, _| h.bytes_written as f64,
        ),
        (
            "timevault_replica_bytes_read_total",
            "counter",
            "Bytes read from the replica.",
            |h, _| h.bytes_read as f64,
        ),
        (
            "timevault_replica_requests_total",
            "counter",
            "Requests sent to the replica.",
            |h, _| h.requests as f64,
        ),
        (
            "timevault_replica_errors_total",
            "counter",
            "Failed requests (each retry counts).",
            |h, _| h.errors as f64,
        ),
        (
            "timevault_replica_bad_objects_total",
            "counter",
            "Objects that failed authentication.",
            |h, _| h.bad_objects as f64,
        ),
        (
            "timevault_replica_up",
            "gauge",
            "0 when the replica's most recent request failed.",
            |h, _| f64::from(u8::from(!replica_failing(h))),
        ),
        (
            "timevault_replica_behind_seconds",
            "gauge",
            "0 while the replica holds every acknowledged write; else seconds since the first write it missed, until a catch-up finds it complete.",
            |h, now| h.behind_since.map_or(0.0, |t| age(now, t)),
        ),
        (
            "timevault_replica_missed_writes_total",
            "counter",
            "Writes acknowledged by the write quorum without this replica.",
            |h, _| h.missed_writes as f64,
        ),
    ];
    for (name, kind, help, pick) in families {
        x.family(name, kind, help);
        for (replica, region, h) in &view.replicas {
            x.sample(
                name,
                &[("replica", replica), ("region", region)],
                pick(h, now),
            );
        }
    }
}

/// Calls to key services (KMS) since the process started.
fn render_kms(x: &mut Exposition, series: &crate::keys::telemetry::Series) {
    type Pick = fn(&crate::keys::telemetry::CallStats) -> f64;
    let families: [(&str, &str, &str, Pick); 4] = [
        (
            "timevault_kms_requests_total",
            "counter",
            "Requests to a key service, per KEK and operation.",
            |s| s.requests as f64,
        ),
        (
            "timevault_kms_request_errors_total",
            "counter",
            "Requests to a key service that failed.",
            |s| s.errors as f64,
        ),
        (
            "timevault_kms_request_seconds_sum",
            "counter",
            "Seconds spent in key service requests.",
            |s| s.seconds,
        ),
        (
            "timevault_kms_request_seconds_count",
            "counter",
            "Key service requests timed (as requests_total).",
            |s| s.requests as f64,
        ),
    ];
    for (name, kind, help, pick) in families {
        x.family(name, kind, help);
        for ((provider, kek, operation), stats) in series {
            x.sample(
                name,
                &[
                    ("provider", provider),
                    ("kek", kek),
                    ("operation", operation),
                ],
                pick(stats),
            );
        }
    }
}

fn render_drills(x: &mut Exposition, view: &View) {
    type Pick = fn(&DrillRecord) -> f64;
    let families: [(&str, &str, Pick); 5] = [
        (
            "timevault_drill_success",
            "1 when the newest restore drill passed, else 0.",
            |d| f64::from(u8::from(d.ok)),
        ),
        (
            "timevault_drill_timestamp_seconds",
            "When the newest restore drill finished (Unix seconds).",
            |d| seconds(d.finished_at),
        ),
        (
            "timevault_drill_restore_seconds",
            "Restore wall time of the newest drill, all points (measured RTO).",
            |d| d.rto_seconds(),
        ),
        (
            "timevault_drill_rows_checked",
            "Rows compared with backup-time checksums by the newest drill.",
            |d| d.checks.iter().map(|c| c.rows_checked).sum::<u64>() as f64,
        ),
        (
            "timevault_drill_objects_checked",
            "Blobs compared with backup-time SHA-256 by the newest drill.",
            |d| d.checks.iter().map(|c| c.objects_checked).sum::<u64>() as f64,
        ),
    ];
    for (name, help, pick) in families {
        x.family(name, "gauge", help);
        for (source, d) in &view.drills {
            x.sample(name, &[("source", source)], pick(d));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    const LIMITS: Limits = Limits {
        max_capture_lag: Duration::from_secs(300),
        max_snapshot_age: Duration::from_secs(26 * 3600),
    };

    fn view(newest: &str, snapshot: &str) -> View {
        let mut v = View::default();
        v.sources.insert(
            "app".into(),
            SourceGauges {
                kind: SourceKind::Sqlite,
                oldest: Some(t(snapshot)),
                newest: Some(t(newest)),
                last_snapshot: Some(t(snapshot)),
                streaming: None,
                tenant_unresolved: None,
            },
        );
        v.replicas.push((
            "eu-west".into(),
            "westeurope".into(),
            ReplicaHealth::default(),
        ));
        v
    }

    #[test]
    fn healthy_within_limits_and_reasons_beyond_them() {
        let now = t("2026-11-22T12:00:00Z");
        assert!(health(
            &view("2026-11-22T11:59:00Z", "2026-11-22T02:00:00Z"),
            &LIMITS,
            now
        )
        .is_empty());
        let reasons = health(
            &view("2026-11-22T11:00:00Z", "2026-11-20T02:00:00Z"),
            &LIMITS,
            now,
        );
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(reasons[0].contains("capture lag 3600s"), "{reasons:?}");
        assert!(reasons[1].contains("max_snapshot_age"), "{reasons:?}");
    }

    #[test]
    fn a_continuity_loss_is_unhealthy_until_max_capture_lag_after_its_new_chain() {
        let mut v = view("2026-11-22T11:59:59Z", "2026-11-22T02:00:00Z");
        let lost = Continuity {
            losses: 1,
            last_reason: Some("the WAL disappeared".into()),
            last_at: Some(t("2026-11-22T11:59:00Z")),
            recovered_at: None,
        };
        v.continuity.insert("app".into(), lost.clone());
        let now = t("2026-11-22T12:00:00Z");
        let reasons = health(&v, &LIMITS, now);
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(reasons[0].contains("continuity lost: the WAL disappeared; no new chain yet"));
        let text = render(&v, &LIMITS, now);
        assert!(text.contains("timevault_continuity_lost_total{source=\"app\"} 1\n"));
        assert!(text.contains("timevault_continuity_lost{source=\"app\"} 1\n"));
        assert!(text.contains("timevault_healthy 0\n"));
        // Recovered a minute ago: still reported; past max_capture_lag: healthy, counted.
        v.continuity.get_mut("app").unwrap().recovered_at = Some(t("2026-11-22T11:59:01Z"));
        assert!(health(&v, &LIMITS, now)[0].contains("a new chain started at"));
        let later = t("2026-11-22T12:10:00Z");
        let mut fresh = view("2026-11-22T12:09:59Z", "2026-11-22T02:00:00Z");
        fresh.continuity = v.continuity.clone();
        assert!(health(&fresh, &LIMITS, later).is_empty());
        let text = render(&fresh, &LIMITS, later);
        assert!(text.contains("timevault_continuity_lost_total{source=\"app\"} 1\n"));
        assert!(text.contains("timevault_continuity_lost{source=\"app\"} 0\n"));
    }

    #[test]
    fn a_failing_replica_is_unhealthy_until_it_succeeds_again() {
        let now = t("2026-11-22T12:00:00Z");
        let mut v = view("2026-11-22T11:59:59Z", "2026-11-22T02:00:00Z");
        v.replicas[0].2.last_ok = Some(t("2026-11-22T11:00:00Z"));
        v.replicas[0].2.last_error_at = Some(t("2026-11-22T11:30:00Z"));
        v.replicas[0].2.last_error = Some("connection refused".into());
        assert!(health(&v, &LIMITS, now)[0].contains("replica eu-west failing: connection refused"));
        v.replicas[0].2.last_ok = Some(t("2026-11-22T11:45:00Z"));
        assert!(health(&v, &LIMITS, now).is_empty());
    }

    #[test]
    fn a_lagging_replica_shows_how_long_since_its_first_missed_write() {
        let now = t("2026-11-22T12:00:00Z");
        let mut v = view("2026-11-22T11:59:59Z", "2026-11-22T02:00:00Z");
        let text = render(&v, &LIMITS, now);
        let labels = "{replica=\"eu-west\",region=\"westeurope\"}";
        assert!(
            text.contains(&format!("timevault_replica_behind_seconds{labels} 0\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "timevault_replica_missed_writes_total{labels} 0\n"
            )),
            "{text}"
        );
        v.replicas[0].2.behind_since = Some(t("2026-11-22T11:58:30Z"));
        v.replicas[0].2.missed_writes = 7;
        let text = render(&v, &LIMITS, now);
        assert!(
            text.contains(&format!("timevault_replica_behind_seconds{labels} 90\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "timevault_replica_missed_writes_total{labels} 7\n"
            )),
            "{text}"
        );
        assert!(text.contains("# TYPE timevault_replica_missed_writes_total counter\n"));
    }

    #[test]
    fn a_failed_drill_is_unhealthy_and_shown() {
        let now = t("2026-11-22T12:00:00Z");
        let mut v = view("2026-11-22T11:59:59Z", "2026-11-22T02:00:00Z");
        v.drills.insert(
            "app".into(),
            DrillRecord {
                source: "app".into(),
                kind: "sqlite".into(),
                started_at: t("2026-11-22T03:30:00Z"),
                finished_at: t("2026-11-22T03:30:02Z"),
                ok: false,
                error: Some("monthly point: cannot read chunks/ab/abcd".into()),
                checks: Vec::new(),
            },
        );
        let reasons = health(&v, &LIMITS, now);
        assert_eq!(
            reasons,
            ["source app: last restore drill FAILED: monthly point: cannot read chunks/ab/abcd"]
        );
        let text = render(&v, &LIMITS, now);
        assert!(
            text.contains("timevault_drill_success{source=\"app\"} 0\n"),
            "{text}"
        );
        assert!(text.ends_with("timevault_healthy 0\n"), "{text}");
    }

    #[test]
    fn the_capture_method_is_a_gauge_once_reported() {
        let now = t("2026-11-21T12:00:00Z");
        let mut v = view("2026-11-21T11:59:58Z", "2026-11-21T02:00:00Z");
        let text = render(&v, &LIMITS, now);
        assert!(!text.contains("timevault_capture_streaming{"), "{text}");
        v.sources.get_mut("app").unwrap().streaming = Some(true);
        let text = render(&v, &LIMITS, now);
        assert!(
            text.contains("timevault_capture_streaming{source=\"app\",kind=\"sqlite\"} 1"),
            "{text}"
        );
        v.sources.get_mut("app").unwrap().streaming = Some(false);
        let text = render(&v, &LIMITS, now);
        assert!(
            text.contains("timevault_capture_streaming{source=\"app\",kind=\"sqlite\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn a_tenant_kek_not_usable_fails_health_and_shows_in_the_gauge() {
        let now = t("2026-11-21T12:00:00Z");
        let mut v = view("2026-11-21T11:59:58Z", "2026-11-21T02:00:00Z");
        v.tenant_keks.insert("1001".into(), None);
        assert!(health(&v, &LIMITS, now).is_empty());
        let text = render(&v, &LIMITS, now);
        assert!(
            text.contains("timevault_tenant_kek_usable{tenant=\"1001\"} 1"),
            "{text}"
        );
        v.tenant_keks.insert(
            "1001".into(),
            Some("aws-kms:k: key state is Disabled".into()),
        );
        let reasons = health(&v, &LIMITS, now);
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(reasons[0].starts_with("tenant 1001: its key-encryption key is not usable"));
        assert!(reasons[0].contains("Disabled"));
        let text = render(&v, &LIMITS, now);
        assert!(
            text.contains("timevault_tenant_kek_usable{tenant=\"1001\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn unresolved_tenant_rows_are_counted_once_reported() {
        let now = t("2026-11-21T12:00:00Z");
        let mut v = view("2026-11-21T11:59:58Z", "2026-11-21T02:00:00Z");
        let text = render(&v, &LIMITS, now);
        assert!(
            !text.contains("timevault_capture_tenant_unresolved_total{"),
            "{text}"
        );
        v.sources.get_mut("app").unwrap().tenant_unresolved = Some(3);
        let text = render(&v, &LIMITS, now);
        assert!(
            text.contains(
                "timevault_capture_tenant_unresolved_total{source=\"app\",kind=\"sqlite\"} 3"
            ),
            "{text}"
        );
    }

    #[test]
    fn renders_labelled_samples() {
        let now = t("2026-11-22T12:00:00Z");
        let text = render(
            &view("2026-11-22T11:59:58Z", "2026-11-22T02:00:00Z"),
            &LIMITS,
            now,
        );
        assert!(
            text.contains("# TYPE timevault_capture_lag_seconds gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("timevault_capture_lag_seconds{source=\"app\",kind=\"sqlite\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("timevault_replica_up{replica=\"eu-west\",region=\"westeurope\"} 1\n"),
            "{text}"
        );
        assert!(text.ends_with("timevault_healthy 1\n"), "{text}");
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
