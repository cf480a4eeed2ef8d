//! Continuity: can the current chain go on, or were changes lost?
//!
//! A chain's change log proves that nothing was missed only while the same slot on the same
//! server and database keeps decoding through the same publication. Before every capture (and
//! when a source is opened) one query reads what the chain depends on ([`Observed`]) and
//! [`judge`] says whether it still holds. When it does not, continuity is lost: the source has
//! no chain any more, the loss is logged and remembered, and the next snapshot starts a new
//! chain (reason `continuity-lost`), re-creating the slot (and the publication) first.
//!
//! A connection that failed is checked before the next capture and replaced when it is gone (a
//! restarted or replaced server); the identity check then tells a restart (the chain goes on)
//! from a replacement (continuity lost).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::postgres::types::Oid;
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};

use super::pgoutput::Lsn;
use super::{connect, pg_error, ChainState, PostgresSource};
use crate::error::{Error, Result};

/// How long a suspect connection may take to answer a ping before it is replaced.
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Which server and database a chain's changes come from. Recorded in the snapshot details
/// (the same JSON object, keys `system_identifier` and `database_oid`); absent in snapshots
/// taken before it was recorded, and then not compared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerIdentity {
    /// `pg_control_system().system_identifier`: new with every `initdb` (a replaced server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_identifier: Option<i64>,
    /// `pg_database.oid` of the database: new when it was dropped and created again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_oid: Option<u32>,
}

impl ServerIdentity {
    /// The identity recorded in a snapshot's details (empty for older snapshots).
    pub fn recorded(details: &serde_json::Value) -> Result<ServerIdentity> {
        ServerIdentity::deserialize(details)
            .map_err(|e| Error::corrupt("snapshot details: server identity").with_source(e))
    }
}

/// The snapshot details as stored: the details and the server identity in one JSON object.
#[derive(Serialize)]
pub(super) struct RecordedDetails<'a, T: Serialize> {
    #[serde(flatten)]
    pub details: &'a T,
    #[serde(flatten)]
    pub identity: ServerIdentity,
}

/// Why a chain cannot be continued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loss {
    /// The server's system identifier changed: another cluster answers at the address.
    ServerReplaced {
        recorded: i64,
        found: i64,
    },
    /// The database's oid changed: it was dropped and created again under the same name.
    DatabaseRecreated {
        recorded: u32,
        found: u32,
    },
    SlotMissing {
        slot: String,
    },
    /// `wal_status = 'lost'`: the server removed WAL the slot still needed.
    SlotInvalidated {
        slot: String,
    },
    /// pgoutput cannot decode past a stretch where the publication did not exist.
    PublicationMissing {
        publication: String,
    },
    /// Someone else consumed changes from the slot.
    SlotAhead {
        slot: String,
        at: Lsn,
        stored: Lsn,
    },
}

impl fmt::Display for Loss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Loss::ServerReplaced { recorded, found } => write!(
                f,
                "the server was replaced (system identifier {found}, the chain's is {recorded})"
            ),
            Loss::DatabaseRecreated { recorded, found } => write!(
                f,
                "the database was created again (oid {found}, the chain's is {recorded})"
            ),
            Loss::SlotMissing { slot } => write!(f, "replication slot {slot} is gone"),
            Loss::SlotInvalidated { slot } => write!(
                f,
                "replication slot {slot} was invalidated (wal_status lost: WAL it needed was removed)"
            ),
            Loss::PublicationMissing { publication } => {
                write!(f, "publication {publication} is gone")
            }
            Loss::SlotAhead { slot, at, stored } => write!(
                f,
                "replication slot {slot} is at {at}, past the last stored change {stored}"
            ),
        }
    }
}

/// What the server says about the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    pub confirmed: Option<Lsn>,
    pub wal_status: Option<String>,
}

/// What a chain depends on, as the server has it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub identity: ServerIdentity,
    /// `None`: there is no slot of that name.
    pub slot: Option<SlotState>,
    pub publication_exists: bool,
}

/// What to do about a chain (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    /// The last segment was stored but the slot not advanced: advance it to here first.
    Advance(Lsn),
    Lost(Loss),
}

