//! `restore --tenant` on a real PostgreSQL 15 cluster: the fixture and its workload, captured;
//! each tenant restored alone at several points equals that tenant's reference checksums, the
//! other tenants' rows are absent, and the global table is whole.

use crate::common;

use std::collections::BTreeMap;
use timevault::restore::postgres::restore_postgres_with;
use timevault::restore::postgres_tenant::TenantOptions;

use chrono::{DateTime, Utc};
use timevault::catalog::SourceCatalog;
use timevault::restore::RestoreOptions;
use timevault::source::postgres::PostgresSource;
use timevault::time::At;
use timevault_fixtures::checksum::{tenant_ids, tenants_checksums};
use timevault_fixtures::harness::unique_name;
use timevault_fixtures::{
    generate_postgres, table_checksums, tenant_checksums, Database, GenerateOptions, Workload,
};

struct Point {
    at: DateTime<Utc>,
    tenants: BTreeMap<i64, BTreeMap<String, String>>,
    plans: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_restores_alone_at_every_point() {
    let dir = tempfile::tempdir().unwrap();
    let repo = common::local_repo(dir.path()).await;
    let url = crate::pg!().create_database().await.unwrap();
    generate_postgres(&url, &GenerateOptions { seed: 31, scale: 1 })
        .await
        .unwrap();
    let mut app = Database::Postgres(url.clone()).connect().await.unwrap();
    let tenants = tenant_ids(&mut app).await.unwrap();
    assert!(tenants.len() >= 3, "{tenants:?}");
    let mut source = PostgresSource::open("tenants", &url, &repo).await.unwrap();
    let snap = source.snapshot(&repo).await.unwrap();
    let mut points = vec![Point {
        at: snap.taken_at,
        tenants: tenants_checksums(&mut app, &tenants).await.unwrap(),
        plans: table_checksums(&mut app).await.unwrap()["plans"].clone(),
    }];
    let mut workload = Workload::new(31, 1).with_bulk_rows(2_000);
    for _ in 0..4 {
        let point = workload.step(&mut app, None).await.unwrap();
        source.capture(&repo).await.unwrap();
        let at = SourceCatalog::load(&repo, "tenants")
            .await
            .unwrap()
            .newest()
            .unwrap();
        points.push(Point {
            at,
            tenants: point.tenants,
            plans: point.tables["plans"].clone(),
        });
    }
    // Two tenants the workload changed, and one more.
    let last = points.last().unwrap();
    let changed: Vec<i64> = tenants
        .iter()
        .copied()
        .filter(|t| points[0].tenants[t] != last.tenants[t])
        .collect();
    assert!(
        changed.len() >= 2,
        "the workload changes tenants: {changed:?}"
    );
    let unchanged = tenants.iter().copied().find(|t| !changed.contains(t));
    let picked: Vec<i64> = changed[..2].iter().copied().chain(unchanged).collect();
    for (i, p) in points.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
        for &tenant in &picked {
            let target = crate::pg!().url(&unique_name("tenant").replace('-', "_"));
            let restored = restore_postgres_with(
                &repo,
                &RestoreOptions {
                    source: "tenants".into(),
                    at: At::Instant(p.at),
                    target: target.clone(),
                    force: false,
                    jobs: None,
                },
                Some(&TenantOptions::new(&tenant.to_string())),
            )
            .await
            .unwrap();
            let mut r = Database::Postgres(target).connect().await.unwrap();
            assert_eq!(
                tenant_checksums(&mut r, tenant).await.unwrap(),
                p.tenants[&tenant],
                "point {i}, tenant {tenant}"
            );
            // No other tenant's rows: every other tenant hashes like one that does not exist.
            let nobody = tenant_checksums(&mut r, -1).await.unwrap();
            let other = picked.iter().find(|&&t| t != tenant).copied().unwrap();
            assert_eq!(tenant_checksums(&mut r, other).await.unwrap(), nobody);
            assert_eq!(table_checksums(&mut r).await.unwrap()["plans"], p.plans);
            eprintln!(
                "point {i} tenant {tenant}: {} snapshot rows, {} changes",
                restored.snapshot_rows, restored.changes
            );
        }
    }
    source.drop_slot().await.unwrap();
}
