//! The one way timevault connects to PostgreSQL and drops a database it created.
//!
//! Every connection (sources, restores, exports, drills, the tenancy schema reader) is opened
//! by [`connect`] or [`connect_with`]: `application` names it in `pg_stat_activity`, statements
//! are not logged, TCP_NODELAY is set (every COPY would otherwise end 40 ms late,
//! `crate::nodelay`), and a password never reaches an error message. Every `DROP DATABASE`
//! timevault runs is [`drop_database`]: scratch databases of exports and drills, a restore's
//! build database, and the old target a forced restore replaces (each caller checks the name
//! first: see `source::postgres::scratch` and `restore::postgres`).

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::ConnectOptions;

use crate::error::{Error, ErrorKind, Result};
use crate::redact::mask_url;

/// Connect with a URL (its password never reaches an error message).
pub async fn connect(url: &str) -> Result<PgConnection> {
    let options: PgConnectOptions = url.parse().map_err(|e| {
        Error::new(
            ErrorKind::Config,
            format!("postgres url {}: {e}", mask_url(url)),
        )
    })?;
    connect_with(options, "timevault", &mask_url(url))
        .await
        .map_err(|e| e.with_hint("check the url, the server and its pg_hba.conf"))
}

/// Connect with `options`; `application` names the connection in `pg_stat_activity`, `what`
/// names the server or database in errors.
pub async fn connect_with(
    options: PgConnectOptions,
    application: &str,
    what: &str,
) -> Result<PgConnection> {
    let (host, port) = (options.get_host().to_string(), options.get_port());
    let conn = options
        .application_name(application)
        .disable_statement_logging()
        .connect()
        .await
        .map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                format!("cannot connect to {what}: {e}"),
            )
        })?;
    crate::nodelay::on_connections_to(&host, port).await;
    Ok(conn)
}

/// `DROP DATABASE IF EXISTS <name> WITH (FORCE)` on `admin` (a connection to another database
/// of the server). The caller has checked that `name` is one this run may drop.
pub async fn drop_database(admin: &mut PgConnection, name: &str) -> Result<()> {
    let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(name));
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(admin)
        .await
        .map(|_| ())
        .map_err(|e| Error::other(format!("dropping database {name}")).with_source(e))
}

/// Double-quote an identifier (embedded quotes doubled).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
