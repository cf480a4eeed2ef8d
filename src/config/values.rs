//! Checks for single values: URLs, paths, cron expressions, durations.
//!
//! Pure functions that know nothing of files and lines: each returns the resolved value or a
//! [`Problem`] (what is wrong, what to try); `validate.rs` adds the location and the key.

use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use super::{mask_url, CronSpec};

/// What is wrong with a value, and what to try instead.
#[derive(Debug)]
pub(super) struct Problem {
    pub message: String,
    pub hint: String,
}

fn problem<T>(message: impl Into<String>, hint: impl Into<String>) -> Result<T, Problem> {
    Err(Problem {
        message: message.into(),
        hint: hint.into(),
    })
}

/// URL schemes a replica or a blobs source may use (all understood by object_store).
const STORE_SCHEMES: &[&str] = &[
    "file", "s3", "s3a", "az", "azure", "abfs", "abfss", "gs", "memory", "http", "https",
];

const URL_HINT: &str = "use an object_store URL (s3://bucket/prefix, az://container/prefix, \
                        gs://bucket/prefix, file:///absolute/path) or a plain path such as \
                        var/replica (resolved against the config file's directory)";

const CRON_HINT: &str = "fields are: second minute hour day-of-month month day-of-week [year], \
                         in UTC; e.g. \"0 0 2 * * *\" runs at 02:00:00 every day";

const DURATION_HINT: &str = "write a duration such as 1s, 500ms, 5m or 1h 30m";

/// An object_store URL, checked; a plain path becomes an absolute `file://` URL against `dir`.
pub(super) fn store_url(text: &str, dir: &Path) -> Result<String, Problem> {
    let text = text.trim();
    let shown = mask_url(text);
    if text.is_empty() {
        return problem("URL is empty", URL_HINT);
    }
    let Some(end) = text.find("://") else {
        if let Some(scheme) = scheme_prefix(text) {
            return problem(
                format!("`{shown}` looks like a URL but lacks `//` after `{scheme}:`"),
                URL_HINT,
            );
        }
        let path = resolve(dir, text);
        return match url::Url::from_file_path(&path) {
            Ok(url) => Ok(url.to_string()),
            Err(()) => problem(
                format!("cannot turn `{}` into a file URL", path.display()),
                URL_HINT,
            ),
        };
    };
    let scheme = text[..end].to_ascii_lowercase();
    if !STORE_SCHEMES.contains(&scheme.as_str()) {
        return problem(
            format!("unknown URL scheme `{scheme}` in `{shown}`"),
            URL_HINT,
        );
    }
    let url = match url::Url::parse(text) {
        Ok(url) => url,
        Err(e) => return problem(format!("`{shown}` is not a valid URL: {e}"), URL_HINT),
    };
    let host = url.host_str().unwrap_or("");
    match scheme.as_str() {
        "memory" => {}
        "file" if !(host.is_empty() || host == "localhost") => {
            return problem(
                format!("`{shown}` is not an absolute file URL (`{host}` would be a host name)"),
                "write file:///absolute/path, or a plain path such as var/replica without file://",
            );
        }
        "file" => {}
        _ if host.is_empty() => {
            return problem(
                format!("`{shown}` names no bucket, container or host"),
                URL_HINT,
            );
        }
        _ => {}
    }
    Ok(text.to_string())
}

/// A SQLite database: a file path (or `file://` / `sqlite:` URL), made absolute against `dir`.
pub(super) fn sqlite_path(text: &str, dir: &Path) -> Result<String, Problem> {
    let text = text.trim();
    let hint = "a sqlite source url is a database file path such as var/app.db \
                (relative paths are resolved against the config file's directory)";
    if text.is_empty() {
        return problem("path is empty", hint);
    }
    let path = if text.starts_with("file://") {
        match url::Url::parse(text)
            .ok()
            .and_then(|u| u.to_file_path().ok())
        {
            Some(path) => path,
            None => return problem(format!("`{text}` is not an absolute file URL"), hint),
        }
    } else if let Some(rest) = text
        .strip_prefix("sqlite://")
        .or_else(|| text.strip_prefix("sqlite:"))
    {
        resolve(dir, rest)
    } else if text.contains("://") || scheme_prefix(text).is_some() {
        return problem(
            format!("`{}` is a URL, not a file path", mask_url(text)),
            hint,
        );
    } else {
        resolve(dir, text)
    };
    Ok(path.to_string_lossy().into_owned())
}

