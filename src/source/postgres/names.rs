//! The replication slot and publication a source uses, and the options that override them.
//!
//! Slots are cluster-wide: two timevault installations (two repositories, say production and a
//! staging copy) that both back up a source named `db` on one server would share the slot
//! `timevault_db`, and each would advance it past changes only the other had stored. A
//! publication is per database, but `drop_slot` drops it, so one installation's cleanup would
//! break the other's capture. `options.slot` (and `options.publication`, which otherwise
//! follows the slot) give each installation its own names.

use std::collections::BTreeMap;

use super::slot_name;
pub use crate::config::postgres_options::{
    invalid_name, NAME_HINT, PUBLICATION_OPTION, SLOT_OPTION,
};
use crate::error::{Error, Result};

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

    /// The names from a source's options; an invalid one is a configuration error.
    pub fn from_options(source: &str, options: &BTreeMap<String, String>) -> Result<SlotNames> {
        let checked = |key: &str| -> Result<Option<String>> {
            let Some(value) = options.get(key) else {
                return Ok(None);
            };
            match invalid_name(value) {
                None => Ok(Some(value.clone())),
                Some(why) => Err(Error::config(format!(
                    "source {source}: option {key} = {value:?} {why}"
                ))
                .with_hint(NAME_HINT)),
            }
        };
        let mut names = SlotNames::default_for(source);
        if let Some(slot) = checked(SLOT_OPTION)? {
            names.publication = slot.clone();
            names.slot = slot;
        }
        if let Some(publication) = checked(PUBLICATION_OPTION)? {
            names.publication = publication;
        }
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_follow_the_source_and_the_publication_follows_the_slot() {
        assert_eq!(
            SlotNames::from_options("db", &options(&[])).unwrap(),
            SlotNames {
                slot: "timevault_db".into(),
                publication: "timevault_db".into()
            }
        );
        let slot = SlotNames::from_options("db", &options(&[("slot", "tv_staging")])).unwrap();
        assert_eq!(
            (slot.slot.as_str(), slot.publication.as_str()),
            ("tv_staging", "tv_staging")
        );
        let both = SlotNames::from_options(
            "db",
            &options(&[("slot", "tv_a"), ("publication", "tv_pub")]),
        )
        .unwrap();
        assert_eq!(
            (both.slot.as_str(), both.publication.as_str()),
            ("tv_a", "tv_pub")
        );
    }

    #[test]
    fn invalid_names_are_configuration_errors() {
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
        let err = SlotNames::from_options("db", &options(&[("publication", "Pub")])).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Config);
        assert!(
            err.message().contains("option publication"),
            "{}",
            err.message()
        );
        assert!(err.hint().is_some());
    }
}
