//! Replication slot health, for `status`.
//!
//! A logical slot makes the server keep every WAL segment from the slot's restart point on. If
//! capture stops (daemon down, repository unreachable) the server's disk fills up, or, with
//! `max_slot_wal_keep_size`, the slot is invalidated and the change log has a gap. So `status`
//! shows how much WAL the slot retains and how far its confirmed position is behind the
//! server, and warns when the slot is missing, invalidated, or retains more than the source's
//! `slot_wal_warn` option (default 1 GiB).

use serde::Serialize;
use sqlx::Row;

use super::{connect, pg_error, SlotNames};
use crate::error::Result;

pub use crate::config::postgres_options::{
    parse_size, DEFAULT_SLOT_WAL_WARN, SLOT_WAL_WARN_OPTION,
};
use crate::config::PostgresOptions;

/// What the server says about a source's slot.
#[derive(Debug, Clone, Serialize)]
pub struct SlotHealth {
    pub slot: String,
    pub exists: bool,
    /// A session is reading the slot right now (timevault peeks, so usually false between
    /// polls).
    pub active: bool,
    /// `reserved`, `extended`, `unreserved` or `lost` (invalidated).
    pub wal_status: Option<String>,
    /// `pg_current_wal_lsn() - restart_lsn`: WAL the server keeps for this slot.
    pub retained_wal_bytes: Option<i64>,
    /// `pg_current_wal_lsn() - confirmed_flush_lsn`: WAL written since the last stored commit.
    pub confirmed_flush_lag_bytes: Option<i64>,
    pub restart_lsn: Option<String>,
    pub confirmed_flush_lsn: Option<String>,
    pub warn_threshold_bytes: u64,
    /// Why an operator should look (empty when healthy).
    pub warnings: Vec<String>,
}

/// Read the replication slot `slot` on the server at `url`.
pub async fn slot_health(slot: &str, url: &str, threshold: u64) -> Result<SlotHealth> {
    let mut conn = connect(url).await?;
    let slot = slot.to_string();
    let row = sqlx::query(
        "SELECT active, wal_status, \
                pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8, \
                pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8, \
                restart_lsn::text, confirmed_flush_lsn::text \
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(&slot)
    .fetch_optional(&mut conn)
    .await
    .map_err(|e| pg_error("reading the replication slot", e))?;
    let mut health = SlotHealth {
        slot,
        exists: row.is_some(),
        active: false,
        wal_status: None,
        retained_wal_bytes: None,
        confirmed_flush_lag_bytes: None,
        restart_lsn: None,
        confirmed_flush_lsn: None,
        warn_threshold_bytes: threshold,
        warnings: Vec::new(),
    };
    if let Some(r) = row {
        health.active = r.get(0);
        health.wal_status = r.get(1);
        health.retained_wal_bytes = r.get(2);
        health.confirmed_flush_lag_bytes = r.get(3);
        health.restart_lsn = r.get(4);
        health.confirmed_flush_lsn = r.get(5);
    }
    health.warnings = warnings(&health);
    Ok(health)
}

/// The slot part of `status`: the health, or why the server could not be asked.
#[derive(Debug, Clone, Serialize)]
pub struct SlotReport {
    #[serde(flatten)]
    pub health: Option<SlotHealth>,
    pub error: Option<String>,
}

impl SlotReport {
    /// Ask the server; an unreachable server is reported, not an error.
    pub async fn read(source: &str, url: &str, options: &PostgresOptions) -> SlotReport {
        let names = SlotNames::for_source(source, options);
        match slot_health(&names.slot, url, options.slot_wal_warn()).await {
            Ok(h) => SlotReport {
                health: Some(h),
                error: None,
            },
            Err(e) => SlotReport {
                health: None,
                error: Some(e.to_string()),
            },
        }
    }

    /// The lines `status` prints.
    pub fn lines(&self) -> Vec<String> {
        let Some(h) = &self.health else {
            let error = self.error.as_deref().unwrap_or("unknown");
            return vec![format!("WARNING: slot health unknown: {error}")];
        };
        let mut out = Vec::new();
        if h.exists {
            out.push(format!(
                "slot {}: {}, retains {} of WAL, confirmed flush {} behind",
                h.slot,
                if h.active { "active" } else { "idle" },
                human(h.retained_wal_bytes.unwrap_or(0).max(0) as u64),
                human(h.confirmed_flush_lag_bytes.unwrap_or(0).max(0) as u64)
            ));
        }
        out.extend(h.warnings.iter().map(|w| format!("WARNING: {w}")));
        out
    }
}

fn warnings(h: &SlotHealth) -> Vec<String> {
    let mut out = Vec::new();
    if !h.exists {
        out.push(format!(
            "replication slot {} does not exist: changes are not captured; the next snapshot starts a new chain",
            h.slot
        ));
        return out;
    }
    if h.wal_status.as_deref() == Some("lost") || h.restart_lsn.is_none() {
        out.push(format!(
            "replication slot {} was invalidated (WAL it needed was removed): continuity is lost",
            h.slot
        ));
    }
    if let Some(retained) = h
        .retained_wal_bytes
        .filter(|&r| r as u64 > h.warn_threshold_bytes)
    {
        out.push(format!(
            "replication slot {} retains {} of WAL (threshold {}): is capture running?",
            h.slot,
            human(retained as u64),
            human(h.warn_threshold_bytes)
        ));
    }
    out
}

/// Bytes in binary units, one decimal.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(retained: i64) -> SlotHealth {
        SlotHealth {
            slot: "timevault_db".into(),
            exists: true,
            active: false,
            wal_status: Some("reserved".into()),
            retained_wal_bytes: Some(retained),
            confirmed_flush_lag_bytes: Some(0),
            restart_lsn: Some("0/1".into()),
            confirmed_flush_lsn: Some("0/1".into()),
            warn_threshold_bytes: 1 << 20,
            warnings: vec![],
        }
    }

    #[test]
    fn sizes_print_in_binary_units() {
        assert_eq!(human(1536), "1.5 KiB");
    }

    #[test]
    fn warns_on_retained_wal_and_on_a_lost_or_missing_slot() {
        assert!(warnings(&health(1000)).is_empty());
        let w = warnings(&health(2 << 20));
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("retains 2.0 MiB"), "{w:?}");
        let mut lost = health(0);
        lost.wal_status = Some("lost".into());
        assert!(warnings(&lost)[0].contains("invalidated"));
        let mut gone = health(0);
        gone.exists = false;
        assert!(warnings(&gone)[0].contains("does not exist"));
    }
}
