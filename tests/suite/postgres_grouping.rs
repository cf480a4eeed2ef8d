//! Tenant-pure PostgreSQL snapshot chunks, on a real PostgreSQL 15 cluster.
//!
//! A snapshot copied on 2 workers with tables split into 4-page ranges (so a tenant's rows
//! are spread over several parts) records a tenant for every chunk of every tenant table.
//! Restoring each tenant alone from it must equal the tenant's reference checksums with no
//! other tenant's rows (which proves every chunk holds only its recorded tenant's rows: a
//! foreign row in a chunk would appear in the wrong tenant's restore and be missing from its
//! own), while reading less than a full restore. A snapshot taken with
//! `snapshot_group_by_tenant = false` records no grouping; a tenant restore then reads every
//! chunk and filters rows, with the same result.

use crate::common;

use timevault::catalog::{SnapshotManifest, SourceCatalog};
use timevault::config::{PostgresOptions, SourceConfig};
use timevault::repo::Repository;
use timevault::restore::postgres::{restore_postgres, restore_postgres_with};
use timevault::restore::postgres_tenant::TenantOptions;
use timevault::restore::RestoreOptions;
use timevault::source::postgres::{PostgresSnapshotDetails, PostgresSource};
use timevault::time::At;
use timevault_fixtures::checksum::{tenant_ids, tenants_checksums};
use timevault_fixtures::harness::unique_name;
use timevault_fixtures::{
    generate_postgres, table_checksums, tenant_checksums, Database, GenerateOptions,
};

fn bytes_read(repo: &Repository) -> u64 {
    repo.replicas()
        .replicas()
        .iter()
        .map(|r| r.health().bytes_read)
        .sum()
}

async fn details(repo: &Repository, source: &str) -> PostgresSnapshotDetails {
    let catalog = SourceCatalog::load(repo, source).await.unwrap();
    let chain = catalog.latest_chain().unwrap().id().to_string();
    details_of(repo, source, &chain).await
}

async fn details_of(repo: &Repository, source: &str, chain: &str) -> PostgresSnapshotDetails {
    let catalog = SourceCatalog::load(repo, source).await.unwrap();
    let found = catalog.chains.iter().find(|c| c.id() == chain).unwrap();
    let manifest = SnapshotManifest::read(repo, &found.snapshot.key)
        .await
        .unwrap();
    serde_json::from_value(manifest.details).unwrap()
}

/// Restore `tenant` alone at `at` into a new database; returns the bytes read from the
/// repository and the database's URL.
async fn restore_tenant(
    repo: &Repository,
    source: &str,
    at: chrono::DateTime<chrono::Utc>,
    tenant: i64,
) -> (u64, String) {
    let target = crate::pg!().url(&unique_name("grouped").replace('-', "_"));
    let before = bytes_read(repo);
    restore_postgres_with(
        repo,
        &RestoreOptions {
            source: source.into(),
            at: At::Instant(at),
            target: target.clone(),
            force: false,
            jobs: None,
        },
        Some(&TenantOptions::new(&tenant.to_string())),
    )
    .await
    .unwrap();
    (bytes_read(repo) - before, target)
}

/// Restore the whole source at `at`; returns the bytes read from the repository.
async fn restore_full(repo: &Repository, source: &str, at: chrono::DateTime<chrono::Utc>) -> u64 {
    let target = crate::pg!().url(&unique_name("full").replace('-', "_"));
    let before = bytes_read(repo);
    restore_postgres(
        repo,
        &RestoreOptions {
            source: source.into(),
            at: At::Instant(at),
            target,
            force: false,
            jobs: None,
        },
    )
    .await
    .unwrap();
    bytes_read(repo) - before
}

