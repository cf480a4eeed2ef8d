//! The write pipeline's cost over zstd alone, on realistic mixed data, in one run.
//!
//! `cargo bench --bench pipeline` generates `TIMEVAULT_BENCH_MB` MiB (default 256) of
//! deterministic mixed data and measures, single-threaded unless said otherwise:
//!
//! 1. zstd level 3 alone, streaming into a counting sink (the yardstick);
//! 2. `ObjectWriter` (zstd + AES-256-GCM STREAM segments + header) into a counting sink;
//! 3. `Repository::put_chunk` of 4 MiB chunks into a local file replica (keyed BLAKE3, seal,
//!    create-only file write), one chunk at a time, then two chunks in flight, then through
//!    `ChunkedWriter` (as database snapshots write, its puts running as tasks);
//! 4. a breakdown of the pipeline's stages, timed separately, to show where time goes;
//! 5. peak memory (VmHWM) of streaming a quarter of the input and all of it, each measured in
//!    a fresh child process so no earlier allocation hides in the high-water mark.
//!
//! Every figure is the median of `TIMEVAULT_BENCH_RUNS` runs (default 3), the cases interleaved
//! round-robin so that a noisy neighbour slows all of them alike; compare ratios within one
//! run, not across runs. Next to wall-clock MB/s the tables show CPU seconds of the whole
//! process, which other processes on a shared machine disturb less. Timings are printed, never
//! asserted. MB is 10^6 bytes; MB/s is input bytes per second.
//!
//! The data is a mix, by bytes, of 35% JSON rows (repeated field names, names, emails,
//! timestamps, amounts), 25% English-like prose (a skewed vocabulary), 15% log lines
//! (timestamps, paths, status codes, latencies, request ids) and 25% PDF-like files whose body
//! is random bytes. Pieces of 16-512 KiB of one kind follow each other, like files and table
//! pages in a real backup, each next piece of the kind furthest below its share; zstd-3
//! compresses the whole 2.3x.

use std::io::{self, Write};
use std::process::Command;
use std::time::Instant;

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use timevault::archive::{self, Codec, KeySet, Kind, MasterKey, ObjectWriter, SealOptions};
use timevault::config::Config;
use timevault::repo::{layout, store, ChunkedWriter, Replica, Repository};

const LEVEL: i32 = 3;
const CHUNK: usize = 4 << 20;
/// Size of each `write` call into the encoders, like a reader's buffer.
const WRITE_BLOCK: usize = 1 << 20;
const SEED: u64 = 0x7469_6d65_7661_756c;
const GOAL_OVERHEAD: f64 = 0.10;
/// Argument that turns this binary into a child measuring peak memory.
const PEAK_ARG: &str = "--timevault-peak-memory";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == PEAK_ARG) {
        peak_child(&args[at + 1..]);
        return;
    }
    // MiB of input, small in CI; more runs give a steadier median on a busy machine.
    let mib = env_count("TIMEVAULT_BENCH_MB", 256);
    let runs = env_count("TIMEVAULT_BENCH_RUNS", 3);
    let started = Instant::now();
    let (input, mix) = generate(mib << 20);
    println!(
        "generated {mib} MiB of mixed data in {:.1} s: {mix}",
        started.elapsed().as_secs_f64()
    );
    let len = input.len() as u64;
    let results = run_cases(input, runs);
    print_throughput(len, &results);
    print_breakdown(len, &results);
    print_peak_memory(mib);
}

/// A positive number from the environment, or `default`.
fn env_count(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .ok()
            .filter(|&n: &usize| n > 0)
            .unwrap_or_else(|| panic!("{name} must be a positive whole number, not {v:?}")),
        Err(_) => default,
    }
}

// ---------------------------------------------------------------------------------------------
// Deterministic realistic data
// ---------------------------------------------------------------------------------------------

/// SplitMix64: the same bytes on every platform and with every crate version.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    /// Skewed towards the front of `items`, as word frequencies are.
    fn pick_skewed<T: Copy>(&mut self, items: &[T]) -> T {
        let bound = self.below(items.len()) + 1;
        items[self.below(bound)]
    }
}

