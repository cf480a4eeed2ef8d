//! Capture lag under pgbench at a fixed rate, with the daemon running as in production.
//!
//! **Lag of one transaction** = the instant timevault acknowledged it minus its commit
//! timestamp. Acknowledged means the slot's `confirmed_flush_lsn` reached the transaction's
//! commit end LSN: timevault advances the slot only after the segment holding the transaction
//! is durable on the write quorum, so this is an upper bound on "durable on the quorum minus
//! commit", too high by at most one probe interval ([`PROBE`]) plus one slot advance.
//!
//! The measurement is independent of the capture code: the daemon (`timevault::daemon::run`,
//! `schedule.capture_interval` and the source's `capture_method` as the caller asks) runs
//! untouched; a probe connection reads
//! `pg_replication_slots` every [`PROBE`]; afterwards every transaction's commit timestamp and
//! end LSN are read back from the segments in the repository (their `C` records), so every
//! transaction pgbench committed is counted, not a sample. Both clocks are this host's.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgConnection;
use sqlx::Connection;
use timevault::catalog::SourceCatalog;
use timevault::changelog::SegmentManifest;
use timevault::config::Config;
use timevault::daemon::{self, DaemonOptions};
use timevault::repo::Repository;
use timevault::source::postgres::changes::{parse_lines, Record};
use timevault::source::postgres::Lsn;

/// How often the probe reads the slot's confirmed position.
pub const PROBE: Duration = Duration::from_millis(25);

/// How one lag run's daemon captures.
#[derive(Debug, Clone, Copy)]
pub struct Capture {
    /// `schedule.capture_interval`.
    pub interval: &'static str,
    /// The source's `capture_method`: `streaming` or `polling`.
    pub method: &'static str,
}

/// One lag run: pgbench's rate and duration, and how the daemon captures.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub rate: u32,
    pub seconds: u64,
    pub capture: Capture,
}

/// What one lag run measured.
pub struct LagFigures {
    pub capture: Capture,
    pub rate: u32,
    pub seconds: u64,
    /// pgbench's own summary lines (tps, transactions processed, latency).
    pub pgbench: Vec<String>,
    /// Lag of every data transaction committed while pgbench ran, sorted (seconds).
    pub lags: Vec<f64>,
    /// Row changes (inserts, updates, deletes) in those transactions.
    pub changes: u64,
    /// Transactions found in segments that the probe never saw acknowledged during the run.
    pub unacknowledged: usize,
    /// Daemon jobs that failed during the run.
    pub errors: u64,
    /// Seconds between successive acknowledgements while pgbench ran (one per capture pass
    /// that shipped something), sorted.
    pub gaps: Vec<f64>,
    /// WAL the server wrote while pgbench ran, bytes.
    pub wal_bytes: i64,
    /// WAL between the slot's restart point and its confirmed position (what every peek and
    /// every advance decodes again), mean and max over the probe's samples, bytes.
    pub redecode_mean: f64,
    pub redecode_max: i64,
    /// Transaction data the server's logical decoding decoded for the slot while pgbench ran
    /// (`pg_stat_replication_slots.total_bytes`; a peek that decodes a transaction again
    /// counts it again), bytes.
    pub decoded_bytes: i64,
    /// CPU time (user + system) of this process (the daemon and the probe) while pgbench ran.
    pub cpu_seconds: f64,
    /// Bytes the server processes serving timevault (its SQL connections and its walsender)
    /// read from files while pgbench ran (`rchar` in /proc/<pid>/io): the WAL that logical
    /// decoding read for it, plus a little catalog. A process that ended during the run is
    /// not counted.
    pub server_read_bytes: i64,
}

impl LagFigures {
    /// The `q` quantile (nearest rank) of the lags.
    pub fn quantile(&self, q: f64) -> f64 {
        quantile(&self.lags, q)
    }
}

/// The `q` quantile (nearest rank) of sorted values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// What the probe saw: acknowledgements, and the re-decoded WAL at every sample.
struct Probed {
    acks: Vec<(DateTime<Utc>, Lsn)>,
    redecode: Vec<i64>,
}