fn source_config(name: &str, url: &str, grouped: bool) -> SourceConfig {
    SourceConfig::postgres(
        name,
        url,
        PostgresOptions {
            snapshot_workers: Some(2),
            snapshot_split_pages: Some(4),
            snapshot_group_by_tenant: Some(grouped),
            ..PostgresOptions::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_chunk_holds_one_tenant_and_a_tenant_restore_reads_only_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let repo = common::local_repo(dir.path()).await;
    let url = crate::pg!().create_database().await.unwrap();
    generate_postgres(&url, &GenerateOptions { seed: 47, scale: 3 })
        .await
        .unwrap();
    let mut app = Database::Postgres(url.clone()).connect().await.unwrap();
    let tenants = tenant_ids(&mut app).await.unwrap();
    let expected = tenants_checksums(&mut app, &tenants).await.unwrap();
    let plans = table_checksums(&mut app).await.unwrap()["plans"].clone();

    let config = source_config("grouped", &url, true);
    let mut source = PostgresSource::open_configured(&config, None, &repo)
        .await
        .unwrap();
    let snap = source.snapshot(&repo).await.unwrap();
    let details = details(&repo, "grouped").await;

    // Every image records its grouping; tenant tables name a tenant for every chunk.
    let mut split_tenants = 0;
    for image in &details.tables {
        let grouping = image.tenancy.as_ref().expect("a grouped snapshot");
        let name = format!("{}.{}", image.schema, image.name);
        match (&grouping.key, name.as_str()) {
            (None, "public.plans") => {}
            (None, other) => panic!("{other} was not grouped by tenant"),
            (Some(key), _) => {
                assert_eq!(grouping.chunk_tenants.len(), image.chunks.len(), "{name}");
                if image.name == "contract_versions" {
                    assert_eq!(key.hops.len(), 1, "{name} belongs through contracts");
                }
                // A tenant whose chunks are not contiguous came from several parts.
                let runs = grouping
                    .chunk_tenants
                    .windows(2)
                    .filter(|w| w[0] != w[1])
                    .count()
                    + 1;
                let distinct: std::collections::BTreeSet<_> =
                    grouping.chunk_tenants.iter().collect();
                if runs > distinct.len() {
                    split_tenants += 1;
                }
            }
        }
    }
    assert!(
        split_tenants > 0,
        "some table was copied in several parts ({} parts in all)",
        snap.parts
    );

    let full = restore_full(&repo, "grouped", snap.taken_at).await;

    // Every tenant alone: exact, isolated, and cheaper than the whole database.
    let nobody = {
        let (_, target) = restore_tenant(&repo, "grouped", snap.taken_at, -1).await;
        let mut r = Database::Postgres(target).connect().await.unwrap();
        tenant_checksums(&mut r, -1).await.unwrap()
    };
    let mut reads = Vec::new();
    for &tenant in &tenants {
        let (read, target) = restore_tenant(&repo, "grouped", snap.taken_at, tenant).await;
        let mut r = Database::Postgres(target).connect().await.unwrap();
        assert_eq!(
            tenant_checksums(&mut r, tenant).await.unwrap(),
            expected[&tenant],
            "tenant {tenant}"
        );
        let other = tenants.iter().copied().find(|&t| t != tenant).unwrap();
        assert_eq!(
            tenant_checksums(&mut r, other).await.unwrap(),
            nobody,
            "tenant {tenant}'s restore holds none of tenant {other}'s rows"
        );
        assert_eq!(table_checksums(&mut r).await.unwrap()["plans"], plans);
        assert!(read < full, "tenant {tenant} read {read} of {full} bytes");
        reads.push(read);
    }
    let smallest = *reads.iter().min().unwrap();
    eprintln!("full restore read {full} bytes; tenants read {reads:?}");
    assert!(
        smallest * 4 < full,
        "the smallest tenant read {smallest} bytes of the full restore's {full}"
    );

    // One tenant changes; in the next snapshot every other tenant's chunks are the same
    // chunks, so only the changed tenant's rows are stored again.
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
    let after = details_of(&repo, "grouped", &second.chain).await;
    let chunks_of = |d: &PostgresSnapshotDetails, tenant: &str| -> Vec<String> {
        d.tables
            .iter()
            .flat_map(|image| {
                let tenants = &image.tenancy.as_ref().unwrap().chunk_tenants;
                image
                    .chunks
                    .iter()
                    .zip(tenants)
                    .filter(|(_, t)| t.as_deref() == Some(tenant))
                    .map(|(c, _)| c.id.clone())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    for &tenant in &tenants {
        let (was, now) = (
            chunks_of(&details, &tenant.to_string()),
            chunks_of(&after, &tenant.to_string()),
        );
        if tenant == changed {
            assert_ne!(was, now, "tenant {tenant} changed");
        } else {
            assert_eq!(was, now, "tenant {tenant} did not change");
        }
    }
    assert!(
        second.uploaded * 4 < second.bytes,
        "the second snapshot uploaded {} of {} bytes",
        second.uploaded,
        second.bytes
    );
    source.drop_slot().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ungrouped_snapshot_restores_a_tenant_by_filtering_every_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let repo = common::local_repo(dir.path()).await;
    let url = crate::pg!().create_database().await.unwrap();
    generate_postgres(&url, &GenerateOptions { seed: 48, scale: 1 })
        .await
        .unwrap();
    let mut app = Database::Postgres(url.clone()).connect().await.unwrap();
    let tenants = tenant_ids(&mut app).await.unwrap();
    let expected = tenants_checksums(&mut app, &tenants).await.unwrap();

    let config = source_config("ungrouped", &url, false);
    let mut source = PostgresSource::open_configured(&config, None, &repo)
        .await
        .unwrap();
    let snap = source.snapshot(&repo).await.unwrap();
    let details = details(&repo, "ungrouped").await;
    assert!(details.tables.iter().all(|t| t.tenancy.is_none()));
    let full = restore_full(&repo, "ungrouped", snap.taken_at).await;
    for &tenant in tenants.iter().take(3) {
        let (read, target) = restore_tenant(&repo, "ungrouped", snap.taken_at, tenant).await;
        let mut r = Database::Postgres(target).connect().await.unwrap();
        assert_eq!(
            tenant_checksums(&mut r, tenant).await.unwrap(),
            expected[&tenant],
            "tenant {tenant}"
        );
        // Nothing says where the tenant's rows are: every chunk is read.
        assert!(
            read * 10 >= full * 9,
            "tenant {tenant} read {read} bytes, a full restore {full}"
        );
    }
    source.drop_slot().await.unwrap();
}
