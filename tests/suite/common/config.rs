//! One config builder for the tests: the `[repository]`, `[[replicas]]`, `[[sources]]`,
//! `[schedule]`, `[daemon]`, `[retention]` and `[tenancy]` a test needs, written as TOML in one
//! place. Only what a test sets is written, so a config says no more than its test does.
//!
//! Tests about the config file itself (syntax, typos, errors with file and line) write their
//! TOML by hand. `tests/clock` includes this file too, so it uses nothing else of `common`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use timevault::config::Config;

/// `write_quorum`: every replica, or a number of them.
#[derive(Clone, Copy, Debug)]
pub enum Quorum {
    All,
    Count(u32),
}

/// A timevault config, built up and then written, parsed or loaded.
#[derive(Clone, Debug, Default)]
pub struct ConfigBuilder {
    /// `[repository]` keys with their values already as TOML.
    repository: Vec<(String, String)>,
    replicas: Vec<Entry>,
    sources: Vec<Entry>,
    schedule: Vec<(String, String)>,
    daemon: Vec<(String, String)>,
    retention: Vec<(String, String)>,
    tenancy: Option<Tenancy>,
}

/// A `[[replicas]]` (name, region, url) or `[[sources]]` (name, kind, url) entry.
#[derive(Clone, Debug)]
struct Entry {
    keys: [(&'static str, String); 3],
    options: Vec<(String, String)>,
}

#[derive(Clone, Debug, Default)]
struct Tenancy {
    column: Option<String>,
    tenant_keys: bool,
    tables: Vec<(String, String)>,
    blobs: Vec<(String, String)>,
    keys: Vec<(String, String)>,
}

impl ConfigBuilder {
    /// An empty `[repository]` and nothing else.
    pub fn new() -> Self {
        Self::default()
    }

    /// Two sites: `key_file = "timevault.key"` and two file replicas, `eu-west` (region
    /// westeurope) and `eu-north` (northeurope), under `replicas/`.
    pub fn two_sites() -> Self {
        Self::new()
            .key_file("timevault.key")
            .replica("eu-west", "westeurope", "replicas/eu-west")
            .replica("eu-north", "northeurope", "replicas/eu-north")
    }

    /// A small repository: `key_file = "k"` and one file replica `a` (region `r`) at `url`.
    pub fn one_replica(url: &str) -> Self {
        Self::new().key_file("k").replica("a", "r", url)
    }

    pub fn key_file(self, path: &str) -> Self {
        self.repository_value("key_file", quote(path))
    }

    pub fn passphrase_env(self, var: &str) -> Self {
        self.repository_value("passphrase_env", quote(var))
    }

    /// `kek = [...]`: key-encryption keys in key services (`aws-kms:<ARN>`).
    pub fn kek(self, keks: &[&str]) -> Self {
        let list: Vec<String> = keks.iter().map(|k| quote(k)).collect();
        self.repository_value("kek", format!("[{}]", list.join(", ")))
    }

    /// No local key (`key_file`, `key_env`, `passphrase_env`): a repository opened through
    /// its `kek` alone.
    pub fn without_local_key(mut self) -> Self {
        self.repository
            .retain(|(k, _)| !matches!(k.as_str(), "key_file" | "key_env" | "passphrase_env"));
        self
    }

    pub fn write_quorum(self, quorum: Quorum) -> Self {
        let value = match quorum {
            Quorum::All => quote("all"),
            Quorum::Count(n) => n.to_string(),
        };
        self.repository_value("write_quorum", value)
    }

    pub fn lease_ttl(self, ttl: &str) -> Self {
        self.repository_value("lease_ttl", quote(ttl))
    }

    pub fn replica(self, name: &str, region: &str, url: &str) -> Self {
        self.replica_with(name, region, url, None::<(&str, &str)>)
    }

    /// A replica with `options = { .. }` (endpoint, credentials, transport settings). A
    /// replica of the same name is replaced where it stands.
    pub fn replica_with<K: ToString, V: ToString>(
        mut self,
        name: &str,
        region: &str,
        url: &str,
        options: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let entry = Entry::new([("name", name), ("region", region), ("url", url)], options);
        put(&mut self.replicas, entry);
        self
    }

    pub fn without_replica(mut self, name: &str) -> Self {
        self.replicas.retain(|r| r.name() != name);
        self
    }

    pub fn sqlite(self, name: &str, url: &str) -> Self {
        self.source(name, "sqlite", url)
    }

    pub fn postgres(self, name: &str, url: &str) -> Self {
        self.source(name, "postgres", url)
    }

    pub fn blobs(self, name: &str, url: &str) -> Self {
        self.source(name, "blobs", url)
    }

    pub fn source(self, name: &str, kind: &str, url: &str) -> Self {
        self.source_with(name, kind, url, None::<(&str, &str)>)
    }

    /// A source with `options = { .. }` (a PostgreSQL source's `slot`, `slot_wal_warn`, ..).
    /// A source of the same name is replaced where it stands.
    pub fn source_with<K: ToString, V: ToString>(
        mut self,
        name: &str,
        kind: &str,
        url: &str,
        options: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let entry = Entry::new([("name", name), ("kind", kind), ("url", url)], options);
        put(&mut self.sources, entry);
        self
    }

    /// A `[schedule]` key (`snapshot`, `capture_interval`, `blob_scan`, `drill`, `prune`, ..);
    /// setting a key again replaces its value.
    pub fn schedule(mut self, key: &str, value: &str) -> Self {
        set(&mut self.schedule, key, quote(value));
        self
    }

    /// A `[daemon]` key (`listen`, `max_capture_lag`, `max_snapshot_age`).
    pub fn daemon(mut self, key: &str, value: &str) -> Self {
        set(&mut self.daemon, key, quote(value));
        self
    }

    /// `[daemon] listen = "127.0.0.1:<port>"`.
    pub fn listen(self, port: u16) -> Self {
        self.daemon("listen", &format!("127.0.0.1:{port}"))
    }

    /// A `[retention]` key (`pitr`, `monthly`, `audit`, `chunk_grace`, ..).
    pub fn retention(mut self, key: &str, value: &str) -> Self {
        set(&mut self.retention, key, quote(value));
        self
    }

    /// `[tenancy] column`.
    pub fn tenancy_column(mut self, column: &str) -> Self {
        self.tenancy.get_or_insert_with(Tenancy::default).column = Some(column.to_string());
        self
    }

    /// A `[tenancy.tables]` rule (`global`, `contract_id -> contracts.id`, ..).
    pub fn tenancy_table(mut self, table: &str, rule: &str) -> Self {
        let tenancy = self.tenancy.get_or_insert_with(Tenancy::default);
        set(&mut tenancy.tables, table, quote(rule));
        self
    }

    /// A `[tenancy.blobs]` rule for a blob source (`prefix:tenants/{tenant}/`, `table:..`).
    pub fn tenancy_blobs(mut self, source: &str, rule: &str) -> Self {
        let tenancy = self.tenancy.get_or_insert_with(Tenancy::default);
        set(&mut tenancy.blobs, source, quote(rule));
        self
    }

    /// `[tenancy] tenant_keys = true`: each tenant's snapshot chunks under a key of its own.
    pub fn tenant_keys(mut self) -> Self {
        self.tenancy
            .get_or_insert_with(Tenancy::default)
            .tenant_keys = true;
        self
    }

    /// `[tenancy.keys] "<tenant>" = "<KEK>"`: the tenant's own key-encryption key.
    pub fn tenant_kek(mut self, tenant: &str, kek: &str) -> Self {
        let tenancy = self.tenancy.get_or_insert_with(Tenancy::default);
        set(&mut tenancy.keys, tenant, quote(kek));
        self
    }

    /// `[repository] kek_check_interval`: how long a KEK's state is trusted.
    pub fn kek_check_interval(self, every: &str) -> Self {
        self.repository_value("kek_check_interval", quote(every))
    }

    /// The fixture application's tenancy: column `tenant_id`, `plans` global and
    /// `contract_versions` through `contract_id -> contracts.id`.
    pub fn fixture_tenancy(self) -> Self {
        self.tenancy_column("tenant_id")
            .tenancy_table("plans", "global")
            .tenancy_table("contract_versions", "contract_id -> contracts.id")
    }

    /// The config as TOML.
    pub fn text(&self) -> String {
        let mut out = String::new();
        table(&mut out, "[repository]", &self.repository);
        for replica in &self.replicas {
            replica.write(&mut out, "[[replicas]]");
        }
        for source in &self.sources {
            source.write(&mut out, "[[sources]]");
        }
        for (header, keys) in [
            ("[schedule]", &self.schedule),
            ("[daemon]", &self.daemon),
            ("[retention]", &self.retention),
        ] {
            if !keys.is_empty() {
                table(&mut out, header, keys);
            }
        }
        if let Some(tenancy) = &self.tenancy {
            let mut column: Vec<_> = tenancy
                .column
                .iter()
                .map(|c| ("column".to_string(), quote(c)))
                .collect();
            if tenancy.tenant_keys {
                column.push(("tenant_keys".to_string(), "true".to_string()));
            }
            table(&mut out, "[tenancy]", &column);
            if !tenancy.tables.is_empty() {
                table(&mut out, "[tenancy.tables]", &tenancy.tables);
            }
            if !tenancy.blobs.is_empty() {
                table(&mut out, "[tenancy.blobs]", &tenancy.blobs);
            }
            if !tenancy.keys.is_empty() {
                table(&mut out, "[tenancy.keys]", &tenancy.keys);
            }
        }
        out
    }

    /// Write `dir/timevault.toml`; returns its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        self.write_as(&dir.join("timevault.toml"))
    }

    /// Write the config to `path` (another name beside the usual one).
    pub fn write_as(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.text()).unwrap();
        path.to_path_buf()
    }