/// A replication slot or publication name (`options.slot`, `options.publication`).
pub(super) fn pg_name(text: &str) -> Result<String, Problem> {
    use super::postgres_options::{invalid_name, NAME_HINT};
    match invalid_name(text) {
        None => Ok(text.to_string()),
        Some(why) => problem(format!("`{text}` {why}"), NAME_HINT),
    }
}

/// A whole number from 1 to `max`.
pub(super) fn whole_number(text: &str, max: u64) -> Result<u64, Problem> {
    match text.trim().parse::<u64>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => problem(
            format!("`{text}` is not a whole number from 1 to {max}"),
            "write digits only, in quotes like every option value: \"4\"",
        ),
    }
}

/// A byte size: bytes, or a number with `KiB`, `MiB`, `GiB` or `TiB`.
pub(super) fn size(text: &str) -> Result<u64, Problem> {
    match super::postgres_options::parse_size(text) {
        Some(bytes) => Ok(bytes),
        None => problem(
            format!("`{text}` is not a size"),
            "write bytes or a number with KiB, MiB, GiB or TiB, e.g. \"2GiB\"",
        ),
    }
}

/// `true` or `false`.
pub(super) fn capture_choice(text: &str) -> Result<super::CaptureChoice, Problem> {
    use super::CaptureChoice;
    match text.trim() {
        "auto" => Ok(CaptureChoice::Auto),
        "streaming" => Ok(CaptureChoice::Streaming),
        "polling" => Ok(CaptureChoice::Polling),
        _ => problem(
            format!("`{text}` is not a capture method"),
            "write \"auto\" (streaming when the server allows it), \"streaming\" or \"polling\"",
        ),
    }
}

pub(super) fn boolean(text: &str) -> Result<bool, Problem> {
    match text.trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => problem(
            format!("`{text}` is neither true nor false"),
            "write \"true\" or \"false\"",
        ),
    }
}

/// A `postgres://` or `postgresql://` URL, kept as written.
pub(super) fn postgres_url(text: &str) -> Result<String, Problem> {
    let text = text.trim();
    let hint = "write postgres://user@host:5432/database (or postgresql://...)";
    let lower = text.to_ascii_lowercase();
    if !(lower.starts_with("postgres://") || lower.starts_with("postgresql://")) {
        return problem(
            format!(
                "`{}` does not start with postgres:// or postgresql://",
                mask_url(text)
            ),
            hint,
        );
    }
    let url = match url::Url::parse(text) {
        Ok(url) => url,
        Err(e) => {
            return problem(
                format!("`{}` is not a valid URL: {e}", mask_url(text)),
                hint,
            )
        }
    };
    // The database, user and server are taken from the URL's own parts: export and drill put
    // their scratch databases beside the source by naming another database in the path, and
    // a `?dbname=` would silently win over it (and point their cleanup at the source itself).
    if let Some((key, _)) = url
        .query_pairs()
        .find(|(k, _)| CONNECTION_PARAMETERS.contains(&k.as_ref()))
    {
        return problem(
            format!(
                "`{}` names `{key}` as a query parameter; timevault takes the server, user and database only from the URL itself",
                mask_url(text)
            ),
            hint,
        );
    }
    if url.path().trim_start_matches('/').is_empty() {
        return problem(format!("`{}` names no database", mask_url(text)), hint);
    }
    Ok(text.to_string())
}

/// Query parameters that would override who or where a postgres URL connects to.
const CONNECTION_PARAMETERS: [&str; 6] = ["dbname", "user", "host", "hostaddr", "port", "service"];

