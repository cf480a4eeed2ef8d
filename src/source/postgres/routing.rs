//! Which tenant a captured row change belongs to, so that capture seals it under that
//! tenant's key (`[tenancy] tenant_keys`, docs/FORMAT.md §8.2).
//!
//! The rules are the snapshot's ([`TenantRules`] over the chain's snapshot schema, and over the
//! catalog for a table created since), so a table's changes go where its snapshot chunks went:
//! - a table with the tenant column: the column's value in the change's tuple;
//! - a table that belongs through foreign keys: the tenant of the row its first link names,
//!   learned from the stream when that row was inserted or updated since this process started,
//!   else asked of the server on a second connection (one query per parent row, cached);
//! - a global table, or a row whose tenant value is NULL: no tenant (the repository key).
//!
//! A delete whose old tuple holds only the replica identity key and not the deciding column
//! carries only that key: it stays under the repository key ([`Tenant::KeyOnly`]). A change
//! whose tenant cannot be found (its parent row is gone, or the value was not sent) is
//! [`Tenant::Unresolved`]: capture keeps it under the repository key and counts it, so a later
//! `tenant forget` cannot claim to have erased it silently.

use std::collections::HashMap;

use sqlx::postgres::PgConnection;
use sqlx::Row;

use super::grouping::{TenantKey, TenantRules};
use super::schema::Schema;
use super::{connect, pg_error};
use crate::error::Result;
use crate::stored::postgres::changes::{Record, RelationRecord, Tuple};

/// At most this many parent rows' tenants are remembered (then the memory starts over).
const CACHE_ROWS: usize = 1_000_000;

/// Whose a row change is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tenant {
    /// A global table, a row whose tenant is NULL, or not a row change.
    None,
    /// The tenant's id (the tenant column's text).
    Of(String),
    /// A key-only delete: only the replica identity key, without the deciding column.
    KeyOnly,
    /// A row of a tenant table whose tenant could not be found.
    Unresolved,
}

/// How one relation's rows find their tenant.
#[derive(Debug, Clone)]
struct Route {
    decide: Decide,
    /// Indexes of the replica identity key's columns.
    key: Vec<usize>,
    /// Columns other tables' rows link to: (index, parent column), remembered with the tenant.
    remember: Vec<(usize, ParentColumn)>,
}

#[derive(Debug, Clone)]
enum Decide {
    Global,
    /// The tenant column's index in the relation.
    Column(usize),
    /// The first link's index, the key whose first hop it follows, and that hop's column.
    Link(usize, TenantKey, ParentColumn),
    /// A tenant table without the column its key names (the column was dropped).
    Missing,
}

/// A column rows link to (schema, table, column), as an index into the router's memory: a row
/// change looks its parent up without building a key (capture routes every row change).
type ParentColumn = usize;

/// Routes a chain's row changes to tenants.
pub struct TenantRouter {
    url: String,
    rules: Option<TenantRules>,
    /// The chain's snapshot schema.
    schema: Option<Schema>,
    /// How each table of the chain's snapshot schema belongs (absent: global).
    keys: HashMap<(String, String), TenantKey>,
    /// The columns rows of other tables link to, per table.
    parents: HashMap<(String, String), Vec<String>>,
    routes: HashMap<u32, std::sync::Arc<Route>>,
    /// Each parent column's index into `known`.
    columns: HashMap<(String, String, String), ParentColumn>,
    /// Per parent column: the key's text → the row's tenant.
    known: Vec<HashMap<String, Option<String>>>,
    /// Rows in `known`, all columns together.
    known_rows: usize,
    lookup: Option<PgConnection>,
}

impl TenantRouter {
    pub fn new(url: &str) -> TenantRouter {
        TenantRouter {
            url: url.to_string(),
            rules: None,
            schema: None,
            keys: HashMap::new(),
            parents: HashMap::new(),
            routes: HashMap::new(),
            columns: HashMap::new(),
            known: Vec::new(),
            known_rows: 0,
            lookup: None,
        }
    }

