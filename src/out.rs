//! Everything the binary prints goes through here instead of `println!`, which panics when
//! standard output is a pipe whose reader has gone (`timevault status | head -1`).
//!
//! Rust ignores SIGPIPE, and timevault keeps it ignored: with the default handler, a
//! `pg_restore` child whose pipe closes would kill the restore. So a write to a closed pipe
//! fails with `BrokenPipe`. Decision: that is not an error. The output stops, the command
//! finishes its work (a `backup` of several sources still backs up every one) and exits with
//! its own code, 0 when the work succeeded, quietly. Any other write error (a full disk
//! behind `> file`) is reported once on stderr and makes the exit code 1: the output is
//! incomplete.

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// Standard output failed once: nothing more is written to it.
static STDOUT_GONE: AtomicBool = AtomicBool::new(false);
/// It failed with something other than a closed pipe.
static STDOUT_FAILED: AtomicBool = AtomicBool::new(false);

/// Like `println!`, through [`stdout`].
macro_rules! outln {
    () => {
        $crate::out::stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out::stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Like `print!`, through [`stdout`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out::stdout(format_args!($($arg)*))
    };
}

/// Like `eprintln!`, through [`stderr`].
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::out::stderr(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub(crate) use {errln, out, outln};

/// Write to standard output; see the module docs for what a failure does.
pub(crate) fn stdout(args: fmt::Arguments<'_>) {
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return;
    }
    let written = std::io::stdout().lock().write_fmt(args);
    if let Err(e) = written {
        failed(e);
    }
}

/// Write what standard output still buffers (a last line without a newline); call once
/// before exiting, so that its failure is handled like any other.
pub(crate) fn flush() {
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return;
    }
    if let Err(e) = std::io::stdout().lock().flush() {
        failed(e);
    }
}

fn failed(e: std::io::Error) {
    STDOUT_GONE.store(true, Ordering::Relaxed);
    if e.kind() != std::io::ErrorKind::BrokenPipe {
        STDOUT_FAILED.store(true, Ordering::Relaxed);
        stderr(format_args!(
            "error: cannot write to standard output: {e}\n"
        ));
    }
}

/// Whether standard output failed with something other than a closed pipe.
pub(crate) fn stdout_failed() -> bool {
    STDOUT_FAILED.load(Ordering::Relaxed)
}

/// Write to standard error; a failure there has nowhere left to be reported and is ignored.
pub(crate) fn stderr(args: fmt::Arguments<'_>) {
    let _ = std::io::stderr().lock().write_fmt(args);
}
