//! The options of a PostgreSQL source (`options = { ... }` in `[[sources]]`): their names, the
//! rule for slot and publication names, and [`PostgresOptions`], the typed values config
//! checks once at load (with the file and line of a bad one) and the source reads.

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

/// The source option that sets the retained-WAL warning threshold (`"512MiB"`, `"2GiB"`, bytes).
pub const SLOT_WAL_WARN_OPTION: &str = "slot_wal_warn";

/// Retained WAL above which `status` warns, unless the source sets [`SLOT_WAL_WARN_OPTION`].
pub const DEFAULT_SLOT_WAL_WARN: u64 = 1 << 30;

/// Source option: how capture reads the slot: `auto` (default: streaming, or polling when the
/// server or role does not allow a replication connection), `streaming` or `polling`.
pub const CAPTURE_METHOD_OPTION: &str = "capture_method";

/// How capture reads a PostgreSQL source's slot ([`CAPTURE_METHOD_OPTION`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CaptureChoice {
    /// Streaming when the server and role allow a replication connection, else polling.
    #[default]
    Auto,
    /// Always a replication connection (`START_REPLICATION`); fails when not allowed.
    Streaming,
    /// Always SQL (`pg_logical_slot_peek_binary_changes`).
    Polling,
}

impl CaptureChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureChoice::Auto => "auto",
            CaptureChoice::Streaming => "streaming",
            CaptureChoice::Polling => "polling",
        }
    }
}

/// Every option a PostgreSQL source accepts; any other is a configuration error (a typo such
/// as `snapshot_worker` would otherwise be ignored without a word).
pub const KNOWN_OPTIONS: &[&str] = &[
    SLOT_OPTION,
    PUBLICATION_OPTION,
    SLOT_WAL_WARN_OPTION,
    SNAPSHOT_WORKERS_OPTION,
    SPLIT_PAGES_OPTION,
    GROUP_OPTION,
    CAPTURE_METHOD_OPTION,
];

/// A PostgreSQL source's options as checked values. `None` is "not set": the default applies
/// (see the accessors) and `config show` does not print it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostgresOptions {
    /// The replication slot's name; default `timevault_<source>`.
    pub slot: Option<String>,
    /// The publication's name; default the slot's.
    pub publication: Option<String>,
    /// Retained WAL in bytes above which `status` warns.
    pub slot_wal_warn: Option<u64>,
    /// Connections that copy a snapshot's tables in parallel (1 to 64).
    pub snapshot_workers: Option<usize>,
    /// Tables larger than this many pages are copied in page ranges of this size.
    pub snapshot_split_pages: Option<u64>,
    /// Whether snapshot chunks are cut per tenant.
    pub snapshot_group_by_tenant: Option<bool>,
    /// How capture reads the slot.
    pub capture_method: Option<CaptureChoice>,
}

impl PostgresOptions {
    /// The retained-WAL warning threshold in bytes.
    pub fn slot_wal_warn(&self) -> u64 {
        self.slot_wal_warn.unwrap_or(DEFAULT_SLOT_WAL_WARN)
    }

    /// Whether snapshot chunks are cut per tenant (default yes).
    pub fn group_by_tenant(&self) -> bool {
        self.snapshot_group_by_tenant.unwrap_or(true)
    }

    /// How capture reads the slot (default `auto`).
    pub fn capture_method(&self) -> CaptureChoice {
        self.capture_method.unwrap_or_default()
    }

    /// The options that are set, as an operator writes them (for `config show`).
    pub fn as_written(&self) -> std::collections::BTreeMap<String, String> {
        let mut out = std::collections::BTreeMap::new();
        let mut put = |key: &str, value: Option<String>| {
            if let Some(value) = value {
                out.insert(key.to_string(), value);
            }
        };
        put(SLOT_OPTION, self.slot.clone());
        put(PUBLICATION_OPTION, self.publication.clone());
        put(SLOT_WAL_WARN_OPTION, self.slot_wal_warn.map(format_size));
        put(
            SNAPSHOT_WORKERS_OPTION,
            self.snapshot_workers.map(|n| n.to_string()),
        );
        put(
            SPLIT_PAGES_OPTION,
            self.snapshot_split_pages.map(|n| n.to_string()),
        );
        put(
            GROUP_OPTION,
            self.snapshot_group_by_tenant.map(|b| b.to_string()),
        );
        put(
            CAPTURE_METHOD_OPTION,
            self.capture_method.map(|c| c.as_str().to_string()),
        );
        out
    }
}

/// Binary units, largest first, for [`parse_size`] and [`format_size`].
const SIZE_UNITS: &[(&str, u32)] = &[("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];

/// Parse a byte size: digits with an optional `B`, `KiB`, `MiB`, `GiB` or `TiB` suffix.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().ok()?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        unit => SIZE_UNITS.iter().find(|(u, _)| *u == unit)?.1,
    };
    number.checked_mul(1 << shift)
}

/// A byte size in the largest binary unit that divides it exactly ("2GiB", "1000").
pub fn format_size(bytes: u64) -> String {
    SIZE_UNITS
        .iter()
        .find(|(_, shift)| bytes != 0 && bytes.trailing_zeros() >= *shift)
        .map(|(unit, shift)| format!("{}{unit}", bytes >> shift))
        .unwrap_or_else(|| bytes.to_string())
}

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