    /// A chain starts or resumes from this snapshot schema.
    pub fn reset(&mut self, schema: &Schema) {
        self.schema = Some(schema.clone());
        self.routes.clear();
        self.derive();
    }

    /// Rows belong by `rules` (`None`: snapshots are not grouped, nothing is routed).
    pub fn set_rules(&mut self, rules: Option<&TenantRules>) {
        self.rules = rules.cloned();
        self.routes.clear();
        self.derive();
    }

    fn derive(&mut self) {
        self.keys.clear();
        self.parents.clear();
        let (Some(rules), Some(schema)) = (self.rules.clone(), self.schema.take()) else {
            return;
        };
        for table in &schema.tables {
            if let Some(key) = rules.key(&schema, table) {
                self.learn_key((table.schema.clone(), table.name.clone()), key);
            }
        }
        self.schema = Some(schema);
    }

    fn learn_key(&mut self, table: (String, String), key: TenantKey) {
        for hop in &key.hops {
            let columns = self
                .parents
                .entry((hop.schema.clone(), hop.table.clone()))
                .or_default();
            if !columns.contains(&hop.key) {
                columns.push(hop.key.clone());
            }
        }
        self.keys.insert(table, key);
    }

    /// Drop the lookup connection (after a failed step); it comes back on use.
    pub fn disconnect(&mut self) {
        self.lookup = None;
    }

    /// A Relation record: how its rows will be routed. `catalog`: the server's catalog when
    /// capture read it for this batch (a table created since the snapshot is looked up in it).
    pub fn relation(&mut self, relation: &RelationRecord, catalog: Option<&Schema>) {
        let table = (relation.schema.clone(), relation.name.clone());
        if !self.keys.contains_key(&table) {
            let created = catalog
                .zip(self.rules.as_ref())
                .and_then(|(catalog, rules)| {
                    let t = catalog.table(&relation.schema, &relation.name)?;
                    rules.key(catalog, t)
                });
            if let Some(key) = created {
                self.learn_key(table.clone(), key);
            }
        }
        let index = |name: &str| relation.columns.iter().position(|c| c == name);
        let decide = match self.keys.get(&table).cloned() {
            None => Decide::Global,
            Some(key) => match index(key.first_column()) {
                None => Decide::Missing,
                Some(i) if key.hops.is_empty() => Decide::Column(i),
                Some(i) => {
                    let hop = &key.hops[0];
                    let parent = self.parent_column(&hop.schema, &hop.table, &hop.key);
                    Decide::Link(i, key, parent)
                }
            },
        };
        let linked: Vec<String> = self.parents.get(&table).cloned().unwrap_or_default();
        let remember = linked
            .iter()
            .filter_map(|c| index(c).map(|i| (i, self.parent_column(&table.0, &table.1, c))))
            .collect();
        let route = Route {
            decide,
            key: relation.key.clone(),
            remember,
        };
        self.routes.insert(relation.id, std::sync::Arc::new(route));
    }

    /// Whose `record` is (only `I`, `U` and `D` records belong to a tenant).
    pub async fn tenant(&mut self, record: &Record) -> Result<Tenant> {
        let (rel, tuple, key_only) = match record {
            Record::Insert { rel, new } => (*rel, new, false),
            Record::Update { rel, new, .. } => (*rel, new, false),
            Record::Delete { rel, old, full } => (*rel, old, !*full),
            _ => return Ok(Tenant::None),
        };
        let Some(route) = self.routes.get(&rel).cloned() else {
            // pgoutput sends a Relation before a table's first change in every session.
            return Ok(Tenant::Unresolved);
        };
        let tenant = self.decide(&route, tuple, key_only).await?;
        if let Tenant::Of(_) | Tenant::None = &tenant {
            self.remember(&route, tuple, &tenant);
        }
        Ok(tenant)
    }

