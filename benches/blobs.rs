//! The blob store source next to `restic`, in one run on the same generated files: initial
//! backup, incremental backup after changing 5% of the files, restore of the latest state,
//! and repository size. Prints ratios; asserts nothing about time (only that both restores
//! equal the source, by a SHA-256 listing).
//!
//! `cargo bench --bench blobs` (release). TIMEVAULT_BENCH_BLOBS_SCALE (default 20) sizes the
//! data set at 100 files per unit, about 1 GB at 20 (2,000 files); 2 is a quick run
//! (200 files, about 110 MB). TIMEVAULT_BENCH_BLOBS_STAGES=0 skips the stage breakdown.
//! Files live in a temporary directory (TMPDIR); the run needs about 7x the data set on disk.
//!
//! The data set is written once by a deterministic generator (the fixture generator's
//! attachments average about 100 KB, so 2,000 of them are about 200 MB; this one keeps its
//! content and file kinds and draws larger sizes): PDF-like files (text and incompressible
//! streams), PNG-like scans and text, 10 KB to 8 MB, about 5% of them exact copies of an
//! earlier file. Both tools back up the same tree, then the same 5% of the files change once
//! (half overwritten in the middle, half appended to), then both back up again.
//!
//! timevault runs as its CLI would: each figure opens the repository (key file, no KDF) and
//! the source afresh. It writes to one local file replica (the figure compared with restic,
//! which writes one repository) and, separately, to two (the default geo setup); zstd level 3.
//! restic runs with its defaults: repository v2, compression `auto`, its own cache in the
//! temporary directory, a password in RESTIC_PASSWORD (its scrypt KDF runs in every command).
//! `sync` runs before every timed step so one tool's write-back does not land on the other;
//! each step also reports the CPU time the rest of the machine used meanwhile (kernel
//! write-back included), so a run disturbed by a neighbour shows as such.
//!
//! Then, unless disabled, one thread walks timevault's backup and restore paths stage by
//! stage (list, read, chunk, hash, seal, write) to show where the time goes, with a few
//! alternatives for comparison (whole-object reads, in-memory FastCDC, writes without fsync).

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fastcdc::v2020::{AsyncStreamCDC, FastCDC};
use futures::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use sha2::{Digest, Sha256};
use timevault::archive::{self, Codec, KeySet, Kind, MasterKey, SealOptions};
use timevault::config::Config;
use timevault::repo::{layout, store, Replica, Repository};
use timevault::restore::{restore_blobs, RestoreOptions};
use timevault::source::blobs::{
    BlobEntry, BlobSource, Cutter, ScanManifest, ScanStats, CHUNK_AVG, CHUNK_MAX, CHUNK_MIN,
};
use timevault::time::At;
use timevault_fixtures::content::{file_bytes, FileKind};
use timevault_fixtures::rng::Dice;
use timevault_fixtures::StoreUrl;

const SEED: u64 = 42;
const FILES_PER_SCALE: u64 = 100;
/// Share of files that are exact copies of an earlier file (one document, many tenants).
const DUPLICATE_SHARE: f64 = 0.05;
/// One file in this many changes between the two backups.
const CHANGE_EVERY: u64 = 20;
const LEVEL: i32 = 3;
const SOURCE: &str = "files";
const PASSWORD: &str = "timevault-bench";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

// ---------------------------------------------------------------------------------------------
// The data set.

/// One generated file: where it goes and what it holds.
struct FileSpec {
    key: String,
    kind: FileKind,
    size: usize,
    /// The file whose content this one repeats (itself unless a duplicate).
    content_of: u64,
}

fn spec(i: u64) -> FileSpec {
    let mut d = Dice::new(SEED, "bench-blob", i);
    // Few big tenants, a long tail.
    let tenants = d.below(60) + 1;
    let tenant = 1001 + d.below(tenants);
    let kind = FileKind::pick(&mut d);
    // Log-uniform bands (by doublings): 62% 10-150 KB, 33% 150 KB-1.5 MB, 5% 1.5-8 MB; the
    // mean is about 500 KB.
    let size = match d.below(100) {
        0..=61 => d.log_uniform(10_000, 150_000),
        62..=94 => d.log_uniform(150_000, 1_500_000),
        _ => d.log_uniform(1_500_000, 8_000_000),
    } as usize;
    let key = |kind: FileKind| {
        format!(
            "tenants/{tenant}/contracts/{}/att-{i}.{}",
            1 + i / 3,
            kind.extension()
        )
    };
    if i > 0 && d.chance(DUPLICATE_SHARE) {
        let original = spec(d.below(i));
        return FileSpec {
            key: key(original.kind),
            kind: original.kind,
            size: original.size,
            content_of: original.content_of,
        };
    }
    FileSpec {
        key: key(kind),
        kind,
        size,
        content_of: i,
    }
}

