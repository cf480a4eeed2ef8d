//! `timevault verify`: does every replica hold every object, and (with `--read-data`) does
//! every byte authenticate?
//!
//! Replicas are compared by listing: an object one replica has and another lacks is reported
//! as missing on the latter. Lease generations are per replica by design and are not compared.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use futures::{stream, StreamExt};
use serde::Serialize;

use super::{layout, RepoHeader, Repository};
use crate::archive;

/// Where blob scan roots live (docs/FORMAT.md §7.2).
const MANIFESTS: &str = "manifests/";

/// How many objects are fetched and authenticated at once per replica.
const READ_CONCURRENCY: usize = 8;

/// What one copy turned out to be.
enum Found {
    Is(Authenticated),
    Forgotten,
}

#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Download and authenticate every object, not only compare listings.
    pub read_data: bool,
    /// Report only this replica (it is still compared against all the others).
    pub replica: Option<String>,
}

/// The state of one replica.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplicaReport {
    pub name: String,
    pub region: String,
    pub objects: u64,
    pub bytes: u64,
    /// Objects present on another replica but not here.
    pub missing: Vec<String>,
    /// Objects that failed authentication, with the reason.
    pub damaged: Vec<(String, String)>,
    /// Objects authenticated (with `--read-data`).
    pub checked: u64,
    /// Objects sealed under a forgotten tenant's destroyed key (`tenant forget`): unreadable
    /// on purpose, not damage; the next `prune` deletes the chunks among them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forgotten: Vec<String>,
    /// Content objects under data keys this credential cannot open (the backup role): their
    /// headers and data key records were checked, their content was not authenticated.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sealed: u64,
    /// Which keys the chunks are sealed under (with `--read-data`): a repository written
    /// before write-only roles holds content under the repository key, which every role holds.
    #[serde(default, skip_serializing_if = "KeyMix::is_empty")]
    pub keys: KeyMix,
    /// Set when the replica could not be listed at all.
    pub unreachable: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Chunks by the key they are sealed under.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KeyMix {
    /// Content under the repository (metadata) key: written before write-only roles, so a
    /// backup credential can read it.
    pub repository: u64,
    /// Blob scan listings: metadata, under the repository key by design.
    pub listing: u64,
    /// Under content data keys: only the restore and admin roles open them.
    pub data: u64,
    /// Under tenants' keys.
    pub tenant: u64,
}

impl KeyMix {
    pub fn is_empty(&self) -> bool {
        *self == KeyMix::default()
    }

    fn add(&mut self, other: KeyMix) {
        self.repository += other.repository;
        self.listing += other.listing;
        self.data += other.data;
        self.tenant += other.tenant;
    }
}

/// How one object's copy authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Authenticated {
    /// Every byte.
    Opened,
    /// Content under a data key this credential cannot open: its header and its data key's
    /// record exist, nothing more can be checked here.
    Sealed,
}

impl ReplicaReport {
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.damaged.is_empty() && self.unreachable.is_none()
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub repository_id: String,
    pub read_data: bool,
    pub replicas: Vec<ReplicaReport>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.replicas.iter().all(ReplicaReport::is_clean)
    }
}

/// What authenticating one replica's objects found.
#[derive(Debug, Default)]
pub(super) struct Checked {
    pub checked: u64,
    /// Objects that failed, with the reason.
    pub damaged: Vec<(String, String)>,
    /// Objects under a forgotten tenant's destroyed key.
    pub forgotten: Vec<String>,
    /// Content objects under data keys this credential cannot open.
    pub sealed: u64,
    pub keys: KeyMix,
}

/// Key → size, per replica; `Err` for a replica that could not be listed.
pub(super) type Listings = Vec<Result<BTreeMap<String, u64>, String>>;

/// Keys that every replica should hold: everything but leases.
pub(super) fn is_replicated(key: &str) -> bool {
    !key.starts_with("leases/")
}