#[rustfmt::skip]
const FIRST: &[&str] = &[
    "anna", "jose", "zoe", "lukasz", "soren", "francois", "jurgen", "asa", "huong", "hanako",
    "minjun", "alexandros", "dmitri", "mohammed", "sarah", "renee", "kai", "priya", "oluwaseun",
    "chloe", "liam", "emma", "noah", "olivia", "mateo", "sofia", "yuki", "aarav", "fatima",
];
#[rustfmt::skip]
const LAST: &[&str] = &[
    "schmidt", "martinez", "obrien", "wisniewski", "kierkegaard", "lefevre", "gross", "oberg",
    "nguyen", "sato", "kim", "papadopoulos", "ivanov", "alali", "cohen", "dubois", "muller",
    "raghunathan", "adeyemi", "dupont", "smith", "garcia", "rossi", "tanaka", "silva", "khan",
];
#[rustfmt::skip]
const DOMAINS: &[&str] = &[
    "example.com", "mail.example.org", "acme.test", "globex.example", "initech.test",
];
const STATUSES: &[&str] = &["paid", "open", "overdue", "void", "draft", "refunded"];
const CURRENCIES: &[&str] = &["EUR", "USD", "GBP", "CHF", "JPY", "SEK"];
#[rustfmt::skip]
const TAGS: &[&str] = &[
    "priority", "enterprise", "trial", "renewal", "eu", "us", "apac", "churn-risk", "upsell",
];
#[rustfmt::skip]
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be",
    "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have",
    "an", "had", "they", "you", "were", "their", "one", "all", "we", "can", "her", "has", "there",
    "been", "if", "more", "when", "will", "would", "who", "so", "no", "party", "agreement",
    "shall", "provide", "services", "within", "days", "notice", "liability", "limited", "fees",
    "paid", "preceding", "twelve", "months", "confidential", "information", "means", "any",
    "data", "disclosed", "either", "term", "renewal", "automatically", "unless", "terminated",
    "written", "consent", "governing", "law", "jurisdiction", "courts", "indemnify", "harmless",
    "against", "claims", "arising", "breach", "warranty", "force", "majeure", "subcontractor",
    "personal", "processing", "controller", "processor", "audit", "rights", "invoice", "payable",
    "customer", "supplier", "schedule", "delivery", "quality", "acceptance", "payment",
    "interest", "remedy", "exclusive", "termination", "obligations", "reasonable", "efforts",
    "security", "incident", "backup", "restore", "retention", "period", "storage", "encryption",
    "availability", "maintenance", "window", "support", "response", "resolution", "credits",
    "measured", "calendar", "quarter", "excluding", "scheduled", "emergency", "notwithstanding",
    "foregoing", "hereunder", "thereof", "including", "without", "limitation", "assignment",
    "successors", "amendment", "waiver", "severability", "entire", "counterparts", "signature",
    "electronic", "delivered", "registered", "office", "address",
];
const LEVELS: &[&str] = &["INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR"];
const SERVICES: &[&str] = &["api", "worker", "billing", "auth", "export", "scheduler"];
const METHODS: &[&str] = &["GET", "GET", "GET", "POST", "PUT", "DELETE"];
#[rustfmt::skip]
const ROUTES: &[&str] = &[
    "/v1/tenants/{}/invoices", "/v1/tenants/{}/customers", "/v1/tenants/{}/documents",
    "/v1/tenants/{}/exports", "/v1/sessions/{}", "/healthz",
];
const HTTP_STATUS: &[u16] = &[200, 200, 200, 200, 201, 204, 301, 400, 404, 409, 500, 503];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Piece {
    Json,
    Text,
    Log,
    Binary,
}

/// The mix by bytes, in percent.
const MIX: [(Piece, usize); 4] = [
    (Piece::Json, 35),
    (Piece::Text, 25),
    (Piece::Log, 15),
    (Piece::Binary, 25),
];

/// An endless stream of mixed data; any prefix of it is the same for every caller.
struct MixedData {
    rng: Rng,
    /// Milliseconds since the epoch, advancing with every row and log line.
    clock: i64,
    row: u64,
    piece: Vec<u8>,
    kind: Piece,
    pos: usize,
    /// Bytes generated and handed out per kind, in `MIX` order.
    generated: [u64; 4],
    handed: [u64; 4],
}

impl MixedData {
    fn new(seed: u64) -> Self {
        MixedData {
            rng: Rng(seed),
            clock: 1_767_225_600_000, // 2026-01-01T00:00:00Z
            row: 1_000_000,
            piece: Vec::with_capacity(600 << 10),
            kind: Piece::Json,
            pos: 0,
            generated: [0; 4],
            handed: [0; 4],
        }
    }

