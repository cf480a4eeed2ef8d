//! Keys and parameters (issue 19): a repository header that fails the key check on one replica
//! does not hide the others; Argon2 parameters read from a replica are bounded before any work
//! is done with them; an empty passphrase is refused; and blob chunk boundaries depend on the
//! repository's key, so they do not reveal which known files a bucket holds.

use crate::common;
use common::config::ConfigBuilder;

use std::path::{Path, PathBuf};

use rand::{RngCore, SeedableRng};
use timevault::config::Config;
use timevault::repo::Repository;
use timevault::source::blobs::{BlobSource, ScanManifest, CHUNK_AVG, CHUNK_MAX, CHUNK_MIN};
use timevault::ErrorKind;
use timevault_fixtures::StoreUrl;

/// `repository` (its key) with two file replicas (`ra`, `rb`), written to `timevault.toml`.
fn config(dir: &Path, repository: ConfigBuilder) -> Config {
    repository
        .replica("a", "r1", "ra")
        .replica("b", "r2", "rb")
        .load(dir)
}

/// Edit the `config` member of the repository config object stored on one replica.
fn edit_header(replica: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = replica.join("config");
    let mut value: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut value["config"]);
    std::fs::write(&path, serde_json::to_vec_pretty(&value).unwrap()).unwrap();
}

#[tokio::test]
async fn a_key_check_failing_on_one_replica_tries_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), ConfigBuilder::new().key_file("k"));
    let created = Repository::init(&config).await.unwrap();
    // Replica a (read first) holds a header whose key check does not match the key.
    edit_header(&dir.path().join("ra"), |h| {
        h["key_check"] = "00".repeat(32).into()
    });
    let repo = Repository::open(&config)
        .await
        .expect("replica b's header proves the key");
    assert_eq!(repo.id(), created.repository_id);
    // Only when every replica's header refuses the key is it a wrong key.
    edit_header(&dir.path().join("rb"), |h| {
        h["key_check"] = "11".repeat(32).into()
    });
    let err = Repository::open(&config).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Key, "{err}");
    assert!(err.to_string().contains("wrong key"), "{err}");
}

#[tokio::test]
async fn a_kdf_edited_on_one_replica_does_not_hide_the_passphrase() {
    std::env::set_var("TV_KEYS_TEST_PASS_KDF", "correct horse battery staple");
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        ConfigBuilder::new().passphrase_env("TV_KEYS_TEST_PASS_KDF"),
    );
    let created = Repository::init(&config).await.unwrap();
    // Replica a's salt was changed: the key derived with it is not the repository's key.
    edit_header(&dir.path().join("ra"), |h| {
        h["kdf"]["salt"] = "AAAAAAAAAAAAAAAAAAAAAA==".into()
    });
    let repo = Repository::open(&config)
        .await
        .expect("replica b's parameters derive the right key");
    assert_eq!(repo.id(), created.repository_id);
}

#[tokio::test]
async fn absurd_argon2_parameters_are_corrupt_and_never_computed() {
    std::env::set_var("TV_KEYS_TEST_PASS_BOUNDS", "correct horse battery staple");
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        ConfigBuilder::new().passphrase_env("TV_KEYS_TEST_PASS_BOUNDS"),
    );
    Repository::init(&config).await.unwrap();
    let original = std::fs::read(dir.path().join("ra/config")).unwrap();
    // ~3.7 TiB of memory, a billion passes, a thousand lanes, a 2-byte salt.
    let absurd: [(&str, serde_json::Value); 4] = [
        ("m_cost_kib", 4_000_000_000u32.into()),
        ("t_cost", 1_000_000_000u32.into()),
        ("p_cost", 1000u32.into()),
        ("salt", "AAA=".into()),
    ];
    for (field, value) in absurd {
        for replica in ["ra", "rb"] {
            std::fs::write(dir.path().join(replica).join("config"), &original).unwrap();
            edit_header(&dir.path().join(replica), |h| {
                h["kdf"][field] = value.clone()
            });
        }
        let started = std::time::Instant::now();
        let err = Repository::open(&config).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{field}: {err}");
        assert!(err.to_string().contains(field), "{field}: {err}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{field}: refused before deriving anything"
        );
    }
    // One replica with absurd parameters, the other intact: the intact one opens.
    std::fs::write(dir.path().join("rb/config"), &original).unwrap();
    Repository::open(&config)
        .await
        .expect("replica b's parameters are sane");
}

