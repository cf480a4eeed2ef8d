//! The replication slot and publication a source uses, and the options that override them.
//!
//! Slots are cluster-wide: two timevault installations (two repositories, say production and a
//! staging copy) that both back up a source named `db` on one server would share the slot
//! `timevault_db`, and each would advance it past changes only the other had stored. A
//! publication is per database, but `drop_slot` drops it, so one installation's cleanup would
//! break the other's capture. `options.slot` (and `options.publication`, which otherwise
//! follows the slot) give each installation its own names.

use super::slot_name;
pub use crate::config::postgres_options::{
    invalid_name, NAME_HINT, PUBLICATION_OPTION, SLOT_OPTION,
};
use crate::config::PostgresOptions;

/// The names a source's capture uses on the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotNames {
    pub slot: String,
    pub publication: String,
}

impl SlotNames {
    /// The defaults: `timevault_<source>` for both.
    pub fn default_for(source: &str) -> SlotNames {
        let slot = slot_name(source);
        SlotNames {
            publication: slot.clone(),
            slot,
        }
    }

    /// The names a source's options set (config checked them at load), else the defaults.
    pub fn for_source(source: &str, options: &PostgresOptions) -> SlotNames {
        let mut names = SlotNames::default_for(source);
        if let Some(slot) = &options.slot {
            names.publication = slot.clone();
            names.slot = slot.clone();
        }
        if let Some(publication) = &options.publication {
            names.publication = publication.clone();
        }
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_source_and_the_publication_follows_the_slot() {
        assert_eq!(
            SlotNames::for_source("db", &PostgresOptions::default()),
            SlotNames {
                slot: "timevault_db".into(),
                publication: "timevault_db".into()
            }
        );
        let slot = SlotNames::for_source(
            "db",
            &PostgresOptions {
                slot: Some("tv_staging".into()),
                ..PostgresOptions::default()
            },
        );
        assert_eq!(
            (slot.slot.as_str(), slot.publication.as_str()),
            ("tv_staging", "tv_staging")
        );
        let both = SlotNames::for_source(
            "db",
            &PostgresOptions {
                slot: Some("tv_a".into()),
                publication: Some("tv_pub".into()),
                ..PostgresOptions::default()
            },
        );
        assert_eq!(
            (both.slot.as_str(), both.publication.as_str()),
            ("tv_a", "tv_pub")
        );
    }

    #[test]
    fn invalid_names_are_named() {
        for bad in [
            "",
            "Upper",
            "has-dash",
            "9lives",
            "has space",
            &"x".repeat(64),
        ] {
            assert!(invalid_name(bad).is_some(), "{bad:?}");
        }
        assert!(invalid_name(&"x".repeat(63)).is_none());
        assert!(invalid_name("_tv_1").is_none());
    }
}
