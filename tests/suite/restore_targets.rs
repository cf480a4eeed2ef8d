//! No mistake destroys data (issue 19, restore targets), through the real binary: a target that
//! is, lies inside or contains a source or a replica is refused even with `--force`; a forced
//! restore destroys nothing before its replacement is complete (PostgreSQL builds beside the
//! target; a SQLite target in use is refused; a blob restore deletes only after every object is
//! written and, unforced, lists what `--force` would delete); restored files and the export's
//! scratch directory are private.

use crate::common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::config::ConfigBuilder;
use common::{ok, timevault, Env};
use sha2::{Digest, Sha256};
use sqlx::Connection;
use timevault_fixtures::harness::unique_name;
use timevault_fixtures::{generate_blobs, generate_postgres, table_checksums, Database};
use timevault_fixtures::{GenerateOptions, StoreUrl};

/// [`Env::config_builder`] with the blob source `files` (`files/`).
fn with_files(env: &Env) -> ConfigBuilder {
    env.config_builder().blobs("files", "files")
}

/// An [`Env`] with a blob source `files` (the scale-1 fixture files), initialised and backed
/// up with `config` (from [`with_files`]); returns the config path.
async fn backed_up(env: &Env, config: ConfigBuilder) -> PathBuf {
    let files = StoreUrl::local_dir(&env.path().join("files")).unwrap();
    generate_blobs(
        &files.open().unwrap(),
        &GenerateOptions { seed: 7, scale: 1 },
    )
    .await
    .unwrap();
    let config = config.write(env.path());
    ok(&timevault(&config, &["init"]));
    ok(&timevault(&config, &["backup"]));
    // A database snapshot after the blob scan, so `latest` of the two is inside both windows.
    ok(&timevault(&config, &["backup", "--source", "app"]));
    config
}

/// Assert the command failed with `code` and stderr holding every one of `needles`; returns
/// stderr.
fn refused(out: &Output, code: i32, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
    stderr
}

fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// key (relative path) → sha256 of every file under `dir`.
fn tree(dir: &Path) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let key = p.strip_prefix(dir).unwrap().to_string_lossy().to_string();
                out.insert(key, sha256_file(&p));
            }
        }
    }
    out
}

/// The binary run under umask 022 (the common default), so a file mode proves what the code
/// asked for, not the test runner's umask.
fn umask_022(config: &Path, args: &[&str]) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("umask 022; exec \"$0\" \"$@\"")
        .arg(common::binary())
        .arg("--config")
        .arg(config)
        .args(args);
    command
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Every chunk file of every replica under `dir`, with its bytes flipped in the middle;
/// returns the originals to put back.
fn corrupt_chunks(replicas: &[PathBuf]) -> Vec<(PathBuf, Vec<u8>)> {
    let mut saved = Vec::new();
    for replica in replicas {
        let mut stack = vec![replica.join("chunks")];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let bytes = std::fs::read(&p).unwrap();
                let mut bad = bytes.clone();
                let middle = bad.len() / 2;
                bad[middle] ^= 0x40;
                std::fs::write(&p, bad).unwrap();
                saved.push((p, bytes));
            }
        }
    }
    assert!(!saved.is_empty(), "no chunk files under {replicas:?}");
    saved
}

fn heal_chunks(saved: Vec<(PathBuf, Vec<u8>)>) {
    for (path, bytes) in saved {
        std::fs::write(path, bytes).unwrap();
    }
}

