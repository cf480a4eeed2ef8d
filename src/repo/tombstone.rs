//! Tombstones: what a prune removed, kept until every replica has lost it.
//!
//! A replica that is down while a prune deletes keeps its copies. Without a record, the next
//! `replicas sync` would copy them back to the others (sync fills in whatever one replica has
//! and another lacks) and the catalog, a union of all replicas, would list them again. So a
//! prune writes a tombstone listing every key it is about to delete *before* deleting; sync
//! never copies a tombstoned key, and each prune deletes tombstoned keys again on every
//! replica and drops a tombstone only once every replica confirmed every deletion.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{layout, Repository};
use crate::archive::Kind;
use crate::error::{Error, Result};
use crate::time;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub pruned_at: DateTime<Utc>,
    pub keys: Vec<String>,
}

impl Repository {
    pub async fn write_tombstone(&self, tombstone: &Tombstone) -> Result<String> {
        let key = layout::tombstone(&time::compact(tombstone.pruned_at));
        let json = serde_json::to_vec(tombstone).expect("tombstone serializes");
        self.write_object(Kind::Catalog, &key, json).await?;
        Ok(key)
    }

    /// Delete `objects` on every replica, tombstoned first, so `replicas sync` never copies
    /// one back from a replica that was down. `doing` names the step for an error, which says
    /// that the next prune deletes what is left.
    pub(crate) async fn tombstone_and_delete(&self, objects: &[String], doing: &str) -> Result<()> {
        self.write_tombstone(&Tombstone {
            pruned_at: Utc::now(),
            keys: objects.to_vec(),
        })
        .await?;
        for object in objects {
            self.delete_everywhere(object).await.map_err(|e| {
                e.context(format!(
                    "{doing}: tombstoned; the next prune deletes what is left"
                ))
            })?;
        }
        Ok(())
    }

    /// Every tombstone, by key.
    pub async fn tombstones(&self) -> Result<BTreeMap<String, Tombstone>> {
        let mut out = BTreeMap::new();
        for key in self.list(layout::TOMBSTONES).await? {
            let bytes = self.read_object(Kind::Catalog, &key).await?;
            let t: Tombstone = serde_json::from_slice(&bytes).map_err(|e| {
                Error::corrupt(format!("tombstone {key}: unreadable")).with_source(e)
            })?;
            out.insert(key, t);
        }
        Ok(out)
    }

    /// Every key some prune removed but a replica may still hold: never copy these.
    pub async fn tombstoned_keys(&self) -> Result<HashSet<String>> {
        Ok(self
            .tombstones()
            .await?
            .into_values()
            .flat_map(|t| t.keys)
            .collect())
    }
}
