//! Forgetting a tenant (issue 24): `tenant forget` destroys the tenant's data keys on every
//! replica while the daemon runs. Its snapshot chunks and its captured row changes (sealed per
//! record under its key, also rows reached only through a foreign key) become unreadable in
//! every backup; every other tenant restores exactly at instants before and after the forget;
//! export and restore of the tenant fail with exit 7; decrypting every object left with every
//! key left yields none of its bytes; prune deletes its chunks; verify and drill pass.
//! Every write comes from `psql`, a process of its own.

use crate::common;
use common::config::ConfigBuilder;
use common::daemon::Daemon;
use common::{keyscan, ok, psql, timevault};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use timevault::config::Config;
use timevault::keys::role::Role;
use timevault::repo::Repository;
use timevault_fixtures::checksum::tenant_ids;
use timevault_fixtures::harness::unique_name;
use timevault_fixtures::schema::{Tenancy, TABLES};
use timevault_fixtures::{generate_postgres, tenant_checksums, Database, GenerateOptions};

/// What the forgotten tenant's rows say, so a scan can look for them.
const MARK: &str = "FORGET-ME";
/// What its file says (which holds the mark too).
const FILE_MARK: &str = "FORGET-ME-FILE";

/// Every object of the replicas opened with every key left (the admin's, which opens every
/// data key and tenant key still stored), looking for B's marks.
fn scan(repo: &Repository, dir: &Path, replicas: &[PathBuf]) -> keyscan::Scan {
    let content = keyscan::admin_content(&dir.join("k"));
    let keys = keyscan::keys_held(repo.keys(), &content, Role::Admin, replicas);
    keyscan::scan(&keys, repo.keys().key_id(), replicas, &[MARK, FILE_MARK])
}

/// Delete every row of `tenant` from the source, children first (as an operator erases a
/// customer from production before forgetting its backups).
fn erase_from_source(url: &str, tenant: i64) {
    let mut sql = String::from("BEGIN;");
    for table in TABLES.iter().rev() {
        match &table.tenancy {
            Tenancy::Global => {}
            Tenancy::Column(c) => {
                sql.push_str(&format!("DELETE FROM {} WHERE {c} = {tenant};", table.name))
            }
            Tenancy::Parent { column, table: parent, key } => sql.push_str(&format!(
                "DELETE FROM {} WHERE {column} IN (SELECT {key} FROM {parent} WHERE tenant_id = {tenant});",
                table.name
            )),
        }
    }
    sql.push_str("COMMIT;");
    psql(url, &sql);
}

/// Each tenant's checksums in the database at `url`.
async fn checksums(url: &str, tenants: &[i64]) -> BTreeMap<i64, BTreeMap<String, String>> {
    let mut conn = Database::Postgres(url.to_string()).connect().await.unwrap();
    let mut out = BTreeMap::new();
    for &t in tenants {
        out.insert(t, tenant_checksums(&mut conn, t).await.unwrap());
    }
    out
}

/// Rows of `tenant` anywhere in the database at `url`, and rows carrying the mark.
fn rows_of(url: &str, tenant: i64) -> (i64, i64) {
    let mut of_tenant = Vec::new();
    for table in TABLES {
        match &table.tenancy {
            Tenancy::Global => {}
            Tenancy::Column(c) => of_tenant.push(format!(
                "(SELECT count(*) FROM {} WHERE {c} = {tenant})",
                table.name
            )),
            Tenancy::Parent { column, .. } => of_tenant.push(format!(
                "(SELECT count(*) FROM {} WHERE {column} NOT IN (SELECT id FROM contracts))",
                table.name
            )),
        }
    }
    let rows: i64 = psql(url, &format!("SELECT {}", of_tenant.join(" + ")))
        .parse()
        .unwrap();
    let marked: i64 = psql(
        url,
        &format!(
            "SELECT (SELECT count(*) FROM contracts WHERE title LIKE '{MARK}%') + \
             (SELECT count(*) FROM contract_versions WHERE change_note LIKE '{MARK}%')"
        ),
    )
    .parse()
    .unwrap();
    (rows, marked)
}