    fn fill(&mut self, out: &mut [u8]) {
        let mut filled = 0;
        while filled < out.len() {
            if self.pos == self.piece.len() {
                self.next_piece();
            }
            let n = (out.len() - filled).min(self.piece.len() - self.pos);
            out[filled..filled + n].copy_from_slice(&self.piece[self.pos..self.pos + n]);
            let slot = MIX.iter().position(|(k, _)| *k == self.kind).unwrap_or(0);
            self.handed[slot] += n as u64;
            self.pos += n;
            filled += n;
        }
    }

    fn next_piece(&mut self) {
        self.kind = self.most_behind();
        let target = (16 << 10) + self.rng.below(496 << 10);
        self.piece.clear();
        self.pos = 0;
        while self.piece.len() < target {
            match self.kind {
                Piece::Json => self.json_row(),
                Piece::Text => self.paragraph(),
                Piece::Log => self.log_line(),
                Piece::Binary => self.pdf_like(target),
            }
        }
        let slot = MIX.iter().position(|(k, _)| *k == self.kind).unwrap_or(0);
        self.generated[slot] += self.piece.len() as u64;
    }

    /// The kind furthest below its share of the bytes generated so far, so that the mix holds
    /// to within one piece at any length; the random piece sizes vary the order.
    fn most_behind(&self) -> Piece {
        let total: u64 = self.generated.iter().sum();
        let behind = |i: usize| (MIX[i].1 as u64 * total) as f64 / 100.0 - self.generated[i] as f64;
        let slot = (0..MIX.len())
            .max_by(|&a, &b| behind(a).total_cmp(&behind(b)))
            .unwrap_or(0);
        MIX[slot].0
    }

    fn timestamp(&mut self) -> String {
        self.clock += self.rng.below(2_000) as i64;
        chrono::DateTime::from_timestamp_millis(self.clock)
            .expect("clock within chrono's range")
            .format("%Y-%m-%dT%H:%M:%S%.3fZ")
            .to_string()
    }

    fn words(&mut self, count: usize) -> String {
        let mut s = String::new();
        for i in 0..count {
            if i > 0 {
                s.push(' ');
            }
            s.push_str(self.rng.pick_skewed(WORDS));
        }
        s
    }

    fn json_row(&mut self) {
        self.row += 1 + self.rng.below(3) as u64;
        let (first, last) = (self.rng.pick(FIRST), self.rng.pick(LAST));
        let created = self.timestamp();
        let note_len = self.rng.below(12);
        let note = self.words(note_len);
        let r = &mut self.rng;
        writeln!(
            self.piece,
            r#"{{"id":{},"tenant_id":"t-{:04}","created_at":"{created}","customer":{{"name":"{first} {last}","email":"{first}.{last}{}@{}"}},"status":"{}","amount":{}.{:02},"currency":"{}","items":{},"tags":["{}","{}"],"note":"{note}"}}"#,
            self.row,
            r.below(400),
            r.below(100),
            r.pick(DOMAINS),
            r.pick(STATUSES),
            r.below(20_000),
            r.below(100),
            r.pick(CURRENCIES),
            1 + r.below(20),
            r.pick(TAGS),
            r.pick(TAGS),
        )
        .expect("writing to memory");
    }

    fn paragraph(&mut self) {
        for _ in 0..3 + self.rng.below(6) {
            let len = 6 + self.rng.below(20);
            let mut sentence = self.words(len);
            if let Some(first) = sentence.get_mut(..1) {
                first.make_ascii_uppercase();
            }
            if self.rng.below(4) == 0 {
                let clause_len = 3 + self.rng.below(6);
                let clause = self.words(clause_len);
                sentence = format!("{sentence}, {clause}");
            }
            write!(self.piece, "{sentence}. ").expect("writing to memory");
        }
        self.piece.extend_from_slice(b"\n\n");
    }

