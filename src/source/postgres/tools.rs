//! The PostgreSQL client tools timevault runs: `pg_dump` takes schema images, `pg_restore`
//! applies them.
//!
//! Both must be of the server's major version or newer (an older `pg_dump` refuses a newer
//! server; an older `pg_restore` cannot read a newer archive). They are looked for in
//! `$TIMEVAULT_PG_BINDIR` when it is set (and only there), else on `PATH`, else in
//! `/usr/lib/postgresql/<major>/bin` (Debian's layout), newest major first. Connection
//! settings reach them as libpq environment variables, so a password never appears on a
//! command line (where `ps` would show it).

use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::config::mask_url;
use crate::error::{Error, ErrorKind, Result};

/// The environment variable naming the directory that holds `pg_dump` and `pg_restore`.
pub const BINDIR_ENV: &str = "TIMEVAULT_PG_BINDIR";

/// Where Debian and Ubuntu install each major version's client tools.
const DEBIAN_ROOT: &str = "/usr/lib/postgresql";

/// A `pg_dump` and a `pg_restore` from one directory, of one major version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgTools {
    pub pg_dump: PathBuf,
    pub pg_restore: PathBuf,
    /// Their major version (`pg_dump --version`).
    pub major: u32,
    /// Their full version, e.g. `15.5`.
    pub version: String,
}

impl PgTools {
    /// Find tools of major version `min_major` or newer; the error says what was found and
    /// how to install suitable ones.
    pub async fn find(min_major: u32) -> Result<PgTools> {
        let mut seen = Vec::new();
        for dir in candidate_dirs() {
            let Some(tools) = tools_in(&dir).await else {
                continue;
            };
            if tools.major >= min_major {
                return Ok(tools);
            }
            seen.push(format!("{} {}", tools.pg_dump.display(), tools.version));
        }
        Err(missing_tools(min_major, &seen))
    }
}

fn missing_tools(min_major: u32, seen: &[String]) -> Error {
    let found = if seen.is_empty() {
        "none found".to_string()
    } else {
        format!("found only {}", seen.join(", "))
    };
    let place = match std::env::var_os(BINDIR_ENV) {
        Some(dir) => format!("in ${BINDIR_ENV} ({})", Path::new(&dir).display()),
        None => format!("on PATH or in {DEBIAN_ROOT}/<major>/bin"),
    };
    Error::new(
        ErrorKind::Config,
        format!(
            "pg_dump and pg_restore of PostgreSQL {min_major} or newer are needed {place}: {found}"
        ),
    )
    .with_hint(format!(
        "install the client tools of the server's major version or newer (Debian/Ubuntu: \
         apt-get install postgresql-client-{min_major}; RHEL: dnf install postgresql{min_major}; \
         macOS: brew install libpq), or set {BINDIR_ENV} to the directory that holds them"
    ))
}

/// The directories to look in, in order.
fn candidate_dirs() -> Vec<PathBuf> {
    if let Some(dir) = std::env::var_os(BINDIR_ENV) {
        return vec![PathBuf::from(dir)];
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir(DEBIAN_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            Some((major, e.path().join("bin")))
        })
        .collect();
    majors.sort_by_key(|(major, _)| std::cmp::Reverse(*major));
    dirs.extend(majors.into_iter().map(|(_, dir)| dir));
    dirs
}

/// Both tools in `dir`, with the version `pg_dump --version` reports.
async fn tools_in(dir: &Path) -> Option<PgTools> {
    let (pg_dump, pg_restore) = (dir.join("pg_dump"), dir.join("pg_restore"));
    if !pg_dump.is_file() || !pg_restore.is_file() {
        return None;
    }
    let out = Command::new(&pg_dump)
        .arg("--version")
        .output()
        .await
        .ok()?;
    let version = parse_version(&String::from_utf8_lossy(&out.stdout))?;
    let major = version.split('.').next()?.parse().ok()?;
    Some(PgTools {
        pg_dump,
        pg_restore,
        major,
        version,
    })
}

/// The version in `pg_dump (PostgreSQL) 15.5 (Debian 15.5-0+deb12u1)`: `15.5`.
pub fn parse_version(text: &str) -> Option<String> {
    let rest = text.split(") ").nth(1)?;
    let version = rest.split_whitespace().next()?;
    version
        .chars()
        .next()
        .filter(char::is_ascii_digit)
        .map(|_| version.to_string())
}

/// The major version of a `server_version_num` (150005 → 15).
pub fn server_major(version_num: i32) -> u32 {
    (version_num.max(0) / 10_000) as u32
}

/// The major version of the server `conn` talks to; an error when the server did not report
/// one (never a guess of 0, which any client tools would satisfy).
pub fn connected_major(conn: &sqlx::PgConnection) -> crate::error::Result<u32> {
    conn.server_version_num()
        .map(|v| server_major(v as i32))
        .ok_or_else(|| {
            crate::error::Error::other(
                "the PostgreSQL server did not report its version (server_version_num)",
            )
        })
}