/// Reported by a user: `restore --to file://<a replica's own path> --force` broke that replica,
/// and `restore --to <the live SQLite source> --force` was accepted. Every overlap (same,
/// inside, containing; through a symlink; the source's WAL; two targets of one group) is
/// refused with exit 2 naming what it overlaps, and nothing changes; a sibling whose name only
/// starts like a replica's is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_overlapping_a_source_or_replica_are_refused_even_forced() {
    let env = Env::new(31).await;
    let config = backed_up(&env, with_files(&env)).await;
    let dir = env.path().canonicalize().unwrap();
    let db_before = sha256_file(&env.db);
    let replica = dir.join("replicas/eu-west");
    let replica_before = tree(&replica);
    let restore = |source: &str, to: &str| {
        timevault(
            &config,
            &[
                "restore", "--source", source, "--at", "latest", "--to", to, "--force",
            ],
        )
    };
    let db = env.db.to_str().unwrap().to_string();
    refused(
        &restore("app", &db),
        2,
        &["is source app", "--force does not lift this"],
    );
    std::os::unix::fs::symlink(&dir, dir.join("link")).unwrap();
    let via_link = dir.join("link/app.db");
    refused(
        &restore("app", via_link.to_str().unwrap()),
        2,
        &["is source app"],
    );
    refused(
        &restore("app", &format!("{db}-wal")),
        2,
        &["source app (its -wal file)"],
    );
    let replica_url = format!("file://{}", replica.display());
    refused(&restore("files", &replica_url), 2, &["is replica eu-west"]);
    let inside = replica.join("restored");
    refused(
        &restore("files", inside.to_str().unwrap()),
        2,
        &["lies inside replica eu-west"],
    );
    refused(
        &restore("files", dir.to_str().unwrap()),
        2,
        &[
            "contains source app",
            "contains replica eu-west",
            "contains replica eu-north",
        ],
    );
    let group = timevault(
        &config,
        &[
            "restore",
            "--at",
            "latest",
            "--to",
            &format!("app={}", dir.join("g/app.db").display()),
            "--to",
            &format!("files={}", dir.join("g").display()),
            "--force",
        ],
    );
    refused(&group, 2, &["lies inside restore target of files"]);
    assert!(
        !dir.join("g").exists(),
        "a refused group restore wrote its targets"
    );
    assert_eq!(sha256_file(&env.db), db_before, "the live database changed");
    assert_eq!(tree(&replica), replica_before, "the replica changed");
    ok(&timevault(&config, &["verify"]));
    // Compared by components, not as strings: `eu-west2` is not inside `eu-west`.
    let sibling = dir.join("replicas/eu-west2");
    ok(&restore("files", sibling.to_str().unwrap()));
    assert_eq!(tree(&sibling), tree(&dir.join("files")));
    ok(&restore("app", dir.join("restored.db").to_str().unwrap()));
}

