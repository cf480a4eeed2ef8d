//! The options of a PostgreSQL source (`options = { ... }` in `[[sources]]`): their names and
//! the rule for slot and publication names, owned by the config that checks them; the source
//! reads them through these names.

/// The source option naming the replication slot.
pub const SLOT_OPTION: &str = "slot";

/// The source option naming the publication (default: the slot's name).
pub const PUBLICATION_OPTION: &str = "publication";

/// Source option: `false` copies tables ungrouped (fewer, fuller chunks; a restore of one
/// tenant then reads every chunk). Default `true`.
pub const GROUP_OPTION: &str = "snapshot_group_by_tenant";

/// Source option: how many connections copy tables in parallel.
pub const SNAPSHOT_WORKERS_OPTION: &str = "snapshot_workers";
/// Source option: tables larger than this many pages are split into page ranges of this size.
pub const SPLIT_PAGES_OPTION: &str = "snapshot_split_pages";

/// Longest name PostgreSQL keeps (NAMEDATALEN - 1).
const MAX_NAME: usize = 63;

/// What to write instead of an invalid name.
pub const NAME_HINT: &str =
    "use 1 to 63 characters from a-z, 0-9 and _, starting with a letter or _ (e.g. \"timevault_staging_db\")";

/// Why `name` cannot be a slot or publication name, or `None` when it can. PostgreSQL allows
/// only lowercase letters, digits and `_` in slot names; publications get the same rule, so
/// the two can share a name and neither needs quoting in an operator's SQL.
pub fn invalid_name(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("is empty");
    }
    if name.len() > MAX_NAME {
        return Some("is longer than 63 characters");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Some("may hold only a-z, 0-9 and _");
    }
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        return Some("must not start with a digit");
    }
    None
}
