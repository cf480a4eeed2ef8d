//! Progress on a terminal: indicatif bars fed by the library's process-wide counters
//! (`repo::chunk_bytes_read`, `repo::replica_bytes_read`, and for a backup
//! `repo::chunk_bytes_put`, `repo::chunk_bytes_uploaded`, `repo::objects_written`), so the
//! library never draws anything. Hidden when stderr is no terminal or with `--json`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

use crate::out::errln;

/// How often a bar reads its counters.
const TICK: Duration = Duration::from_millis(200);

/// A progress bar fed by a process-wide counter until it is finished.
pub(crate) struct Progress {
    bar: ProgressBar,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    pub(crate) fn hidden() -> Progress {
        Progress {
            bar: ProgressBar::hidden(),
            ticker: None,
        }
    }

    /// Plaintext bytes of chunks read and authenticated against `total` (a restore's plan),
    /// with rate and ETA. The caller checks for a terminal.
    pub(crate) fn bytes(message: String, total: u64) -> Progress {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} ({elapsed})",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        bar.set_message(message);
        let counter = timevault::repo::chunk_bytes_read;
        let start = counter();
        Self::fed(bar, move |bar| bar.set_position(counter() - start))
    }

    /// Bytes read so far (as `counter` counts them) and the rate, for work whose total is not
    /// known beforehand (an export, a drill, a verify, a sync); hidden without a terminal.
    pub(crate) fn counting(message: String, counter: fn() -> u64) -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress::hidden();
        }
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {msg}: {bytes} read, {bytes_per_sec} ({elapsed})",
            )
            .expect("template"),
        );
        bar.set_message(message);
        let start = counter();
        Self::fed(bar, move |bar| bar.set_position(counter() - start)).spinning()
    }

    /// Animate a spinner between counter reads (once the first read has filled it in).
    fn spinning(self) -> Progress {
        self.bar.enable_steady_tick(Duration::from_millis(120));
        self
    }

    /// Call `tick` on `bar` now and every [`TICK`] until the progress is finished.
    fn fed(bar: ProgressBar, tick: impl Fn(&ProgressBar) + Send + 'static) -> Progress {
        tick(&bar);
        let shown = bar.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(TICK).await;
                tick(&shown);
            }
        });
        Progress {
            bar,
            ticker: Some(ticker),
        }
    }

    pub(crate) fn finish_and_clear(self) {
        if let Some(ticker) = self.ticker {
            ticker.abort();
        }
        self.bar.finish_and_clear();
    }
}

/// The process-wide counters a backup moves, at one instant.
#[derive(Clone, Copy)]
struct BackupCounters {
    /// Plaintext bytes read from the source and stored as chunks (deduplicated ones included).
    read: u64,
    /// Sealed chunk bytes uploaded.
    uploaded: u64,
    /// Objects written (chunks and manifests).
    objects: u64,
}

impl BackupCounters {
    fn now() -> BackupCounters {
        BackupCounters {
            read: timevault::repo::chunk_bytes_put(),
            uploaded: timevault::repo::chunk_bytes_uploaded(),
            objects: timevault::repo::objects_written(),
        }
    }

    fn since(self, start: BackupCounters) -> BackupCounters {
        BackupCounters {
            read: self.read - start.read,
            uploaded: self.uploaded - start.uploaded,
            objects: self.objects - start.objects,
        }
    }
}

/// One source's backup on a terminal: bytes read from the source (against `total` when it is
/// known: a SQLite file's size), bytes uploaded, objects written, the rate; then a summary line.
pub(crate) struct BackupProgress {
    shown: Option<(String, BackupCounters, Instant)>,
    progress: Progress,
}

impl BackupProgress {
    pub(crate) fn start(source: &str, total: Option<u64>, json: bool) -> BackupProgress {
        if json || !std::io::stderr().is_terminal() {
            return BackupProgress {
                shown: None,
                progress: Progress::hidden(),
            };
        }
        let bar = match total {
            Some(total) => {
                let bar = ProgressBar::new(total);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} read, {bytes_per_sec}, eta {eta}; {prefix} ({elapsed})",
                    )
                    .expect("template")
                    .progress_chars("=> "),
                );
                bar
            }
            None => {
                let bar = ProgressBar::new_spinner();
                bar.set_style(
                    ProgressStyle::with_template(
                        "{spinner} {msg}: {bytes} read, {bytes_per_sec}; {prefix} ({elapsed})",
                    )
                    .expect("template"),
                );
                bar
            }
        };
        // Built with its texts: a setter would draw once without them.
        let bar = bar
            .with_prefix("0 B uploaded, 0 objects written")
            .with_message(format!("backing up {source}"));
        let start = BackupCounters::now();
        let progress = Progress::fed(bar, move |bar| {
            let done = BackupCounters::now().since(start);
            // The file may grow while it is read (a checkpoint before the copy): never past 100%.
            if bar.length().is_some_and(|len| done.read > len) {
                bar.set_length(done.read);
            }
            bar.set_prefix(format!(
                "{} uploaded, {} objects written",
                HumanBytes(done.uploaded),
                done.objects
            ));
            bar.set_position(done.read);
        });
        let progress = match total {
            Some(_) => progress,
            None => progress.spinning(),
        };
        BackupProgress {
            shown: Some((source.to_string(), start, Instant::now())),
            progress,
        }
    }

    /// Clear the bar and, when it was shown, print the summary line.
    pub(crate) fn finish(self) {
        self.progress.finish_and_clear();
        let Some((source, start, started)) = self.shown else {
            return;
        };
        let done = BackupCounters::now().since(start);
        let seconds = started.elapsed().as_secs_f64();
        errln!(
            "backup of {source}: {} read, {} uploaded, {} objects written in {seconds:.1}s ({}/s)",
            HumanBytes(done.read),
            HumanBytes(done.uploaded),
            done.objects,
            HumanBytes((done.read as f64 / seconds.max(0.001)) as u64)
        );
    }
}