    fn log_line(&mut self) {
        let ts = self.timestamp();
        let r = &mut self.rng;
        let route = r.pick(ROUTES).replace("{}", &r.below(5_000).to_string());
        writeln!(
            self.piece,
            "{ts} {:<5} {}[{}]: {} {route} {} {}.{:03}ms bytes={} ip=10.{}.{}.{} req={:016x}",
            r.pick(LEVELS),
            r.pick(SERVICES),
            1_000 + r.below(64),
            r.pick(METHODS),
            r.pick(HTTP_STATUS),
            r.below(400),
            r.below(1_000),
            r.below(200_000),
            r.below(256),
            r.below(256),
            r.below(256),
            r.next(),
        )
        .expect("writing to memory");
    }

    /// A PDF's shape around an incompressible body (its streams are already deflated).
    fn pdf_like(&mut self, target: usize) {
        let header = format!(
            "%PDF-1.7\n%\u{e2}\u{e3}\u{cf}\u{d3}\n1 0 obj\n<< /Length {target} /Filter /FlateDecode >>\nstream\n"
        );
        self.piece.extend_from_slice(header.as_bytes());
        while self.piece.len() < target {
            let word = self.rng.next().to_le_bytes();
            self.piece.extend_from_slice(&word);
        }
        self.piece
            .extend_from_slice(b"\nendstream\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n");
    }

    fn describe(&self) -> String {
        let total: u64 = self.handed.iter().sum::<u64>().max(1);
        let names = ["JSON rows", "prose", "log lines", "PDF-like random"];
        let parts: Vec<String> = names
            .iter()
            .zip(self.handed)
            .map(|(name, n)| format!("{:.0}% {name}", n as f64 * 100.0 / total as f64))
            .collect();
        parts.join(", ")
    }
}

/// The first `len` bytes of the mixed stream, and a description of its actual mix.
fn generate(len: usize) -> (Bytes, String) {
    let mut data = vec![0u8; len];
    let mut gen = MixedData::new(SEED);
    gen.fill(&mut data);
    (Bytes::from(data), gen.describe())
}

// ---------------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------------

/// A `Write` that keeps only the count, so the sink costs nothing.
#[derive(Default)]
struct CountingSink(u64);

impl Write for CountingSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0 += data.len() as u64;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn zstd_alone(input: &[u8]) -> u64 {
    let mut encoder =
        zstd::stream::write::Encoder::new(CountingSink::default(), LEVEL).expect("zstd encoder");
    for block in input.chunks(WRITE_BLOCK) {
        encoder.write_all(block).expect("writing to a sink");
    }
    encoder.finish().expect("zstd finish").0
}

fn object_writer(input: &[u8], keys: &KeySet, codec: Codec) -> u64 {
    let options = SealOptions {
        codec,
        level: LEVEL,
    };
    let mut writer = ObjectWriter::new(
        CountingSink::default(),
        keys,
        Kind::Chunk,
        "bench/stream",
        options,
    )
    .expect("object writer");
    for block in input.chunks(WRITE_BLOCK) {
        writer.write_all(block).expect("writing to a sink");
    }
    writer.finish().expect("object finish").0
}

/// zstd's output for `input`, kept to time encryption and framing on the real body.
fn zstd_body(input: &[u8]) -> Vec<u8> {
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), LEVEL).expect("zstd encoder");
    for block in input.chunks(WRITE_BLOCK) {
        encoder.write_all(block).expect("writing to memory");
    }
    encoder.finish().expect("zstd finish")
}

fn chunks(input: &Bytes) -> Vec<Bytes> {
    (0..input.len())
        .step_by(CHUNK)
        .map(|at| input.slice(at..(at + CHUNK).min(input.len())))
        .collect()
}

/// A fresh repository with one local file replica; dropped (deleted) after each run so that
/// no run deduplicates against an earlier one.
struct BenchRepo {
    dir: tempfile::TempDir,
    repo: Repository,
}

impl BenchRepo {
    async fn create() -> BenchRepo {
        let dir = tempfile::tempdir().expect("temporary directory");
        let text = format!(
            "[repository]\nkey_file = \"k\"\ncompression_level = {LEVEL}\n\n\
             [[replicas]]\nname = \"local\"\nregion = \"bench\"\nurl = \"replica\"\n"
        );
        let config = Config::parse(&text, &dir.path().join("timevault.toml")).expect("config");
        Repository::init(&config).await.expect("init");
        let repo = Repository::open(&config).await.expect("open");
        BenchRepo { dir, repo }
    }