/// Wait until `path` exists (an application opened its database), at most 10 s.
fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Close the child's stdin and wait for it to exit (at most 10 s).
fn close(mut child: Child) {
    drop(child.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the child did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kill a child this test started, and reap it.
fn kill(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A forced SQLite restore over a database an application has open is refused (exit 2) and
/// leaves it as it was: with its `-wal` and `-shm` beside it (an application in WAL mode, whose
/// WAL may hold changes the file lacks; the old code deleted both), and with only a descriptor
/// open on it. Once the application is gone the forced restore goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_target_in_use_is_refused_even_forced() {
    let env = Env::new(32).await;
    let config = env.write_config();
    ok(&timevault(&config, &["init"]));
    ok(&timevault(&config, &["backup"]));
    let target = env.path().join("t.db");
    let t = target.to_str().unwrap();
    let restore = || {
        timevault(
            &config,
            &[
                "restore", "--source", "app", "--at", "latest", "--to", t, "--force",
            ],
        )
    };
    ok(&restore());
    // An application with the database open in WAL mode, in the middle of a write.
    let mut app = Command::new("sqlite3")
        .arg(&target)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stdin = app.stdin.as_mut().unwrap();
    writeln!(
        stdin,
        "CREATE TABLE app_state(x); INSERT INTO app_state VALUES (1);"
    )
    .unwrap();
    stdin.flush().unwrap();
    let wal = env.path().join("t.db-wal");
    wait_for(&wal);
    let before = sha256_file(&target);
    refused(&restore(), 2, &["t.db-wal", "stop the application"]);
    assert!(wal.exists(), "the application's WAL was removed");
    assert_eq!(sha256_file(&target), before);
    close(app);
    assert!(!wal.exists(), "sqlite3 left its WAL behind");
    // Only a descriptor open on it (an application in rollback-journal mode between
    // transactions holds no lock).
    let holder = Command::new("sleep")
        .arg("60")
        .stdin(std::fs::File::open(&target).unwrap())
        .spawn()
        .unwrap();
    let pid = holder.id().to_string();
    refused(&restore(), 2, &[&format!("process {pid} has it open")]);
    kill(holder);
    // The application stopped: the restore replaces the database (the application's table is
    // not in the backup).
    ok(&restore());
    let mut conn = Database::Sqlite(target.clone()).connect().await.unwrap();
    let sums = timevault_fixtures::table_checksums(&mut conn)
        .await
        .unwrap();
    assert!(!sums.contains_key("app_state"), "{sums:?}");
}

/// Restored SQLite files take the source file's mode (0640 here, under umask 022: the old
/// code gave 0644), or 0600 when the source cannot be read; never world-readable by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_sqlite_files_keep_the_source_mode_or_are_private() {
    let env = Env::new(33).await;
    let config = env.write_config();
    ok(&timevault(&config, &["init"]));
    ok(&timevault(&config, &["backup"]));
    std::fs::set_permissions(&env.db, std::fs::Permissions::from_mode(0o640)).unwrap();
    let like_source = env.path().join("like-source.db");
    let args = |to: &Path| {
        vec![
            "restore".to_string(),
            "--source".into(),
            "app".into(),
            "--at".into(),
            "latest".into(),
            "--to".into(),
            to.display().to_string(),
        ]
    };
    let run = |to: &Path| {
        let a = args(to);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        ok(&umask_022(&config, &a).output().unwrap());
    };
    run(&like_source);
    assert_eq!(mode(&like_source), 0o640);
    // The source is gone (an operator restoring after losing it): private.
    std::fs::rename(&env.db, env.path().join("lost.db")).unwrap();
    let private = env.path().join("private.db");
    run(&private);
    assert_eq!(mode(&private), 0o600);
}

/// The export's scratch directory (table and file spools) is 0700 and the archive 0600 under
/// umask 022; the old code created the directory 0755. Watched while the export runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_scratch_directory_is_private() {
    let env = Env::new(34).await;
    let config = backed_up(
        &env,
        with_files(&env)
            .fixture_tenancy()
            .tenancy_blobs("files", "prefix:tenants/{tenant}/"),
    )
    .await;
    let out_dir = env.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("t1003.tar.zst");
    let args = [
        "export",
        "--tenant",
        "1003",
        "--at",
        "latest",
        "--out",
        out.to_str().unwrap(),
    ];
    let mut export = umask_022(&config, &args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(env.path().join("export.err")).unwrap())
        .spawn()
        .unwrap();
    let mut seen = std::collections::BTreeMap::new();
    while export.try_wait().unwrap().is_none() {
        for e in std::fs::read_dir(&out_dir).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Ok(meta) = e.metadata() else { continue };
            if name.starts_with(".timevault-export-") && meta.is_dir() {
                seen.insert(name, meta.permissions().mode() & 0o777);
            }
        }
        std::thread::yield_now();
    }
    let status = export.wait().unwrap();
    let stderr = std::fs::read_to_string(env.path().join("export.err")).unwrap();
    assert!(status.success(), "export failed: {stderr}");
    assert!(!seen.is_empty(), "the scratch directory was never seen");
    for (name, m) in &seen {
        assert_eq!(*m, 0o700, "{name} has mode {m:o}");
    }
    assert_eq!(mode(&out), 0o600);
}