    async fn decide(&mut self, route: &Route, tuple: &Tuple, key_only: bool) -> Result<Tenant> {
        let (index, link) = match &route.decide {
            Decide::Global => return Ok(Tenant::None),
            Decide::Missing => return Ok(Tenant::Unresolved),
            Decide::Column(i) => (*i, None),
            Decide::Link(i, key, parent) => (*i, Some((key, *parent))),
        };
        if key_only && !route.key.contains(&index) {
            return Ok(Tenant::KeyOnly);
        }
        if tuple.unchanged.contains(&index) {
            return Ok(Tenant::Unresolved);
        }
        let Some(Some(value)) = tuple.values.get(index) else {
            return Ok(Tenant::None);
        };
        match link {
            None => Ok(Tenant::Of(value.clone())),
            Some((key, parent)) => self.follow(key, parent, value).await,
        }
    }

    /// The tenant of the first hop's row (in `parent`) whose key is `value`.
    async fn follow(
        &mut self,
        key: &TenantKey,
        parent: ParentColumn,
        value: &str,
    ) -> Result<Tenant> {
        if let Some(known) = self.known[parent].get(value) {
            return Ok(known.clone().map_or(Tenant::None, Tenant::Of));
        }
        let sql = key
            .link_tenant_sql(&literal(value))
            .expect("a link key has hops");
        let conn = self.lookup().await?;
        let found = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .fetch_optional(conn)
            .await
            .map_err(|e| pg_error("looking up a changed row's tenant", e))?;
        let Some(found) = found else {
            return Ok(Tenant::Unresolved);
        };
        let tenant: Option<String> = found
            .try_get(0)
            .map_err(|e| pg_error("reading a row's tenant", e))?;
        self.keep(parent, value, tenant.clone());
        Ok(tenant.map_or(Tenant::None, Tenant::Of))
    }

    fn remember(&mut self, route: &Route, tuple: &Tuple, tenant: &Tenant) {
        let tenant = match tenant {
            Tenant::Of(t) => Some(t.as_str()),
            _ => None,
        };
        for (i, parent) in &route.remember {
            if let Some(Some(value)) = tuple.values.get(*i) {
                // Most changes repeat what is known: no allocation then.
                let same = self.known[*parent]
                    .get(value.as_str())
                    .is_some_and(|t| t.as_deref() == tenant);
                if !same {
                    self.keep(*parent, value, tenant.map(str::to_string));
                }
            }
        }
    }

    fn keep(&mut self, parent: ParentColumn, value: &str, tenant: Option<String>) {
        if self.known_rows >= CACHE_ROWS {
            self.known.iter_mut().for_each(HashMap::clear);
            self.known_rows = 0;
        }
        if self.known[parent]
            .insert(value.to_string(), tenant)
            .is_none()
        {
            self.known_rows += 1;
        }
    }

    /// The index of the column `column` of `schema.table` that rows link to.
    fn parent_column(&mut self, schema: &str, table: &str, column: &str) -> ParentColumn {
        let id = (schema.to_string(), table.to_string(), column.to_string());
        if let Some(i) = self.columns.get(&id) {
            return *i;
        }
        self.known.push(HashMap::new());
        let i = self.known.len() - 1;
        self.columns.insert(id, i);
        i
    }

    async fn lookup(&mut self) -> Result<&mut PgConnection> {
        if self.lookup.is_none() {
            let mut conn = connect(&self.url).await?;
            // Literals below are quoted for standard strings.
            sqlx::raw_sql("SET standard_conforming_strings = on")
                .execute(&mut conn)
                .await
                .map_err(|e| pg_error("preparing the tenant lookup", e))?;
            self.lookup = Some(conn);
        }
        Ok(self.lookup.as_mut().expect("connected above"))
    }
}