    /// `put_chunk` every chunk with `in_flight` at a time; returns sealed bytes written.
    async fn put_all(&self, chunks: Vec<Bytes>, in_flight: usize) -> u64 {
        let count = chunks.len();
        let writes: Vec<_> = stream::iter(chunks)
            .map(|c| self.repo.put_chunk(c))
            .buffer_unordered(in_flight)
            .try_collect()
            .await
            .expect("put_chunk");
        assert_eq!(writes.len(), count);
        assert!(
            writes.iter().all(|w| w.uploaded > 0),
            "every chunk is new and must be written ({})",
            self.dir.path().display()
        );
        writes.iter().map(|w| w.uploaded).sum()
    }
}

/// Wall and CPU seconds of one run. CPU time (every thread of this process, from
/// /proc/self/stat) is what other processes on a shared machine disturb least.
#[derive(Clone, Copy)]
struct Sample {
    wall: f64,
    cpu: f64,
}

struct Timer {
    started: Instant,
    cpu: f64,
}

impl Timer {
    fn start() -> Timer {
        Timer {
            started: Instant::now(),
            cpu: process_cpu_secs(),
        }
    }

    fn stop(self) -> Sample {
        Sample {
            wall: self.started.elapsed().as_secs_f64(),
            cpu: process_cpu_secs() - self.cpu,
        }
    }
}

/// User plus system time of all threads, live and exited, in USER_HZ (1/100 s) ticks; NaN
/// where /proc is unavailable.
fn process_cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    match ticks[..] {
        [user, system] => (user + system) as f64 / 100.0,
        _ => f64::NAN,
    }
}

/// One `put_chunk` run: only the puts are timed, not creating or deleting the repository.
fn pipeline(rt: &tokio::runtime::Runtime, input: &Bytes, in_flight: usize) -> (Sample, u64) {
    rt.block_on(async {
        let bench = BenchRepo::create().await;
        let chunks = chunks(input);
        let timer = Timer::start();
        let written = bench.put_all(chunks, in_flight).await;
        (timer.stop(), written)
    })
}

/// One `ChunkedWriter` run (as database snapshots store their streams): 1 MiB records into
/// 4 MiB chunks, its puts running as tasks while the next chunk fills. Only the writes are timed.
fn chunked_writer(rt: &tokio::runtime::Runtime, input: &Bytes) -> (Sample, u64) {
    rt.block_on(async {
        let bench = BenchRepo::create().await;
        let timer = Timer::start();
        let mut writer = ChunkedWriter::new(&bench.repo, CHUNK);
        for record in input.chunks(1 << 20) {
            writer.write_record(record).await.expect("write_record");
        }
        let list = writer.finish().await.expect("finish");
        (timer.stop(), list.uploaded)
    })
}

/// The in-memory part of `put_chunk`, chunk by chunk: what `archive::seal` does.
fn seal_chunks(input: &[u8], keys: &KeySet) -> Vec<(String, Bytes)> {
    let options = SealOptions {
        codec: Codec::Zstd,
        level: LEVEL,
    };
    input
        .chunks(CHUNK)
        .map(|c| {
            let key = layout::chunk(&keys.chunk_id(c));
            let sealed = archive::seal(keys, Kind::Chunk, &key, c, options);
            (key, Bytes::from(sealed))
        })
        .collect()
}

/// Create-only writes of already sealed chunks to a fresh file replica; only the puts are timed.
fn store_chunks(rt: &tokio::runtime::Runtime, sealed: &[(String, Bytes)]) -> (Sample, u64) {
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = format!("file://{}", dir.path().display());
        let store = store::open_store(&url, &Default::default()).expect("file store");
        let replica = Replica::new("local", "bench", store);
        let timer = Timer::start();
        for (key, bytes) in sealed {
            replica.put_create(key, bytes.clone()).await.expect("put");
        }
        let written = sealed.iter().map(|(_, b)| b.len() as u64).sum();
        (timer.stop(), written)
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    Zstd,
    Object,
    Pipeline,
    Pipeline2,
    Writer,
    Blake3,
    ZstdBulk,
    Encrypt,
    Seal,
    Copy,
    Store,
}

impl Case {
    const ALL: [Case; 11] = [
        Case::Zstd,
        Case::Object,
        Case::Pipeline,
        Case::Pipeline2,
        Case::Writer,
        Case::Blake3,
        Case::ZstdBulk,
        Case::Encrypt,
        Case::Seal,
        Case::Copy,
        Case::Store,
    ];
}