/// A humantime duration greater than zero.
pub(super) fn duration(text: &str) -> Result<Duration, Problem> {
    let text = text.trim();
    match humantime::parse_duration(text) {
        Err(e) => problem(format!("`{text}` is not a duration: {e}"), DURATION_HINT),
        Ok(d) if d.is_zero() => problem("duration must be greater than zero", DURATION_HINT),
        Ok(d) => Ok(d),
    }
}

/// A retention span: a whole number of hours, days, weeks or years (`36h`, `35d`, `2w`,
/// `5y`; a year is 365.25 days). Calendar tiers count from now, so seconds make no sense here.
pub(super) fn retention_span(text: &str) -> Result<Duration, Problem> {
    const HINT: &str = "write a whole number followed by h, d, w or y, e.g. \"35d\" or \"5y\"";
    let text = text.trim();
    let unit = text.chars().last().unwrap_or(' ');
    let hours: u64 = match unit {
        'h' => 1,
        'd' => 24,
        'w' => 24 * 7,
        // 365.25 days, as humantime counts a year.
        'y' => 8766,
        _ => return problem(format!("`{text}` is not a span of h, d, w or y"), HINT),
    };
    match text[..text.len() - 1].parse::<u64>() {
        Ok(0) => problem("span must be greater than zero", HINT),
        Ok(n) if n <= 1_000_000 => Ok(Duration::from_secs(n * hours * 3600)),
        _ => problem(format!("`{text}` is not a whole number of {unit}"), HINT),
    }
}

/// A seconds-first cron expression (6 or 7 fields), with day-of-week given by name.
pub(super) fn cron(expr: &str) -> Result<CronSpec, Problem> {
    let expr = expr.trim();
    let fields: Vec<&str> = expr.split_whitespace().collect();
    if fields.len() == 5 {
        return problem(
            format!("`{expr}` has 5 fields, but cron expressions here have seconds first (6 or 7 fields)"),
            format!("seconds come first: write \"0 {expr}\" to fire at second 0 of those minutes"),
        );
    }
    if let Some(dow) = fields.get(5) {
        let numeric = dow.split(',').any(|part| {
            let base = part.split('/').next().unwrap_or("");
            base.chars().any(|c| c.is_ascii_digit())
        });
        if numeric {
            return problem(
                format!(
                    "day-of-week `{dow}` is numeric, which is ambiguous: this cron counts \
                     Sunday as 1, classic cron as 0"
                ),
                "use day names instead, e.g. Sun, Mon-Fri or Sat,Sun",
            );
        }
    }
    match cron::Schedule::from_str(expr) {
        Ok(schedule) => Ok(CronSpec {
            expr: expr.to_string(),
            schedule,
        }),
        Err(err) => {
            // The crate's message repeats the expression with a caret line; keep the reason.
            let text = err.to_string();
            let reason: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && *l != expr && !l.chars().all(|c| c == '^'))
                .map(|l| l.trim_end_matches('.'))
                .collect();
            let reason = if reason.is_empty() {
                "not a valid cron expression".to_string()
            } else {
                reason.join(" ")
            };
            problem(format!("`{expr}`: {reason}"), CRON_HINT)
        }
    }
}

/// `path` made absolute against `dir`, with `.` and `..` removed lexically.
pub(super) fn resolve(dir: &Path, path: &str) -> PathBuf {
    normalize(&dir.join(path))
}

/// The absolute directory holding the config file `origin`.
pub(super) fn config_dir(origin: &Path) -> PathBuf {
    let dir = match origin.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    normalize(&std::path::absolute(&dir).unwrap_or(dir))
}

/// Lexical normalization: drop `.`, apply `..` to the preceding component. Symlinks are not
/// consulted, so `a/link/..` becomes `a` even if `link` points elsewhere (as Go's `filepath.Clean`).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                if matches!(out.components().next_back(), Some(Component::Normal(_))) {
                    out.pop();
                } else if !out.has_root() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// `Some("s3")` for text like `s3:bucket` that starts with a URL scheme (two letters or more, so
/// a Windows drive letter is not mistaken for one).
fn scheme_prefix(text: &str) -> Option<&str> {
    let (scheme, _) = text.split_once(':')?;
    let valid = scheme.len() >= 2
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    valid.then_some(scheme)
}