    /// Write `dir/timevault.toml` and load it as the binary would.
    pub fn load(&self, dir: &Path) -> Config {
        Config::load(&self.write(dir)).unwrap()
    }

    /// Parse as if read from `dir/timevault.toml` (relative paths resolve in `dir`), without
    /// writing a file.
    pub fn parse(&self, dir: &Path) -> Config {
        Config::parse(&self.text(), &dir.join("timevault.toml")).unwrap()
    }

    fn repository_value(mut self, key: &str, value: String) -> Self {
        set(&mut self.repository, key, value);
        self
    }
}

impl Entry {
    fn new<K: ToString, V: ToString>(
        keys: [(&'static str, &str); 3],
        options: impl IntoIterator<Item = (K, V)>,
    ) -> Entry {
        Entry {
            keys: keys.map(|(k, v)| (k, v.to_string())),
            options: options
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn name(&self) -> &str {
        &self.keys[0].1
    }

    fn write(&self, out: &mut String, header: &str) {
        let mut keys: Vec<(String, String)> = self
            .keys
            .iter()
            .map(|(k, v)| (k.to_string(), quote(v)))
            .collect();
        if !self.options.is_empty() {
            let options: Vec<String> = self
                .options
                .iter()
                .map(|(k, v)| format!("{} = {}", key(k), quote(v)))
                .collect();
            keys.push(("options".into(), format!("{{ {} }}", options.join(", "))));
        }
        table(out, header, &keys);
    }
}

/// Add `entry`, or replace the one of the same name where it stands.
fn put(entries: &mut Vec<Entry>, entry: Entry) {
    match entries.iter_mut().find(|e| e.name() == entry.name()) {
        Some(old) => *old = entry,
        None => entries.push(entry),
    }
}

/// Set `key` to `value`, in place when it is there already.
fn set(keys: &mut Vec<(String, String)>, key: &str, value: String) {
    match keys.iter_mut().find(|(k, _)| k == key) {
        Some(entry) => entry.1 = value,
        None => keys.push((key.to_string(), value)),
    }
}

fn table(out: &mut String, header: &str, keys: &[(String, String)]) {
    if !out.is_empty() {
        out.push('\n');
    }
    writeln!(out, "{header}").unwrap();
    for (k, v) in keys {
        writeln!(out, "{} = {v}", key(k)).unwrap();
    }
}

/// A key, quoted unless it is a bare key.
fn key(k: &str) -> String {
    let bare = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        k.to_string()
    } else {
        quote(k)
    }
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => write!(out, "\\u{:04X}", c as u32).unwrap(),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
