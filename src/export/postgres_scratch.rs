//! The scratch database a PostgreSQL export restores into: on the source's own server (the
//! only server timevault knows can hold the data), under a random name, dropped afterwards.

use std::str::FromStr;

use rand::RngCore;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::Connection;

use crate::config::mask_url;
use crate::error::{Error, ErrorKind, Result};
use crate::tenancy::schema::quote_ident;

/// The source URL with its database replaced by `timevault_export_<8 hex>`.
pub fn url(source_url: &str) -> Result<String> {
    let mut url = url::Url::parse(source_url)
        .map_err(|e| Error::config(format!("{}: {e}", mask_url(source_url))))?;
    let mut suffix = [0u8; 4];
    rand::thread_rng().fill_bytes(&mut suffix);
    url.set_path(&format!("/timevault_export_{}", hex::encode(suffix)));
    Ok(url.to_string())
}

pub async fn connect(url: &str) -> Result<PgConnection> {
    let conn = PgConnection::connect(url).await.map_err(|e| {
        Error::new(
            ErrorKind::Unavailable,
            format!("connecting to the scratch database {}: {e}", mask_url(url)),
        )
    })?;
    // Its COPYs would otherwise end 40 ms late (crate::nodelay).
    crate::nodelay::on_every_tcp_socket();
    Ok(conn)
}

/// Drop the scratch database; a failure is logged, never hides the export's own outcome.
pub async fn drop(url: &str) {
    let result = async {
        let options = PgConnectOptions::from_str(url).map_err(|e| e.to_string())?;
        let name = options
            .get_database()
            .ok_or("no database name")?
            .to_string();
        let mut admin = PgConnection::connect_with(&options.database("postgres"))
            .await
            .map_err(|e| e.to_string())?;
        let sql = format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(&name)
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut admin)
            .await
            .map_err(|e| e.to_string())?;
        let _ = admin.close().await;
        Ok::<_, String>(())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(database = %mask_url(url), error = %e, "could not drop the export's scratch database; drop it by hand");
    }
}