/// `value` as an untyped SQL string literal (the server casts it to the key column's type, so
/// the key's index is used).
fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::postgres::schema::test_table as table;

    #[test]
    fn literals_double_their_quotes() {
        assert_eq!(literal("a'b"), "'a''b'");
        assert_eq!(literal("x\\y"), "'x\\y'");
    }

    fn relation(id: u32, name: &str, columns: &[&str], key: &[usize]) -> RelationRecord {
        RelationRecord {
            id,
            schema: "public".into(),
            name: name.into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            key: key.to_vec(),
        }
    }

    fn tuple(values: &[Option<&str>]) -> Tuple {
        Tuple {
            values: values.iter().map(|v| v.map(str::to_string)).collect(),
            unchanged: Vec::new(),
        }
    }

    /// A router over plans (global), contracts (tenant_id) and versions (contract_id ->
    /// contracts.id), its relations announced as pgoutput would.
    fn router() -> TenantRouter {
        let schema = Schema {
            tables: vec![
                table("plans", &["id", "name"], None),
                table("contracts", &["id", "tenant_id"], None),
                table(
                    "versions",
                    &["id", "contract_id"],
                    Some(("contract_id", "contracts")),
                ),
            ],
            ..Default::default()
        };
        let mut r = TenantRouter::new("postgres://unused");
        r.set_rules(Some(&TenantRules::default()));
        r.reset(&schema);
        r.relation(&relation(1, "plans", &["id", "name"], &[0]), None);
        r.relation(&relation(2, "contracts", &["id", "tenant_id"], &[0]), None);
        r.relation(&relation(3, "versions", &["id", "contract_id"], &[0]), None);
        r
    }

    #[tokio::test]
    async fn rows_go_to_the_tenant_their_column_or_their_parent_names() {
        let mut r = router();
        let insert = |rel, values: &[Option<&str>]| Record::Insert {
            rel,
            new: tuple(values),
        };
        assert_eq!(
            r.tenant(&insert(1, &[Some("1"), Some("basic")]))
                .await
                .unwrap(),
            Tenant::None,
            "a global table"
        );
        assert_eq!(
            r.tenant(&insert(2, &[Some("7"), Some("1001")]))
                .await
                .unwrap(),
            Tenant::Of("1001".into())
        );
        assert_eq!(
            r.tenant(&insert(2, &[Some("8"), None])).await.unwrap(),
            Tenant::None,
            "a row whose tenant is NULL"
        );
        // The child's parent was seen in the stream: no server is asked (there is none).
        assert_eq!(
            r.tenant(&insert(3, &[Some("70"), Some("7")]))
                .await
                .unwrap(),
            Tenant::Of("1001".into())
        );
        let update = Record::Update {
            rel: 2,
            old: None,
            new: tuple(&[Some("7"), Some("1002")]),
        };
        assert_eq!(r.tenant(&update).await.unwrap(), Tenant::Of("1002".into()));
        assert_eq!(
            r.tenant(&insert(3, &[Some("71"), Some("7")]))
                .await
                .unwrap(),
            Tenant::Of("1002".into()),
            "the parent's latest tenant"
        );
        // A delete by key carries the key only: it is not a tenant's row.
        let delete = Record::Delete {
            rel: 2,
            old: tuple(&[Some("7"), None]),
            full: false,
        };
        assert_eq!(r.tenant(&delete).await.unwrap(), Tenant::KeyOnly);
        let full = Record::Delete {
            rel: 2,
            old: tuple(&[Some("7"), Some("1002")]),
            full: true,
        };
        assert_eq!(r.tenant(&full).await.unwrap(), Tenant::Of("1002".into()));
        // A value the update did not send, and a relation never announced: not found.
        let mut toasted = tuple(&[Some("7"), None]);
        toasted.unchanged = vec![1];
        let update = Record::Update {
            rel: 2,
            old: None,
            new: toasted,
        };
        assert_eq!(r.tenant(&update).await.unwrap(), Tenant::Unresolved);
        assert_eq!(
            r.tenant(&insert(9, &[Some("1")])).await.unwrap(),
            Tenant::Unresolved
        );
        // Without rules nothing belongs to a tenant.
        r.set_rules(None);
        r.relation(&relation(2, "contracts", &["id", "tenant_id"], &[0]), None);
        assert_eq!(
            r.tenant(&insert(2, &[Some("9"), Some("1001")]))
                .await
                .unwrap(),
            Tenant::None
        );
    }
}