/// Judge whether a chain recorded on `recorded` and stored up to `stored` can go on.
pub fn judge(
    recorded: &ServerIdentity,
    stored: Lsn,
    observed: &Observed,
    slot: &str,
    publication: &str,
) -> Verdict {
    let found = &observed.identity;
    if let (Some(recorded), Some(found)) = (recorded.system_identifier, found.system_identifier) {
        if recorded != found {
            return Verdict::Lost(Loss::ServerReplaced { recorded, found });
        }
    }
    if let (Some(recorded), Some(found)) = (recorded.database_oid, found.database_oid) {
        if recorded != found {
            return Verdict::Lost(Loss::DatabaseRecreated { recorded, found });
        }
    }
    let slot = slot.to_string();
    let Some(state) = &observed.slot else {
        return Verdict::Lost(Loss::SlotMissing { slot });
    };
    if state.wal_status.as_deref() == Some("lost") {
        return Verdict::Lost(Loss::SlotInvalidated { slot });
    }
    if !observed.publication_exists {
        return Verdict::Lost(Loss::PublicationMissing {
            publication: publication.to_string(),
        });
    }
    match state.confirmed {
        Some(at) if at > stored => Verdict::Lost(Loss::SlotAhead { slot, at, stored }),
        Some(at) if at < stored => Verdict::Advance(stored),
        _ => Verdict::Continue,
    }
}

