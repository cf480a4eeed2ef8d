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
use std::path::Path;

pub use super::location::{
    database_location, resolve_path, store_location, DatabaseLocation, Location, Overlap,
    StoreLocation,
};
use crate::config::{mask_url, Config, SourceKind};
use crate::error::{Error, Result};

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
        Location::File(std::path::PathBuf::from(p))
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