/// What the cases run on, made once before any timing.
struct Prepared {
    input: Bytes,
    keys: KeySet,
    rt: tokio::runtime::Runtime,
    /// zstd's output for the whole input, to time encryption and framing on the real body.
    body: Vec<u8>,
    /// The input sealed as chunks, to time the file writes alone.
    sealed: Vec<(String, Bytes)>,
}

impl Prepared {
    fn new(input: Bytes) -> Prepared {
        let keys = MasterKey::generate().derive();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let body = zstd_body(&input);
        let sealed = seal_chunks(&input, &keys);
        Prepared {
            input,
            keys,
            rt,
            body,
            sealed,
        }
    }

    /// Seconds and output bytes of one run of `case`.
    fn run(&self, case: Case) -> (Sample, u64) {
        let (input, keys) = (&self.input[..], &self.keys);
        let timed = |f: &mut dyn FnMut() -> u64| {
            let timer = Timer::start();
            let out = std::hint::black_box(f());
            (timer.stop(), out)
        };
        let per_chunk = |f: &dyn Fn(&[u8]) -> usize| input.chunks(CHUNK).map(|c| f(c) as u64).sum();
        match case {
            Case::Zstd => timed(&mut || zstd_alone(input)),
            Case::Object => timed(&mut || object_writer(input, keys, Codec::Zstd)),
            Case::Pipeline => pipeline(&self.rt, &self.input, 1),
            Case::Pipeline2 => pipeline(&self.rt, &self.input, 2),
            Case::Writer => chunked_writer(&self.rt, &self.input),
            Case::Blake3 => timed(&mut || per_chunk(&|c| keys.chunk_id(c).len())),
            Case::ZstdBulk => {
                timed(&mut || per_chunk(&|c| zstd::bulk::compress(c, LEVEL).expect("zstd").len()))
            }
            Case::Encrypt => timed(&mut || object_writer(&self.body, keys, Codec::None)),
            Case::Seal => timed(&mut || seal_chunks(input, keys).len() as u64),
            Case::Copy => timed(&mut || per_chunk(&|c| std::hint::black_box(c.to_vec()).len())),
            Case::Store => store_chunks(&self.rt, &self.sealed),
        }
    }
}

/// Samples and output bytes of every case.
struct Results {
    samples: Vec<Vec<Sample>>,
    out: Vec<u64>,
    body_len: usize,
    sealed_len: u64,
}

impl Results {
    /// Median wall seconds.
    fn median(&self, case: Case) -> f64 {
        self.median_of(case, |s| s.wall)
    }

    /// Median CPU seconds, all threads.
    fn median_cpu(&self, case: Case) -> f64 {
        self.median_of(case, |s| s.cpu)
    }