/// Unforced, a non-empty blob target is refused (exit 8) with what `--force` would delete:
/// the count and the first keys of the objects the instant did not hold (the old code said
/// only "not empty"). A forced restore that fails (every chunk unreadable) deletes nothing;
/// healed, it replaces the contents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_restore_lists_what_force_would_delete_and_deletes_last() {
    let env = Env::new(35).await;
    let config = backed_up(&env, with_files(&env)).await;
    let target = env.path().join("target");
    let source_files = tree(&env.path().join("files"));
    let (kept, _) = source_files.iter().next().unwrap();
    std::fs::create_dir_all(target.join(kept).parent().unwrap()).unwrap();
    std::fs::write(target.join(kept), b"old version").unwrap();
    std::fs::write(target.join("precious.txt"), b"precious").unwrap();
    std::fs::create_dir_all(target.join("junk")).unwrap();
    for i in 0..11 {
        std::fs::write(target.join(format!("junk/{i:02}")), b"junk").unwrap();
    }
    let t = target.to_str().unwrap();
    let restore = |force: bool| {
        let mut args = vec!["restore", "--source", "files", "--at", "latest", "--to", t];
        if force {
            args.push("--force");
        }
        timevault(&config, &args)
    };
    let before = tree(&target);
    refused(
        &restore(false),
        8,
        &[
            "holds 13 objects",
            "--force would delete 12 the instant did not hold: junk/00, junk/01",
            "junk/08, junk/09, and 2 more",
            "and overwrite 1",
        ],
    );
    assert_eq!(tree(&target), before);
    let replicas = [
        env.path().join("replicas/eu-west"),
        env.path().join("replicas/eu-north"),
    ];
    let saved = corrupt_chunks(&replicas);
    let failed = restore(true);
    assert!(
        !failed.status.success(),
        "a restore of unreadable chunks succeeded"
    );
    let after = tree(&target);
    for (key, sha) in before.iter().filter(|(k, _)| *k != kept) {
        assert_eq!(
            after.get(key),
            Some(sha),
            "{key} deleted by a failed restore"
        );
    }
    heal_chunks(saved);
    ok(&restore(true));
    assert_eq!(tree(&target), source_files);
}

/// A forced PostgreSQL restore builds into `<name>_timevault_<hex>`: one that fails (every
/// chunk unreadable) leaves the old database with its rows (the old code had dropped it
/// first) and no partial database; one that succeeds replaces it. A target naming the source
/// database (spelled `localhost` instead of `127.0.0.1`) is refused, forced or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_postgres_restore_keeps_the_old_database_until_the_new_one_is_complete() {
    let source = crate::pg!().create_database().await.unwrap();
    generate_postgres(&source, &GenerateOptions { seed: 36, scale: 1 })
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let slot = unique_name("tv_rt").replace('-', "_");
    let config = ConfigBuilder::one_replica("replica")
        .source_with("db", "postgres", &source, [("slot", &slot)])
        .write(dir.path());
    ok(&timevault(&config, &["init"]));
    ok(&timevault(&config, &["backup", "--source", "db"]));
    let restore = |to: &str| {
        timevault(
            &config,
            &[
                "restore", "--source", "db", "--at", "latest", "--to", to, "--force",
            ],
        )
    };
    // The source itself, spelled differently.
    let spelled = source.replace("127.0.0.1", "localhost");
    refused(&restore(&spelled), 2, &["is source db"]);
    let source_sums = checksums(&source).await;
    assert!(!source_sums.is_empty());
    // An existing target with rows of its own.
    let target = crate::pg!().create_database().await.unwrap();
    let mut conn = sqlx::PgConnection::connect(&target).await.unwrap();
    sqlx::raw_sql("CREATE TABLE keep (id int PRIMARY KEY); INSERT INTO keep VALUES (1), (2), (3)")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let name = target.rsplit('/').next().unwrap().to_string();
    let saved = corrupt_chunks(&[dir.path().join("replica")]);
    refused(&restore(&target), 4, &[]);
    assert_eq!(
        kept_rows(&target).await,
        3,
        "the old database lost its rows"
    );
    assert!(
        beside(&name).await.is_empty(),
        "a partial database was left"
    );
    heal_chunks(saved);
    ok(&restore(&target));
    assert_eq!(checksums(&target).await, source_sums);
    let mut conn = sqlx::PgConnection::connect(&target).await.unwrap();
    let keep: Option<String> = sqlx::query_scalar("SELECT to_regclass('keep')::text")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    assert_eq!(keep, None, "the old database was not replaced");
    assert!(
        beside(&name).await.is_empty(),
        "the build database was left"
    );
    crate::common::drop_slot(&crate::pg!().admin_url(), &slot);
}

