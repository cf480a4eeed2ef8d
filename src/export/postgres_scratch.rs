//! The scratch database a PostgreSQL export restores into: on the source's own server (the
//! only server timevault knows can hold the data), under a random name, dropped afterwards.

use sqlx::postgres::PgConnection;

use crate::config::mask_url;
use crate::error::Result;
use crate::source::postgres::scratch::Scratch;

/// Scratch databases of exports are named `timevault_export_<8 hex>`.
const PREFIX: &str = "timevault_export_";

/// A new scratch database's URL on the source's server (built as a value: see
/// [`Scratch`]).
pub fn url(source_url: &str) -> Result<String> {
    Ok(Scratch::new(source_url, PREFIX)?.url().to_string())
}

pub async fn connect(url: &str) -> Result<PgConnection> {
    crate::pg_connection::connect(url).await
}

/// Drop the scratch database; a failure is logged, never hides the export's own outcome.
/// Only a database named like this module's scratch databases is dropped.
pub async fn drop(url: &str) {
    let result = match Scratch::from_url(url, PREFIX) {
        Ok(scratch) => scratch.drop_database().await,
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        tracing::warn!(database = %mask_url(url), error = %e, "could not drop the export's scratch database; drop it by hand");
    }
}
