//! Sealing a capture batch's row changes under their tenants' keys (docs/FORMAT.md §8.2),
//! beside the decoding rather than in its way.
//!
//! A run of one tenant's consecutive row changes becomes one sealed record: compressed (the
//! ciphertext would not compress), then sealed under a sealer of the tenant's key. Compressing
//! is most of the cost, so the decode loop only gathers: it reserves each run's seal in order
//! (a tenant's key is looked up once per batch) and hands the runs over in jobs of about
//! [`JOB_BYTES`]. A job is compressed and sealed on a blocking thread while the loop decodes
//! the next one, and the jobs' lines come back in the order their records came.

use std::collections::{HashMap, VecDeque};

use tokio::task::JoinHandle;
use zstd::bulk::Compressor;

use super::changes::{Record, SealedRecord};
use super::routing::Tenant;
use crate::archive::record::{RecordSealer, ReservedSeal};
use crate::error::{Error, Result};
use crate::repo::Repository;

/// A run is sealed once it reaches this many bytes of lines (or another record comes).
const RUN_BYTES: usize = 256 << 10;

/// A new run's buffer: most runs of an interleaved table are a few KiB.
const RUN_CAPACITY: usize = 16 << 10;

/// A job is handed over once its lines reach this many bytes.
const JOB_BYTES: usize = 1 << 20;

/// Jobs sealing at once; the loop waits for the oldest beyond this (memory stays bounded).
const JOBS_IN_FLIGHT: usize = 2;

/// A sealed run is compressed this many zstd levels below `[repository] compression_level`
/// (at least level 1). Runs are short frames (a table's rows of many tenants interleave):
/// measured on runs like the postgres benchmark's, level 1 costs what level 3 costs on whole
/// chunks, and its ratio is within a few percent of level 3's on the same runs. The
/// segment's own compression sees only ciphertext.
const RUN_LEVELS_BELOW: i32 = 2;

/// A batch's sealers (one per tenant), the run not sealed yet, the job being gathered and the
/// jobs being sealed, oldest first.
pub(super) struct Sealers {
    level: i32,
    by_tenant: HashMap<String, RecordSealer>,
    run: Option<(String, Vec<u8>)>,
    job: Job,
    in_flight: VecDeque<JoinHandle<Result<Sealed>>>,
    /// zstd contexts of finished jobs, for the next ones: runs are often a record or two (a
    /// table's rows of many tenants interleave), and a fresh context per run cost more than
    /// the run itself.
    compressors: Vec<Compressor<'static>>,
}

/// Lines in order, some of them runs still to seal.
#[derive(Default)]
struct Job {
    pieces: Vec<Piece>,
    bytes: usize,
}

enum Piece {
    /// A record stored as it is (not a tenant's row change).
    Line(Vec<u8>),
    /// A run of one tenant's lines and the seal reserved for it.
    Run(ReservedSeal, Vec<u8>),
}

/// A sealed job: its lines, and the context it compressed with.
struct Sealed {
    lines: Vec<Vec<u8>>,
    compressor: Compressor<'static>,
}

impl Sealers {
    /// For a repository that compresses at `repository_level`.
    pub fn new(repository_level: i32) -> Sealers {
        Sealers {
            level: (repository_level - RUN_LEVELS_BELOW).max(1),
            by_tenant: HashMap::new(),
            run: None,
            job: Job::default(),
            in_flight: VecDeque::new(),
            compressors: Vec::new(),
        }
    }

    /// Take `record` (whose tenant is `tenant`): the lines of jobs sealed by now, in order.
    pub async fn add(
        &mut self,
        repo: &Repository,
        record: &Record,
        tenant: Tenant,
    ) -> Result<Vec<Vec<u8>>> {
        match tenant {
            Tenant::Of(tenant) => {
                if self.run.as_ref().is_some_and(|(t, _)| *t != tenant) {
                    self.close_run(repo).await?;
                }
                let (_, lines) = self
                    .run
                    .get_or_insert_with(|| (tenant, Vec::with_capacity(RUN_CAPACITY)));
                record.write_line(lines);
                if lines.len() >= RUN_BYTES {
                    self.close_run(repo).await?;
                }
            }
            _ => {
                self.close_run(repo).await?;
                self.job.push(Piece::Line(record.to_line()));
            }
        }
        if self.job.bytes >= JOB_BYTES {
            self.hand_over();
        }
        self.collect(false).await
    }

    /// Every line left, sealed, in order (the batch ends).
    pub async fn finish(&mut self, repo: &Repository) -> Result<Vec<Vec<u8>>> {
        self.close_run(repo).await?;
        self.hand_over();
        self.collect(true).await
    }

    /// The pending run into the job, its tenant's next seal reserved for it.
    async fn close_run(&mut self, repo: &Repository) -> Result<()> {
        let Some((tenant, lines)) = self.run.take() else {
            return Ok(());
        };
        if !self.by_tenant.contains_key(&tenant) {
            let keys = repo.tenant_keys(&tenant).await?;
            self.by_tenant
                .insert(tenant.clone(), RecordSealer::new(&keys));
        }
        let seal = self
            .by_tenant
            .get_mut(&tenant)
            .expect("inserted above")
            .reserve();
        self.job.push(Piece::Run(seal, lines));
        Ok(())
    }

    /// Start sealing the gathered job on a blocking thread.
    fn hand_over(&mut self) {
        if self.job.pieces.is_empty() {
            return;
        }
        let job = std::mem::take(&mut self.job);
        let compressor = self.compressors.pop();
        let level = self.level;
        self.in_flight
            .push_back(tokio::task::spawn_blocking(move || {
                job.seal(compressor, level)
            }));
    }

