//! Places data lives, in a form two can be compared in: files by canonical path (the
//! deepest existing ancestor canonicalised, the rest appended), object stores by service,
//! bucket or container and prefix components (`s3://b/p` contains `s3://b/p/x`, not
//! `s3://b/px`), PostgreSQL databases by server, port and database as `PgConnectOptions`
//! reads them. The only I/O: canonical paths.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use object_store::aws::AmazonS3ConfigKey;
use object_store::azure::AzureConfigKey;
use sqlx::postgres::PgConnectOptions;

use crate::error::{Error, Result};
use crate::redact::mask_url;

/// A place data lives, in a form two places can be compared in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local file or directory: absolute, canonical up to its deepest existing ancestor.
    File(PathBuf),
    /// An object store prefix.
    Store(StoreLocation),
    /// A PostgreSQL database.
    Database(DatabaseLocation),
    /// Reachable by nothing else (`memory://`): overlaps nothing.
    Private,
}

/// An object store location. Two are the same store when service and bucket agree and no
/// endpoint or account both name differs (one taken from the environment is unknown here,
/// so it is assumed the same: refusing is the safe side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreLocation {
    /// `s3`, `az`, `gs` or `http` (aliases folded: `s3a` is `s3`; `azure`, `abfs`, `abfss`
    /// are `az`).
    pub service: String,
    /// The endpoint the URL or options name, lower case, without a trailing `/`.
    pub endpoint: Option<String>,
    /// Azure: the storage account the URL or options name.
    pub account: Option<String>,
    /// The bucket or container.
    pub bucket: String,
    /// The prefix, as path components.
    pub prefix: Vec<String>,
}

/// A PostgreSQL database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseLocation {
    /// `local` for a Unix socket or a loopback address, else the host name in lower case.
    pub server: String,
    pub port: u16,
    pub database: String,
}

/// How a target lies relative to another place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    Same,
    /// The target lies inside the other place.
    Inside,
    /// The target contains the other place.
    Contains,
}

impl Location {
    /// How `self` lies relative to `other`, if they overlap at all.
    pub fn overlap(&self, other: &Location) -> Option<Overlap> {
        match (self, other) {
            (Location::File(a), Location::File(b)) => nested(a.components(), b.components()),
            (Location::Store(a), Location::Store(b)) if a.same_store(b) => {
                nested(a.prefix.iter(), b.prefix.iter())
            }
            (Location::Database(a), Location::Database(b)) => (a == b).then_some(Overlap::Same),
            _ => None,
        }
    }
}

impl StoreLocation {
    fn same_store(&self, other: &StoreLocation) -> bool {
        let differ =
            |a: &Option<String>, b: &Option<String>| matches!((a, b), (Some(x), Some(y)) if x != y);
        self.service == other.service
            && self.bucket == other.bucket
            && !differ(&self.endpoint, &other.endpoint)
            && !differ(&self.account, &other.account)
    }
}

/// Compare two sequences of path components: equal, `a` under `b`, or `b` under `a`.
fn nested<T: PartialEq>(a: impl Iterator<Item = T>, b: impl Iterator<Item = T>) -> Option<Overlap> {
    let (a, b): (Vec<T>, Vec<T>) = (a.collect(), b.collect());
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    match (common == a.len(), common == b.len()) {
        (true, true) => Some(Overlap::Same),
        (false, true) => Some(Overlap::Inside),
        (true, false) => Some(Overlap::Contains),
        (false, false) => None,
    }
}

/// `path` made absolute (against the working directory), its deepest existing ancestor
/// canonicalised (symlinks resolved) and the components that do not exist yet appended, so
/// a target that does not exist yet still compares by its canonical parent and name.
pub fn resolve_path(path: &Path) -> Result<PathBuf> {
    let absolute = std::path::absolute(path).map_err(|e| Error::io(path.display(), e))?;
    let mut missing = Vec::new();
    let mut base = absolute.as_path();
    let mut resolved = loop {
        if let Ok(canonical) = base.canonicalize() {
            break canonical;
        }
        match (base.parent(), base.components().next_back()) {
            (Some(parent), Some(last)) => {
                missing.push(last);
                base = parent;
            }
            _ => break PathBuf::from("/"),
        }
    };
    for component in missing.into_iter().rev() {
        match component {
            Component::ParentDir => {
                resolved.pop();
            }
            Component::Normal(name) => resolved.push(name),
            _ => {}
        }
    }
    Ok(resolved)
}