/// Every key that some replica holds and every replica should hold, sorted.
pub(super) fn replicated_union(listings: &Listings) -> BTreeSet<String> {
    listings
        .iter()
        .flatten()
        .flat_map(|l| l.keys())
        .filter(|k| is_replicated(k))
        .cloned()
        .collect()
}

impl Repository {
    pub(super) async fn list_all_replicas(&self) -> Listings {
        let mut out = Vec::new();
        for replica in self.replicas.replicas() {
            out.push(match replica.list("").await {
                Ok(metas) => Ok(metas
                    .into_iter()
                    .map(|m| (m.location.to_string(), m.size))
                    .collect()),
                Err(e) => Err(e.to_string()),
            });
        }
        out
    }

    /// Check that `bytes` are an authentic copy of the object at `key` (as far as this
    /// credential can: see [`Authenticated::Sealed`]).
    pub(super) fn authenticate(&self, key: &str, bytes: &[u8]) -> Result<Authenticated, String> {
        if key == layout::CONFIG {
            let (header, mac) =
                RepoHeader::parse_unverified(bytes, "").map_err(|e| e.to_string())?;
            if header.repository_id != self.header.repository_id {
                return Err(format!("belongs to repository {}", header.repository_id));
            }
            return header
                .verify(&mac, &self.keys, "")
                .map(|()| Authenticated::Opened)
                .map_err(|e| e.to_string());
        }
        if key.starts_with(crate::keys::wrapped::PREFIX) {
            let copy = crate::keys::FoundCopy::parse(key, bytes).map_err(|e| e.to_string())?;
            if copy.key.repository_id != self.header.repository_id {
                return Err(format!("belongs to repository {}", copy.key.repository_id));
            }
            return copy
                .authenticate(&self.keys)
                .map(|()| Authenticated::Opened)
                .map_err(|e| e.to_string());
        }
        let Some(kind) = layout::kind_of(key) else {
            return Err("not a timevault object (unknown prefix)".into());
        };
        if let Some(why) = self.sealed_under_locked_key(key, bytes) {
            return Err(why);
        }
        let id = super::tenant_keys::header_key_id(bytes, kind);
        if id.is_some_and(|id| self.is_unopened_data_key(&id) || self.is_sealed_tenant_key(&id)) {
            return Ok(Authenticated::Sealed);
        }
        let keys = id.map_or_else(|| self.keys.clone(), |id| self.known_keys_for_id(id));
        archive::open(&keys, kind, key, bytes)
            .map(|_| Authenticated::Opened)
            .map_err(|e| e.to_string())
    }

    /// Which keys a chunk's copy is sealed under (nothing for another kind, or a key id this
    /// process does not know: `authenticate` reports that one).
    fn count_key(&self, key: &str, bytes: &[u8], listings: &HashSet<String>) -> KeyMix {
        let mut mix = KeyMix::default();
        if layout::kind_of(key) != Some(archive::Kind::Chunk) {
            return mix;
        }
        match super::tenant_keys::header_key_id(bytes, archive::Kind::Chunk) {
            Some(id) if id == self.keys.key_id() => {
                if layout::chunk_id_of(key).is_some_and(|c| listings.contains(c)) {
                    mix.listing += 1
                } else {
                    mix.repository += 1
                }
            }
            Some(id) if self.is_data_key(&id) => mix.data += 1,
            Some(id) if self.is_tenant_key(&id) => mix.tenant += 1,
            _ => {}
        }
        mix
    }

