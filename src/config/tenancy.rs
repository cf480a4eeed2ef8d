//! The syntax of the `[tenancy]` table: which rule each table and blob source follows
//! (`crate::tenancy` resolves the rules against a real schema and builds the SQL).

use std::collections::BTreeMap;
use std::fmt;

/// The `[tenancy]` table, syntax checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenancyConfig {
    /// The column that names a row's tenant in directly mapped tables.
    pub column: String,
    /// Tables that are global or reached through a path; every other table must have `column`.
    pub tables: BTreeMap<String, TableRule>,
    /// Blob source name → how its keys belong to tenants.
    pub blobs: BTreeMap<String, BlobRule>,
    /// `tenant_keys = true`: each tenant's PostgreSQL snapshot chunks are sealed under a data
    /// key of its own (docs/FORMAT.md §3.2).
    pub tenant_keys: bool,
    /// `[tenancy.keys]`: tenants whose data key is wrapped by a key-encryption key of their
    /// own (a customer-managed key) instead of the repository key.
    pub keys: BTreeMap<String, crate::keys::KekUri>,
}

/// A `[tenancy.tables]` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableRule {
    Global,
    /// One or more hops, starting at the mapped table.
    Path(Vec<Hop>),
}

/// `column -> table.key`: follow `column` of the current table to the row of `table` whose
/// `key` equals it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    pub column: String,
    pub table: String,
    pub key: String,
}

/// A `[tenancy.blobs]` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobRule {
    /// A key prefix with `{tenant}` in it.
    Prefix(String),
    /// The keys in `table.column` of the tenant's rows.
    Table { table: String, column: String },
}

impl BlobRule {
    /// The prefix for `tenant`, for prefix rules.
    pub fn prefix_for(&self, tenant: &str) -> Option<String> {
        match self {
            BlobRule::Prefix(p) => Some(p.replace("{tenant}", tenant)),
            BlobRule::Table { .. } => None,
        }
    }

    /// For a prefix rule, the tenant whose prefix `key` lies under (`None`: no tenant's, or a
    /// table rule). The tenant is the text in the `{tenant}` place, up to the next `/`.
    pub fn tenant_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        let BlobRule::Prefix(template) = self else {
            return None;
        };
        let (before, after) = template.split_once("{tenant}")?;
        let rest = key.strip_prefix(before)?;
        let end = rest.find(after)?;
        let tenant = &rest[..end];
        (!tenant.is_empty() && !tenant.contains('/')).then_some(tenant)
    }
}

impl fmt::Display for Hop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}.{}", self.column, self.table, self.key)
    }
}

impl fmt::Display for TableRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableRule::Global => f.write_str("global"),
            TableRule::Path(hops) => {
                let parts: Vec<String> = hops.iter().map(Hop::to_string).collect();
                f.write_str(&parts.join(", "))
            }
        }
    }
}

impl fmt::Display for BlobRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlobRule::Prefix(p) => write!(f, "prefix:{p}"),
            BlobRule::Table { table, column } => write!(f, "table:{table}.{column}"),
        }
    }
}

/// A table or column name as the tenancy map accepts it: letters, digits, `_` and `$`, not
/// starting with a digit; quoted when used in SQL.
pub fn is_identifier(name: &str) -> bool {
    name.chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '$')
}

/// Parse a `[tenancy.tables]` value; the error says what is wrong with the text.
pub fn parse_table_rule(text: &str) -> std::result::Result<TableRule, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("global") {
        return Ok(TableRule::Global);
    }
    let hops = text
        .split(',')
        .map(parse_hop)
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(TableRule::Path(hops))
}

fn parse_hop(text: &str) -> std::result::Result<Hop, String> {
    let text = text.trim();
    let (column, target) = text.split_once("->").ok_or_else(|| {
        format!("`{text}` is neither \"global\" nor a path `fk_col -> table.col`")
    })?;
    let (column, target) = (column.trim(), target.trim());
    let (table, key) = target
        .split_once('.')
        .ok_or_else(|| format!("`{target}` in `{text}` is not `table.column`"))?;
    for (what, name) in [("column", column), ("table", table), ("column", key)] {
        if !is_identifier(name) {
            return Err(format!("`{name}` in `{text}` is not a {what} name"));
        }
    }
    Ok(Hop {
        column: column.to_string(),
        table: table.to_string(),
        key: key.to_string(),
    })
}

/// Parse a `[tenancy.blobs]` value.
pub fn parse_blob_rule(text: &str) -> std::result::Result<BlobRule, String> {
    let text = text.trim();
    if let Some(prefix) = text.strip_prefix("prefix:") {
        if prefix.matches("{tenant}").count() != 1 {
            return Err(format!(
                "prefix `{prefix}` must contain `{{tenant}}` exactly once"
            ));
        }
        if !prefix.ends_with('/') {
            return Err(format!(
                "prefix `{prefix}` must end with `/`, or tenant 1 would also match tenant 10's keys"
            ));
        }
        return Ok(BlobRule::Prefix(prefix.to_string()));
    }
    if let Some(target) = text.strip_prefix("table:") {
        let (table, column) = target
            .split_once('.')
            .filter(|(t, c)| is_identifier(t) && is_identifier(c))
            .ok_or_else(|| format!("`{target}` is not `table.column`"))?;
        return Ok(BlobRule::Table {
            table: table.to_string(),
            column: column.to_string(),
        });
    }
    Err(format!(
        "`{text}` is neither `prefix:...{{tenant}}.../` nor `table:table.column`"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_rule_names_the_tenant_of_a_key() {
        let rule = parse_blob_rule("prefix:tenants/{tenant}/").unwrap();
        assert_eq!(rule.tenant_of("tenants/1001/a.pdf"), Some("1001"));
        assert_eq!(rule.tenant_of("tenants/1001/sub/a.pdf"), Some("1001"));
        assert_eq!(rule.tenant_of("tenants//a.pdf"), None);
        assert_eq!(rule.tenant_of("tenants/1001"), None, "not under a prefix");
        assert_eq!(rule.tenant_of("shared/logo.png"), None);
        let nested = parse_blob_rule("prefix:t-{tenant}/files/").unwrap();
        assert_eq!(nested.tenant_of("t-7/files/x"), Some("7"));
        assert_eq!(nested.tenant_of("t-7/other/x"), None);
        let table = parse_blob_rule("table:attachments.blob_key").unwrap();
        assert_eq!(table.tenant_of("tenants/1001/a.pdf"), None);
    }
}