async fn checksums(url: &str) -> std::collections::BTreeMap<String, String> {
    let mut conn = Database::Postgres(url.to_string()).connect().await.unwrap();
    let sums = table_checksums(&mut conn).await.unwrap();
    conn.close().await.unwrap();
    sums
}

async fn kept_rows(url: &str) -> i64 {
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let n = sqlx::query_scalar("SELECT count(*) FROM keep")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    n
}

/// Databases named `<name>_timevault_...` on the test server.
async fn beside(name: &str) -> Vec<String> {
    let mut admin = sqlx::PgConnection::connect(&crate::pg!().admin_url())
        .await
        .unwrap();
    let names =
        sqlx::query_scalar("SELECT datname::text FROM pg_database WHERE starts_with(datname, $1)")
            .bind(format!("{name}_timevault_"))
            .fetch_all(&mut admin)
            .await
            .unwrap();
    admin.close().await.unwrap();
    names
}

/// Every file under `dir` with its size and modification time: a dry run must change none.
fn tree_state(dir: &Path) -> Vec<(std::path::PathBuf, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                out.push((entry.path(), meta.len(), meta.modified().unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Issue 21: `restore --dry-run` prints the plan (base, later parts, the instant reached,
/// chunks and bytes, which replicas hold them, the target check) and writes nothing: no file in
/// the directory changes (repository replicas included: no read claim, no audit record). A
/// target the restore would refuse makes the dry run exit as the restore would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_dry_run_prints_the_plan_and_touches_nothing() {
    let env = Env::new(61).await;
    let config = env.write_config();
    ok(&timevault(&config, &["init"]));
    ok(&timevault(&config, &["backup"]));
    let before = tree_state(env.path());
    let target = env.path().join("planned.db");
    let dry_run = |target: &Path, extra: &[&str]| {
        let target = target.display().to_string();
        let mut a = vec!["restore", "--source", "app", "--at", "latest", "--dry-run"];
        a.extend_from_slice(extra);
        a.extend(["--to", target.as_str()]);
        timevault(&config, &a)
    };
    let out = ok(&dry_run(&target, &[]));
    for expected in [
        "dry run: restore of app (sqlite)",
        "reaches",
        "later part(s)",
        "replica eu-west: holds every object",
        "replica eu-north: holds every object",
        "a new file",
    ] {
        assert!(out.contains(expected), "{expected:?} missing from:\n{out}");
    }
    assert!(!target.exists());
    assert_eq!(tree_state(env.path()), before, "the dry run changed files");

    // A replica copy lost: the plan says which replica lacks objects.
    let chunk = walk_files(&env.path().join("replicas/eu-north/chunks"))
        .into_iter()
        .next()
        .expect("a chunk on eu-north");
    std::fs::remove_file(&chunk).unwrap();
    let out = ok(&dry_run(&target, &[]));
    assert!(out.contains("replica eu-north: lacks 1 object(s)"), "{out}");

    // An existing target without --force: refused, as the restore would (exit 3 or the
    // restore's code), and still nothing written.
    let existing = env.path().join("existing.db");
    std::fs::write(&existing, b"an older restore").unwrap();
    let out = dry_run(&existing, &[]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("REFUSED"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&dry_run(&target, &["--json"]))).unwrap();
    assert!(json["dry_run"][0]["chunks"].as_u64().unwrap() > 0, "{json}");
    assert!(json["dry_run"][0]["bytes"].as_u64().unwrap() > 0, "{json}");
}

/// Whether a progress line holds "<n> <unit>/<m> <KiB|MiB|GiB>" (indicatif's
/// `{bytes}/{total_bytes}`).
fn bar_counts_bytes_of_a_total(line: &str) -> bool {
    line.split_once("B/").is_some_and(|(_, total)| {
        let mut words = total.split_whitespace();
        let number = words.next().unwrap_or("");
        let unit = words.next().unwrap_or("");
        number.parse::<f64>().is_ok() && ["KiB", "MiB", "GiB"].contains(&unit)
    })
}

fn walk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    tree_state(dir).into_iter().map(|(p, _, _)| p).collect()
}

/// Issue 21: on a terminal a restore shows a progress bar over the bytes its plan reads
/// (`script` gives it a pseudo-terminal); without one, and with `--json`, nothing but the
/// result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_shows_progress_on_a_terminal_only() {
    let env = Env::new(62).await;
    let config = env.write_config();
    ok(&timevault(&config, &["init"]));
    ok(&timevault(&config, &["backup"]));
    let on_terminal = env.path().join("tty.db");
    let command = format!(
        "{} --config {} restore --source app --at latest --to {}",
        common::binary().display(),
        config.display(),
        on_terminal.display()
    );
    let out = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .output()
        .expect("script runs (util-linux; apt-get install -y bsdutils)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("restoring app ["),
        "no progress bar on a terminal:\n{text}"
    );
    // "<done>/<total>": the bar may be drawn before the first byte is read ("0 B/3.39 MiB"),
    // so only the plan's total is certain to carry a binary unit.
    assert!(
        text.lines()
            .any(|line| line.contains("restoring app [") && bar_counts_bytes_of_a_total(line)),
        "the bar counts bytes against the plan's total:\n{text}"
    );
    assert!(text.contains("restored app to"), "{text}");
    let piped = timevault(
        &config,
        &[
            "restore",
            "--source",
            "app",
            "--at",
            "latest",
            "--to",
            env.path().join("piped.db").to_str().unwrap(),
        ],
    );
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(piped.status.success(), "{stderr}");
    assert!(
        !stderr.contains("restoring app"),
        "a bar without a terminal: {stderr}"
    );
    // A drill, `verify --read-data` and `replicas sync` show the bytes read so far.
    for (args, line) in [
        ("drill", "drilling app:"),
        ("verify --read-data", "verifying:"),
        ("replicas sync", "syncing replicas:"),
    ] {
        let command = format!(
            "{} --config {} {args}",
            common::binary().display(),
            config.display()
        );
        let out = Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args}: {text}");
        assert!(
            text.contains(line),
            "{args}: no progress line on a terminal:\n{text}"
        );
    }
}

/// A library caller gets what the CLI's `restore` gets: `restore::restore_group` refuses a
/// target that is the live source, even forced (the file stays as it was), and a restore it
/// does writes the audit record (before, both lived in the binary, so a library caller could
/// overwrite the live database with `force` and left no audit trail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_restore_checks_targets_and_writes_the_audit_record() {
    use timevault::restore::{restore_group, GroupRequest, DEFAULT_REFERENCE_QUERY};
    let env = Env::new(61).await;
    let config_path = env.write_config();
    ok(&timevault(&config_path, &["init"]));
    ok(&timevault(&config_path, &["backup"]));
    let config = timevault::config::Config::load(&config_path).unwrap();
    let repo = timevault::repo::Repository::open(&config).await.unwrap();
    let request = |target: &Path| GroupRequest {
        targets: vec![("app".into(), target.display().to_string())],
        at: timevault::time::At::Latest,
        force: true,
        jobs: None,
        tenant: None,
        target_options: Default::default(),
        reference_query: DEFAULT_REFERENCE_QUERY.into(),
        requested_by: Some("library-caller".into()),
        reason: Some("restore test".into()),
    };
    let live = std::fs::read(&env.db).unwrap();
    let err = restore_group(&config, &repo, request(&env.db))
        .await
        .unwrap_err();
    assert_eq!(err.kind().exit_code(), 2, "{err}");
    assert!(err.to_string().contains("source app"), "{err}");
    assert_eq!(
        std::fs::read(&env.db).unwrap(),
        live,
        "the live file is untouched"
    );

    let target = env.path().join("library.db");
    let done = restore_group(&config, &repo, request(&target))
        .await
        .unwrap();
    assert_eq!(done.restored.len(), 1);
    assert_eq!(
        common::checksums(&target).await,
        common::checksums(&env.db).await
    );
    let audit = ok(&timevault(&config_path, &["audit", "--json"]));
    assert!(
        audit.contains("library-caller") && audit.contains("library.db"),
        "{audit}"
    );
}

