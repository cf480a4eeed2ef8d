//! Blob sources end to end, in process: scans of local files, S3 (moto) and Azure (Azurite),
//! restore to scan instants and to instants between scans, dedup figures, refusals,
//! corruption, and the consistency group reference check.

use crate::common::config::{ConfigBuilder, Quorum};

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::{RngCore, SeedableRng};
use timevault::repo::{layout, Repository};
use timevault::restore::{
    check_references, restore_blobs, restore_sqlite, RestoreOptions, RestoreSummary,
    DEFAULT_REFERENCE_QUERY,
};
use timevault::source::blobs::{
    load_catalog, BlobEntry, BlobSource, ScanManifest, ScanStats, CHUNK_MAX,
};
use timevault::source::sqlite::SqliteSource;
use timevault::time::At;
use timevault::ErrorKind;
use timevault_fixtures::harness::{azure, s3};
use timevault_fixtures::{
    generate_blobs, generate_sqlite, BlobLocation, GenerateOptions, StoreUrl,
};

/// A repository on two local file replicas, in a temp directory.
struct Env {
    dir: tempfile::TempDir,
    repo: Repository,
}

impl Env {
    async fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let config = ConfigBuilder::two_sites()
            .write_quorum(Quorum::All)
            .lease_ttl("5s")
            .blobs("files", "files")
            .schedule("snapshot", "0 0 2 * * *")
            .schedule("blob_scan", "0 */15 * * * *")
            .load(dir.path());
        Repository::init(&config).await.unwrap();
        let repo = Repository::open(&config).await.unwrap();
        Env { dir, repo }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A fresh local location under the temp directory.
    fn local(&self, name: &str) -> StoreUrl {
        StoreUrl::local_dir(&self.path().join(name)).unwrap()
    }

    async fn source(&self, url: &StoreUrl) -> BlobSource {
        BlobSource::open("files", &url.url, &url.options, &self.repo)
            .await
            .unwrap()
    }

    async fn restore(
        &self,
        at: At,
        target: &StoreUrl,
        force: bool,
    ) -> timevault::Result<RestoreSummary> {
        restore_blobs(
            &self.repo,
            &RestoreOptions {
                source: "files".into(),
                at,
                target: target.url.clone(),
                force,
                jobs: None,
            },
            &target.options,
        )
        .await
    }
}

fn open(url: &StoreUrl) -> BlobLocation {
    url.open().unwrap()
}

async fn checksum(url: &StoreUrl) -> String {
    open(url).listing_checksum().await.unwrap()
}

/// Generate the scale-1 fixture files (seed 42) into `url`.
async fn generate(url: &StoreUrl) {
    generate_blobs(&open(url), &GenerateOptions { seed: 42, scale: 1 })
        .await
        .unwrap();
}

/// Sleep past the store's last-modified precision (one second on S3 and Azure), so a change
/// made now is ordered after the scan that just finished.
async fn next_second() {
    tokio::time::sleep(Duration::from_millis(1100)).await;
}

/// Deterministic incompressible bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

/// The content type a store reports for an object.
async fn content_type(loc: &BlobLocation, key: &object_store::path::Path) -> Option<String> {
    use object_store::ObjectStoreExt;
    let path = object_store::path::Path::from_iter(loc.prefix.parts().chain(key.parts()));
    let got = loc.store.get(&path).await.unwrap();
    got.attributes
        .get(&object_store::Attribute::ContentType)
        .map(|v| v.to_string())
}

/// An instant whose source state is known, and that state's listing checksum.
struct Point {
    name: &'static str,
    at: DateTime<Utc>,
    checksum: String,
}

/// Scan, and record the scan's instant with the source's checksum right then.
async fn scan_point(
    env: &Env,
    source: &mut BlobSource,
    url: &StoreUrl,
    name: &'static str,
) -> (Point, ScanStats) {
    let stats = source.scan(&env.repo).await.unwrap();
    let point = Point {
        name,
        at: stats.scanned_at,
        checksum: checksum(url).await,
    };
    (point, stats)
}