#[tokio::test]
async fn an_empty_passphrase_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    config(
        dir.path(),
        ConfigBuilder::new().passphrase_env("TV_KEYS_TEST_EMPTY"),
    );
    let out = std::process::Command::new(common::binary())
        .arg("--config")
        .arg(dir.path().join("timevault.toml"))
        .arg("init")
        .env("TV_KEYS_TEST_EMPTY", "")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("empty passphrase"), "{stderr}");
    assert!(stderr.contains("TV_KEYS_TEST_EMPTY"), "{stderr}");
    assert!(
        !dir.path().join("ra/config").exists(),
        "no repository was created"
    );
}

/// The chunk lengths of every object of the newest scan, by key.
async fn chunk_lengths(repo: &Repository, source: &BlobSource) -> Vec<(String, Vec<u64>)> {
    let scan = source.last_scan().unwrap();
    let manifest = ScanManifest::read(repo, &scan.key).await.unwrap();
    let mut reader = manifest.entries(repo);
    let mut out = Vec::new();
    while let Some(entry) = reader.next_entry().await.unwrap() {
        out.push((entry.key, entry.chunks.iter().map(|c| c.len).collect()));
    }
    out
}

/// Scan `files` into a new repository keyed by `key_file` (created when missing).
async fn scan_with_key(dir: &Path, name: &str, key_file: &Path, files: &StoreUrl) -> Vec<u64> {
    let root = dir.join(name);
    std::fs::create_dir_all(&root).unwrap();
    let config = ConfigBuilder::one_replica("replica")
        .key_file(&key_file.display().to_string())
        .parse(&root);
    Repository::init(&config).await.unwrap();
    let repo = Repository::open(&config).await.unwrap();
    let mut source = BlobSource::open("files", &files.url, &files.options, &repo)
        .await
        .unwrap();
    source.scan(&repo).await.unwrap();
    let mut lengths = chunk_lengths(&repo, &source).await;
    assert_eq!(lengths.len(), 1);
    lengths.pop().unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_chunk_boundaries_depend_on_the_repository_key() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let mut data = vec![0u8; 12 << 20];
    rand::rngs::StdRng::seed_from_u64(19).fill_bytes(&mut data);
    std::fs::write(files.join("known.pdf"), &data).unwrap();
    let url = StoreUrl::local_dir(&files).unwrap();
    // What anyone who knows the file computes with FastCDC's public gear table.
    let public: Vec<u64> = fastcdc::v2020::FastCDC::new(&data, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX)
        .map(|c| c.length as u64)
        .collect();
    assert!(public.len() >= 6, "{public:?}");
    let keys: Vec<PathBuf> = (0..2).map(|i| dir.path().join(format!("k{i}"))).collect();
    let first = scan_with_key(dir.path(), "one", &keys[0], &url).await;
    let again = scan_with_key(dir.path(), "one-again", &keys[0], &url).await;
    let other = scan_with_key(dir.path(), "two", &keys[1], &url).await;
    for lengths in [&first, &other] {
        assert_eq!(lengths.iter().sum::<u64>(), data.len() as u64);
        assert!(lengths[..lengths.len() - 1]
            .iter()
            .all(|&l| (u64::from(CHUNK_MIN)..=u64::from(CHUNK_MAX)).contains(&l)));
    }
    assert_eq!(first, again, "one key always cuts the same way (dedup)");
    assert_ne!(first, public, "the public gear table would reveal the file");
    assert_ne!(other, public, "the public gear table would reveal the file");
    assert_ne!(first, other, "another key cuts elsewhere");
}