    fn median_of(&self, case: Case, field: fn(&Sample) -> f64) -> f64 {
        let mut v: Vec<f64> = self.samples[case as usize].iter().map(field).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    fn out(&self, case: Case) -> u64 {
        self.out[case as usize]
    }
}

/// Every case `runs` times, round-robin.
fn run_cases(input: Bytes, runs: usize) -> Results {
    let prepared = Prepared::new(input);
    let mut results = Results {
        samples: vec![Vec::new(); Case::ALL.len()],
        out: vec![0; Case::ALL.len()],
        body_len: prepared.body.len(),
        sealed_len: prepared.sealed.iter().map(|(_, b)| b.len() as u64).sum(),
    };
    for run in 1..=runs {
        eprint!("run {run}/{runs}:");
        for case in Case::ALL {
            let (sample, out) = prepared.run(case);
            eprint!(" {:.2}s", sample.wall);
            results.samples[case as usize].push(sample);
            results.out[case as usize] = out;
        }
        eprintln!();
    }
    results
}

// ---------------------------------------------------------------------------------------------
// Reports
// ---------------------------------------------------------------------------------------------

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn print_throughput(len: u64, r: &Results) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "\nwrite pipeline, {:.1} MB input, zstd level {LEVEL}, median of {} runs, {cpus} CPUs",
        mb(len),
        r.samples[0].len()
    );
    println!(
        "{:<40} {:>7} {:>6} {:>8} {:>6} {:>9} {:>7} {:>6}",
        "case", "MB/s", "ratio", "overhead", "CPU s", "CPU ratio", "out MB", "zstd x"
    );
    let rows = [
        (Case::Zstd, "1  zstd alone, stream, 1 thread"),
        (Case::Object, "2  ObjectWriter zstd+AES-GCM, 1 thread"),
        (Case::Pipeline, "3  put_chunk 4 MiB to file, 1 in flight"),
        (Case::Pipeline2, "3b put_chunk 4 MiB to file, 2 in flight"),
        (Case::Writer, "3c ChunkedWriter 4 MiB to file (2 tasks)"),
    ];
    for (case, label) in rows {
        let ratio = r.median(Case::Zstd) / r.median(case);
        let cpu_ratio = r.median_cpu(Case::Zstd) / r.median_cpu(case);
        println!(
            "{label:<40} {:>7.1} {ratio:>6.3} {:>7.1}% {:>6.2} {cpu_ratio:>9.3} {:>7.1} {:>6.2}",
            mb(len) / r.median(case),
            (1.0 - ratio) * 100.0,
            r.median_cpu(case),
            mb(r.out(case)),
            len as f64 / r.out(case) as f64,
        );
    }
    println!(
        "ratio = MB/s / zstd-alone MB/s, overhead = 1 - ratio (wall clock); CPU ratio = zstd-alone"
    );
    println!(
        "CPU seconds / the case's CPU seconds (all threads); 3b uses two cores: not a cost figure"
    );
    for (case, what) in [
        (Case::Object, "encryption and framing (2 vs 1)"),
        (Case::Pipeline, "full write pipeline (3 vs 1)"),
    ] {
        let overhead = 1.0 - r.median(Case::Zstd) / r.median(case);
        let cpu_overhead = 1.0 - r.median_cpu(Case::Zstd) / r.median_cpu(case);
        let verdict = if overhead <= GOAL_OVERHEAD {
            "met"
        } else {
            "NOT met"
        };
        println!(
            "goal <= {:.0}% over zstd alone, {what}: {:.1}% -> {verdict} (by CPU time {:.1}%)",
            GOAL_OVERHEAD * 100.0,
            overhead * 100.0,
            cpu_overhead * 100.0
        );
    }
    // Two runs of the same zstd work differ by up to ~20% on a busy machine, more than the
    // framing costs; the framing stage timed on its own is the steadier figure.
    println!(
        "AES-GCM framing timed alone (stage breakdown): {:.1}% of zstd-alone time; end-to-end \
         differences under ~10% are within this machine's run-to-run noise",
        r.median(Case::Encrypt) / r.median(Case::Zstd) * 100.0
    );
}

fn print_breakdown(len: u64, r: &Results) {
    let (zstd, zstd_cpu) = (r.median(Case::Zstd), r.median_cpu(Case::Zstd));
    let (body, sealed) = (r.body_len as u64, r.sealed_len);
    println!("\nstage breakdown, 1 thread, medians; MB/s of the bytes each stage processes");
    println!(
        "{:<44} {:>7} {:>7} {:>8} {:>6} {:>8}",
        "stage", "seconds", "MB/s", "% of [1]", "CPU s", "CPU %[1]"
    );
    let row = |label: &str, secs: f64, cpu: f64, bytes: Option<u64>| {
        let rate = bytes.map_or(String::new(), |b| format!("{:.1}", mb(b) / secs));
        println!(
            "{label:<44} {secs:>7.3} {rate:>7} {:>7.1}% {cpu:>6.2} {:>7.1}%",
            secs / zstd * 100.0,
            cpu / zstd_cpu * 100.0
        );
    };
    let stages = [
        (Case::Zstd, "[1] zstd stream, 1 MiB writes", len),
        (
            Case::Encrypt,
            "    AES-GCM STREAM framing of the zstd body",
            body,
        ),
        (Case::Object, "[2] ObjectWriter: zstd + framing", len),
        (Case::Blake3, "a.  keyed BLAKE3 chunk ids", len),
        (
            Case::Copy,
            "    copy 4 MiB chunks (put_chunk no longer does)",
            len,
        ),
        (Case::ZstdBulk, "    zstd bulk, per 4 MiB chunk", len),
        (
            Case::Seal,
            "c.  archive::seal per chunk: bulk + framing",
            len,
        ),
        (
            Case::Store,
            "d.  create-only file writes, sealed chunks",
            sealed,
        ),
        (Case::Pipeline, "[3] put_chunk, 1 in flight", len),
    ];
    for (case, label, bytes) in stages {
        row(label, r.median(case), r.median_cpu(case), Some(bytes));
    }
    let parts = [Case::Blake3, Case::Seal, Case::Store];
    let sum = |f: &dyn Fn(Case) -> f64| parts.iter().map(|&c| f(c)).sum::<f64>();
    row(
        "[3] - (a+c+d): hand-offs, allocator",
        r.median(Case::Pipeline) - sum(&|c| r.median(c)),
        r.median_cpu(Case::Pipeline) - sum(&|c| r.median_cpu(c)),
        None,
    );
}