fn content(spec: &FileSpec) -> Vec<u8> {
    let mut d = Dice::new(SEED, "bench-blob-content", spec.content_of);
    file_bytes(&mut d, spec.kind, spec.size)
}

struct DataSet {
    files: u64,
    bytes: u64,
    duplicates: u64,
}

/// Write files `0..files` under `root`, on two threads.
fn generate(root: &Path, files: u64) -> DataSet {
    let threads = 2;
    let parts: Vec<(u64, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let (mut bytes, mut duplicates) = (0, 0);
                    for i in (t..files).step_by(threads as usize) {
                        let spec = spec(i);
                        let data = content(&spec);
                        let path = root.join(&spec.key);
                        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                        std::fs::write(&path, &data).unwrap();
                        bytes += data.len() as u64;
                        duplicates += u64::from(spec.content_of != i);
                    }
                    (bytes, duplicates)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    DataSet {
        files,
        bytes: parts.iter().map(|p| p.0).sum(),
        duplicates: parts.iter().map(|p| p.1).sum(),
    }
}

struct Change {
    files: u64,
    overwritten: u64,
    appended: u64,
    /// Size of the changed files after the change (what an incremental backup reads).
    bytes: u64,
    /// Bytes written by the change.
    new_bytes: u64,
}

/// Change one file in [`CHANGE_EVERY`], picked by a seeded order: every other one gets a
/// region in the middle overwritten (same size), the rest get bytes appended. Each region is
/// an eighth of the file, 4 KiB to 256 KiB, in the file's own kind of content.
fn change(root: &Path, files: u64) -> Change {
    let mut order: Vec<(u64, u64)> = (0..files)
        .map(|i| (Dice::new(SEED, "bench-change", i).next_u64(), i))
        .collect();
    order.sort_unstable();
    let picked = (files / CHANGE_EVERY).max(1);
    let mut out = Change {
        files: picked,
        overwritten: 0,
        appended: 0,
        bytes: 0,
        new_bytes: 0,
    };
    for (n, &(_, i)) in order.iter().take(picked as usize).enumerate() {
        let spec = spec(i);
        let path = root.join(&spec.key);
        let before = std::fs::metadata(&path).unwrap();
        let size = before.len() as usize;
        let len = (size / 8).clamp(4096, 256 << 10).min(size);
        let mut d = Dice::new(SEED, "bench-change-bytes", i);
        let region = file_bytes(&mut d, spec.kind, len);
        let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        if n % 2 == 0 {
            file.seek(SeekFrom::Start((size / 2 - len / 2) as u64))
                .unwrap();
            out.overwritten += 1;
        } else {
            file.seek(SeekFrom::End(0)).unwrap();
            out.appended += 1;
        }
        file.write_all(&region).unwrap();
        drop(file);
        let after = std::fs::metadata(&path).unwrap();
        assert_ne!(
            before.modified().unwrap(),
            after.modified().unwrap(),
            "{}: the change must move last-modified",
            spec.key
        );
        out.bytes += after.len();
        out.new_bytes += len as u64;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Measuring.

#[derive(Clone, Copy, Default)]
struct Measured {
    seconds: f64,
    /// CPU seconds (user + system) of this process, or of the child for restic.
    cpu: f64,
    /// CPU seconds the rest of the machine used meanwhile: a noisy neighbour shows here.
    others: f64,
}

/// Busy CPU seconds of the whole machine (all CPUs), from /proc/stat.
fn machine_busy() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return f64::NAN;
    };
    // cpu user nice system idle iowait irq softirq steal ...
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    if f.len() < 8 {
        return f64::NAN;
    }
    (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) as f64 / 100.0
}

/// (this process, its waited-for children) CPU seconds, from /proc (USER_HZ = 100).
fn cpu_times() -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return (f64::NAN, f64::NAN);
    };
    // After the command name: state is field 3; utime, stime, cutime, cstime are 14-17.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let t: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|f| f.parse::<u64>().ok())
        .map(|ticks| ticks as f64 / 100.0)
        .collect();
    match t[..] {
        [u, s, cu, cs] => (u + s, cu + cs),
        _ => (f64::NAN, f64::NAN),
    }
}

