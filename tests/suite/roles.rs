//! Write-only backup hosts and roles (issue 25). A daemon whose host holds only a `backup`
//! credential (made from the admin key with `keys role backup`) snapshots, captures and scans
//! SQLite, PostgreSQL and blob sources and prunes; with the same credential restore, export,
//! drills and key management fail at once naming the role they need (exit 3); trying every key
//! the credential holds, or can open from the repository, on every object finds none of the
//! rows or files written; with a `restore` credential every restore is exact. Writers are the
//! `sqlite3` and `psql` CLIs.

use crate::common;
use common::config::ConfigBuilder;
use common::daemon::Daemon;
use common::{http_get, keyscan, ok, psql, timevault};

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use chrono::Utc;
use timevault::config::Config;
use timevault::keys::role::{Credential, Role};
use timevault::repo::Repository;
use timevault_fixtures::checksum::tenant_ids;
use timevault_fixtures::harness::{free_port, unique_name};
use timevault_fixtures::{
    generate_postgres, generate_sqlite, table_checksums, tenant_checksums, Database,
    GenerateOptions,
};

/// What the rows and files written under the backup host say.
const MARK: &str = "ROLE-MARK";

/// Exit 3 naming the role that was needed.
fn refused(out: &Output, role: &str) {
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("needs the {role} role")),
        "names the {role} role: {stderr}"
    );
    assert!(
        !stderr.contains("authentication") && !stderr.contains("decrypt"),
        "a role error, never a decryption error: {stderr}"
    );
}

/// `keys role ROLE --out dir/ROLE.cred` with the admin config; the file is mode 0600.
fn credential(admin: &Path, dir: &Path, role: &str) -> PathBuf {
    let out = dir.join(format!("{role}.cred"));
    let said = ok(&timevault(
        admin,
        &["keys", "role", role, "--out", out.to_str().unwrap()],
    ));
    assert!(
        said.contains(&format!("wrote a {role} credential")),
        "{said}"
    );
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{role} credential mode");
    out
}

/// `dir/ROLE.toml`: the admin's config with `key_file` at the `ROLE` credential, as that
/// host's config.
fn host_config(base: &ConfigBuilder, dir: &Path, role: &str) -> PathBuf {
    base.clone()
        .key_file(&format!("{role}.cred"))
        .write_as(&dir.join(format!("{role}.toml")))
}