// ---------------------------------------------------------------------------------------------
// Peak memory, measured in child processes
// ---------------------------------------------------------------------------------------------

/// VmHWM (peak resident set) of this process in KiB, where Linux reports it.
fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Child: stream `mib` MiB of mixed data, generated as it goes so the input never accumulates,
/// and print VmHWM just before the first byte and after the last.
fn peak_child(args: &[String]) {
    let mib: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(64);
    let (before, after) = match args.first().map(String::as_str) {
        Some("chunks") => peak_chunks(mib),
        _ => peak_object(mib),
    };
    println!("{} {}", before.unwrap_or(0), after.unwrap_or(0));
}

/// One object of `mib` MiB through `ObjectWriter`, written 1 MiB at a time.
fn peak_object(mib: usize) -> (Option<u64>, Option<u64>) {
    let mut gen = MixedData::new(SEED);
    let keys = MasterKey::generate().derive();
    let options = SealOptions {
        codec: Codec::Zstd,
        level: LEVEL,
    };
    let mut block = vec![0u8; WRITE_BLOCK];
    let mut writer = ObjectWriter::new(
        CountingSink::default(),
        &keys,
        Kind::Chunk,
        "bench/peak",
        options,
    )
    .expect("object writer");
    let before = vm_hwm_kib();
    for _ in 0..mib {
        gen.fill(&mut block);
        writer.write_all(&block).expect("writing to a sink");
    }
    writer.finish().expect("object finish");
    (before, vm_hwm_kib())
}

/// `mib` MiB as 4 MiB chunks through `put_chunk` into a file replica, one at a time.
fn peak_chunks(mib: usize) -> (Option<u64>, Option<u64>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let mut gen = MixedData::new(SEED);
        let bench = BenchRepo::create().await;
        let before = vm_hwm_kib();
        let total = mib << 20;
        for at in (0..total).step_by(CHUNK) {
            let mut chunk = vec![0u8; CHUNK.min(total - at)];
            gen.fill(&mut chunk);
            bench.put_all(vec![Bytes::from(chunk)], 1).await;
        }
        (before, vm_hwm_kib())
    })
}

/// VmHWM before and after, in KiB, as the child reports them.
fn peak_in_child(what: &str, mib: usize) -> Result<(u64, u64), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = Command::new(exe)
        .args([PEAK_ARG, what, &mib.to_string()])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(format!("child failed: {}", stderr.trim()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text
        .split_whitespace()
        .map(|f| f.parse::<u64>().unwrap_or(0));
    match (fields.next(), fields.next()) {
        (Some(before), Some(after)) if before > 0 && after > 0 => Ok((before, after)),
        _ => Err("VmHWM unavailable on this system".to_string()),
    }
}

fn print_peak_memory(mib: usize) {
    let small = (mib / 4).max(1);
    println!(
        "\npeak memory (VmHWM), each size in a fresh child process, input generated on the fly"
    );
    println!(
        "{:<46} {:>8} {:>14} {:>14} {:>10}",
        "case", "input", "VmHWM before", "VmHWM after", "growth"
    );
    for (what, label) in [
        ("object", "ObjectWriter, one object"),
        ("chunks", "put_chunk 4 MiB chunks, file replica"),
    ] {
        for size in [small, mib] {
            match peak_in_child(what, size) {
                Ok((before, after)) => println!(
                    "{label:<46} {:>4} MiB {:>10.1} MiB {:>10.1} MiB {:>6.1} MiB",
                    size,
                    before as f64 / 1024.0,
                    after as f64 / 1024.0,
                    after.saturating_sub(before) as f64 / 1024.0
                ),
                Err(why) => println!("{label:<46} {size:>4} MiB  ({why})"),
            }
        }
    }
}
