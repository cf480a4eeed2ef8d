//! Scratch databases on a source's server (export and drill restore into one and drop it).
//!
//! The name is built as a value, never by editing the source URL into something a query
//! parameter could override (config load refuses `?dbname=` and its kin in source URLs), and
//! only a database this run created, whose name carries the scratch prefix and its random
//! suffix, is ever dropped.

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::Connection;

use crate::config::mask_url;
use crate::error::{Error, Result};

/// A scratch database on the source's server: `<prefix><8 hex digits>`.
#[derive(Debug, Clone)]
pub struct Scratch {
    /// The target URL a restore builds into (the source URL with the scratch name as its path).
    url: String,
    name: String,
    prefix: &'static str,
    /// The source's server, to connect to `postgres` for the drop.
    server: PgConnectOptions,
}

impl Scratch {
    /// A new scratch name on the server of `source_url` (`prefix` like `timevault_drill_`).
    pub fn new(source_url: &str, prefix: &'static str) -> Result<Scratch> {
        let bad_url = |e: &dyn std::fmt::Display| {
            Error::config(format!("postgres url {}: {e}", mask_url(source_url)))
        };
        let server = PgConnectOptions::from_str(source_url).map_err(|e| bad_url(&e))?;
        let mut url = url::Url::parse(source_url).map_err(|e| bad_url(&e))?;
        let name = format!("{prefix}{:08x}", rand::random::<u32>());
        url.set_path(&format!("/{name}"));
        // What the restore will connect to must be exactly the scratch name.
        let target = PgConnectOptions::from_str(url.as_str()).map_err(|e| bad_url(&e))?;
        if target.get_database() != Some(name.as_str()) {
            return Err(Error::config(format!(
                "postgres url {} would not connect to the scratch database {name}",
                mask_url(source_url)
            ))
            .with_hint(
                "remove dbname (and user, host, port) query parameters from the source url",
            ));
        }
        Ok(Scratch {
            url: url.to_string(),
            name,
            prefix,
            server,
        })
    }

    /// The scratch database a URL from [`Scratch::url`] names, to drop it (refused unless its
    /// name is a scratch name with this prefix).
    pub fn from_url(url: &str, prefix: &'static str) -> Result<Scratch> {
        let server = PgConnectOptions::from_str(url)
            .map_err(|e| Error::config(format!("postgres url {}", mask_url(url))).with_source(e))?;
        let name = server.get_database().unwrap_or_default().to_string();
        if !is_scratch_name(&name, prefix) {
            return Err(Error::other(format!(
                "refusing to drop database {name:?}: not a {prefix}<8 hex> scratch database"
            )));
        }
        Ok(Scratch {
            url: url.to_string(),
            name,
            prefix,
            server,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Drop the scratch database (it must still carry this run's scratch name).
    pub async fn drop_database(&self) -> Result<()> {
        if !is_scratch_name(&self.name, self.prefix) {
            return Err(Error::other(format!(
                "refusing to drop {}: not a scratch database name",
                self.name
            )));
        }
        let server = self.server.clone().database("postgres");
        let mut admin =
            super::connect_with(server, "timevault", "the server to drop a scratch database")
                .await?;
        let dropped = crate::pg_connection::drop_database(&mut admin, &self.name).await;
        let _ = admin.close().await;
        dropped
    }
}

/// `<prefix>` followed by exactly 8 lowercase hex digits.
fn is_scratch_name(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix).is_some_and(|rest| {
        rest.len() == 8
            && rest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn the_scratch_url_names_the_scratch_database_and_nothing_else() {
        let s = Scratch::new(
            "postgres://u:pw@db.internal:5433/app?sslmode=disable",
            "timevault_drill_",
        )
        .unwrap();
        assert!(
            is_scratch_name(s.name(), "timevault_drill_"),
            "{}",
            s.name()
        );
        let target = PgConnectOptions::from_str(s.url()).unwrap();
        assert_eq!(target.get_database(), Some(s.name()));
        assert_eq!(target.get_host(), "db.internal");
        assert_eq!(target.get_port(), 5433);
        assert!(s.url().contains("sslmode=disable"));
        // A query parameter that would pick the database is refused, never followed.
        let err =
            Scratch::new("postgres://db/postgres?dbname=app", "timevault_drill_").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    }

    #[test]
    fn only_scratch_names_are_dropped() {
        assert!(is_scratch_name(
            "timevault_export_0a1b2c3d",
            "timevault_export_"
        ));
        for name in [
            "app",
            "timevault_export_",
            "timevault_export_0a1b2c3dx",
            "timevault_export_0A1B2C3D",
            "timevault_drill_0a1b2c3d",
        ] {
            assert!(!is_scratch_name(name, "timevault_export_"), "{name}");
        }
    }
}