/// The credential's keys, as a thief of the host would hold them.
fn stolen(path: &Path) -> Credential {
    Credential::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Blob scan manifests written so far for `source`.
fn scans(replica: &Path, source: &str) -> usize {
    std::fs::read_dir(replica.join("manifests").join(source)).map_or(0, |d| d.count())
}

fn wait_for_scan(replica: &Path, source: &str, more_than: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while scans(replica, source) <= more_than {
        assert!(Instant::now() < deadline, "no new scan of {source} in 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every row of the pre-roles fixture's table `notes`, in order, read by the `sqlite3` CLI.
fn notes(db: &Path) -> String {
    let out = Command::new("sqlite3")
        .arg(db)
        .arg("SELECT count(*) || ':' || group_concat(id || '=' || body, '|') FROM (SELECT * FROM notes ORDER BY id);")
        .output()
        .expect("sqlite3 runs (apt-get install -y sqlite3, or .ci/install-deps)");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// `/healthz` once it answers 200.
fn healthy(daemon: &Daemon, port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((200, body)) = http_get(port, "/healthz") {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz never answered 200: {:?}\ndaemon log:\n{}",
            http_get(port, "/healthz"),
            daemon.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_host_backs_up_every_source_and_can_decrypt_none_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    generate_sqlite(&db, &GenerateOptions { seed: 93, scale: 1 })
        .await
        .unwrap();
    let url = crate::pg!().create_database().await.unwrap();
    generate_postgres(&url, &GenerateOptions { seed: 94, scale: 1 })
        .await
        .unwrap();
    let files = dir.path().join("files");
    std::fs::create_dir_all(files.join("tenants/1")).unwrap();
    std::fs::write(
        files.join("tenants/1/contract.txt"),
        format!("{MARK} the signed contract\n").repeat(200),
    )
    .unwrap();
    let replica = dir.path().join("replica");
    let port = free_port().unwrap();
    let base = ConfigBuilder::one_replica("replica")
        .sqlite("app", "app.db")
        .postgres("rolespg", &url)
        .blobs("files", "files")
        .schedule("capture_interval", "200ms")
        .schedule("blob_scan", "*/2 * * * * *")
        // The backup host cannot drill: it says so instead.
        .schedule("drill", "*/5 * * * * *")
        .listen(port);
    let admin = base.write(dir.path());
    ok(&timevault(&admin, &["init"]));
    let backup_cred = credential(&admin, dir.path(), "backup");
    let restore_cred = credential(&admin, dir.path(), "restore");
    let again = timevault(
        &admin,
        &[
            "keys",
            "role",
            "backup",
            "--out",
            backup_cred.to_str().unwrap(),
        ],
    );
    assert_eq!(again.status.code(), Some(3), "never over a file: {again:?}");
    let backup = host_config(&base, dir.path(), "backup");
    let restore = host_config(&base, dir.path(), "restore");
    let shown = ok(&timevault(&backup, &["keys", "show"]));
    assert!(shown.contains("role: backup"), "{shown}");
    assert!(shown.contains("opened with: backup credential"), "{shown}");

    // The backup host's daemon: a first snapshot and scan, then writes from other processes.
    let daemon = Daemon::command(&backup).log_level("warn").start();
    let loaded = Config::load(&backup).unwrap();
    common::captured_within_a_minute(&loaded, "app", Utc::now()).await;
    common::captured_within_a_minute(&loaded, "rolespg", Utc::now()).await;
    wait_for_scan(&replica, "files", 0);
    let shell = Command::new("sqlite3")
        .arg(&db)
        .arg(format!(
            "UPDATE contracts SET title = '{MARK} sqlite ' || id WHERE id % 3 = 0;"
        ))
        .output()
        .expect("sqlite3 runs (apt-get install -y sqlite3, or .ci/install-deps)");
    assert!(shell.status.success(), "{shell:?}");
    psql(
        &url,
        &format!("UPDATE contracts SET title = '{MARK} pg ' || id WHERE id % 3 = 0"),
    );
    let scanned = scans(&replica, "files");
    std::fs::write(
        files.join("tenants/1/amendment.txt"),
        format!("{MARK} an amendment\n").repeat(100),
    )
    .unwrap();
    let written = Utc::now();
    common::captured_within_a_minute(&loaded, "app", written).await;
    common::captured_within_a_minute(&loaded, "rolespg", written).await;
    wait_for_scan(&replica, "files", scanned);

    // It is healthy and says why it does not drill; so does `status`; prune runs.
    let body = healthy(&daemon, port);
    assert!(body.contains("drill: needs the restore role"), "{body}");
    let status = ok(&timevault(&backup, &["status"]));
    assert!(status.contains("(role backup)"), "{status}");
    assert!(status.contains("drill: needs the restore role"), "{status}");
    ok(&timevault(&backup, &["prune"]));

    // Everything that reads content is refused at once, naming the role.
    let target = dir.path().join("refused.db");
    refused(
        &timevault(
            &backup,
            &[
                "restore",
                "--source",
                "app",
                "--at",
                "latest",
                "--to",
                target.to_str().unwrap(),
            ],
        ),
        "restore",
    );
    assert!(!target.exists(), "nothing written");
    let archive = dir.path().join("t1.tar.zst");
    refused(
        &timevault(
            &backup,
            &[
                "export",
                "--tenant",
                "1",
                "--at",
                "latest",
                "--out",
                archive.to_str().unwrap(),
                "--requested-by",
                "ops@example.com",
                "--reason",
                "test",
            ],
        ),
        "restore",
    );
    assert!(!archive.exists());
    refused(&timevault(&backup, &["drill"]), "restore");
    refused(
        &timevault(
            &backup,
            &[
                "tenant",
                "forget",
                "1",
                "--requested-by",
                "dpo@example.com",
                "--reason",
                "test",
                "--yes",
            ],
        ),
        "admin",
    );
    refused(
        &timevault(
            &backup,
            &[
                "keys",
                "role",
                "restore",
                "--out",
                dir.path().join("x").to_str().unwrap(),
            ],
        ),
        "admin",
    );
    refused(&timevault(&restore, &["keys", "rotate"]), "admin");

    // verify --read-data on the backup host: headers and data key records checked, content
    // sealed; nothing is damage.
    let verified = ok(&timevault(&backup, &["verify", "--read-data"]));
    assert!(verified.contains("sealed:"), "{verified}");
    assert!(!verified.contains("damaged"), "{verified}");

    // A thief with the backup credential: every key it holds or can open, on every object.
    let replicas = [replica.clone()];
    let thief = stolen(&backup_cred);
    assert_eq!(thief.role, Role::Backup);
    let held = keyscan::keys_held(&thief.keys, &thief.content, Role::Backup, &replicas);
    assert_eq!(held.len(), 1, "only the metadata key: {:?}", held.keys());
    let found = keyscan::scan(&held, thief.keys.key_id(), &replicas, &[MARK]);
    println!("backup credential scan: {found:?}");
    assert!(found.found.is_empty(), "{found:?}");
    assert!(
        found.unreadable > 0 && found.opened > 0,
        "content sealed, metadata open: {found:?}"
    );
    // The same scan with the restore credential finds every mark: the scan is not vacuous.
    let operator = stolen(&restore_cred);
    let held = keyscan::keys_held(&operator.keys, &operator.content, Role::Restore, &replicas);
    let seen = keyscan::scan(&held, operator.keys.key_id(), &replicas, &[MARK]);
    assert_eq!(seen.unreadable, 0, "{seen:?}");
    assert!(
        seen.found(MARK).len() >= 3,
        "rows of both databases and the files: {seen:?}"
    );

    // The restore host restores every source exactly (the daemon stopped: `latest` is now).
    daemon.stop();
    let restored_db = dir.path().join("restored.db");
    ok(&timevault(
        &restore,
        &[
            "restore",
            "--source",
            "app",
            "--at",
            "latest",
            "--to",
            restored_db.to_str().unwrap(),
        ],
    ));
    assert_eq!(
        common::checksums(&restored_db).await,
        common::checksums(&db).await
    );
    let pg_target = crate::pg!().url(&unique_name("roles").replace('-', "_"));
    ok(&timevault(
        &restore,
        &[
            "restore", "--source", "rolespg", "--at", "latest", "--to", &pg_target,
        ],
    ));
    let mut source = Database::Postgres(url.clone()).connect().await.unwrap();
    let mut copy = Database::Postgres(pg_target).connect().await.unwrap();
    assert_eq!(
        table_checksums(&mut copy).await.unwrap(),
        table_checksums(&mut source).await.unwrap()
    );
    let restored_files = dir.path().join("restored-files");
    ok(&timevault(
        &restore,
        &[
            "restore",
            "--source",
            "files",
            "--at",
            "latest",
            "--to",
            restored_files.to_str().unwrap(),
        ],
    ));
    for name in ["tenants/1/contract.txt", "tenants/1/amendment.txt"] {
        assert_eq!(
            std::fs::read(restored_files.join(name)).unwrap(),
            std::fs::read(files.join(name)).unwrap(),
            "{name}"
        );
    }
    let verified = ok(&timevault(&restore, &["verify", "--read-data"]));
    assert!(!verified.contains("sealed:"), "{verified}");
    assert!(verified.contains("under content data keys"), "{verified}");
    // The scan listings are metadata, told apart from content: no content under the
    // repository key in a repository written with roles.
    assert!(
        verified
            .contains("blob listing(s) under the repository key (metadata), 0 content chunk(s)"),
        "{verified}"
    );

    // Drills run on a restore host: `daemon --only drill` drills every source on the schedule
    // (no lease, no capture) and serves the outcome; the backup credential cannot run it.
    refused(
        &timevault(&backup, &["daemon", "--only", "drill"]),
        "restore",
    );
    let drills = Daemon::command(&restore)
        .arg("--only")
        .arg("drill")
        .log_level("warn")
        .start();
    let deadline = Instant::now() + Duration::from_secs(120);
    let drilled =
        |s: &str| std::fs::read_dir(replica.join("drills").join(s)).map_or(0, |d| d.count()) > 0;
    while !["app", "rolespg", "files"].iter().all(|s| drilled(s)) {
        assert!(
            Instant::now() < deadline,
            "no drill record from daemon --only drill:\n{}",
            drills.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, body) = http_get(port, "/healthz").expect("the drill daemon serves /healthz");
    assert_eq!(code, 200, "drills passed: {body}");
    drills.stop();
}

/// Tenant keys on a backup host: each backup process makes each tenant a key it cannot read
/// back (so two processes, two keys), identifying chunks as the tenant's other keys do; a thief
/// of the host opens none of them; the restore role restores every tenant exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_host_seals_each_tenant_under_keys_it_cannot_open() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::pg!().create_database().await.unwrap();
    generate_postgres(&url, &GenerateOptions { seed: 95, scale: 2 })
        .await
        .unwrap();
    let mut app = Database::Postgres(url.clone()).connect().await.unwrap();
    let tenants = tenant_ids(&mut app).await.unwrap();
    let b = tenants[1];
    psql(
        &url,
        &format!("UPDATE contracts SET title = '{MARK} ' || id WHERE tenant_id = {b}"),
    );
    let base = ConfigBuilder::one_replica("replica")
        .postgres("rolestk", &url)
        .fixture_tenancy()
        .tenant_keys();
    let admin = base.write(dir.path());
    ok(&timevault(&admin, &["init"]));
    credential(&admin, dir.path(), "backup");
    let restore_cred = credential(&admin, dir.path(), "restore");
    let backup = host_config(&base, dir.path(), "backup");
    let restore = host_config(&base, dir.path(), "restore");

    // Two backup processes: a snapshot, then a capture of B's and A's changes.
    ok(&timevault(&backup, &["backup"]));
    psql(
        &url,
        &format!(
            "UPDATE contract_versions SET change_note = '{MARK} captured' \
               WHERE contract_id IN (SELECT id FROM contracts WHERE tenant_id = {b}); \
             UPDATE contracts SET title = title || ' v2' WHERE tenant_id = {}",
            tenants[0]
        ),
    );
    ok(&timevault(&backup, &["backup"]));
    refused(&timevault(&backup, &["tenant", "keys"]), "restore");
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&timevault(&restore, &["tenant", "keys", "--json"]))).unwrap();
    let keys_of_b = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["tenant"].as_str() == Some(b.to_string().as_str()))
        .count();
    assert!(keys_of_b >= 2, "a key per backup process: {listed}");

    let replicas = [dir.path().join("replica")];
    let thief = stolen(&dir.path().join("backup.cred"));
    let held = keyscan::keys_held(&thief.keys, &thief.content, Role::Backup, &replicas);
    let found = keyscan::scan(&held, thief.keys.key_id(), &replicas, &[MARK]);
    assert!(found.found.is_empty(), "{found:?}");
    assert!(found.unreadable > 0, "{found:?}");
    let operator = stolen(&restore_cred);
    let held = keyscan::keys_held(&operator.keys, &operator.content, Role::Restore, &replicas);
    let seen = keyscan::scan(&held, operator.keys.key_id(), &replicas, &[MARK]);
    assert_eq!(seen.unreadable + seen.records_unreadable, 0, "{seen:?}");
    assert!(
        seen.found(MARK)
            .iter()
            .any(|k| k.contains("(sealed record)")),
        "B's captured rows, sealed under its key: {seen:?}"
    );

    let target = crate::pg!().url(&unique_name("roles_t").replace('-', "_"));
    ok(&timevault(
        &restore,
        &[
            "restore", "--source", "rolestk", "--at", "latest", "--to", &target,
        ],
    ));
    let mut copy = Database::Postgres(target).connect().await.unwrap();
    assert_eq!(
        table_checksums(&mut copy).await.unwrap(),
        table_checksums(&mut app).await.unwrap()
    );
    let b_target = crate::pg!().url(&unique_name("roles_b").replace('-', "_"));
    ok(&timevault(
        &restore,
        &[
            "restore",
            "--source",
            "rolestk",
            "--at",
            "latest",
            "--tenant",
            &b.to_string(),
            "--to",
            &b_target,
        ],
    ));
    let mut copy = Database::Postgres(b_target).connect().await.unwrap();
    assert_eq!(
        tenant_checksums(&mut copy, b).await.unwrap(),
        tenant_checksums(&mut app, b).await.unwrap()
    );
    // The repository opens for the admin as before; a backup host's catalog is intact.
    let config = Config::load(&admin).unwrap();
    Repository::open(&config).await.unwrap();
}

/// A repository written before roles existed (`fixtures/pre-roles`, made by the release before
/// them: a SQLite source and a blob source, content under the repository key) keeps working:
/// its old snapshot restores exactly, new backups put their content under data keys, and
/// `verify --read-data` reports the mix. A backup credential made for it still reads the old
/// content (it is under the repository key, which the credential holds; documented), and none
/// of the new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_written_before_roles_keeps_working_and_verify_shows_the_mix() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/pre-roles"));
    common::copy_dir(fixture, dir.path());
    let key = dir.path().join("timevault.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let admin = dir.path().join("timevault.toml");
    let listed: serde_json::Value = serde_json::from_str(&ok(&timevault(
        &admin,
        &["snapshots", "--source", "app", "--json"],
    )))
    .unwrap();
    let old_at = listed[0]["taken_at"].as_str().unwrap().to_string();
    let old_db = dir.path().join("old.db");
    std::fs::copy(dir.path().join("app.db"), &old_db).unwrap();

    // Today's timevault writes new content into it.
    let shell = Command::new("sqlite3")
        .arg(dir.path().join("app.db"))
        .arg("INSERT INTO notes VALUES (1000, 'ROLE-MARK written after roles');")
        .output()
        .expect("sqlite3 runs (apt-get install -y sqlite3, or .ci/install-deps)");
    assert!(shell.status.success(), "{shell:?}");
    std::fs::write(
        dir.path().join("files/tenants/7/new.txt"),
        format!("{MARK} a new file\n").repeat(50),
    )
    .unwrap();
    ok(&timevault(&admin, &["backup"]));
    let verified: serde_json::Value = serde_json::from_str(&ok(&timevault(
        &admin,
        &["verify", "--read-data", "--json"],
    )))
    .unwrap();
    let mix = &verified["replicas"][0]["keys"];
    assert!(
        mix["repository"].as_u64().unwrap() > 0 && mix["data"].as_u64().unwrap() > 0,
        "old content under the repository key, new under data keys: {verified}"
    );
    let said = ok(&timevault(&admin, &["verify", "--read-data"]));
    assert!(said.contains("a backup credential can read that"), "{said}");

    // The old snapshot and the latest state both restore exactly.
    for (at, expected) in [
        (old_at.as_str(), &old_db),
        ("latest", &dir.path().join("app.db")),
    ] {
        let target = dir.path().join(format!("restored-{}.db", at.len()));
        ok(&timevault(
            &admin,
            &[
                "restore",
                "--source",
                "app",
                "--at",
                at,
                "--to",
                target.to_str().unwrap(),
            ],
        ));
        assert_eq!(notes(&target), notes(expected), "at {at}");
    }

    // A backup credential for this repository: the old content is readable with it, the new
    // is not.
    let cred = credential(&admin, dir.path(), "backup");
    let thief = stolen(&cred);
    let replicas = [dir.path().join("replica")];
    let held = keyscan::keys_held(&thief.keys, &thief.content, Role::Backup, &replicas);
    let found = keyscan::scan(
        &held,
        thief.keys.key_id(),
        &replicas,
        &["PRE-ROLES-MARK", MARK],
    );
    assert!(!found.found("PRE-ROLES-MARK").is_empty(), "{found:?}");
    assert!(found.found(MARK).is_empty(), "{found:?}");
}