/// Restore the source at `at` with the CLI into a new database; its URL.
fn restore_at(config: &Path, at: DateTime<Utc>) -> String {
    let target = crate::pg!().url(&unique_name("fg").replace('-', "_"));
    ok(&timevault(
        config,
        &[
            "restore",
            "--source",
            "fg",
            "--at",
            &at.to_rfc3339(),
            "--to",
            &target,
        ],
    ));
    target
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_tenant_is_unreadable_everywhere_and_every_other_tenant_restores_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::pg!().create_database().await.unwrap();
    generate_postgres(&url, &GenerateOptions { seed: 71, scale: 3 })
        .await
        .unwrap();
    let mut app = Database::Postgres(url.clone()).connect().await.unwrap();
    let tenants = tenant_ids(&mut app).await.unwrap();
    assert!(tenants.len() >= 3, "{tenants:?}");
    let (a, b, c) = (tenants[0], tenants[1], tenants[2]);
    let others = [a, c];
    // B's rows carry the mark in the snapshot: a table with the tenant column, and one that
    // belongs through contract_id.
    psql(
        &url,
        &format!(
            "UPDATE contracts SET title = '{MARK} ' || id WHERE tenant_id = {b}; \
             UPDATE contract_versions SET change_note = '{MARK} snapshot' \
               WHERE contract_id IN (SELECT id FROM contracts WHERE tenant_id = {b})"
        ),
    );
    // Each tenant's files under its prefix; B's carry the mark too.
    let files = dir.path().join("files");
    for (tenant, body) in [
        (a, "the contract of A".to_string()),
        (b, format!("{FILE_MARK} the contract of B")),
        (c, "the contract of C".to_string()),
    ] {
        let path = files.join(format!("tenants/{tenant}/contract.txt"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, body.repeat(100)).unwrap();
    }
    std::fs::create_dir_all(files.join("shared")).unwrap();
    std::fs::write(files.join("shared/logo.txt"), "everyone's logo").unwrap();
    let replicas = [dir.path().join("north"), dir.path().join("west")];
    let config_path = ConfigBuilder::one_replica("north")
        .replica("west", "west", "west")
        .postgres("fg", &url)
        .blobs("files", "files")
        .fixture_tenancy()
        .tenancy_blobs("files", "prefix:tenants/{tenant}/")
        .tenant_keys()
        .schedule("capture_interval", "200ms")
        .schedule("blob_scan", "*/2 * * * * *")
        .write(dir.path());
    ok(&timevault(&config_path, &["init"]));
    let config = Config::load(&config_path).unwrap();
    let daemon = Daemon::command(&config_path).log_level("warn").start();
    common::captured_within_a_minute(&config, "fg", Utc::now()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_dir(dir.path().join("north/manifests/files"))
        .map_or(true, |d| d.count() == 0)
    {
        assert!(
            Instant::now() < deadline,
            "the daemon scans the files at start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Changes after the snapshot, each from psql: B's child rows first (their tenant is found
    // by asking the server), then its contracts (found in the row), then A's and C's.
    psql(
        &url,
        &format!(
            "UPDATE contract_versions SET change_note = '{MARK} captured child' \
               WHERE contract_id IN (SELECT id FROM contracts WHERE tenant_id = {b})"
        ),
    );
    psql(
        &url,
        &format!("UPDATE contracts SET title = '{MARK} captured ' || id WHERE tenant_id = {b}"),
    );
    psql(
        &url,
        &format!(
            "UPDATE contracts SET title = title || ' v2' WHERE tenant_id IN ({a}, {c}); \
             UPDATE contract_versions SET change_note = 'reviewed' \
               WHERE contract_id IN (SELECT id FROM contracts WHERE tenant_id = {a})"
        ),
    );
    let before = Utc::now();
    let t1 = common::captured_within_a_minute(&config, "fg", before).await;
    let at_t1 = checksums(&url, &others).await;

    // Before the forget, the scan finds B's mark both in snapshot chunks and sealed records.
    let repo = Repository::open(&config).await.unwrap();
    let found = scan(&repo, dir.path(), &replicas);
    assert!(
        found
            .found(MARK)
            .iter()
            .any(|k| k.starts_with("chunks/") && !k.contains("sealed")),
        "{found:?}"
    );
    assert!(
        found
            .found(MARK)
            .iter()
            .any(|k| k.contains("(sealed record)")),
        "{found:?}"
    );
    assert!(
        !found.found(FILE_MARK).is_empty(),
        "B's file content is found: {found:?}"
    );
    assert_eq!(found.unreadable + found.records_unreadable, 0, "{found:?}");

    // The operator erases B from production, then forgets its backups while the daemon runs.
    erase_from_source(&url, b);
    std::fs::remove_dir_all(files.join(format!("tenants/{b}"))).unwrap();
    let erased = Utc::now();
    common::captured_within_a_minute(&config, "fg", erased).await;
    let b_id = b.to_string();
    let forget = [
        "tenant",
        "forget",
        &b_id,
        "--requested-by",
        "dpo@example.com",
        "--reason",
        "erasure request 2026-118",
    ];
    let unconfirmed = timevault(&config_path, &forget);
    assert_eq!(unconfirmed.status.code(), Some(2), "no terminal, no --yes");
    assert!(String::from_utf8_lossy(&unconfirmed.stderr).contains("pass --yes"));
    let said = ok(&timevault(
        &config_path,
        &[&forget[..], &["--yes"]].concat(),
    ));
    println!("tenant forget said:\n{said}");
    assert!(said.contains(&format!("forgot tenant {b}")), "{said}");
    assert!(said.contains("unreadable for ever:"), "{said}");
    // A and C keep changing after the forget.
    psql(
        &url,
        &format!("UPDATE contracts SET title = title || ' v3' WHERE tenant_id IN ({a}, {c})"),
    );
    let after = Utc::now();
    let t2 = common::captured_within_a_minute(&config, "fg", after).await;
    let at_t2 = checksums(&url, &others).await;
    // A scan after the forget too.
    let scans = || {
        std::fs::read_dir(dir.path().join("north/manifests/files"))
            .unwrap()
            .count()
    };
    let before_scans = scans();
    let deadline = Instant::now() + Duration::from_secs(30);
    while scans() == before_scans {
        assert!(Instant::now() < deadline, "the daemon scans every 2 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    daemon.stop();

    // B's keys are gone from every replica; the tenant keys left are A's and C's.
    let listed = ok(&timevault(&config_path, &["tenant", "keys"]));
    assert!(!listed.contains(&format!("tenant {b} ")), "{listed}");
    assert!(listed.contains(&format!("tenant {a} ")), "{listed}");

    // Restores at instants before and after the forget: A and C exact, nothing of B.
    for (at, expected) in [(t1, &at_t1), (t2, &at_t2)] {
        let target = restore_at(&config_path, at);
        assert_eq!(&checksums(&target, &others).await, expected, "at {at}");
        assert_eq!(rows_of(&target, b), (0, 0), "B's rows at {at}");
    }
    // The files at every scan (the first held B's file, the last was taken after the forget):
    // A's and C's exact, nothing of B.
    let scans: serde_json::Value = serde_json::from_str(&ok(&timevault(
        &config_path,
        &["snapshots", "--source", "files", "--json"],
    )))
    .unwrap();
    let scans = scans.as_array().unwrap();
    assert!(
        scans.len() >= 2,
        "a scan before and after the forget: {scans:?}"
    );
    for (i, scan) in scans.iter().enumerate() {
        let at = scan["taken_at"].as_str().unwrap();
        let restored = dir.path().join(format!("files-{i}"));
        ok(&timevault(
            &config_path,
            &[
                "restore",
                "--source",
                "files",
                "--at",
                at,
                "--to",
                restored.to_str().unwrap(),
            ],
        ));
        for tenant in [a, c] {
            let name = format!("tenants/{tenant}/contract.txt");
            assert_eq!(
                std::fs::read(restored.join(&name)).unwrap(),
                std::fs::read(files.join(&name)).unwrap()
            );
        }
        assert!(restored.join("shared/logo.txt").exists());
        assert!(
            !restored.join(format!("tenants/{b}")).exists(),
            "B's files at {at}"
        );
    }
    // B's export and tenant restore: exit 7, naming the forget.
    let out = dir.path().join("b.tar.zst");
    let refused = timevault(
        &config_path,
        &[
            "export",
            "--tenant",
            &b.to_string(),
            "--at",
            &t1.to_rfc3339(),
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(refused.status.code(), Some(7));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(&format!("tenant {b} was forgotten on")),
        "{stderr}"
    );
    assert!(stderr.contains("by dpo@example.com"), "{stderr}");
    assert!(!out.exists());

    // Every object left, with every key left: not one byte of B.
    let after_forget = scan(&repo, dir.path(), &replicas);
    assert!(after_forget.found.is_empty(), "{after_forget:?}");
    assert!(
        after_forget.under_other_keys > 0 && after_forget.records_opened > 0,
        "{after_forget:?}"
    );
    assert!(
        after_forget.unreadable > 0 && after_forget.records_unreadable > 0,
        "{after_forget:?}"
    );
    println!("scan after forget: {after_forget:?}");

    // Verify counts B's objects as forgotten, not damaged; prune (after the grace) deletes its
    // chunks; then verify, the drill and a restore still pass.
    let verified = ok(&timevault(&config_path, &["verify", "--read-data"]));
    assert!(verified.contains("forgotten:"), "{verified}");
    let pruned = ok(&timevault(&config_path, &["prune"]));
    assert!(pruned.contains("chunks of forgotten tenants: "), "{pruned}");
    let pruned = scan(&repo, dir.path(), &replicas);
    println!("scan after prune: {pruned:?}");
    assert_eq!(pruned.unreadable, 0, "B's chunks deleted: {pruned:?}");
    assert!(pruned.found.is_empty());
    let verified = ok(&timevault(&config_path, &["verify"]));
    assert!(
        verified.contains("chunk(s) of forgotten tenants deleted by prune"),
        "{verified}"
    );
    let drilled = ok(&timevault(&config_path, &["drill"]));
    assert!(drilled.contains("forgotten tenant"), "{drilled}");
    let target = restore_at(&config_path, t2);
    assert_eq!(checksums(&target, &others).await, at_t2);
}