/// What the slot's logical decoding has decoded so far (`pg_stat_replication_slots`).
async fn decoded(url: &str, slot: &str) -> i64 {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    let bytes: Option<i64> = sqlx::query_scalar(
        "SELECT total_bytes FROM pg_stat_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(&mut conn)
    .await
    .expect("slot statistics");
    let _ = conn.close().await;
    bytes.unwrap_or(0)
}

/// `rchar` of every server process serving timevault now: its SQL connections
/// (`application_name = 'timevault'`) and the process holding `slot` (the walsender).
async fn server_reads(url: &str, slot: &str) -> std::collections::BTreeMap<i32, i64> {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    let pids: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'timevault' \
         UNION SELECT active_pid FROM pg_replication_slots \
         WHERE slot_name = $1 AND active_pid IS NOT NULL",
    )
    .bind(slot)
    .fetch_all(&mut conn)
    .await
    .expect("server processes");
    let _ = conn.close().await;
    pids.into_iter()
        .filter_map(|pid| {
            let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
            let rchar = io
                .lines()
                .find_map(|l| l.strip_prefix("rchar: "))?
                .trim()
                .parse()
                .ok()?;
            Some((pid, rchar))
        })
        .collect()
}

/// This process's CPU time so far (user + system), seconds.
pub fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command (which may hold spaces) in parentheses: utime and stime are
    // the 12th and 13th, in clock ticks (100 per second on Linux).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

async fn wal_lsn(url: &str) -> String {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    let lsn: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&mut conn)
        .await
        .expect("wal lsn");
    let _ = conn.close().await;
    lsn
}

