//! Sealing a capture batch's row changes under their tenants' keys (docs/FORMAT.md §8.2),
//! beside the decoding rather than in its way.
//!
//! Runs of one tenant's consecutive row changes are compressed (the ciphertext would not
//! compress) and sealed under a sealer of the tenant's key. Compressing is most of the cost,
//! so the decode loop only gathers: it hands the runs over in jobs of about [`JOB_BYTES`],
//! reserving each tenant's seal for the job in order (a tenant's key is looked up once per
//! batch). A job is compressed and sealed on a blocking thread while the loop decodes the
//! next one, and the jobs' lines come back in the order their records came.
//!
//! Within a job, a tenant's runs are one zstd frame and one sealed `X` record, standing where
//! its first run stood; each later run's place holds a `Y` line naming that record. Tenants'
//! rows interleave in a table (runs of a few KiB), and one frame per run cost a sixth more
//! than one per tenant per job.

use std::collections::{HashMap, VecDeque};

use tokio::task::JoinHandle;
use zstd::bulk::Compressor;

use super::changes::{Record, SealedPart, SealedRecord};
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

/// A tenant's frame of a job is compressed this many zstd levels below `[repository]
/// compression_level` (at least level 1). Frames are short (a job's share of one tenant):
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
    /// zstd contexts of finished jobs, for the next ones (a fresh context per frame cost more
    /// than a short frame itself).
    compressors: Vec<Compressor<'static>>,
}

/// Lines in order, some of them runs still to seal, and the seal each tenant's runs of the
/// job are sealed with (one frame per tenant per job).
#[derive(Default)]
struct Job {
    pieces: Vec<Piece>,
    bytes: usize,
    /// Each tenant's seal, in the order of its first run in the job.
    seals: Vec<ReservedSeal>,
    tenants: HashMap<String, usize>,
}

enum Piece {
    /// A record stored as it is (not a tenant's row change).
    Line(Vec<u8>),
    /// A run of one tenant's lines, and the index of the tenant's seal.
    Run(usize, Vec<u8>),
}

/// A sealed job: its lines, and the context it compressed with.
struct Sealed {
    lines: Vec<u8>,
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

    /// Take `record` (whose tenant is `tenant`): the lines of the jobs sealed by now, in order,
    /// one block per job. A block is written as one record, so it stays in one chunk: a `Y`
    /// line is read with the `X` line it names.
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

    /// Every line left, sealed, in order (the batch ends); one block per job.
    pub async fn finish(&mut self, repo: &Repository) -> Result<Vec<Vec<u8>>> {
        self.close_run(repo).await?;
        self.hand_over();
        self.collect(true).await
    }

    /// The pending run into the job; the tenant's first run in the job reserves its seal.
    async fn close_run(&mut self, repo: &Repository) -> Result<()> {
        let Some((tenant, lines)) = self.run.take() else {
            return Ok(());
        };
        let slot = match self.job.tenants.get(&tenant) {
            Some(&slot) => slot,
            None => {
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
                self.job.seals.push(seal);
                let slot = self.job.seals.len() - 1;
                self.job.tenants.insert(tenant, slot);
                slot
            }
        };
        self.job.push(Piece::Run(slot, lines));
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
        let mut blocks = Vec::new();
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
            blocks.push(sealed.lines);
        }
        Ok(blocks)
    }
}

impl Job {
    fn push(&mut self, piece: Piece) {
        self.bytes += match &piece {
            Piece::Line(line) | Piece::Run(_, line) => line.len(),
        };
        self.pieces.push(piece);
    }