struct Timer {
    started: Instant,
    cpu: (f64, f64),
    busy: f64,
}

impl Timer {
    fn start() -> Timer {
        Timer {
            started: Instant::now(),
            cpu: cpu_times(),
            busy: machine_busy(),
        }
    }

    fn stop(self) -> Measured {
        let (own, children) = cpu_times();
        let cpu = (own - self.cpu.0) + (children - self.cpu.1);
        Measured {
            seconds: self.started.elapsed().as_secs_f64(),
            cpu,
            others: (machine_busy() - self.busy - cpu).max(0.0),
        }
    }
}

/// Flush dirty pages so that one step's write-back is not billed to the next.
fn settle() {
    let _ = Command::new("sync").status();
}

fn walk(path: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// (apparent bytes, allocated bytes) of every file under `path`.
fn dir_size(path: &Path) -> (u64, u64) {
    walk(path)
        .iter()
        .filter_map(|p| p.metadata().ok())
        .fold((0, 0), |(a, d), m| (a + m.len(), d + m.blocks() * 512))
}

/// Relative path -> SHA-256 of every file under `root`, on two threads.
fn sha_listing(root: &Path) -> BTreeMap<String, String> {
    let files = walk(root);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|t| {
                let files = &files;
                s.spawn(move || {
                    files
                        .iter()
                        .skip(t)
                        .step_by(2)
                        .map(|p| {
                            let rel = p.strip_prefix(root).unwrap().to_string_lossy();
                            let sha = hex::encode(Sha256::digest(std::fs::read(p).unwrap()));
                            (rel.replace(std::path::MAIN_SEPARATOR, "/"), sha)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

// ---------------------------------------------------------------------------------------------
// timevault.

/// A repository in `dir` on the named local file replicas.
async fn tv_repository(dir: &Path, replicas: &[&str]) -> Config {
    let mut text = "[repository]\nkey_file = \"timevault.key\"\n".to_string();
    for (i, name) in replicas.iter().enumerate() {
        text.push_str(&format!(
            "[[replicas]]\nname = \"{name}\"\nregion = \"r{i}\"\nurl = \"{name}\"\n"
        ));
    }
    let config = Config::parse(&text, &dir.join("timevault.toml")).unwrap();
    Repository::init(&config).await.unwrap();
    config
}

/// One scan as `timevault backup` runs it: open the repository and the source, scan.
async fn tv_backup(config: &Config, source_url: &str) -> (Measured, ScanStats) {
    settle();
    let timer = Timer::start();
    let repo = Repository::open(config).await.unwrap();
    let mut source = BlobSource::open(SOURCE, source_url, &BTreeMap::new(), &repo)
        .await
        .unwrap();
    let stats = source.scan(&repo).await.unwrap();
    (timer.stop(), stats)
}

async fn tv_restore(config: &Config, target: &StoreUrl) -> Measured {
    settle();
    let timer = Timer::start();
    let repo = Repository::open(config).await.unwrap();
    restore_blobs(
        &repo,
        &RestoreOptions {
            source: SOURCE.into(),
            at: At::Latest,
            target: target.url.clone(),
            force: false,
            jobs: None,
        },
        &target.options,
    )
    .await
    .unwrap();
    timer.stop()
}

// ---------------------------------------------------------------------------------------------
// restic.

struct Restic {
    repo: PathBuf,
    cache: PathBuf,
}

impl Restic {
    fn command(&self) -> Command {
        let mut cmd = Command::new("restic");
        cmd.env("RESTIC_PASSWORD", PASSWORD)
            .env("RESTIC_CACHE_DIR", &self.cache)
            .arg("--repo")
            .arg(&self.repo);
        cmd
    }

    /// Run restic with `args` in `cwd`; its time and stdout.
    fn run<S: AsRef<OsStr>>(&self, args: &[S], cwd: &Path) -> (Measured, String) {
        settle();
        let mut cmd = self.command();
        cmd.args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit());
        let timer = Timer::start();
        let out = cmd
            .output()
            .expect("run restic (apt-get install -y restic)");
        let measured = timer.stop();
        assert!(out.status.success(), "{cmd:?} failed");
        (measured, String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `restic backup .` in `root` (so the snapshot holds the tree's own paths); the summary.
    fn backup(&self, root: &Path) -> (Measured, serde_json::Value) {
        let (m, out) = self.run(&["backup", "--json", "."], root);
        let summary = out
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["message_type"] == "summary")
            .unwrap_or_default();
        (m, summary)
    }
}

fn restic_version() -> String {
    Command::new("restic")
        .arg("version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "restic (not found)".into())
}

// ---------------------------------------------------------------------------------------------
// Where timevault's time goes, one thread, stage by stage.

#[derive(Default)]
struct BackupStages {
    list: Duration,
    /// Blocking reads of the file through the scan's `Cutter`, as the scan does.
    read_and_chunk: Duration,
    /// Through `GetResult::into_stream` (8 KiB reads) and AsyncStreamCDC, for comparison.
    read_and_chunk_async: Duration,
    /// The same stream drained without chunking, for comparison.
    read_stream: Duration,
    /// Whole-object reads (`bytes()`, one blocking read each), for comparison.
    read_whole: Duration,
    /// FastCDC over the bytes in memory, for comparison.
    chunk_in_memory: Duration,
    sha256: Duration,
    chunk_ids: Duration,
    /// zstd-3 alone: part of `seal`.
    zstd: Duration,
    seal: Duration,
    write: Duration,
    /// The same writes without fsync, for comparison: timevault's file replicas fsync every
    /// chunk file and its directory (restic fsyncs every pack).
    write_no_fsync: Duration,
    bytes: u64,
    chunks: u64,
    new_chunks: u64,
}

impl BackupStages {
    fn scan_path(&self) -> Duration {
        self.list + self.read_and_chunk + self.sha256 + self.chunk_ids + self.seal + self.write
    }
}

fn timed<T>(acc: &mut Duration, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    *acc += started.elapsed();
    out
}

async fn backup_stages(source_url: &str, out: &Path) -> BackupStages {
    let keys: KeySet = MasterKey::generate().derive();
    let options = SealOptions {
        codec: Codec::Zstd,
        level: LEVEL,
    };
    let source = store::open_store(source_url, &BTreeMap::new()).unwrap();
    let target = StoreUrl::local_dir(out).unwrap();
    let replica = Replica::new(
        "stages",
        "bench",
        store::open_store(&target.url, &BTreeMap::new()).unwrap(),
    );
    let plain_dir = out.with_extension("nofsync");
    std::fs::create_dir_all(&plain_dir).unwrap();
    let plain = LocalFileSystem::new_with_prefix(&plain_dir).unwrap();
    let mut s = BackupStages::default();
    let mut seen = HashSet::new();

    let started = Instant::now();
    let metas: Vec<_> = source.list(None).try_collect().await.unwrap();
    s.list = started.elapsed();
    for meta in &metas {
        // As the scan reads: the file through StreamCDC, on a blocking thread.
        let started = Instant::now();
        let got = source.get(&meta.location).await.unwrap();
        let chunks: Vec<Vec<u8>> = match got.payload {
            object_store::GetResultPayload::File(file, _) => {
                tokio::task::spawn_blocking(move || Cutter::new(file).map(|c| c.unwrap()).collect())
                    .await
                    .unwrap()
            }
            object_store::GetResultPayload::Stream(_) => unreachable!("a local source"),
        };
        s.read_and_chunk += started.elapsed();

        // As the scan read before: the store's stream (8 KiB reads) through AsyncStreamCDC.
        let started = Instant::now();
        let reader = source
            .get(&meta.location)
            .await
            .unwrap()
            .into_stream()
            .map_err(std::io::Error::other)
            .into_async_read();
        let mut cdc = AsyncStreamCDC::new(reader, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX);
        let streamed: Vec<Vec<u8>> = cdc.as_stream().map(|c| c.unwrap().data).collect().await;
        s.read_and_chunk_async += started.elapsed();
        assert_eq!(streamed, chunks, "the same chunks either way");

        let started = Instant::now();
        let streamed: usize = source
            .get(&meta.location)
            .await
            .unwrap()
            .into_stream()
            .map_ok(|b| b.len())
            .try_fold(0, |n, len| async move { Ok(n + len) })
            .await
            .unwrap();
        s.read_stream += started.elapsed();
        assert_eq!(streamed as u64, meta.size);

        let started = Instant::now();
        let whole = source
            .get(&meta.location)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        s.read_whole += started.elapsed();
        let cut = timed(&mut s.chunk_in_memory, || {
            FastCDC::new(&whole, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX).count()
        });
        assert_eq!(cut, chunks.len(), "same cut points in memory and streamed");

        timed(&mut s.sha256, || {
            let mut h = Sha256::new();
            for c in &chunks {
                h.update(c);
            }
            h.finalize()
        });
        for c in &chunks {
            s.bytes += c.len() as u64;
            s.chunks += 1;
            let id = timed(&mut s.chunk_ids, || keys.chunk_id(c));
            if !seen.insert(id.clone()) {
                continue;
            }
            s.new_chunks += 1;
            timed(&mut s.zstd, || {
                zstd::bulk::compress(c, LEVEL).unwrap().len()
            });
            let key = layout::chunk(&id);
            let sealed = timed(&mut s.seal, || {
                Bytes::from(archive::seal(&keys, Kind::Chunk, &key, c, options))
            });
            let started = Instant::now();
            replica.put_create(&key, sealed.clone()).await.unwrap();
            s.write += started.elapsed();
            let started = Instant::now();
            let create = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            plain
                .put_opts(&key.as_str().into(), sealed.into(), create)
                .await
                .unwrap();
            s.write_no_fsync += started.elapsed();
        }
    }
    s
}

#[derive(Default)]
struct RestoreStages {
    manifest: Duration,
    read: Duration,
    open: Duration,
    chunk_ids: Duration,
    sha256: Duration,
    write: Duration,
    /// The same writes without fsync, for comparison (restic does not fsync restored files).
    write_no_fsync: Duration,
    bytes: u64,
}

impl RestoreStages {
    fn total(&self) -> Duration {
        self.manifest + self.read + self.open + self.chunk_ids + self.sha256 + self.write
    }
}

async fn restore_stages(config: &Config, manifest: &str, out: &Path) -> RestoreStages {
    let repo = Repository::open(config).await.unwrap();
    let keys = repo.keys().clone();
    let replica = repo.replicas().replicas()[0].clone();
    let target = StoreUrl::local_dir(out).unwrap();
    let target = store::open_store(&target.url, &BTreeMap::new()).unwrap();
    let plain_dir = out.with_extension("nofsync");
    std::fs::create_dir_all(&plain_dir).unwrap();
    let plain = LocalFileSystem::new_with_prefix(&plain_dir).unwrap();
    let mut s = RestoreStages::default();

    let started = Instant::now();
    let mut reader = ScanManifest::read(&repo, manifest)
        .await
        .unwrap()
        .entries(&repo);
    let mut entries: Vec<BlobEntry> = Vec::new();
    while let Some(e) = reader.next_entry().await.unwrap() {
        entries.push(e);
    }
    s.manifest = started.elapsed();
    for entry in &entries {
        let mut object = Vec::with_capacity(entry.size as usize);
        for chunk in &entry.chunks {
            let key = layout::chunk(&chunk.id);
            let started = Instant::now();
            let sealed = replica.get(&key).await.unwrap().expect("chunk present");
            s.read += started.elapsed();
            let plain = timed(&mut s.open, || {
                archive::open(&keys, Kind::Chunk, &key, &sealed).unwrap()
            });
            let id = timed(&mut s.chunk_ids, || keys.chunk_id(&plain));
            assert_eq!(id, chunk.id);
            object.extend_from_slice(&plain);
        }
        let sha = timed(&mut s.sha256, || hex::encode(Sha256::digest(&object)));
        assert_eq!(sha, entry.sha256);
        s.bytes += object.len() as u64;
        let path = timevault::source::blobs::key_path(&entry.key).unwrap();
        let object = Bytes::from(object);
        let started = Instant::now();
        target
            .put(&path, PutPayload::from(object.clone()))
            .await
            .unwrap();
        s.write += started.elapsed();
        let started = Instant::now();
        plain.put(&path, PutPayload::from(object)).await.unwrap();
        s.write_no_fsync += started.elapsed();
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Report.

fn row(label: &str, tool: &str, m: Measured, bytes: u64) {
    println!(
        "{:<24} {:<22} {:>8.2} {:>8.1} {:>7.2} {:>8.2} {:>7.2}",
        label,
        tool,
        m.seconds,
        mb(bytes) / m.seconds,
        m.cpu,
        m.cpu / m.seconds,
        m.others
    );
}

fn goal(label: &str, timevault: f64, restic: f64, unit: &str) {
    let ratio = timevault / restic;
    println!(
        "{:<26} {:>10.2} {:>10.2} {:<3} {:>8.2} {:>9}",
        label,
        timevault,
        restic,
        unit,
        ratio,
        if ratio <= 1.0 { "met" } else { "NOT met" }
    );
}

fn stage(label: &str, d: Duration, bytes: u64, total: Duration) {
    let secs = d.as_secs_f64();
    println!(
        "  {:<58} {:>8.2} {:>9.1} {:>6.0}%",
        label,
        secs,
        mb(bytes) / secs,
        100.0 * secs / total.as_secs_f64()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let scale = env_u64("TIMEVAULT_BENCH_BLOBS_SCALE", 20).max(1);
    let with_stages = env_u64("TIMEVAULT_BENCH_BLOBS_STAGES", 1) != 0;
    let files = scale * FILES_PER_SCALE;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let source = StoreUrl::local_dir(&data).unwrap();

    eprintln!("generating {files} files...");
    let started = Instant::now();
    let set = generate(&data, files);
    let generated_in = started.elapsed().as_secs_f64();

    // Repositories: timevault on one replica and on two, restic.
    let tv1_dir = dir.path().join("tv1");
    let tv2_dir = dir.path().join("tv2");
    let tv1 = tv_repository(&tv1_dir, &["a"]).await;
    let tv2 = tv_repository(&tv2_dir, &["a", "b"]).await;
    let restic = Restic {
        repo: dir.path().join("restic"),
        cache: dir.path().join("restic-cache"),
    };
    restic.run(&["init"], dir.path());
    let (restic_open, _) = restic.run(&["cat", "config"], dir.path());

    eprintln!("initial backups...");
    let (tv1_initial, tv1_initial_stats) = tv_backup(&tv1, &source.url).await;
    let (tv2_initial, _) = tv_backup(&tv2, &source.url).await;
    let (restic_initial, restic_initial_summary) = restic.backup(&data);
    let tv1_size_initial = dir_size(&tv1_dir.join("a"));
    let tv2_size_initial = dir_size(&tv2_dir.join("a"));
    let restic_size_initial = dir_size(&restic.repo);

    // Past any coarse timestamp granularity, then the one change both tools see.
    std::thread::sleep(Duration::from_millis(1100));
    let changed = change(&data, files);

    eprintln!("incremental backups...");
    let (tv1_incr, tv1_incr_stats) = tv_backup(&tv1, &source.url).await;
    let (tv2_incr, _) = tv_backup(&tv2, &source.url).await;
    let (restic_incr, restic_incr_summary) = restic.backup(&data);
    assert_eq!(
        tv1_incr_stats.changed, changed.files,
        "timevault read exactly the changed files"
    );
    let tv1_size = dir_size(&tv1_dir.join("a"));
    let tv2_size = dir_size(&tv2_dir.join("a"));
    let tv2_size_b = dir_size(&tv2_dir.join("b"));
    let restic_size = dir_size(&restic.repo);

    eprintln!("restores...");
    let tv_target = StoreUrl::local_dir(&dir.path().join("restore-tv")).unwrap();
    let tv_restore_m = tv_restore(&tv1, &tv_target).await;
    let restic_target = dir.path().join("restore-restic");
    let (restic_restore, _) = restic.run(
        &[
            OsStr::new("restore"),
            OsStr::new("latest"),
            OsStr::new("--target"),
            restic_target.as_os_str(),
        ],
        dir.path(),
    );

    eprintln!("checking restores against the source...");
    let expected = sha_listing(&data);
    assert_eq!(expected.len() as u64, set.files);
    let tv_listing = sha_listing(&dir.path().join("restore-tv"));
    assert!(
        tv_listing == expected,
        "timevault restore differs from the source"
    );
    let restic_listing = sha_listing(&restic_target);
    assert!(
        restic_listing == expected,
        "restic restore differs from the source"
    );
    let final_bytes = dir_size(&data).0;

    let stages = if with_stages {
        eprintln!("stage breakdown...");
        settle();
        let backup = backup_stages(&source.url, &dir.path().join("stages-backup")).await;
        let restore = restore_stages(
            &tv1,
            &tv1_incr_stats.manifest,
            &dir.path().join("stages-restore"),
        )
        .await;
        Some((backup, restore))
    } else {
        None
    };

    // ---- report
    let version = restic_version();
    println!(
        "\nBlob store source vs {version}; {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "data set (scale {scale}): {} files, {:.1} MB ({} exact duplicates), generated in {:.1} s",
        set.files,
        mb(set.bytes),
        set.duplicates,
        generated_in
    );
    println!(
        "change: {} files ({} overwritten in the middle, {} appended to), {:.1} MB in changed files, {:.1} MB written",
        changed.files,
        changed.overwritten,
        changed.appended,
        mb(changed.bytes),
        mb(changed.new_bytes)
    );
    println!(
        "(MB/s: data set MB per second; incremental: changed files' MB per second. CPU/wall above \
         1 is more than one core busy; other CPU s: what the rest of the machine used meanwhile, \
         near 0 on a quiet machine.)\n"
    );
    println!(
        "{:<24} {:<22} {:>8} {:>8} {:>7} {:>8} {:>7}",
        "figure", "tool", "seconds", "MB/s", "CPU s", "CPU/wall", "other"
    );
    row(
        "initial backup",
        "timevault, 1 replica",
        tv1_initial,
        set.bytes,
    );
    row("", "timevault, 2 replicas", tv2_initial, set.bytes);
    row("", "restic", restic_initial, set.bytes);
    row(
        "incremental backup (5%)",
        "timevault, 1 replica",
        tv1_incr,
        changed.bytes,
    );
    row("", "timevault, 2 replicas", tv2_incr, changed.bytes);
    row("", "restic", restic_incr, changed.bytes);
    row("restore latest", "timevault", tv_restore_m, final_bytes);
    row("", "restic", restic_restore, final_bytes);
    println!(
        "restic's fixed cost per command (`restic cat config`: start, scrypt, open): {:.2} s",
        restic_open.seconds
    );
    println!(
        "timevault initial scan: {} chunks new, {} deduplicated; incremental: {} changed read, {} chunks new, {} deduplicated",
        tv1_initial_stats.chunks_new,
        tv1_initial_stats.chunks_deduplicated,
        tv1_incr_stats.changed,
        tv1_incr_stats.chunks_new,
        tv1_incr_stats.chunks_deduplicated
    );
    println!(
        "restic initial: data_added {:.1} MB; incremental: files_changed {}, data_added {:.1} MB",
        restic_initial_summary["data_added"]
            .as_f64()
            .unwrap_or(f64::NAN)
            / 1e6,
        restic_incr_summary["files_changed"],
        restic_incr_summary["data_added"]
            .as_f64()
            .unwrap_or(f64::NAN)
            / 1e6,
    );

    println!(
        "\n{:<34} {:>14} {:>18} {:>14}",
        "repository size, MB (apparent/du)", "after initial", "after incremental", "files"
    );
    let size_row = |label: &str, a: (u64, u64), b: (u64, u64), path: &Path| {
        println!(
            "{:<34} {:>6.1}/{:<7.1} {:>8.1}/{:<9.1} {:>14}",
            label,
            mb(a.0),
            mb(a.1),
            mb(b.0),
            mb(b.1),
            walk(path).len()
        );
    };
    size_row(
        "timevault, 1 replica",
        tv1_size_initial,
        tv1_size,
        &tv1_dir.join("a"),
    );
    size_row(
        "timevault, 2 replicas (each)",
        tv2_size_initial,
        tv2_size,
        &tv2_dir.join("a"),
    );
    println!(
        "timevault, 2 replicas (both)       {:>23.1}",
        mb(tv2_size.0 + tv2_size_b.0)
    );
    size_row("restic", restic_size_initial, restic_size, &restic.repo);

    println!("\ngoal: timevault (1 replica) at least as fast as restic, repository no larger");
    println!(
        "{:<26} {:>10} {:>10} {:<3} {:>8} {:>9}",
        "figure", "timevault", "restic", "", "tv/restic", "goal"
    );
    goal(
        "initial backup",
        tv1_initial.seconds,
        restic_initial.seconds,
        "s",
    );
    goal(
        "incremental backup",
        tv1_incr.seconds,
        restic_incr.seconds,
        "s",
    );
    goal("restore", tv_restore_m.seconds, restic_restore.seconds, "s");
    goal(
        "repository size (apparent)",
        mb(tv1_size.0),
        mb(restic_size.0),
        "MB",
    );
    println!(
        "restores checked: both equal the source ({} files, SHA-256 listing)",
        expected.len()
    );

    if let Some((b, r)) = stages {
        let total = b.scan_path();
        println!(
            "\nwhere timevault's backup time goes: one thread, stages timed apart, all {} files \
             ({:.1} MB, {} chunks, {} new)",
            set.files,
            mb(b.bytes),
            b.chunks,
            b.new_chunks
        );
        println!(
            "  {:<58} {:>8} {:>9} {:>7}",
            "stage", "seconds", "MB/s", "share"
        );
        stage("list the source", b.list, b.bytes, total);
        stage(
            "read + chunk as the scan does (blocking reads, Cutter)",
            b.read_and_chunk,
            b.bytes,
            total,
        );
        stage("SHA-256 of each object", b.sha256, b.bytes, total);
        stage("chunk ids (keyed BLAKE3)", b.chunk_ids, b.bytes, total);
        stage(
            "seal new chunks (zstd-3 + AES-256-GCM)",
            b.seal,
            b.bytes,
            total,
        );
        stage(
            "write new chunks (create-only file put, fsync)",
            b.write,
            b.bytes,
            total,
        );
        stage("sum", total, b.bytes, total);
        println!("  for comparison:");
        stage(
            "  read + chunk as the scan did (8 KiB stream, AsyncStreamCDC)",
            b.read_and_chunk_async,
            b.bytes,
            total,
        );
        stage(
            "  read the 8 KiB stream without chunking",
            b.read_stream,
            b.bytes,
            total,
        );
        stage(
            "  read whole objects (one blocking read each)",
            b.read_whole,
            b.bytes,
            total,
        );
        stage(
            "  FastCDC over bytes in memory",
            b.chunk_in_memory,
            b.bytes,
            total,
        );
        stage("  zstd-3 alone (inside seal)", b.zstd, b.bytes, total);
        stage(
            "  write new chunks without fsync",
            b.write_no_fsync,
            b.bytes,
            total,
        );
        println!(
            "  measured initial scan: {:.2} s wall, {:.2} s CPU",
            tv1_initial.seconds, tv1_initial.cpu
        );

        let total = r.total();
        println!(
            "\nwhere timevault's restore time goes: one thread, stages timed apart ({:.1} MB)",
            mb(r.bytes)
        );
        stage("read the scan manifest", r.manifest, r.bytes, total);
        stage("read sealed chunks (file get)", r.read, r.bytes, total);
        stage("open chunks (AES-256-GCM + zstd)", r.open, r.bytes, total);
        stage(
            "check chunk ids (keyed BLAKE3)",
            r.chunk_ids,
            r.bytes,
            total,
        );
        stage("SHA-256 of each object", r.sha256, r.bytes, total);
        stage("write objects (file put, fsync)", r.write, r.bytes, total);
        stage("sum", total, r.bytes, total);
        println!("  for comparison:");
        stage(
            "  write objects without fsync",
            r.write_no_fsync,
            r.bytes,
            total,
        );
        println!(
            "  measured restore: {:.2} s wall, {:.2} s CPU",
            tv_restore_m.seconds, tv_restore_m.cpu
        );
    }
}
