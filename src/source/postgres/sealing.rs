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

/// A job is handed over once its lines reach this many bytes.
const JOB_BYTES: usize = 1 << 20;

/// Jobs sealing at once; the loop waits for the oldest beyond this (memory stays bounded).
const JOBS_IN_FLIGHT: usize = 2;

/// zstd level of a sealed run (the segment's own compression sees only ciphertext).
const RUN_LEVEL: i32 = 1;

/// A batch's sealers (one per tenant), the run not sealed yet, the job being gathered and the
/// jobs being sealed, oldest first.
#[derive(Default)]
pub(super) struct Sealers {
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
                let (_, lines) = self.run.get_or_insert_with(|| (tenant, Vec::new()));
                lines.extend(record.to_line());
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
        self.in_flight
            .push_back(tokio::task::spawn_blocking(move || job.seal(compressor)));
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
    fn seal(self, compressor: Option<Compressor<'static>>) -> Result<Sealed> {
        let failed =
            |e: std::io::Error| Error::other("compressing a tenant's row changes").with_source(e);
        let mut compressor = match compressor {
            Some(c) => c,
            None => Compressor::new(RUN_LEVEL).map_err(failed)?,
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
