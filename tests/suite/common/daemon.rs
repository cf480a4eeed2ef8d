//! `timevault daemon` as its own process, the way users run it: one way to start it, read its
//! log, signal, kill and stop it. A test that fails half way leaves no daemon behind (the
//! guard kills it when dropped), and a daemon that does not stop cleanly fails the test with
//! the end of its log.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::KillOnDrop;

/// How long `stop` waits for the daemon to drain its jobs after SIGTERM.
const STOP_PATIENCE: Duration = Duration::from_secs(90);

/// How many lines of the log a failure message shows.
const TAIL_LINES: usize = 80;

/// How to start the daemon: `timevault --config <config> --log <level> daemon [args]`, with
/// stdout and stderr going to `daemon.log` beside the config.
#[derive(Clone, Debug)]
pub struct DaemonCommand {
    config: PathBuf,
    log: PathBuf,
    level: String,
    envs: Vec<(OsString, OsString)>,
    args: Vec<OsString>,
    append: bool,
}

impl DaemonCommand {
    /// The `--log` filter (default `info`).
    pub fn log_level(mut self, level: &str) -> Self {
        self.level = level.to_string();
        self
    }

    /// One more environment variable for the daemon.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    pub fn envs<K: Into<OsString>, V: Into<OsString>>(
        mut self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.envs
            .extend(vars.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// An argument after `daemon` (`--once`, `--json`).
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Append to the log instead of starting it anew: a test that restarts the daemon keeps
    /// what every run logged.
    pub fn append(mut self) -> Self {
        self.append = true;
        self
    }

    /// Start a daemon; call again to start another after a kill.
    pub fn start(&self) -> Daemon {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(self.append)
            .truncate(!self.append)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("{}: {e}", self.log.display()));
        let child = Command::new(super::binary())
            .arg("--config")
            .arg(&self.config)
            .args(["--log", &self.level, "daemon"])
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn the daemon");
        Daemon {
            child: KillOnDrop(child),
            log: self.log.clone(),
        }
    }
}

/// A running daemon, killed (SIGKILL) when dropped.
pub struct Daemon {
    child: KillOnDrop,
    log: PathBuf,
}

impl Daemon {
    /// `timevault --config <config> --log info daemon`, logging to `daemon.log` beside the
    /// config (created anew).
    pub fn start(config: &Path) -> Daemon {
        Daemon::command(config).start()
    }

    /// The command [`Daemon::start`] runs, to change before starting.
    pub fn command(config: &Path) -> DaemonCommand {
        DaemonCommand {
            config: config.to_path_buf(),
            log: config.with_file_name("daemon.log"),
            level: "info".to_string(),
            envs: Vec::new(),
            args: Vec::new(),
            append: false,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Everything the daemon has logged so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Scrape `/metrics` on `port` every `every` until `done` accepts the text; after `limit`
    /// the test fails naming `what` with the daemon's log.
    pub fn metrics_until(
        &self,
        port: u16,
        (limit, every): (Duration, Duration),
        what: &str,
        done: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some((200, text)) = super::http_get(port, "/metrics") {
                if done(&text) {
                    return text;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{what} never happened; daemon log:\n{}",
                self.log()
            );
            std::thread::sleep(every);
        }
    }

    /// The last lines of the log, for a failure message.
    pub fn log_tail(&self) -> String {
        tail(&self.log())
    }

    /// Send `signal` (`-STOP`, `-CONT`, `-TERM`) without waiting.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {}", self.id());
    }

    /// Panics with the log's tail if the daemon has exited by itself.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "the daemon {} had exited ({status}); its log ends:\n{}",
                self.id(),
                self.log_tail()
            );
        }
    }

    /// SIGKILL, as a crash would, and reap the process.
    pub fn kill(mut self) -> ExitStatus {
        let _ = self.child.kill();
        self.child.wait().unwrap()
    }

    /// SIGTERM, then the daemon must drain its jobs and exit 0 within 90 s; otherwise it is
    /// killed and the test fails with the end of its log. Returns the whole log.
    pub fn stop(mut self) -> String {
        self.assert_running();
        self.signal("-TERM");
        let deadline = Instant::now() + STOP_PATIENCE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "the daemon did not stop within {STOP_PATIENCE:?} of SIGTERM; its log ends:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let log = self.log();
        assert!(
            status.success(),
            "the daemon exited {status} on SIGTERM; its log ends:\n{}",
            tail(&log)
        );
        log
    }

    /// Wait until `needle` is in the log `times` times; panics with the log's tail after 90 s.
    pub async fn wait_log(&self, needle: &str, times: usize) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let text = self.log();
            if text.matches(needle).count() >= times {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} not logged {times} times; the log ends:\n{}",
                tail(&text)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}
