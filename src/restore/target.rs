//! Where a restore may write. A target that is, lies inside or contains a configured source
//! or a replica is refused, with or without `--force`: `--force` replaces what is at the
//! target, and replacing a live source or a replica destroys what the backups protect (tried:
//! a blob restore into a replica's own directory left it failing `verify`; a SQLite restore
//! over the live database replaced it under the application). The targets of one group restore
//! must not overlap each other either (a forced blob restore would delete the database just
//! restored inside its directory).
//!
//! Plan then apply: [`resolve_path`], [`store_location`] and [`database_location`] turn paths and
//! URLs into comparable [`Location`] values (the only I/O: canonical paths), and
//! [`plan_targets`] (pure) decides. Files compare by canonical path (the deepest existing
//! ancestor canonicalised, the rest appended), object stores by service, bucket or container
//! and prefix components (`s3://b/p` contains `s3://b/p/x`, not `s3://b/px`), PostgreSQL by
//! server, port and database as `PgConnectOptions` reads them.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use object_store::aws::AmazonS3ConfigKey;
use object_store::azure::AzureConfigKey;
use sqlx::postgres::PgConnectOptions;

use crate::config::{mask_url, Config, SourceKind};
use crate::error::{Error, Result};

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

/// A named place: a restore target, a source or a replica.
#[derive(Debug, Clone)]
pub struct Place {
    /// What it is, for the error: `source app`, `replica eu-west`, `restore target of files`.
    pub what: String,
    /// Its path or URL as the user wrote it (secrets masked).
    pub shown: String,
    pub location: Location,
    /// A file that matters only as itself (a SQLite source's `-wal` and `-shm`): only a target
    /// that is it conflicts (one containing it contains the database too, and says so).
    pub sidecar: bool,
}

const HINT: &str = "restore into a new location outside every source and replica \
                    (`timevault config show` lists them); --force does not lift this. To bring \
                    a live source back, restore beside it, stop the application, then move the \
                    restored copy into place";

/// Decide whether `targets` may be written: none may be, lie inside or contain a place in
/// `protected` (the configured sources and replicas) or another target. Pure.
pub fn plan_targets(targets: &[Place], protected: &[Place]) -> Result<()> {
    let mut conflicts = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        let others = protected.iter().chain(&targets[i + 1..]);
        for other in others {
            match target.location.overlap(&other.location) {
                Some(Overlap::Same) => conflicts.push(describe(target, Overlap::Same, other)),
                Some(overlap) if !other.sidecar => conflicts.push(describe(target, overlap, other)),
                _ => {}
            }
        }
    }
    if conflicts.is_empty() {
        return Ok(());
    }
    Err(Error::config(format!("refusing to restore: {}", conflicts.join("; "))).with_hint(HINT))
}

fn describe(target: &Place, overlap: Overlap, other: &Place) -> String {
    let relation = match overlap {
        Overlap::Same => "is",
        Overlap::Inside => "lies inside",
        Overlap::Contains => "contains",
    };
    format!(
        "{} {} {relation} {} ({})",
        target.what, target.shown, other.what, other.shown
    )
}

/// Refuse restore targets (`(source, target)` pairs, blob targets opened with
/// `target_options`) that overlap a source or replica of `config` or each other. Runs before
/// anything is opened or written.
pub fn check_targets(
    config: &Config,
    pairs: &[(String, String)],
    target_options: &BTreeMap<String, String>,
) -> Result<()> {
    let protected = protected_places(config)?;
    let targets = pairs
        .iter()
        .map(|(source, target)| {
            let kind = config.source(source)?.kind();
            target_place(source, kind, target, target_options)
        })
        .collect::<Result<Vec<_>>>()?;
    plan_targets(&targets, &protected)
}