    /// Each tenant's runs compressed as one frame and sealed as one `X` record, which stands
    /// where the tenant's first run stood; each later run's place gets a `Y` line naming it.
    fn seal(self, compressor: Option<Compressor<'static>>, level: i32) -> Result<Sealed> {
        let failed =
            |e: std::io::Error| Error::other("compressing a tenant's row changes").with_source(e);
        let mut compressor = match compressor {
            Some(c) => c,
            None => Compressor::new(level).map_err(failed)?,
        };
        // Each tenant's frame: its runs' lines, and their lengths.
        let mut frames: Vec<(Vec<u8>, Vec<u64>)> = self
            .seals
            .iter()
            .map(|_| (Vec::new(), Vec::new()))
            .collect();
        let mut order = Vec::with_capacity(self.pieces.len());
        for piece in self.pieces {
            match piece {
                Piece::Run(slot, run) => {
                    let (lines, parts) = &mut frames[slot];
                    lines.extend_from_slice(&run);
                    parts.push(run.len() as u64);
                    order.push(Piece::Run(slot, Vec::new()));
                }
                line => order.push(line),
            }
        }
        let mut records = Vec::with_capacity(frames.len());
        let mut compressed = Vec::new();
        for (seal, (lines, parts)) in self.seals.into_iter().zip(frames) {
            compressed.clear();
            compressed.reserve(zstd::zstd_safe::compress_bound(lines.len()));
            compressor
                .compress_to_buffer(&lines, &mut compressed)
                .map_err(failed)?;
            let (seal, ciphertext) = seal.seal(&compressed);
            records.push((
                seal,
                Some(SealedRecord::run_line(&seal, &parts, &ciphertext)),
            ));
        }
        let mut out = Vec::with_capacity(self.bytes / 2);
        for piece in order {
            match piece {
                Piece::Line(line) => out.extend_from_slice(&line),
                Piece::Run(slot, _) => {
                    let (seal, first) = &mut records[slot];
                    match first.take() {
                        Some(x) => out.extend_from_slice(&x),
                        None => out.extend_from_slice(&SealedPart::line(seal)),
                    }
                }
            }
        }
        Ok(Sealed {
            lines: out,
            compressor,
        })
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

        // Each `X` holds one tenant's runs, under that tenant's key.
        let mut opener = RecordOpener::default();
        let (mut xs, mut ys) = (0, 0);
        for block in &lines {
            for record in parse_lines(block).unwrap() {
                let x = match record {
                    Record::Sealed(x) => x,
                    Record::SealedPart(_) => {
                        ys += 1;
                        continue;
                    }
                    _ => continue,
                };
                xs += 1;
                let (seal, ciphertext) = x.parts().unwrap();
                let keys = repo.keys_for_id(seal.key_id).await.unwrap();
                let plain = opener.open(&keys, &seal, &ciphertext).unwrap();
                let frame = zstd::stream::decode_all(plain.as_slice()).unwrap();
                assert_eq!(
                    x.p.iter().sum::<u64>(),
                    frame.len() as u64 * u64::from(x.p.len() > 1)
                );
                for record in parse_lines(&frame).unwrap() {
                    let Record::Update { new, .. } = record else {
                        panic!("a run holds row changes only");
                    };
                    let tenant = new.values[1].as_deref().unwrap();
                    let expected = repo.tenant_keys(&format!("t{tenant}")).await.unwrap();
                    assert_eq!(expected.key_id(), seal.key_id, "under its tenant's key");
                }
            }
        }
        assert!(xs >= 5 && ys > 1_000, "{xs} X lines, {ys} Y lines");

        // Restore's reader gives every record back in the order it came, a block at a time
        // (a block is kept in one chunk); a restore of one tenant gets its rows and no other's.
        let forgotten = crate::repo::Forgotten::default();
        let read = |only: Option<std::collections::HashSet<[u8; 8]>>| {
            let (repo, lines, forgotten) = (&repo, &lines, &forgotten);
            async move {
                let mut reader =
                    crate::restore::postgres::sealed::SealedRecords::new(forgotten, only);
                let mut output = Vec::new();
                for block in lines {
                    for record in parse_lines(block).unwrap() {
                        output.extend(reader.open(repo, record, "test").await.unwrap());
                    }
                    reader.end_chunk("test").unwrap();
                }
                output
            }
        };
        let output = read(None).await;
        assert_eq!(output.len(), input.len());
        assert!(output == input, "every record, in the order it came");
        let t2 = repo.tenant_keys("t2").await.unwrap().key_id();
        let only_t2 = read(Some([t2].into_iter().collect())).await;
        let expected: Vec<Record> = input
            .iter()
            .filter(|r| match r {
                Record::Update { new, .. } => new.values[1].as_deref() == Some("2"),
                _ => true,
            })
            .cloned()
            .collect();
        assert!(
            only_t2 == expected,
            "tenant t2's rows and the records of no tenant"
        );

        // Damage is found: a `Y` with no `X` before it, a chunk cut after an `X` of many runs.
        let records = parse_lines(&lines[0]).unwrap();
        let x_at = records
            .iter()
            .position(|r| matches!(r, Record::Sealed(x) if x.p.len() > 1))
            .unwrap();
        let y = records
            .iter()
            .find(|r| matches!(r, Record::SealedPart(_)))
            .unwrap();
        let mut reader = crate::restore::postgres::sealed::SealedRecords::new(&forgotten, None);
        let lone = reader.open(&repo, y.clone(), "seg").await.unwrap_err();
        assert!(
            lone.to_string().contains("that no `X` line before it"),
            "{lone}"
        );
        let mut reader = crate::restore::postgres::sealed::SealedRecords::new(&forgotten, None);
        for record in records.into_iter().take(x_at + 1) {
            reader.open(&repo, record, "seg").await.unwrap();
        }
        let cut = reader.end_chunk("seg").unwrap_err();
        assert!(
            cut.to_string().contains("a chunk ends before the runs"),
            "{cut}"
        );
    }
}
