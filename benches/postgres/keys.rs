//! What per-tenant keys cost (issue 24): the same database snapshotted and captured with
//! `[tenancy] tenant_keys` off and on, each into a repository and a slot of its own, taking
//! turns (which goes first alternates), in the same run.
//!
//! A capture pass reads the same changes in both: one `psql` transaction updates every
//! contract version (a table that belongs through `contract_id`: with keys on, its tenant is
//! asked of the server once per contract, then cached), another every contract (the tenant
//! column), both for every tenant. The tables are vacuumed and a checkpoint taken after each
//! pair of passes.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use timevault::config::Config;
use timevault::repo::Repository;
use timevault::source::postgres::PostgresSource;

pub struct KeyFigures {
    pub snapshot_off: Vec<Duration>,
    pub snapshot_on: Vec<Duration>,
    pub capture_off: Vec<Duration>,
    pub capture_on: Vec<Duration>,
    /// This process's CPU time (all threads) per capture pass: on a machine whose cores are
    /// all busy (here: 2 cores, the server's decoding and both pipeline stages), wall time.
    pub capture_cpu_off: Vec<Duration>,
    pub capture_cpu_on: Vec<Duration>,
    /// Row changes per capture pass.
    pub changes: u64,
}

async fn repository(dir: &Path, name: &str, tenant_keys: bool) -> Repository {
    let root = dir.join(name);
    std::fs::create_dir_all(&root).unwrap();
    let text = format!(
        "[repository]\nkey_file = \"k\"\n[[replicas]]\nname = \"a\"\nregion = \"r\"\nurl = \"replica\"\n[tenancy]\ncolumn = \"tenant_id\"\ntenant_keys = {tenant_keys}\n"
    );
    let config = Config::parse(&text, &root.join("timevault.toml")).unwrap();
    Repository::init(&config).await.unwrap();
    Repository::open(&config).await.unwrap()
}

fn psql(url: &str, sql: &str) {
    let status = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql])
        .status()
        .unwrap();
    assert!(status.success(), "psql {sql}");
}

pub async fn measure(dir: &Path, url: &str, pairs: u64) -> KeyFigures {
    let off = repository(dir, "keys-off", false).await;
    let on = repository(dir, "keys-on", true).await;
    let mut sources = [
        PostgresSource::open("bench_keys_off", url, &off)
            .await
            .unwrap(),
        PostgresSource::open("bench_keys_on", url, &on)
            .await
            .unwrap(),
    ];
    let repos = [&off, &on];
    let mut figures = KeyFigures {
        snapshot_off: Vec::new(),
        snapshot_on: Vec::new(),
        capture_off: Vec::new(),
        capture_on: Vec::new(),
        capture_cpu_off: Vec::new(),
        capture_cpu_on: Vec::new(),
        changes: 0,
    };
    for i in 0..pairs {
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            let started = Instant::now();
            sources[k].snapshot(repos[k]).await.unwrap();
            let took = started.elapsed();
            [&mut figures.snapshot_off, &mut figures.snapshot_on][k].push(took);
        }
        psql(
            url,
            &format!("UPDATE contract_versions SET change_note = 'keys bench {i}'"),
        );
        psql(
            url,
            &format!("UPDATE contracts SET title = left(title, 200) || ' {i}'"),
        );
        for k in order {
            let started = Instant::now();
            let cpu_from = super::lag::cpu_seconds();
            let stats = sources[k].capture(repos[k]).await.unwrap();
            let took = started.elapsed();
            let cpu = Duration::from_secs_f64(super::lag::cpu_seconds() - cpu_from);
            figures.changes = stats.changes;
            [&mut figures.capture_off, &mut figures.capture_on][k].push(took);
            [&mut figures.capture_cpu_off, &mut figures.capture_cpu_on][k].push(cpu);
        }
        // Every pass updates every row: without a vacuum the tables bloat pass after pass. And
        // the slots' restart points advance only past a running-transactions record, which a
        // checkpoint writes; without one (a pair takes seconds) each pass decoded all the WAL
        // since the first pass again, and both modes slowed down run after run.
        psql(url, "VACUUM contracts, contract_versions");
        psql(url, "CHECKPOINT");
    }
    for (source, repo) in sources.into_iter().zip(repos) {
        source.drop_slot().await.unwrap();
        let _ = repo;
    }
    figures
}

fn median(times: &[Duration]) -> f64 {
    let mut sorted: Vec<f64> = times.iter().map(Duration::as_secs_f64).collect();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn list(times: &[Duration]) -> String {
    let parts: Vec<String> = times
        .iter()
        .map(|t| format!("{:.2}", t.as_secs_f64()))
        .collect();
    parts.join(", ")
}

pub fn print(f: &KeyFigures) {
    let (s_off, s_on) = (median(&f.snapshot_off), median(&f.snapshot_on));
    let (c_off, c_on) = (median(&f.capture_off), median(&f.capture_on));
    println!(
        "tenant keys (medians of {} alternating runs): snapshot off {s_off:.2} s, on {s_on:.2} s: on/off {:.3} (off: {}; on: {})",
        f.snapshot_off.len(),
        s_on / s_off,
        list(&f.snapshot_off),
        list(&f.snapshot_on)
    );
    println!(
        "tenant keys: capture of {} row changes off {c_off:.2} s, on {c_on:.2} s: on/off {:.3} (off: {}; on: {})",
        f.changes,
        c_on / c_off,
        list(&f.capture_off),
        list(&f.capture_on)
    );
    let (u_off, u_on) = (median(&f.capture_cpu_off), median(&f.capture_cpu_on));
    println!(
        "tenant keys: capture CPU (this process, all threads) off {u_off:.2} s, on {u_on:.2} s: on/off {:.3} (off: {}; on: {})",
        u_on / u_off,
        list(&f.capture_cpu_off),
        list(&f.capture_cpu_on)
    );
}
