//! Restore drills end to end through the binary: a good repository passes (SQLite, blobs and
//! PostgreSQL, each compared with the checksums recorded at backup time), and a snapshot chunk
//! corrupted on every replica makes the drill fail loudly.

use crate::common;

use std::path::{Path, PathBuf};

use common::config::ConfigBuilder;
use common::{ok, timevault, Env};
use timevault::catalog::{SnapshotManifest, SourceCatalog};
use timevault::repo::{layout, Repository};
use timevault_fixtures::{generate_postgres, Database, GenerateOptions, Workload};

/// Files under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// A SQLite source with a snapshot and later changes, and a blob source with one scan.
async fn backed_up(seed: u64) -> (Env, PathBuf) {
    let env = Env::new(seed).await;
    common::copy_dir(
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/blobs")),
        &env.path().join("blobs"),
    );
    let config = env
        .config_builder()
        .blobs("files", "blobs")
        .write(env.path());
    ok(&timevault(&config, &["init"]));
    ok(&timevault(&config, &["daemon", "--once"]));
    let mut app = env.app().await;
    Workload::new(seed, 1).step(&mut app, None).await.unwrap();
    ok(&timevault(&config, &["daemon", "--once"]));
    (env, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_passes_on_a_good_repository_and_is_recorded_everywhere() {
    let (env, config) = backed_up(31).await;
    // The application keeps its database open (a sqlite3 process, as an app server's pool
    // does), so the shell's close below cannot checkpoint and delete the WAL between
    // timevault's runs.
    // A busy timeout: the fixture's own connection may still be closing (its close
    // checkpoints); without one the shell's SELECT failed with "database is locked", printed
    // nothing on stdout, and the read below waited forever.
    let mut holder = std::process::Command::new("sqlite3")
        .args(["-cmd", ".timeout 20000"])
        .arg(&env.db)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the sqlite3 shell is needed: apt-get install -y sqlite3");
    {
        use std::io::{BufRead, Write};
        let stdin = holder.stdin.as_mut().unwrap();
        writeln!(stdin, "SELECT count(*) FROM contracts;").unwrap();
        stdin.flush().unwrap();
        // Its answer says it has the database open (a fixed sleep was not enough on a busy
        // machine: the shell's close below then checkpointed and deleted the WAL, which
        // timevault rightly reported as continuity lost).
        let mut line = String::new();
        std::io::BufReader::new(holder.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.trim().parse::<u64>().is_ok(), "sqlite3 said {line:?}");
    }
    ok(&timevault(&config, &["daemon", "--once"]));
    // Changes by another process after the last capture: the drill's live check ships them
    // and compares the restore with the live database at that instant.
    let shell = std::process::Command::new("sqlite3")
        .arg(&env.db)
        .arg("DELETE FROM contracts WHERE id % 3 = 0")
        .status()
        .expect("the sqlite3 shell is needed: apt-get install -y sqlite3");
    assert!(shell.success());
    let drilled = timevault(&config, &["drill", "--json"]);
    let stderr = String::from_utf8_lossy(&drilled.stderr).to_string();
    let out = ok(&drilled);
    drop(holder.stdin.take());
    holder.wait().unwrap();
    let records: serde_json::Value = serde_json::from_str(&out).unwrap();
    let records = records.as_array().unwrap();
    assert_eq!(records.len(), 2, "{out}");
    for r in records {
        assert_eq!(r["ok"], true, "{r}");
        let checks = r["checks"].as_array().unwrap();
        let points: Vec<&str> = checks
            .iter()
            .map(|c| c["point"].as_str().unwrap())
            .collect();
        let expected: &[&str] = if r["source"] == "app" {
            &["recent", "monthly", "live"]
        } else {
            &["recent", "monthly"]
        };
        assert_eq!(points, expected, "{r}\nstderr: {stderr}");
        for c in checks {
            assert_eq!(c["ok"], true, "{c}");
            assert!(c["rto_seconds"].as_f64().unwrap() > 0.0, "{c}");
            assert!(c["bytes"].as_u64().unwrap() > 0, "{c}");
        }
        // The monthly point is a snapshot (scan) instant: compared with backup-time checksums.
        let monthly = &checks[1];
        let compared = monthly["rows_checked"].as_u64().unwrap()
            + monthly["objects_checked"].as_u64().unwrap();
        assert!(
            compared > 0,
            "the monthly point compared nothing: {monthly}"
        );
    }
    let sqlite = &records[0];
    assert_eq!(sqlite["source"], "app");
    assert!(sqlite["checks"][1]["verified"]
        .to_string()
        .contains("row checksums of"));
    let live = &sqlite["checks"][2];
    assert!(live["rows_checked"].as_u64().unwrap() > 0, "{live}");
    assert!(
        live["verified"]
            .to_string()
            .contains("equal the live database"),
        "{live}"
    );
    assert_eq!(records[1]["source"], "files");
    assert!(records[1]["checks"][1]["objects_checked"].as_u64().unwrap() > 0);

    // Recorded as a repository object, on every replica.
    for replica in ["eu-west", "eu-north"] {
        for source in ["app", "files"] {
            let dir = env
                .path()
                .join("replicas")
                .join(replica)
                .join("drills")
                .join(source);
            assert_eq!(files(&dir).len(), 1, "{}", dir.display());
        }
    }
    let status: serde_json::Value =
        serde_json::from_str(&ok(&timevault(&config, &["status", "--json"]))).unwrap();
    for s in status["sources"].as_array().unwrap() {
        assert_eq!(s["drill"]["ok"], true, "{s}");
    }
    let text = ok(&timevault(&config, &["status"]));
    assert!(text.contains("drill: ok at"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_detects_a_snapshot_chunk_corrupted_on_every_replica() {
    let (env, config) = backed_up(32).await;
    // Flip bytes in the middle of the snapshot's first chunk on both replicas.
    let chunk = {
        let repo = Repository::open(&env.config()).await.unwrap();
        let catalog = SourceCatalog::load(&repo, "app").await.unwrap();
        let snapshot = SnapshotManifest::read(&repo, &catalog.chains[0].snapshot.key)
            .await
            .unwrap();
        assert!(
            !snapshot.table_sums.is_empty(),
            "the snapshot records table checksums"
        );
        snapshot.chunks[0].id.clone()
    };
    for replica in ["eu-west", "eu-north"] {
        let path = env
            .path()
            .join("replicas")
            .join(replica)
            .join(layout::chunk(&chunk));
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        bytes[middle + 1] ^= 0x55;
        std::fs::write(&path, bytes).unwrap();
    }
    let out = timevault(&config, &["drill", "--source", "app"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(9),
        "exit code of a failed verification\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("drill of app (sqlite): FAILED"), "{stdout}");
    assert!(
        stdout.contains(&chunk),
        "the message names the damaged chunk: {stdout}"
    );
    assert!(stderr.contains("restore drill FAILED"), "{stderr}");
    // The failure is recorded and shown.
    let text = ok(&timevault(&config, &["status"]));
    assert!(text.contains("drill: FAILED at"), "{text}");
    let status: serde_json::Value =
        serde_json::from_str(&ok(&timevault(&config, &["status", "--json"]))).unwrap();
    assert_eq!(status["sources"][0]["drill"]["ok"], false);
    assert!(status["sources"][0]["drill"]["error"]
        .as_str()
        .unwrap()
        .contains(&chunk));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_drill_compares_rows_and_drops_its_scratch_database() {
    let source = crate::pg!().create_database().await.unwrap();
    generate_postgres(&source, &GenerateOptions { seed: 9, scale: 1 })
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::one_replica("replica")
        .postgres("db", &source)
        .write(dir.path());
    ok(&timevault(&config, &["init"]));
    ok(&timevault(&config, &["daemon", "--once"]));
    let mut app = Database::Postgres(source.clone()).connect().await.unwrap();
    Workload::new(9, 1).step(&mut app, None).await.unwrap();
    ok(&timevault(&config, &["daemon", "--once"]));

    let out = ok(&timevault(&config, &["drill", "--json"]));
    let records: serde_json::Value = serde_json::from_str(&out).unwrap();
    let record = &records[0];
    assert_eq!(record["ok"], true, "{record}");
    let monthly = &record["checks"][1];
    assert_eq!(monthly["point"], "monthly");
    assert!(monthly["rows_checked"].as_u64().unwrap() > 0, "{monthly}");
    assert!(
        monthly["verified"].to_string().contains("row checksums of"),
        "{monthly}"
    );

    // No scratch database is left behind.
    let mut admin = Database::Postgres(crate::pg!().admin_url())
        .connect()
        .await
        .unwrap();
    let left = admin
        .fetch_i64(
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'timevault\\_drill\\_%'",
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(left, 0, "scratch databases left behind");
}