/// A transaction read back from the change log.
struct Committed {
    commit: DateTime<Utc>,
    end_lsn: Lsn,
    changes: u64,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// The daemon's config: the benchmark's repository (`dir`), one postgres source.
fn daemon_config(
    dir: &Path,
    repository_text: &str,
    source: &str,
    url: &str,
    capture: Capture,
) -> Config {
    let text = format!(
        "{repository_text}\n[[sources]]\nname = \"{source}\"\nkind = \"postgres\"\nurl = \"{url}\"\n\
         options = {{ capture_method = \"{}\" }}\n\
         [schedule]\ncapture_interval = \"{}\"\n\
         [daemon]\nlisten = \"127.0.0.1:{}\"\n",
        capture.method,
        capture.interval,
        free_port()
    );
    Config::parse(&text, &dir.join("timevault.toml")).expect("daemon config")
}

/// Read the slot's confirmed position every [`PROBE`] until `stop`; each advance with the
/// instant it was seen (taken after the answer arrived: never early).
async fn probe(url: String, slot: String, stop: Arc<AtomicBool>) -> Probed {
    let mut conn = PgConnection::connect(&url).await.expect("probe connection");
    let mut seen = Vec::new();
    let mut redecode = Vec::new();
    let mut last = Lsn(0);
    let mut tick = tokio::time::interval(PROBE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let row: Option<(Option<String>, Option<i64>)> = sqlx::query_as(
            "SELECT confirmed_flush_lsn::text, \
                    pg_wal_lsn_diff(confirmed_flush_lsn, restart_lsn)::int8 \
             FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&slot)
        .fetch_optional(&mut conn)
        .await
        .expect("probe query");
        let now = Utc::now();
        let (text, behind) = row.unwrap_or_default();
        redecode.extend(behind);
        if let Some(lsn) = text.and_then(|t| Lsn::parse(&t)) {
            if lsn > last {
                seen.push((now, lsn));
                last = lsn;
            }
        }
    }
    let _ = conn.close().await;
    Probed {
        acks: seen,
        redecode,
    }
}

/// Run pgbench at `rate` tps for `seconds`; its summary lines.
async fn pgbench(url: &str, rate: u32, seconds: u64) -> Vec<String> {
    let out = tokio::process::Command::new("pgbench")
        .args(["-n", "-c", "4", "-j", "2", "-R", &rate.to_string()])
        .args(["-T", &seconds.to_string(), url])
        .output()
        .await
        .expect("run pgbench (postgresql-15 client tools)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter(|l| {
            l.starts_with("number of transactions actually processed")
                || l.starts_with("latency average")
                || l.starts_with("rate limit schedule lag")
                || l.starts_with("tps")
        })
        .map(str::to_string)
        .collect()
}

/// Every data transaction (at least one row change) committed in `[from, to]`, from the
/// segments of the source's newest chain.
async fn committed(
    repo: &Repository,
    source: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Vec<Committed> {
    let catalog = SourceCatalog::load(repo, source).await.expect("catalog");
    let chain = catalog.latest_chain().expect("a chain");
    let mut out = Vec::new();
    for entry in chain.segments.iter().filter(|s| s.captured_at >= from) {
        let segment = SegmentManifest::read(repo, &entry.key)
            .await
            .expect("segment");
        let mut changes = 0;
        for chunk in &segment.chunks {
            let data = repo.read_chunk(&chunk.id).await.expect("chunk");
            for record in parse_lines(&data).expect("records") {
                match record {
                    Record::Begin { .. } => changes = 0,
                    Record::Insert { .. }
                    | Record::Update { .. }
                    | Record::Delete { .. }
                    | Record::Truncate { .. } => changes += 1,
                    Record::Commit {
                        end_lsn, commit_us, ..
                    } => {
                        let commit = DateTime::from_timestamp_micros(commit_us).expect("time");
                        if changes > 0 && commit >= from && commit <= to {
                            out.push(Committed {
                                commit,
                                end_lsn,
                                changes,
                            });
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    out
}

/// Run the daemon on `source` (whose chain already exists in the repository at `dir`) while
/// pgbench writes at `rate` tps for `seconds`; measure every transaction's lag.
pub async fn measure(
    dir: &Path,
    repository_text: &str,
    source: &str,
    url: &str,
    slot: &str,
    run: Run,
) -> LagFigures {
    let Run {
        rate,
        seconds,
        capture,
    } = run;
    let config = daemon_config(dir, repository_text, source, url, capture);
    let repo = Repository::open(&config).await.expect("repository");
    let stop = Arc::new(AtomicBool::new(false));
    let probe = tokio::spawn(probe(url.to_string(), slot.to_string(), stop.clone()));
    let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(async move {
        daemon::run(&config, &repo, &DaemonOptions::default(), async {
            let _ = stopped.await;
        })
        .await
    });
    // Let the daemon open the source and settle into its capture loop.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let from = Utc::now();
    let wal_from = wal_lsn(url).await;
    let decoded_from = decoded(url, slot).await;
    let cpu_from = cpu_seconds();
    let reads_from = server_reads(url, slot).await;
    let pgbench = pgbench(url, rate, seconds).await;
    let cpu_seconds = cpu_seconds() - cpu_from;
    let reads_to = server_reads(url, slot).await;
    let server_read_bytes = reads_to
        .iter()
        .map(|(pid, to)| to - reads_from.get(pid).copied().unwrap_or(0))
        .sum();
    let wal_to = wal_lsn(url).await;
    let to = Utc::now();
    // The statistics are reported when a decoding pass ends: read them after the shipping.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let decoded_bytes = decoded(url, slot).await - decoded_from;
    let _ = shutdown.send(());
    let runs = daemon.await.expect("daemon task").expect("daemon run");
    stop.store(true, Ordering::Relaxed);
    let probed = probe.await.expect("probe task");
    let acks = probed.acks;
    let wal_bytes =
        Lsn::parse(&wal_to).expect("lsn").0 as i64 - Lsn::parse(&wal_from).expect("lsn").0 as i64;
    let during: Vec<DateTime<Utc>> = acks
        .iter()
        .map(|(at, _)| *at)
        .filter(|at| *at >= from && *at <= to)
        .collect();
    let mut gaps: Vec<f64> = during
        .windows(2)
        .map(|w| (w[1] - w[0]).num_microseconds().unwrap_or(0) as f64 / 1e6)
        .collect();
    gaps.sort_by(f64::total_cmp);
    let redecode_max = probed.redecode.iter().copied().max().unwrap_or(0);
    let redecode_mean =
        probed.redecode.iter().sum::<i64>() as f64 / probed.redecode.len().max(1) as f64;

    let repo = Repository::open(&daemon_config(dir, repository_text, source, url, capture))
        .await
        .expect("repository");
    let txns = committed(&repo, source, from, to).await;
    let mut lags = Vec::with_capacity(txns.len());
    let mut unacknowledged = 0;
    for t in &txns {
        let i = acks.partition_point(|(_, lsn)| *lsn < t.end_lsn);
        match acks.get(i) {
            Some((at, _)) => {
                lags.push((*at - t.commit).num_microseconds().unwrap_or(0) as f64 / 1e6)
            }
            None => unacknowledged += 1,
        }
    }
    lags.sort_by(f64::total_cmp);
    LagFigures {
        capture,
        rate,
        seconds,
        pgbench,
        changes: txns.iter().map(|t| t.changes).sum(),
        lags,
        unacknowledged,
        errors: runs.iter().map(|r| r.errors).sum(),
        gaps,
        wal_bytes,
        redecode_mean,
        redecode_max,
        decoded_bytes,
        cpu_seconds,
        server_read_bytes,
    }
}
