//! What the binary prints when nobody reads it any more (issue 21): `timevault status | head -1`
//! must not panic. Rust ignores SIGPIPE (and timevault keeps it so: a restore's `pg_restore`
//! pipe that closes must not kill the restore), so a write to a closed pipe fails with
//! `BrokenPipe`, and `println!` turned that into a panic. Now the command finishes its work
//! without printing more and exits with its own code.

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::config::ConfigBuilder;
use common::{ok, Env};

/// Run `timevault ARGS` with stdout a stream whose reading end is already closed, so that its
/// first write fails with `BrokenPipe` whatever the timing (a socket pair: `std::io::pipe` is
/// newer than the crate's minimum Rust; the write fails the same way on both).
fn run_with_stdout_closed(config: &Path, args: &[&str]) -> Output {
    let (reader, writer) = std::os::unix::net::UnixStream::pair().unwrap();
    drop(reader);
    Command::new(common::binary())
        .arg("--config")
        .arg(config)
        .args(args)
        .stdout(std::os::fd::OwnedFd::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("run timevault")
}

fn assert_quiet_success(what: &str, out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{what}: a panic: {stderr}");
    assert!(
        !stderr.contains("Broken pipe"),
        "{what}: the closed pipe is not an error: {stderr}"
    );
    assert_eq!(out.status.code(), Some(0), "{what}: {stderr}");
}

/// A reader that stops after the first line, as `head -1` does: `config show` of a config with
/// many sources prints far more than a pipe holds (64 KiB), so the rest is written after the
/// reader has gone.
#[test]
fn a_reader_that_closes_after_the_first_line_costs_no_panic() {
    let dir = tempfile::tempdir().unwrap();
    let config = (0..2000)
        .fold(ConfigBuilder::one_replica("replica"), |config, i| {
            config.sqlite(&format!("db{i}"), &format!("db{i}.db"))
        })
        .write(dir.path());
    let mut child = Command::new(common::binary())
        .arg("--config")
        .arg(&config)
        .args(["config", "show"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("# resolved from"), "{first}");
    // The reader is dropped here: the pipe's reading end is closed.
    let out = child.wait_with_output().unwrap();
    assert_quiet_success("config show | head -1", &out);

    // Output lost otherwise (a full disk) is an error: said once, exit 1, no panic.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = Command::new(common::binary())
        .arg("--config")
        .arg(&config)
        .args(["config", "show"])
        .stdout(full)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        stderr
            .matches("error: cannot write to standard output")
            .count(),
        1,
        "{stderr}"
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
}

/// `status` (text and JSON) into a closed pipe; `backup` into one still backs up every source
/// (the closed pipe stops the printing, not the work).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_writing_to_a_closed_pipe_finish_quietly() {
    let env = Env::new(91).await;
    let blobs = env.path().join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join("a.txt"), "an attachment").unwrap();
    let config = env
        .config_builder()
        .blobs("files", "blobs")
        .write(env.path());
    ok(&common::timevault(&config, &["init"]));
    let backup = run_with_stdout_closed(&config, &["backup"]);
    assert_quiet_success("backup > closed pipe", &backup);
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&common::timevault(&config, &["snapshots", "--json"]))).unwrap();
    for source in ["app", "files"] {
        assert!(
            listed
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l["source"] == source),
            "{source} was not backed up: {listed:#}"
        );
    }
    for args in [&["status"][..], &["status", "--json"], &["snapshots"]] {
        let out = run_with_stdout_closed(&config, args);
        assert_quiet_success(&format!("{args:?} > closed pipe"), &out);
    }
}