    /// Fetch and authenticate `keys` on replica `i`.
    /// The listing chunks every blob scan root names (to tell them from content in the key
    /// mix).
    async fn listing_chunks(&self) -> crate::Result<HashSet<String>> {
        let mut out = HashSet::new();
        for key in self.list(MANIFESTS).await? {
            let bytes = self.read_object(archive::Kind::Manifest, &key).await?;
            let root: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                crate::Error::corrupt(format!("{key}: unreadable scan root")).with_source(e)
            })?;
            let ids = root["listing"].as_array().into_iter().flatten();
            out.extend(ids.filter_map(|r| r["id"].as_str().map(str::to_string)));
        }
        Ok(out)
    }

    /// Fetch and authenticate `keys` on replica `i`; `listings` tells blob listing chunks from
    /// content in the key mix.
    pub(super) async fn find_damaged(
        &self,
        i: usize,
        keys: Vec<String>,
        listings: &HashSet<String>,
    ) -> Checked {
        let replica = self.replicas.replicas()[i].clone();
        let results: Vec<(String, Result<Found, String>, KeyMix)> = stream::iter(keys)
            .map(|key| {
                let replica = replica.clone();
                async move {
                    let mut mix = KeyMix::default();
                    let outcome = match replica.get(&key).await {
                        Ok(Some(bytes)) if self.sealed_under_forgotten_key(&key, &bytes) => {
                            Ok(Found::Forgotten)
                        }
                        Ok(Some(bytes)) => {
                            mix = self.count_key(&key, &bytes, listings);
                            self.authenticate(&key, &bytes).map(Found::Is)
                        }
                        Ok(None) => Err("vanished during verify".into()),
                        Err(e) => Err(format!("unreadable: {e}")),
                    };
                    (key, outcome, mix)
                }
            })
            .buffer_unordered(READ_CONCURRENCY)
            .collect()
            .await;
        let mut out = Checked::default();
        for (key, result, mix) in results {
            out.keys.add(mix);
            match result {
                Ok(Found::Is(Authenticated::Opened)) => out.checked += 1,
                Ok(Found::Is(Authenticated::Sealed)) => out.sealed += 1,
                Ok(Found::Forgotten) => {
                    out.checked += 1;
                    out.forgotten.push(key)
                }
                Err(why) => {
                    out.checked += 1;
                    out.damaged.push((key, why))
                }
            }
        }
        out.damaged.sort();
        out.forgotten.sort();
        for (key, why) in &out.damaged {
            replica.record_bad_object(key, why);
        }
        out
    }

    /// `timevault verify`.
    pub async fn verify(&self, options: &VerifyOptions) -> crate::Result<VerifyReport> {
        if let Some(name) = &options.replica {
            self.replicas.get(name)?;
        }
        if options.read_data {
            // Objects sealed under tenants' keys and data keys are authenticated with them.
            self.learn_tenant_keys().await?;
            self.learn_data_keys().await?;
        }
        let scan_listings = match options.read_data {
            true => self.listing_chunks().await?,
            false => HashSet::new(),
        };
        let listings = self.list_all_replicas().await;
        let union = replicated_union(&listings);
        let mut report = VerifyReport {
            repository_id: self.header.repository_id.clone(),
            read_data: options.read_data,
            replicas: Vec::new(),
        };
        for (i, replica) in self.replicas.replicas().iter().enumerate() {
            if options
                .replica
                .as_deref()
                .is_some_and(|n| n != replica.name())
            {
                continue;
            }
            let mut r = ReplicaReport {
                name: replica.name().to_string(),
                region: replica.region().to_string(),
                ..Default::default()
            };
            match &listings[i] {
                Err(e) => r.unreachable = Some(e.clone()),
                Ok(listing) => {
                    r.objects = listing.len() as u64;
                    r.bytes = listing.values().sum();
                    r.missing = union
                        .iter()
                        .filter(|k| !listing.contains_key(k.as_str()))
                        .map(|k| k.to_string())
                        .collect();
                    if options.read_data {
                        let keys = listing.keys().cloned().collect();
                        let found = self.find_damaged(i, keys, &scan_listings).await;
                        (r.checked, r.damaged, r.forgotten, r.sealed, r.keys) = (
                            found.checked,
                            found.damaged,
                            found.forgotten,
                            found.sealed,
                            found.keys,
                        );
                    }
                }
            }
            report.replicas.push(r);
        }
        Ok(report)
    }
}