/// An object store URL (and its builder options) as a [`Location`]; `file://` URLs become
/// resolved paths.
pub fn store_location(url: &str, options: &BTreeMap<String, String>) -> Result<Location> {
    let shown = mask_url(url);
    let bad = |why: String| {
        Error::input(format!("{shown}: {why}")).with_hint(
            "use file:///abs/path, s3://bucket/prefix, az://container/prefix or gs://bucket/prefix",
        )
    };
    let parsed = url::Url::parse(url).map_err(|e| bad(format!("not a URL: {e}")))?;
    let host = parsed.host_str().unwrap_or("").to_ascii_lowercase();
    let mut prefix = components(parsed.path()).map_err(bad)?;
    let scheme = parsed.scheme().to_ascii_lowercase();
    let (service, bucket, account) = match scheme.as_str() {
        "file" => {
            let path = parsed
                .to_file_path()
                .map_err(|_| bad("not an absolute file path".into()))?;
            return Ok(Location::File(resolve_path(&path)?));
        }
        "memory" => return Ok(Location::Private),
        "s3" | "s3a" => ("s3", host, None),
        "gs" => ("gs", host, None),
        "az" | "azure" => (
            "az",
            host,
            option::<AzureConfigKey>(options, AzureConfigKey::AccountName),
        ),
        "abfs" | "abfss" => {
            let account = host.split('.').next().map(str::to_string);
            let container = match parsed.username() {
                "" if prefix.is_empty() => String::new(),
                "" => prefix.remove(0),
                user => user.to_string(),
            };
            ("az", container, account)
        }
        "http" | "https" => ("http", String::new(), Some(host_port(&parsed))),
        other => return Err(bad(format!("unsupported scheme {other}"))),
    };
    let endpoint = match service {
        "s3" => option::<AmazonS3ConfigKey>(options, AmazonS3ConfigKey::Endpoint),
        "az" => option::<AzureConfigKey>(options, AzureConfigKey::Endpoint),
        _ => None,
    };
    Ok(Location::Store(StoreLocation {
        service: service.to_string(),
        endpoint: endpoint.map(|e| e.trim_end_matches('/').to_string()),
        account,
        bucket,
        prefix,
    }))
}

fn host_port(url: &url::Url) -> String {
    let host = url.host_str().unwrap_or("").to_ascii_lowercase();
    match url.port_or_known_default() {
        Some(port) => format!("{host}:{port}"),
        None => host,
    }
}

/// The value of the builder option `wanted` (under any of its spellings), lower case.
fn option<K: FromStr + PartialEq>(options: &BTreeMap<String, String>, wanted: K) -> Option<String> {
    options
        .iter()
        .find(|(k, _)| K::from_str(k).is_ok_and(|key| key == wanted))
        .map(|(_, v)| v.to_ascii_lowercase())
}

/// A URL path's components, percent-decoded (as object_store reads a prefix).
fn components(path: &str) -> std::result::Result<Vec<String>, String> {
    let path = object_store::path::Path::from_url_path(path).map_err(|e| e.to_string())?;
    Ok(path.parts().map(|p| p.as_ref().to_string()).collect())
}

/// A PostgreSQL URL as a [`Location`], read through `PgConnectOptions` (so `?dbname=`,
/// `?host=` and the `PG*` environment count as they do when connecting).
pub fn database_location(url: &str) -> Result<Location> {
    let options = PgConnectOptions::from_str(url).map_err(|e| {
        Error::input(format!("{}: {e}", mask_url(url)))
            .with_hint("give a postgres://user@host:port/database URL")
    })?;
    let host = options.get_host();
    let local = options.get_socket().is_some()
        || host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host
            .trim_matches(['[', ']'])
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let server = if local {
        "local".to_string()
    } else {
        host.to_ascii_lowercase()
    };
    let database = options
        .get_database()
        .unwrap_or(options.get_username())
        .to_string();
    Ok(Location::Database(DatabaseLocation {
        server,
        port: options.get_port(),
        database,
    }))
}