/// The server's system identifier and the database's oid.
pub async fn identity(conn: &mut PgConnection) -> Result<ServerIdentity> {
    let row = sqlx::query(
        "SELECT (SELECT system_identifier FROM pg_control_system()), \
                (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(conn)
    .await
    .map_err(|e| pg_error("reading the server identity", e))?;
    Ok(ServerIdentity {
        system_identifier: row.get(0),
        database_oid: row.get::<Option<Oid>, _>(1).map(|o| o.0),
    })
}

/// Read everything [`judge`] needs in one round trip.
pub async fn observe(conn: &mut PgConnection, slot: &str, publication: &str) -> Result<Observed> {
    let row = sqlx::query(
        "SELECT (SELECT system_identifier FROM pg_control_system()), \
                (SELECT oid FROM pg_database WHERE datname = current_database()), \
                s.slot_name IS NOT NULL, s.wal_status, s.confirmed_flush_lsn::text, \
                EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $2) \
         FROM (VALUES (1)) AS one(x) LEFT JOIN pg_replication_slots s ON s.slot_name = $1",
    )
    .bind(slot)
    .bind(publication)
    .fetch_one(conn)
    .await
    .map_err(|e| pg_error("checking the slot, publication and server identity", e))?;
    let slot = row.get::<bool, _>(2).then(|| SlotState {
        wal_status: row.get(3),
        confirmed: row.get::<Option<String>, _>(4).and_then(|t| Lsn::parse(&t)),
    });
    Ok(Observed {
        identity: ServerIdentity {
            system_identifier: row.get(0),
            database_oid: row.get::<Option<Oid>, _>(1).map(|o| o.0),
        },
        slot,
        publication_exists: row.get(5),
    })
}

impl PostgresSource {
    /// A newly detected loss of continuity, once; then `None` until the next one.
    pub fn take_loss(&mut self) -> Option<String> {
        self.new_loss.take()
    }

    /// Check that `chain` can go on (repairing a slot left behind its last stored segment);
    /// `Some` says why it cannot.
    pub(super) async fn check_chain(&mut self, chain: &ChainState) -> Result<Option<Loss>> {
        let stored = chain.position.lsn;
        let observed = observe(&mut self.conn, &self.slot, &self.publication).await?;
        match judge(
            &chain.identity,
            stored,
            &observed,
            &self.slot,
            &self.publication,
        ) {
            Verdict::Continue => Ok(None),
            Verdict::Advance(to) => {
                // The last segment was stored but the slot not advanced (a crash or a lost
                // connection in between): finish the advance.
                self.advance_slot(to).await?;
                Ok(None)
            }
            Verdict::Lost(loss) => Ok(Some(loss)),
        }
    }

    /// The chain ends here: no chain until the next snapshot, which records `loss` as its
    /// reason. Returns the error the detecting step reports.
    pub(super) fn lose_continuity(&mut self, loss: &Loss) -> Error {
        let reason = loss.to_string();
        tracing::error!(source = %self.name, reason = %reason, "continuity lost; a new chain starts now");
        self.state = None;
        self.previous = None;
        self.continuity_lost = Some(reason.clone());
        self.new_loss = Some(reason.clone());
        Error::other(format!(
            "source {}: continuity lost: {reason}",
            self.name
        ))
        .with_hint("a new snapshot starts a new chain at the next step; changes since the last capture are not restorable")
    }

    /// After a failed step: make sure the connection still works, reconnecting when it does
    /// not (the server restarted or was replaced). The next continuity check compares the
    /// server identity.
    pub(super) async fn reconnect_if_needed(&mut self) -> Result<()> {
        if !self.suspect {
            return Ok(());
        }
        // The schema lookup connection and its type names may be stale too.
        self.tracker.disconnect();
        self.router.disconnect();
        let alive = matches!(
            tokio::time::timeout(PING_TIMEOUT, self.conn.ping()).await,
            Ok(Ok(()))
        );
        if !alive {
            tracing::warn!(source = %self.name, "the connection to the server is gone; reconnecting");
            self.conn = connect(&self.url).await?;
            tracing::info!(source = %self.name, "reconnected");
        }
        self.suspect = false;
        Ok(())
    }

    /// Remember that a step failed: the connection is checked before the next one.
    pub(super) fn note_outcome<T>(&mut self, result: &Result<T>) {
        if result.is_err() {
            self.suspect = true;
            self.abandon_stream();
        }
    }

    /// Drop the slot if it exists (a new chain after a loss needs a fresh, consistent one).
    pub(super) async fn drop_slot_if_exists(&mut self) -> Result<()> {
        let dropped = sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&self.slot)
        .execute(&mut self.conn)
        .await
        .map_err(|e| pg_error("dropping the replication slot", e))?;
        if dropped.rows_affected() > 0 {
            tracing::info!(source = %self.name, slot = %self.slot, "dropped the replication slot; a new one is created for the new chain");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(system: i64, oid: u32) -> ServerIdentity {
        ServerIdentity {
            system_identifier: Some(system),
            database_oid: Some(oid),
        }
    }

    fn healthy(confirmed: u64) -> Observed {
        Observed {
            identity: identity(7, 16384),
            slot: Some(SlotState {
                confirmed: Some(Lsn(confirmed)),
                wal_status: Some("reserved".into()),
            }),
            publication_exists: true,
        }
    }

    fn verdict(recorded: &ServerIdentity, observed: &Observed) -> Verdict {
        judge(recorded, Lsn(100), observed, "timevault_db", "timevault_db")
    }

    #[test]
    fn a_healthy_chain_continues_and_a_slot_behind_is_advanced() {
        let recorded = identity(7, 16384);
        assert_eq!(verdict(&recorded, &healthy(100)), Verdict::Continue);
        assert_eq!(verdict(&recorded, &healthy(90)), Verdict::Advance(Lsn(100)));
        // Snapshots from before the identity was recorded compare nothing.
        assert_eq!(
            verdict(&ServerIdentity::default(), &healthy(100)),
            Verdict::Continue
        );
    }

    #[test]
    fn every_kind_of_loss_is_named() {
        let recorded = identity(7, 16384);
        let mut replaced = healthy(100);
        replaced.identity = identity(8, 16384);
        // A new server has neither our slot nor our publication: the identity is named.
        replaced.slot = None;
        let lost = |o: &Observed| match verdict(&recorded, o) {
            Verdict::Lost(loss) => loss.to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            lost(&replaced),
            "the server was replaced (system identifier 8, the chain's is 7)"
        );
        let mut recreated = healthy(100);
        recreated.identity = identity(7, 20000);
        assert!(lost(&recreated).contains("database was created again (oid 20000"));
        let mut missing = healthy(100);
        missing.slot = None;
        assert_eq!(lost(&missing), "replication slot timevault_db is gone");
        let mut invalidated = healthy(100);
        invalidated.slot.as_mut().unwrap().wal_status = Some("lost".into());
        assert!(lost(&invalidated).contains("invalidated"));
        let mut unpublished = healthy(100);
        unpublished.publication_exists = false;
        assert_eq!(lost(&unpublished), "publication timevault_db is gone");
        assert!(lost(&healthy(120)).contains("past the last stored change"));
    }

    #[test]
    fn the_identity_sits_beside_the_details_and_older_snapshots_read() {
        #[derive(Serialize)]
        struct Details {
            slot: &'static str,
        }
        let recorded = RecordedDetails {
            details: &Details { slot: "s" },
            identity: identity(7, 16384),
        };
        let value = serde_json::to_value(&recorded).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"slot": "s", "system_identifier": 7, "database_oid": 16384})
        );
        assert_eq!(
            ServerIdentity::recorded(&value).unwrap(),
            identity(7, 16384)
        );
        let old = serde_json::json!({"slot": "s"});
        assert_eq!(
            ServerIdentity::recorded(&old).unwrap(),
            ServerIdentity::default()
        );
    }
}