    /// The lines of sealed jobs, oldest first: of every job with `all`; otherwise of those
    /// finished, waiting for the oldest while more than [`JOBS_IN_FLIGHT`] are sealing.
    async fn collect(&mut self, all: bool) -> Result<Vec<Vec<u8>>> {
        let mut lines = Vec::new();
        while let Some(oldest) = self.in_flight.front() {
            let wait = all || self.in_flight.len() > JOBS_IN_FLIGHT || oldest.is_finished();
            if !wait {
                break;
            }
            let handle = self.in_flight.pop_front().expect("front exists");
            let sealed = handle
                .await
                .map_err(|e| Error::other("sealing tenants' row changes").with_source(e))??;
            self.compressors.push(sealed.compressor);
            lines.extend(sealed.lines);
        }
        Ok(lines)
    }
}

impl Job {
    fn push(&mut self, piece: Piece) {
        self.bytes += match &piece {
            Piece::Line(line) | Piece::Run(_, line) => line.len(),
        };
        self.pieces.push(piece);
    }

    /// Every run compressed and sealed, every line in its place.
    fn seal(self, compressor: Option<Compressor<'static>>, level: i32) -> Result<Sealed> {
        let failed =
            |e: std::io::Error| Error::other("compressing a tenant's row changes").with_source(e);
        let mut compressor = match compressor {
            Some(c) => c,
            None => Compressor::new(level).map_err(failed)?,
        };
        let mut lines = Vec::with_capacity(self.pieces.len());
        let mut compressed = Vec::new();
        for piece in self.pieces {
            match piece {
                Piece::Line(line) => lines.push(line),
                Piece::Run(seal, run) => {
                    compressed.clear();
                    compressed.reserve(zstd::zstd_safe::compress_bound(run.len()));
                    compressor
                        .compress_to_buffer(&run, &mut compressed)
                        .map_err(failed)?;
                    let (seal, ciphertext) = seal.seal(&compressed);
                    lines.push(SealedRecord::run_line(&seal, &ciphertext));
                }
            }
        }
        Ok(Sealed { lines, compressor })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::record::RecordOpener;
    use crate::config::Config;
    use crate::stored::postgres::changes::{parse_lines, Tuple};

    /// A row change of `tenant` carrying about 1 KiB.
    fn change(i: usize, tenant: usize) -> Record {
        Record::Update {
            rel: 16_402,
            old: None,
            new: Tuple {
                values: vec![
                    Some(i.to_string()),
                    Some(tenant.to_string()),
                    Some(format!("row {i} ").repeat(120)),
                ],
                unchanged: Vec::new(),
            },
        }
    }

    /// Interleaved tenants' changes (runs of 1 to 3), with records of no tenant between, over
    /// several jobs sealing at once: opened with each tenant's key, the lines give back every
    /// record in the order it came, and each run is under its own tenant's key.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_sealed_beside_the_decoding_come_back_in_order_under_their_tenants_keys() {
        let dir = tempfile::tempdir().unwrap();
        let text = "[repository]\nkey_file = \"k\"\n[[replicas]]\nname = \"a\"\nregion = \"r\"\n\
                    url = \"a\"\n[tenancy]\ncolumn = \"tenant_id\"\ntenant_keys = true\n";
        let config = Config::parse(text, &dir.path().join("timevault.toml")).unwrap();
        Repository::init(&config).await.unwrap();
        let repo = Repository::open(&config).await.unwrap();

        let mut input = Vec::new();
        let mut sealers = Sealers::new(repo.compression_level());
        let mut lines = Vec::new();
        for i in 0..6_000usize {
            let (record, tenant) = if i % 97 == 0 {
                let record = Record::Message {
                    transactional: true,
                    lsn: crate::source::postgres::pgoutput::Lsn(i as u64),
                    prefix: "p".into(),
                    content: i.to_string(),
                };
                (record, Tenant::None)
            } else {
                let tenant = (i / (1 + i % 3)) % 5;
                (change(i, tenant), Tenant::Of(format!("t{tenant}")))
            };
            lines.extend(sealers.add(&repo, &record, tenant).await.unwrap());
            input.push(record);
        }
        lines.extend(sealers.finish(&repo).await.unwrap());
        assert!(
            input.iter().map(|r| r.to_line().len()).sum::<usize>() > 4 * JOB_BYTES,
            "several jobs"
        );

        let mut opener = RecordOpener::default();
        let mut output = Vec::new();
        let mut sealed = 0;
        for record in parse_lines(&lines.concat()).unwrap() {
            let Record::Sealed(x) = record else {
                output.push(record);
                continue;
            };
            sealed += 1;
            let (seal, ciphertext) = x.parts().unwrap();
            let keys = repo.keys_for_id(seal.key_id).await.unwrap();
            let plain = opener.open(&keys, &seal, &ciphertext).unwrap();
            assert!(x.z);
            let run = parse_lines(&zstd::stream::decode_all(plain.as_slice()).unwrap()).unwrap();
            for record in &run {
                let Record::Update { new, .. } = record else {
                    panic!("a run holds row changes only");
                };
                let tenant = new.values[1].as_deref().unwrap();
                let expected = repo.tenant_keys(&format!("t{tenant}")).await.unwrap();
                assert_eq!(expected.key_id(), seal.key_id, "under its tenant's key");
            }
            output.extend(run);
        }
        assert!(sealed > 1_000, "{sealed} runs");
        assert_eq!(output.len(), input.len());
        assert!(output == input, "every record, in the order it came");
    }
}