/// Issue 21: on a terminal `backup` shows what it has read from the source, uploaded and
/// written, with the rate: a bar against the database file's size for SQLite, a counter for
/// blobs and PostgreSQL (no total is known cheaply beforehand), and a summary line at the
/// end; without a terminal, and with `--json`, none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_shows_progress_on_a_terminal_only() {
    let env = Env::new(63).await;
    std::fs::create_dir_all(env.path().join("files/docs")).unwrap();
    std::fs::write(env.path().join("files/docs/a.txt"), "an attachment").unwrap();
    std::fs::write(env.path().join("files/b.bin"), vec![9u8; 300_000]).unwrap();
    let db = crate::pg!().create_database().await.unwrap();
    generate_postgres(&db, &GenerateOptions { seed: 63, scale: 1 })
        .await
        .unwrap();
    let slot = unique_name("tv_bp").replace('-', "_");
    let config = with_files(&env)
        .source_with("db", "postgres", &db, [("slot", &slot)])
        .write(env.path());
    ok(&timevault(&config, &["init"]));
    let on_terminal = |args: &str| {
        let command = format!(
            "{} --config {} {args}",
            common::binary().display(),
            config.display()
        );
        let out = Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .output()
            .expect("script runs (util-linux; apt-get install -y bsdutils)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{args}: {text}");
        text
    };
    for (source, shown) in [
        ("app", "backing up app ["),
        ("files", "backing up files:"),
        ("db", "backing up db:"),
    ] {
        let text = on_terminal(&format!("backup --source {source}"));
        assert!(text.contains(shown), "{source}: no progress:\n{text}");
        assert!(text.contains("/s"), "{source}: no rate:\n{text}");
        // The summary: "backup of app: 1.2 MiB read, 300 KiB uploaded, 5 objects written in …".
        let summary = text
            .lines()
            .find_map(|l| l.split_once(&format!("backup of {source}: ")))
            .map(|(_, s)| s.to_string())
            .unwrap_or_else(|| panic!("{source}: no summary line:\n{text}"));
        let objects: u64 = summary
            .split_once(" uploaded, ")
            .and_then(|(_, rest)| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{source}: summary {summary:?}"));
        assert!(objects > 0, "{source}: {summary}");
        assert!(summary.contains(" read, "), "{source}: {summary}");
    }
    // The bar of a SQLite backup counts bytes against the file's size.
    let text = on_terminal("backup --source app");
    let size = std::fs::metadata(&env.db).unwrap().len();
    let total = indicatif_bytes(size);
    assert!(
        text.contains(&format!("/{total} read")),
        "no bar against the file's {total}:\n{text}"
    );

    let piped = timevault(&config, &["backup"]);
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(piped.status.success(), "{stderr}");
    assert!(
        !stderr.contains("backing up") && !stderr.contains("backup of"),
        "progress without a terminal: {stderr}"
    );
    let json = on_terminal("backup --json");
    assert!(
        !json.contains("backing up") && !json.contains("backup of"),
        "progress with --json:\n{json}"
    );
}

/// Bytes as indicatif's `{total_bytes}` shows them (binary units, two decimals).
fn indicatif_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}
