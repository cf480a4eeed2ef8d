//! Per-tenant data keys for PostgreSQL snapshots (issue 24): with `[tenancy] tenant_keys`, each
//! tenant's tenant-pure chunks are identified and sealed under a data key of its own, created
//! on first use and stored (under the repository key) at `keys/tenants/<handle>/<key id>`.
//! Restores (whole and per tenant, from a fresh process) are exact, `verify --read-data`
//! authenticates every chunk with its tenant's key, the next snapshot deduplicates within each
//! tenant, and the chunk files themselves name exactly one key per tenant plus the
//! repository's.

use crate::common;
use common::config::ConfigBuilder;
use common::ok;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use timevault::archive::{self, Kind};
use timevault::catalog::{SnapshotManifest, SourceCatalog};
use timevault::config::{PostgresOptions, SourceConfig};
use timevault::repo::Repository;
use timevault::restore::postgres::restore_postgres_with;
use timevault::restore::postgres_tenant::TenantOptions;
use timevault::restore::RestoreOptions;
use timevault::source::postgres::{PostgresSnapshotDetails, PostgresSource};
use timevault::stored::postgres::changes::{parse_lines, Record};
use timevault::time::At;
use timevault_fixtures::checksum::{tenant_ids, tenants_checksums};
use timevault_fixtures::harness::unique_name;
use timevault_fixtures::{
    generate_postgres, table_checksums, tenant_checksums, Database, GenerateOptions,
};

async fn details(repo: &Repository, chain: &str) -> PostgresSnapshotDetails {
    let catalog = SourceCatalog::load(repo, "app").await.unwrap();
    let found = catalog.chains.iter().find(|c| c.id() == chain).unwrap();
    let manifest = SnapshotManifest::read(repo, &found.snapshot.key)
        .await
        .unwrap();
    serde_json::from_value(manifest.details).unwrap()
}

/// Chunk id → the key id in its header, from the replica's files.
fn chunk_key_ids(replica: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for dir in std::fs::read_dir(replica.join("chunks")).unwrap() {
        for file in std::fs::read_dir(dir.unwrap().path()).unwrap() {
            let path = file.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let id = path.file_name().unwrap().to_string_lossy().into_owned();
            out.insert(id, hex::encode(&bytes[12..20]));
        }
    }
    out
}

/// Each tenant's chunk ids in a snapshot.
fn tenant_chunks(details: &PostgresSnapshotDetails) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for image in &details.tables {
        let Some(grouping) = &image.tenancy else {
            continue;
        };
        for (chunk, tenant) in image.chunks.iter().zip(&grouping.chunk_tenants) {
            if let Some(t) = tenant {
                out.entry(t.clone()).or_default().insert(chunk.id.clone());
            }
        }
    }
    out
}