/// The fixture, then an overwrite, a put and a deletion between two scans, a deletion, a
/// re-creation and a new file, each scanned; every recorded instant restores exactly.
async fn history_restores_exactly(env: &Env, url: &StoreUrl, cloud_target: Option<StoreUrl>) {
    generate(url).await;
    let loc = open(url);
    let keys = loc.list_keys("tenants").await.unwrap();
    assert!(keys.len() > 20, "fixture has files: {keys:?}");
    let mut source = env.source(url).await;
    let mut points = Vec::new();

    let (p, first) = scan_point(env, &mut source, url, "fixture").await;
    assert_eq!(first.objects as usize, keys.len());
    assert_eq!(first.new as usize, keys.len());
    points.push(p);

    // Nothing changed: a listing only.
    let again = source.scan(&env.repo).await.unwrap();
    assert_eq!(
        (
            again.new,
            again.changed,
            again.deleted,
            again.bytes_read,
            again.chunks_new
        ),
        (0, 0, 0, 0, 0),
        "{again:?}"
    );
    assert_eq!(again.unchanged as usize, keys.len());

    // Between two scans: overwrite one file, put a new one, remember that instant, then
    // delete another file before the next scan sees it.
    next_second().await;
    loc.put(&keys[0], b"overwritten contract".to_vec())
        .await
        .unwrap();
    loc.put("tenants/1001/contracts/1/new.pdf", noise(1, 300_000))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    points.push(Point {
        name: "between scans, before a deletion",
        at: Utc::now(),
        checksum: checksum(url).await,
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    loc.delete(&keys[1]).await.unwrap();
    let (p, stats) = scan_point(env, &mut source, url, "overwrite, put, delete").await;
    assert_eq!(
        (stats.new, stats.changed, stats.deleted),
        (1, 1, 1),
        "{stats:?}"
    );
    points.push(p);

    next_second().await;
    loc.delete(&keys[2]).await.unwrap();
    let (p, _) = scan_point(env, &mut source, url, "deletion").await;
    points.push(p);

    next_second().await;
    loc.put(&keys[1], b"re-created with new bytes".to_vec())
        .await
        .unwrap();
    loc.put("tenants/1002/contracts/9/late.txt", b"late".to_vec())
        .await
        .unwrap();
    // Several chunks: restored through a multipart upload.
    loc.put("tenants/1002/contracts/9/scan.bin", noise(2, 9 << 20))
        .await
        .unwrap();
    let (p, stats) = scan_point(env, &mut source, url, "re-create and new").await;
    assert_eq!(
        (stats.new, stats.changed, stats.deleted),
        (3, 0, 0),
        "{stats:?}"
    );
    points.push(p);

    for (i, p) in points.iter().enumerate() {
        let target = env.local(&format!("restored/p{i}"));
        let summary = env
            .restore(At::Instant(p.at), &target, false)
            .await
            .unwrap();
        assert!(summary.restored_to <= p.at);
        assert_eq!(
            checksum(&target).await,
            p.checksum,
            "point {i} ({}) at {}",
            p.name,
            p.at
        );
    }
    let target = env.local("restored/latest");
    let summary = env.restore(At::Latest, &target, false).await.unwrap();
    assert_eq!(summary.requested, points.last().unwrap().at);
    assert_eq!(checksum(&target).await, points.last().unwrap().checksum);

    if let Some(cloud) = cloud_target {
        // Into the same kind of store: multipart parts and content types on the real API.
        env.restore(At::Latest, &cloud, false).await.unwrap();
        assert_eq!(checksum(&cloud).await, points.last().unwrap().checksum);
        let key = object_store::path::Path::from("tenants/1002/contracts/9/scan.bin");
        let source_type = content_type(&open(url), &key).await;
        println!("{}: content type of scan.bin: {source_type:?}", cloud.url);
        assert_eq!(content_type(&open(&cloud), &key).await, source_type);
    }

    let catalog = load_catalog(&env.repo, "files").await.unwrap();
    let windows = catalog.windows();
    assert_eq!(windows.len(), 1);
    assert_eq!(windows[0].oldest, points[0].at);
    assert_eq!(windows[0].newest, points.last().unwrap().at);
    let err = env
        .restore(
            At::Instant(points[0].at - chrono::Duration::seconds(1)),
            &env.local("restored/before"),
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_files_restore_to_every_instant() {
    let env = Env::new().await;
    let url = env.local("source");
    history_restores_exactly(&env, &url, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_source_restores_to_every_instant() {
    let env = Env::new().await;
    let url = s3().create_bucket("files").unwrap();
    let target = s3().create_bucket("restored").unwrap();
    history_restores_exactly(&env, &url, Some(target)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_source_restores_to_every_instant() {
    let env = Env::new().await;
    let url = azure().create_container("files").unwrap();
    let target = azure().create_container("restored").unwrap();
    history_restores_exactly(&env, &url, Some(target)).await;
}

/// The distinct chunk ids a scan's listing references.
async fn chunk_ids(env: &Env, manifest: &str) -> (Vec<BlobEntry>, HashSet<String>) {
    let manifest = ScanManifest::read(&env.repo, manifest).await.unwrap();
    let mut reader = manifest.entries(&env.repo);
    let mut entries = Vec::new();
    while let Some(e) = reader.next_entry().await.unwrap() {
        entries.push(e);
    }
    let ids = entries
        .iter()
        .flat_map(|e| e.chunks.iter().map(|c| c.id.clone()))
        .collect();
    (entries, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_content_is_stored_once_and_appends_upload_little() {
    let env = Env::new().await;
    let url = env.local("source");
    generate(&url).await;
    let mut source = env.source(&url).await;

    // Files shared across tenants are stored once.
    let first = source.scan(&env.repo).await.unwrap();
    let (entries, ids) = chunk_ids(&env, &first.manifest).await;
    let distinct: HashSet<&str> = entries.iter().map(|e| e.sha256.as_str()).collect();
    let duplicates = entries.len() - distinct.len();
    println!(
        "fixture: {} files, {} distinct contents, {} chunks stored, {} deduplicated, {} bytes read, {} uploaded",
        entries.len(),
        distinct.len(),
        first.chunks_new,
        first.chunks_deduplicated,
        first.bytes_read,
        first.bytes_uploaded
    );
    assert!(duplicates >= 10, "the fixture shares files across tenants");
    assert_eq!(first.chunks_new as usize, ids.len());
    assert!(first.chunks_deduplicated as usize >= duplicates);
    let stored = std::fs::read_dir(env.path().join("replicas/eu-west/chunks"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .count();
    assert_eq!(stored, ids.len() + first.listing_chunks_new as usize);

    // A scan with nothing changed reads and uploads nothing.
    let second = source.scan(&env.repo).await.unwrap();
    assert_eq!(second.bytes_read, 0);
    assert_eq!(second.chunks_new, 0);
    assert_eq!(second.listing_chunks_new, 0, "the listing deduplicates too");

    // A 50 MB file, then the same file with 1 MB appended.
    let loc = open(&url);
    let big = noise(7, 50 << 20);
    loc.put("tenants/1001/big.bin", big.clone()).await.unwrap();
    let added = source.scan(&env.repo).await.unwrap();
    assert!(added.bytes_uploaded >= 50 << 20);
    let mut appended = big;
    appended.extend_from_slice(&noise(8, 1 << 20));
    next_second().await;
    loc.put("tenants/1001/big.bin", appended).await.unwrap();
    let append = source.scan(&env.repo).await.unwrap();
    println!(
        "append 1 MiB to 50 MiB: read {} bytes, uploaded {} bytes in {} new chunks ({} deduplicated)",
        append.bytes_read, append.bytes_uploaded, append.chunks_new, append.chunks_deduplicated
    );
    assert_eq!(append.changed, 1);
    // Cut points depend on the repository's random key (FORMAT.md §7.1), so the counts vary
    // from run to run. What holds for every key: only the chunk that ended at the old end and
    // chunks that began in its last MiB (at most 4: 256 KiB minimum) are cut anew, so at most
    // one maximal chunk and the appended MiB are uploaded.
    assert!(
        append.chunks_deduplicated + 4 >= added.chunks_new,
        "{append:?} after {added:?}"
    );
    let most = u64::from(CHUNK_MAX) + (1 << 20) + (64 << 10);
    assert!(append.bytes_uploaded < most, "{append:?}");

    // The large object restores through a verified multipart upload.
    let target = env.local("restored");
    env.restore(At::Latest, &target, false).await.unwrap();
    assert_eq!(checksum(&target).await, checksum(&url).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_empty_target_is_refused_unless_forced() {
    let env = Env::new().await;
    let url = env.local("source");
    generate(&url).await;
    env.source(&url).await.scan(&env.repo).await.unwrap();
    let target = env.local("target");
    open(&target)
        .put("precious.txt", b"precious".to_vec())
        .await
        .unwrap();
    let err = env.restore(At::Latest, &target, false).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TargetExists, "{err}");
    assert_eq!(
        open(&target).list_keys("").await.unwrap(),
        vec!["precious.txt"]
    );
    // Forced: the target becomes exactly the instant's state.
    env.restore(At::Latest, &target, true).await.unwrap();
    assert_eq!(checksum(&target).await, checksum(&url).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_corrupted_on_every_replica_fails_the_restore_as_corrupt() {
    let env = Env::new().await;
    let url = env.local("source");
    generate(&url).await;
    let stats = env.source(&url).await.scan(&env.repo).await.unwrap();
    let (entries, _) = chunk_ids(&env, &stats.manifest).await;
    // A file whose content no other file shares, so it is the one the restore trips on.
    let victim = entries
        .iter()
        .find(|e| e.size > 100_000 && entries.iter().filter(|o| o.sha256 == e.sha256).count() == 1)
        .unwrap();
    let key = layout::chunk(&victim.chunks[0].id);
    for replica in ["eu-west", "eu-north"] {
        let path = env.path().join("replicas").join(replica).join(&key);
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
    }
    let err = env
        .restore(At::Latest, &env.local("restored"), false)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    let message = err.to_string();
    assert!(message.contains(&victim.key), "{message}");
    assert!(message.contains("which stay there"), "{message}");
    println!("corrupt chunk: {message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_restore_keeps_rows_and_blobs_in_agreement() {
    let env = Env::new().await;
    let db = env.path().join("app.db");
    let options = GenerateOptions { seed: 42, scale: 1 };
    generate_sqlite(&db, &options).await.unwrap();
    let url = env.local("source");
    generate_blobs(&open(&url), &options).await.unwrap();

    // Blobs scanned before and after the database snapshot: the snapshot instant is inside
    // both windows.
    let mut blobs = env.source(&url).await;
    blobs.scan(&env.repo).await.unwrap();
    let mut sqlite = SqliteSource::open("app", &db, &env.repo).await.unwrap();
    let snapshot = sqlite.snapshot(&env.repo).await.unwrap();
    blobs.scan(&env.repo).await.unwrap();
    let at = At::Instant(snapshot.taken_at);

    let restored_db: PathBuf = env.path().join("restored/app.db");
    restore_sqlite(
        &env.repo,
        &RestoreOptions {
            source: "app".into(),
            at,
            target: restored_db.display().to_string(),
            force: false,
            jobs: None,
        },
    )
    .await
    .unwrap();
    let target = env.local("restored/files");
    env.restore(at, &target, false).await.unwrap();
    let none: BTreeMap<String, String> = BTreeMap::new();
    let missing = check_references(&restored_db, DEFAULT_REFERENCE_QUERY, &target.url, &none)
        .await
        .unwrap();
    assert!(missing.is_empty(), "{missing:?}");

    let keys = open(&target).list_keys("tenants").await.unwrap();
    open(&target).delete(&keys[3]).await.unwrap();
    let missing = check_references(&restored_db, DEFAULT_REFERENCE_QUERY, &target.url, &none)
        .await
        .unwrap();
    assert_eq!(missing, vec![keys[3].clone()]);
    sqlite.close(&env.repo).await.unwrap();
}