/// Every configured source (a SQLite source with its `-wal` and `-shm` files) and replica.
pub fn protected_places(config: &Config) -> Result<Vec<Place>> {
    let mut places = Vec::new();
    for source in &config.sources {
        let what = format!("source {}", source.name);
        let restorer = super::registry::of(source.kind());
        for (side, path) in restorer.sidecars(source) {
            places.push(Place {
                what: format!("{what} ({side})"),
                location: Location::File(resolve_path(Path::new(&path))?),
                shown: path,
                sidecar: true,
            });
        }
        let location = restorer.source_location(source)?;
        places.push(Place {
            what,
            shown: mask_url(&source.url),
            location,
            sidecar: false,
        });
    }
    for replica in &config.replicas {
        places.push(Place {
            what: format!("replica {}", replica.name),
            shown: mask_url(&replica.url),
            location: store_location(&replica.url, &replica.options)?,
            sidecar: false,
        });
    }
    Ok(places)
}

/// The restore target of source `source` (of `kind`): a SQLite file path, a PostgreSQL URL,
/// or an object store URL opened with `options`.
pub fn target_place(
    source: &str,
    kind: SourceKind,
    target: &str,
    options: &BTreeMap<String, String>,
) -> Result<Place> {
    let location = super::registry::of(kind).target_location(target, options)?;
    Ok(Place {
        what: format!("restore target of {source}"),
        shown: mask_url(target),
        location,
        sidecar: false,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A place at file path `p`.
    fn place(what: &str, p: &str) -> Place {
        Place {
            what: what.into(),
            shown: p.into(),
            location: file(p),
            sidecar: false,
        }
    }

    fn file(p: &str) -> Location {
        Location::File(PathBuf::from(p))
    }

    fn store(url: &str) -> Location {
        store_location(url, &BTreeMap::new()).unwrap()
    }

    fn store_with(url: &str, key: &str, value: &str) -> Location {
        let options = [(key.to_string(), value.to_string())].into();
        store_location(url, &options).unwrap()
    }

    fn db(url: &str) -> Location {
        database_location(url).unwrap()
    }

    #[test]
    fn files_overlap_by_components_not_by_string_prefix() {
        let replica = file("/srv/tv/replicas/eu-west");
        assert_eq!(replica.overlap(&replica), Some(Overlap::Same));
        assert_eq!(
            file("/srv/tv/replicas/eu-west/chunks").overlap(&replica),
            Some(Overlap::Inside)
        );
        assert_eq!(file("/srv/tv").overlap(&replica), Some(Overlap::Contains));
        assert_eq!(file("/srv/tv/replicas/eu-west2").overlap(&replica), None);
        assert_eq!(file("/srv/other").overlap(&replica), None);
    }

    #[test]
    fn stores_compare_service_bucket_and_prefix_components() {
        let replica = store("s3://b/p");
        assert_eq!(store("s3://b/p/x").overlap(&replica), Some(Overlap::Inside));
        assert_eq!(store("s3://b/p/").overlap(&replica), Some(Overlap::Same));
        assert_eq!(store("s3a://b/p").overlap(&replica), Some(Overlap::Same));
        assert_eq!(store("s3://b").overlap(&replica), Some(Overlap::Contains));
        assert_eq!(store("s3://b/px").overlap(&replica), None);
        assert_eq!(store("s3://c/p").overlap(&replica), None);
        assert_eq!(store("gs://b/p").overlap(&replica), None);
        assert_eq!(
            store("azure://b/p/q").overlap(&store("az://b/p")),
            Some(Overlap::Inside)
        );
        assert_eq!(
            store("abfss://b@acct.dfs.core.windows.net/p").overlap(&store("az://b/p")),
            Some(Overlap::Same)
        );
        assert_eq!(store("memory:///").overlap(&store("memory:///")), None);
        assert_eq!(
            store("s3://b/a%20b").overlap(&store("s3://b/a b")),
            Some(Overlap::Same)
        );
    }

    #[test]
    fn stores_on_named_different_endpoints_do_not_overlap() {
        let minio = store_with("s3://b/p", "endpoint", "http://127.0.0.1:9000/");
        let other = store_with("s3://b/p", "aws_endpoint", "http://10.0.0.5:9000");
        let same = store_with("s3://b/p/x", "aws_endpoint_url", "HTTP://127.0.0.1:9000");
        assert_eq!(minio.overlap(&other), None);
        assert_eq!(same.overlap(&minio), Some(Overlap::Inside));
        // An endpoint from the environment is unknown here: assumed the same.
        assert_eq!(store("s3://b/p").overlap(&minio), Some(Overlap::Same));
        let a = store_with("az://c/p", "account_name", "one");
        let b = store_with("az://c/p", "azure_storage_account_name", "two");
        assert_eq!(a.overlap(&b), None);
    }

    #[test]
    fn databases_compare_server_port_and_name_as_connect_options_read_them() {
        let source = db("postgres://app@127.0.0.1:5433/app");
        assert_eq!(
            db("postgres://postgres@localhost:5433/app").overlap(&source),
            Some(Overlap::Same)
        );
        assert_eq!(
            db("postgresql://x@[::1]:5433/other?dbname=app").overlap(&source),
            Some(Overlap::Same)
        );
        assert_eq!(
            db("postgres://x@127.0.0.1:5433/app_restored").overlap(&source),
            None
        );
        assert_eq!(db("postgres://x@127.0.0.1:5432/app").overlap(&source), None);
        assert_eq!(
            db("postgres://x@db.internal:5433/app").overlap(&source),
            None
        );
        assert_eq!(
            db("postgres://x@DB.internal:5433/app")
                .overlap(&db("postgres://y@db.internal:5433/app")),
            Some(Overlap::Same)
        );
        // No database named: PostgreSQL takes the user's name.
        assert_eq!(
            db("postgres://app@127.0.0.1:5433").overlap(&source),
            Some(Overlap::Same)
        );
    }

    #[test]
    fn plan_refuses_sources_replicas_and_overlapping_group_targets() {
        let wal = Place {
            sidecar: true,
            ..place("source app (its -wal file)", "/srv/tv/app.db-wal")
        };
        let protected = [
            place("source app", "/srv/tv/app.db"),
            wal,
            place("replica eu-west", "/srv/tv/replicas/eu-west"),
        ];
        let ok = [place("target of app", "/tmp/restored.db")];
        plan_targets(&ok, &protected).unwrap();
        let err = plan_targets(
            &[place("target of files", "/srv/tv/replicas/eu-west")],
            &protected,
        )
        .unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Config);
        assert_eq!(err.exit_code(), 2);
        assert!(err.message().contains("is replica eu-west"), "{err}");
        assert!(err.hint().unwrap().contains("--force does not lift this"));
        let err =
            plan_targets(&[place("target of app", "/srv/tv/app.db")], &protected).unwrap_err();
        assert!(err.message().contains("is source app"), "{err}");
        let err =
            plan_targets(&[place("target of app", "/srv/tv/app.db-wal")], &protected).unwrap_err();
        assert!(
            err.message().contains("is source app (its -wal file)"),
            "{err}"
        );
        let err = plan_targets(&[place("target of files", "/srv/tv")], &protected).unwrap_err();
        assert!(err.message().contains("contains source app"), "{err}");
        assert!(err.message().contains("contains replica eu-west"), "{err}");
        assert!(!err.message().contains("-wal"), "{err}");
        let group = [
            place("target of app", "/tmp/g/app.db"),
            place("target of files", "/tmp/g"),
        ];
        let err = plan_targets(&group, &protected).unwrap_err();
        assert!(
            err.message()
                .contains("target of app /tmp/g/app.db lies inside target of files"),
            "{err}"
        );
    }

    #[test]
    fn paths_resolve_through_symlinks_even_when_the_target_does_not_exist() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        let canonical = real.canonicalize().unwrap();
        let via_link = resolve_path(&dir.path().join("link/new/../x.db")).unwrap();
        assert_eq!(via_link, canonical.join("x.db"));
        let existing = canonical.join("here.db");
        std::fs::write(&existing, b"").unwrap();
        assert_eq!(
            resolve_path(&dir.path().join("link/./here.db")).unwrap(),
            existing
        );
    }
}