/// How libpq reaches one database: environment variables for `pg_dump` and `pg_restore`.
#[derive(Clone)]
pub struct Libpq {
    env: Vec<(&'static str, String)>,
    /// The URL with its password masked, for error messages.
    shown: String,
}

impl std::fmt::Debug for Libpq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Libpq({})", self.shown)
    }
}

impl Libpq {
    /// The settings of a `postgres://user:password@host:port/database?sslmode=...` URL.
    pub fn from_url(url: &str) -> Result<Libpq> {
        let parsed = url::Url::parse(url).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("postgres url {}: {e}", mask_url(url)),
            )
        })?;
        let decode = |s: &str| {
            percent_decode(s)
                .ok_or_else(|| Error::config(format!("postgres url {}: bad escape", mask_url(url))))
        };
        let mut env: Vec<(&'static str, String)> = Vec::new();
        if let Some(host) = parsed.host_str().filter(|h| !h.is_empty()) {
            env.push(("PGHOST", host.trim_matches(['[', ']']).to_string()));
        }
        if let Some(port) = parsed.port() {
            env.push(("PGPORT", port.to_string()));
        }
        if !parsed.username().is_empty() {
            env.push(("PGUSER", decode(parsed.username())?));
        }
        if let Some(password) = parsed.password() {
            env.push(("PGPASSWORD", decode(password)?));
        }
        let database = parsed.path().trim_start_matches('/');
        if !database.is_empty() {
            env.push(("PGDATABASE", decode(database)?));
        }
        for (key, value) in parsed.query_pairs() {
            if let Some(var) = query_variable(&key) {
                env.retain(|(v, _)| *v != var);
                env.push((var, value.into_owned()));
            }
        }
        Ok(Libpq {
            env,
            shown: mask_url(url),
        })
    }

    /// The same server, another database.
    pub fn database(mut self, name: &str) -> Libpq {
        self.env.retain(|(v, _)| *v != "PGDATABASE");
        self.env.push(("PGDATABASE", name.to_string()));
        self
    }

    /// The database these settings name.
    pub fn database_name(&self) -> Option<&str> {
        self.env
            .iter()
            .find(|(v, _)| *v == "PGDATABASE")
            .map(|(_, value)| value.as_str())
    }

    /// The database named, for messages.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Set the variables on a command (and name the connection in `pg_stat_activity`).
    pub fn apply(&self, command: &mut Command) {
        command.env("PGAPPNAME", "timevault");
        for (var, value) in &self.env {
            command.env(var, value);
        }
    }
}

/// The libpq environment variable for a URL query parameter timevault passes on.
fn query_variable(key: &str) -> Option<&'static str> {
    Some(match key {
        "host" => "PGHOST",
        "port" => "PGPORT",
        "user" => "PGUSER",
        "password" => "PGPASSWORD",
        "dbname" => "PGDATABASE",
        "sslmode" => "PGSSLMODE",
        "sslrootcert" => "PGSSLROOTCERT",
        "sslcert" => "PGSSLCERT",
        "sslkey" => "PGSSLKEY",
        "options" => "PGOPTIONS",
        _ => return None,
    })
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_the_tools_banner() {
        assert_eq!(
            parse_version("pg_dump (PostgreSQL) 15.5 (Debian 15.5-0+deb12u1)\n").as_deref(),
            Some("15.5")
        );
        assert_eq!(
            parse_version("pg_restore (PostgreSQL) 17.2\n").as_deref(),
            Some("17.2")
        );
        assert_eq!(parse_version("something else"), None);
        assert_eq!(server_major(150_005), 15);
        assert_eq!(server_major(90_624), 9);
    }

    #[test]
    fn urls_become_libpq_variables_without_the_password_on_the_command_line() {
        let libpq = Libpq::from_url(
            "postgres://app%40x:s%3Acret@db.example:6543/my%20db?sslmode=require&statement-cache-capacity=0",
        )
        .unwrap();
        let get = |l: &Libpq, v: &str| {
            l.env
                .iter()
                .find(|(k, _)| *k == v)
                .map(|(_, value)| value.clone())
        };
        assert_eq!(get(&libpq, "PGUSER").as_deref(), Some("app@x"));
        assert_eq!(get(&libpq, "PGPASSWORD").as_deref(), Some("s:cret"));
        assert_eq!(get(&libpq, "PGHOST").as_deref(), Some("db.example"));
        assert_eq!(get(&libpq, "PGPORT").as_deref(), Some("6543"));
        assert_eq!(get(&libpq, "PGDATABASE").as_deref(), Some("my db"));
        assert_eq!(get(&libpq, "PGSSLMODE").as_deref(), Some("require"));
        assert!(!libpq.shown().contains("s%3Acret"), "{}", libpq.shown());
        let other = libpq.database("restored");
        assert_eq!(get(&other, "PGDATABASE").as_deref(), Some("restored"));
        let socket = Libpq::from_url("postgres://u@localhost/db?host=/run/pg").unwrap();
        assert_eq!(get(&socket, "PGHOST").as_deref(), Some("/run/pg"));
    }
}