/// Restore the source (or one tenant) at `at` through a freshly opened repository, whose
/// tenant keys are read from the repository rather than a cache; the target's URL.
async fn restore_fresh(
    config: &timevault::config::Config,
    at: chrono::DateTime<chrono::Utc>,
    tenant: Option<i64>,
) -> String {
    let fresh = Repository::open(config).await.unwrap();
    let target = crate::pg!().url(&unique_name("tk").replace('-', "_"));
    let options = RestoreOptions {
        source: "app".into(),
        at: At::Instant(at),
        target: target.clone(),
        force: false,
        jobs: None,
    };
    let tenant = tenant.map(|t| TenantOptions::new(&t.to_string()));
    restore_postgres_with(&fresh, &options, tenant.as_ref())
        .await
        .unwrap();
    target
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_snapshot_chunk_is_sealed_under_its_own_key_and_restores_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::pg!().create_database().await.unwrap();
    generate_postgres(&url, &GenerateOptions { seed: 61, scale: 3 })
        .await
        .unwrap();
    let config_path = ConfigBuilder::one_replica("replica")
        .postgres("app", &url)
        .fixture_tenancy()
        .tenant_keys()
        .write(dir.path());
    ok(&common::timevault(&config_path, &["init"]));
    let config = timevault::config::Config::load(&config_path).unwrap();
    let repo = Repository::open(&config).await.unwrap();
    assert!(repo.tenant_keys_enabled());

    let mut app = Database::Postgres(url.clone()).connect().await.unwrap();
    let tenants = tenant_ids(&mut app).await.unwrap();
    let expected = tenants_checksums(&mut app, &tenants).await.unwrap();
    let whole = table_checksums(&mut app).await.unwrap();

    let source_config = SourceConfig::postgres(
        "app",
        &url,
        PostgresOptions {
            snapshot_workers: Some(2),
            snapshot_split_pages: Some(4),
            ..PostgresOptions::default()
        },
    );
    let mut source =
        PostgresSource::open_configured(&source_config, config.tenancy.as_ref(), &repo)
            .await
            .unwrap();
    let snap = source.snapshot(&repo).await.unwrap();
    let first = details(&repo, &snap.chain).await;

    // One key per tenant, listed by `tenant keys`, and each tenant's chunks carry its key id.
    let listed: serde_json::Value = serde_json::from_str(&ok(&common::timevault(
        &config_path,
        &["tenant", "keys", "--json"],
    )))
    .unwrap();
    let key_of: BTreeMap<String, String> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            assert_eq!(k["wrapped_by"], "repository", "{k}");
            (
                k["tenant"].as_str().unwrap().to_string(),
                k["key_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected_tenants: BTreeSet<String> = tenants.iter().map(|t| t.to_string()).collect();
    assert_eq!(
        key_of.keys().cloned().collect::<BTreeSet<_>>(),
        expected_tenants
    );
    assert_eq!(
        key_of.values().collect::<BTreeSet<_>>().len(),
        tenants.len(),
        "distinct keys"
    );

    let on_disk = chunk_key_ids(&dir.path().join("replica"));
    let by_tenant = tenant_chunks(&first);
    for (tenant, chunks) in &by_tenant {
        for chunk in chunks {
            assert_eq!(
                on_disk[chunk], key_of[tenant],
                "chunk {chunk} of tenant {tenant}"
            );
        }
    }
    // Everything else (global tables, rows of no tenant, the schema image) is content under
    // the snapshot process's data key (FORMAT.md §3.4): the chunk files name exactly the
    // tenants' keys and the data keys.
    let data_keys: Vec<String> = std::fs::read_dir(dir.path().join("replica/keys/data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!data_keys.is_empty());
    let ids: BTreeSet<&String> = on_disk.values().collect();
    let mut wanted: BTreeSet<&String> = key_of.values().collect();
    wanted.extend(data_keys.iter().filter(|k| ids.contains(k)));
    assert_eq!(ids, wanted);
    assert!(
        !ids.contains(&repo.keys().key_id_hex()),
        "no content under the repository key"
    );
    // The repository's key alone does not open a tenant's chunk.
    let (chunk, _) = by_tenant
        .iter()
        .next()
        .map(|(t, c)| (c.iter().next().unwrap().clone(), t))
        .unwrap();
    let name = format!("chunks/{}/{chunk}", &chunk[..2]);
    let sealed = std::fs::read(dir.path().join("replica").join(&name)).unwrap();
    assert!(archive::open(repo.keys(), Kind::Chunk, &name, &sealed).is_err());

    // A fresh process (keys read from the repository, not a cache): whole and per tenant exact.
    let target = restore_fresh(&config, snap.taken_at, None).await;
    let mut r = Database::Postgres(target).connect().await.unwrap();
    assert_eq!(table_checksums(&mut r).await.unwrap(), whole);
    for &tenant in tenants.iter().take(2) {
        let target = restore_fresh(&config, snap.taken_at, Some(tenant)).await;
        let mut r = Database::Postgres(target).connect().await.unwrap();
        assert_eq!(
            tenant_checksums(&mut r, tenant).await.unwrap(),
            expected[&tenant],
            "tenant {tenant}"
        );
    }
    ok(&common::timevault(&config_path, &["verify", "--read-data"]));

    // The next snapshot, one tenant changed: every other tenant's chunks are the same chunks
    // (deduplicated under its own key), and no tenant got a second key.
    let changed = tenants[1];
    let mut writer = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    sqlx::query("UPDATE contracts SET title = title || ' (renewed)' WHERE tenant_id = $1")
        .bind(changed)
        .execute(&mut writer)
        .await
        .unwrap();
    let second = source.snapshot(&repo).await.unwrap();
    let after = tenant_chunks(&details(&repo, &second.chain).await);
    for tenant in &tenants {
        let t = tenant.to_string();
        if *tenant == changed {
            assert_ne!(after[&t], by_tenant[&t], "tenant {t} changed");
        } else {
            assert_eq!(after[&t], by_tenant[&t], "tenant {t} unchanged");
        }
    }
    let listed: serde_json::Value = serde_json::from_str(&ok(&common::timevault(
        &config_path,
        &["tenant", "keys", "--json"],
    )))
    .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), tenants.len());
}

/// A table's shape changed in the batch that also changes its rows, with tenant keys on (rows
/// sealed beside the decoding): restores at an instant between the update and the change, and
/// at the batch's end, have each instant's columns, types and rows. The table's new shape (`S`)
/// is written in order behind the records still being sealed; for a while it overtook them
/// (it stood before the batch's first `B`, where replay ignores it). This test passed then
/// too, since the segment's schema image carries the shape; its check of the stored lines
/// did not. Writes from `psql`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_altered_in_the_batch_that_changes_its_rows_restores_exactly_with_tenant_keys() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::pg!().create_database().await.unwrap();
    generate_postgres(&url, &GenerateOptions { seed: 67, scale: 1 })
        .await
        .unwrap();
    common::psql(
        &url,
        "CREATE TABLE notes (id int PRIMARY KEY, tenant_id bigint NOT NULL, body text, extra text); \
         INSERT INTO notes SELECT g, (SELECT min(tenant_id) FROM contracts) + g % 3, 'b0 ' || g, NULL \
         FROM generate_series(1, 300) g",
    );
    let config_path = ConfigBuilder::one_replica("replica")
        .postgres("app", &url)
        .fixture_tenancy()
        .tenant_keys()
        .write(dir.path());
    ok(&common::timevault(&config_path, &["init"]));
    let config = timevault::config::Config::load(&config_path).unwrap();
    let repo = Repository::open(&config).await.unwrap();
    let source_config = SourceConfig::postgres("app", &url, PostgresOptions::default());
    let mut source =
        PostgresSource::open_configured(&source_config, config.tenancy.as_ref(), &repo)
            .await
            .unwrap();
    source.snapshot(&repo).await.unwrap();

    // One batch: every tenant's rows set the column, then it is dropped, then rows change again.
    let rows = "SELECT string_agg(id || ':' || tenant_id || ':' || body || ':' || \
                coalesce(to_jsonb(notes) ->> 'extra', '-') || ':' || \
                coalesce(to_jsonb(notes) ->> 'score', '-'), ',' ORDER BY id) FROM notes";
    let columns = "SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod), ',' \
                   ORDER BY attnum) FROM pg_attribute WHERE attrelid = 'notes'::regclass AND attnum > 0 AND NOT attisdropped";
    common::psql(
        &url,
        "UPDATE notes SET extra = 'e ' || id, body = 'b1 ' || id",
    );
    let before_drop = (common::psql(&url, rows), common::psql(&url, columns));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let between: chrono::DateTime<chrono::Utc> = common::psql(
        &url,
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    )
    .parse()
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    common::psql(
        &url,
        "ALTER TABLE notes DROP COLUMN extra, ADD COLUMN score numeric(10,2) DEFAULT 1.5",
    );
    common::psql(
        &url,
        "UPDATE notes SET body = 'b2 ' || id, score = id / 7.0 WHERE id % 2 = 0",
    );
    let after_drop = (common::psql(&url, rows), common::psql(&url, columns));
    let captured = source.capture(&repo).await.unwrap();
    assert_eq!(captured.segments.len(), 1, "one batch: {captured:?}");
    // The stored lines: the new shape comes after the first transaction's commit.
    let segment = timevault::changelog::SegmentManifest::read(&repo, &captured.segments[0])
        .await
        .unwrap();
    let mut records = Vec::new();
    for chunk in &segment.chunks {
        let data = repo.read_chunk(&chunk.id).await.unwrap();
        records.extend(parse_lines(&data).unwrap());
    }
    // Tenants interleave row by row: each tenant's runs are one sealed record, the later runs
    // `Y` lines naming it.
    let ys = records
        .iter()
        .filter(|r| matches!(r, Record::SealedPart(_)))
        .count();
    assert!(ys > 100, "{ys} Y lines");
    let first = |wanted: fn(&Record) -> bool| records.iter().position(wanted).unwrap();
    let schema = first(|r| matches!(r, Record::Schema(_)));
    let commit = first(|r| matches!(r, Record::Commit { .. }));
    assert!(
        schema > commit,
        "the S line (at {schema}) stands after the first commit (at {commit})"
    );

    // At an instant between the update and the drop: the column and its values are there.
    let target = restore_fresh(&config, between, None).await;
    assert_eq!(
        before_drop.1,
        "id integer,tenant_id bigint,body text,extra text"
    );
    assert_eq!(
        (common::psql(&target, rows), common::psql(&target, columns)),
        before_drop
    );
    // At the end of the batch: the new shape, and every table equals the source.
    let target = restore_fresh(&config, captured.newest.unwrap(), None).await;
    assert_eq!(
        (common::psql(&target, rows), common::psql(&target, columns)),
        after_drop
    );
    let mut restored = Database::Postgres(target).connect().await.unwrap();
    let mut app = Database::Postgres(url.clone()).connect().await.unwrap();
    assert_eq!(
        table_checksums(&mut restored).await.unwrap(),
        table_checksums(&mut app).await.unwrap()
    );
    source.drop_slot().await.unwrap();
}
