//! The one public error type at the library's edge.
//!
//! Every failure an operator can see carries three things: a [`ErrorKind`] that decides the
//! process exit code, a message that says what failed and where (which replica, which object,
//! which file and line), and an optional hint that says what to try. Modules keep their own
//! precise error enums internally and convert into this type at their public boundary.

use std::fmt;

/// Broad classes of failure; each maps to a stable exit code (see README "Exit codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad configuration: unknown key, bad value, missing file.
    Config,
    /// Bad command-line input: a malformed time, an unknown source or replica name.
    Input,
    /// The key is missing, unreadable, too widely readable, or not the repository's key.
    Key,
    /// Stored data failed authentication or is malformed: corruption or tampering.
    Corrupt,
    /// A replica could not be reached, or too few replicas acknowledged a write.
    Unavailable,
    /// Another writer holds the lease.
    Locked,
    /// Something asked for does not exist: no repository, no snapshot, a time outside the window.
    NotFound,
    /// The data asked for belonged to a tenant that was forgotten (`tenant forget`): exit 7,
    /// like other data that is not there.
    Forgotten,
    /// The target of a restore or export already exists and `--force` was not given.
    TargetExists,
    /// `verify` or a drill found problems.
    Verify,
    /// Anything else: local I/O, a database error.
    Other,
}

impl ErrorKind {
    /// The process exit code for this kind. Stable: scripts depend on it.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Other => 1,
            ErrorKind::Config | ErrorKind::Input => 2,
            ErrorKind::Key => 3,
            ErrorKind::Corrupt => 4,
            ErrorKind::Unavailable => 5,
            ErrorKind::Locked => 6,
            ErrorKind::NotFound | ErrorKind::Forgotten => 7,
            ErrorKind::TargetExists => 8,
            ErrorKind::Verify => 9,
        }
    }
}

/// A failure with its kind, a message naming what failed, and a hint saying what to try.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    hint: Option<String>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            hint: None,
            source: None,
        }
    }

    /// Attach "what to try".
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Attach the underlying cause; it is printed after the message.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Prefix the message with more context ("replica eu-west: ...").
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn hint(&self) -> Option<&str> {
        self.hint.as_deref()
    }

    pub fn exit_code(&self) -> i32 {
        self.kind.exit_code()
    }

    pub fn config(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Config, message)
    }

    pub fn input(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Input, message)
    }

    pub fn corrupt(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Corrupt, message)
    }

    pub fn other(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Other, message)
    }

    /// A local I/O failure on `path`.
    pub fn io(path: impl fmt::Display, err: std::io::Error) -> Self {
        Error::new(ErrorKind::Other, format!("{path}: {err}"))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(source) = &self.source {
            let text = source.to_string();
            if !self.message.contains(&text) {
                write!(f, ": {text}")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

/// Add context to any result whose error is an [`Error`].
pub trait ResultExt<T> {
    fn context(self, context: impl fmt::Display) -> Result<T>;
}

impl<T> ResultExt<T> for Result<T> {
    fn context(self, context: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.context(context))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_stable() {
        assert_eq!(ErrorKind::Config.exit_code(), 2);
        assert_eq!(ErrorKind::Key.exit_code(), 3);
        assert_eq!(ErrorKind::Corrupt.exit_code(), 4);
        assert_eq!(ErrorKind::Unavailable.exit_code(), 5);
        assert_eq!(ErrorKind::Locked.exit_code(), 6);
        assert_eq!(ErrorKind::Verify.exit_code(), 9);
        assert_eq!(ErrorKind::Forgotten.exit_code(), 7);
    }

    #[test]
    fn context_prefixes_and_hint_is_kept() {
        let err = Error::corrupt("bad tag")
            .with_hint("run verify")
            .context("replica eu-west");
        assert_eq!(err.to_string(), "replica eu-west: bad tag");
        assert_eq!(err.hint(), Some("run verify"));
    }

    /// A cause kept with `with_source` prints as the flattened `format!("...: {e}")` did, and
    /// stays reachable as the error's source (what `anyhow`-style reporters and logs walk).
    #[test]
    fn a_kept_cause_prints_after_the_message_and_is_the_source() {
        let cause = serde_json::from_str::<u32>("x").unwrap_err();
        let text = cause.to_string();
        let err = Error::corrupt("segment a/b: unreadable manifest").with_source(cause);
        assert_eq!(
            err.to_string(),
            format!("segment a/b: unreadable manifest: {text}")
        );
        let source = std::error::Error::source(&err).expect("the cause is kept");
        assert_eq!(source.to_string(), text);
        assert_eq!(err.message(), "segment a/b: unreadable manifest");
    }
}
