//! Retention: which chains to keep so that the promises hold (every instant of the PITR window,
//! then calendar restore points), as a pure function tested against golden cases.
//!
//! A **chain** (snapshot + its segments, see `catalog`) is the unit. A chain whose window
//! reaches into the PITR window is kept whole (its segments are needed to replay to any instant).
//! A chain kept only as a calendar point (the newest snapshot of a day, ISO week, month or
//! year, within that tier's age) keeps its snapshot: the restore point is the snapshot's
//! instant, so its segments may go. The newest chain is always kept (it may still be growing).
//! Everything is computed in UTC.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Datelike, Duration, Utc};
use serde::Serialize;

/// How long each kind of restore point is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Every instant of the last `pitr` is restorable.
    pub pitr: Duration,
    pub daily: Option<Duration>,
    pub weekly: Option<Duration>,
    pub monthly: Option<Duration>,
    pub yearly: Option<Duration>,
}

/// What the plan needs to know of one chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSpan {
    pub id: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// Why a chain is kept.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case", tag = "tier", content = "period")]
pub enum Reason {
    /// The newest chain: it may still be growing.
    Newest,
    /// Its window reaches into the PITR window.
    Pitr,
    Daily(String),
    Weekly(String),
    Monthly(String),
    Yearly(String),
}

impl Reason {
    fn needs_segments(&self) -> bool {
        matches!(self, Reason::Newest | Reason::Pitr)
    }
}

/// The decision for one chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub chain: String,
    pub reasons: Vec<Reason>,
    /// False when the chain is kept only as a calendar point: its segments may be removed.
    pub keep_segments: bool,
}

/// The whole plan: chains kept (with reasons) and chains removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RetentionPlan {
    pub keep: Vec<Decision>,
    pub remove: Vec<String>,
}

/// A calendar tier: its periods and the reason it gives.
#[derive(Debug, Clone, Copy)]
enum Tier {
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Tier {
    /// The period `t` falls in, as the reason to keep the newest snapshot of that period.
    fn reason(self, t: DateTime<Utc>) -> Reason {
        match self {
            Tier::Daily => Reason::Daily(t.format("%Y-%m-%d").to_string()),
            Tier::Weekly => Reason::Weekly(format!(
                "{}-W{:02}",
                t.iso_week().year(),
                t.iso_week().week()
            )),
            Tier::Monthly => Reason::Monthly(t.format("%Y-%m").to_string()),
            Tier::Yearly => Reason::Yearly(t.format("%Y").to_string()),
        }
    }
}

/// Pure: what to keep and remove at `now`. `chains` may come in any order.
pub fn plan(chains: &[ChainSpan], policy: &RetentionPolicy, now: DateTime<Utc>) -> RetentionPlan {
    let mut sorted: Vec<&ChainSpan> = chains.iter().collect();
    sorted.sort_by_key(|c| (c.start, c.id.clone()));
    let mut reasons: BTreeMap<&str, BTreeSet<Reason>> = BTreeMap::new();
    // 1. The newest chain, and every chain reaching into the PITR window.
    if let Some(newest) = sorted.last() {
        reasons
            .entry(&newest.id)
            .or_default()
            .insert(Reason::Newest);
    }
    let window_start = now - policy.pitr;
    for c in sorted.iter().filter(|c| c.end >= window_start) {
        reasons.entry(&c.id).or_default().insert(Reason::Pitr);
    }
    // 2. Calendar tiers: the newest snapshot of each period within the tier's age.
    let tiers = [
        (policy.daily, Tier::Daily),
        (policy.weekly, Tier::Weekly),
        (policy.monthly, Tier::Monthly),
        (policy.yearly, Tier::Yearly),
    ];
    for (age, tier) in tiers {
        let Some(age) = age else { continue };
        let mut newest_in: BTreeMap<Reason, &ChainSpan> = BTreeMap::new();
        for c in sorted
            .iter()
            .filter(|c| c.start >= now - age && c.start <= now)
        {
            newest_in.insert(tier.reason(c.start), c);
        }
        for (r, c) in newest_in {
            reasons.entry(&c.id).or_default().insert(r);
        }
    }
    let mut out = RetentionPlan::default();
    for c in sorted {
        match reasons.get(c.id.as_str()) {
            Some(rs) => out.keep.push(Decision {
                chain: c.id.clone(),
                keep_segments: rs.iter().any(Reason::needs_segments),
                reasons: rs.iter().cloned().collect(),
            }),
            None => out.remove.push(c.id.clone()),
        }
    }
    out
}

#[cfg(test)]
mod tests;
