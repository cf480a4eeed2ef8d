//! `timevault prune` from the command line: `--dry-run` removes nothing and says what it would
//! remove (`--json` for scripts); the real run removes it, keeps young audit records, and a
//! pruned instant is refused with the restorable window printed.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use chrono::{Duration, Utc};
use common::config::ConfigBuilder;
use common::{ok, timevault};
use timevault::archive::Kind;
use timevault::catalog::{SnapshotManifest, SnapshotReason, SourceCatalog};
use timevault::config::Config;
use timevault::repo::{ChunkRef, Repository};

/// Every file under `dir`, relative, with its size.
fn files(dir: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            if entry.metadata().unwrap().is_dir() {
                stack.push(entry.path());
            } else {
                let rel = entry
                    .path()
                    .strip_prefix(dir)
                    .unwrap()
                    .display()
                    .to_string();
                out.insert(rel, entry.metadata().unwrap().len());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_removes_nothing_and_the_real_run_removes_what_it_listed() {
    let dir = tempfile::tempdir().unwrap();
    let path = ConfigBuilder::two_sites()
        .sqlite("app", "app.db")
        .retention("pitr", "35d")
        .retention("audit", "400d")
        .write(dir.path());
    let config = Config::load(&path).unwrap();
    Repository::init(&config).await.unwrap();
    let repo = Repository::open(&config).await.unwrap();
    // 60 daily snapshots, written with explicit instants; two audit records.
    let now = Utc::now();
    let mut snapshots = Vec::new();
    for day in 0..60 {
        let at = now - Duration::days(day) - Duration::hours(1);
        let chunk = repo
            .put_chunk(Bytes::from(format!("image {day}")))
            .await
            .unwrap();
        let m = SnapshotManifest {
            source: "app".into(),
            kind: timevault::config::SourceKind::Sqlite,
            chain: timevault::time::compact(at),
            taken_at: at,
            reason: SnapshotReason::Initial,
            continues: None,
            bytes: chunk.len,
            sha256: String::new(),
            chunks: vec![ChunkRef {
                id: chunk.id,
                len: chunk.len,
            }],
            details: serde_json::json!({}),
            table_sums: Default::default(),
        };
        m.write(&repo).await.unwrap();
        snapshots.push((day, at, m.key()));
    }
    let audit = |days: i64| {
        format!(
            "audit/{}-0badc0de",
            timevault::time::compact(now - Duration::days(days))
        )
    };
    for days in [500, 10] {
        repo.write_object(Kind::Audit, &audit(days), b"{}".to_vec())
            .await
            .unwrap();
    }
    let replicas = dir.path().join("replicas");
    let before = files(&replicas);

    // 1. Dry run, JSON: what would go, and nothing went.
    let out = ok(&timevault(&path, &["prune", "--dry-run", "--json"]));
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(plan["dry_run"], true);
    let removed: Vec<String> = plan["sources"][0]["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap().to_string())
        .collect();
    let expected: Vec<String> = snapshots
        .iter()
        .filter(|(day, _, _)| *day >= 35)
        .map(|(_, _, key)| key.clone())
        .rev()
        .collect();
    assert_eq!(
        removed, expected,
        "snapshots taken more than 35 days before the prune"
    );
    assert!(plan["sources"][0]["removed"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("before the PITR window"));
    assert_eq!(plan["audit"].as_array().unwrap().len(), 1);
    assert_eq!(plan["audit"][0]["key"], audit(500));
    assert_eq!(files(&replicas), before, "--dry-run removes nothing");
    let text = ok(&timevault(&path, &["prune", "--dry-run"]));
    assert!(
        text.contains("dry run") && text.contains("would remove snapshots/app/"),
        "{text}"
    );
    assert_eq!(files(&replicas), before, "--dry-run removes nothing");

    // 2. The real run removes exactly that, on both replicas.
    let text = ok(&timevault(&path, &["prune"]));
    println!("{text}");
    assert!(text.contains("removed snapshots/app/"), "{text}");
    for replica in ["eu-west", "eu-north"] {
        for key in &expected {
            assert!(
                !replicas.join(replica).join(key).exists(),
                "{replica}: {key}"
            );
        }
        assert!(!replicas.join(replica).join(audit(500)).exists());
        assert!(
            replicas.join(replica).join(audit(10)).exists(),
            "young audit records stay"
        );
    }

    // 3. A pruned instant is refused, with the window printed.
    let old = snapshots[50].1 + Duration::minutes(5);
    let out = timevault(
        &path,
        &[
            "restore",
            "--source",
            "app",
            "--at",
            &old.to_rfc3339(),
            "--to",
            &dir.path().join("x.db").display().to_string(),
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stderr}");
    assert!(
        stderr.contains("outside the restorable window") && stderr.contains("restorable:"),
        "{stderr}"
    );
    assert!(!dir.path().join("x.db").exists());
}

/// The daemon runs `schedule.prune` between its jobs: an expired audit record disappears
/// while it runs (the shutdown waits for that, so nothing depends on timing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_prunes_on_its_schedule() {
    let env = common::Env::new(5).await;
    let config = env
        .config_builder()
        .schedule("prune", "* * * * * *")
        .load(env.path());
    Repository::init(&config).await.unwrap();
    let repo = Repository::open(&config).await.unwrap();
    let old = format!(
        "audit/{}-0badc0de",
        timevault::time::compact(Utc::now() - Duration::days(500))
    );
    repo.write_object(Kind::Audit, &old, b"{}".to_vec())
        .await
        .unwrap();
    let expired = env.path().join("replicas/eu-west").join(&old);
    assert!(expired.exists());
    let gone = async {
        for _ in 0..600 {
            if !expired.exists() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    };
    let runs = timevault::daemon::run(&config, &repo, &Default::default(), gone)
        .await
        .unwrap();
    assert_eq!(runs[0].errors, 0, "{:?}", runs[0].last_error);
    assert!(
        !expired.exists(),
        "the scheduled prune removed the expired audit record"
    );
    let north = env.path().join("replicas/eu-north").join(&old);
    assert!(!north.exists());
    assert!(SourceCatalog::load(&repo, "app")
        .await
        .unwrap()
        .latest_chain()
        .is_some());
}
