//! Replaying the change log onto a restored PostgreSQL database: transactions in commit
//! order, from the first the snapshot did not see to the last committed at or before the
//! instant.
//!
//! The restored database is private until the restore ends (a failed restore drops it), so
//! its intermediate states need not be the source's: many source transactions are applied in
//! one target transaction ([`GROUP_CHANGES`] row changes), and row changes are held back and
//! sent many rows a statement ([`super::batch`] says when that is exact). What a
//! restore reports (last commit, LSN, xid) is still per source transaction.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use sqlx::postgres::PgConnection;

use super::batch::{Batch, Kind, Pending, Row};
use super::ddl::{identity_always, plan_schema_change, record_schema_change};
use super::tenant::{RowFilter, TenantOptions};
use super::{db_error, execute_all, Outcome};
use crate::error::{Error, ErrorKind, Result};
use crate::pg_connection::quote_ident;
use crate::stored::postgres::changes::{Record, RelationRecord, Tuple};
use crate::stored::postgres::ddl::SchemaChange;
use crate::stored::postgres::schema::{Column, Schema, Table};
use crate::stored::postgres::{Lsn, PgSnapshot};

/// Row changes applied in one target transaction before it commits.
const GROUP_CHANGES: u64 = 100_000;

/// The transaction being replayed.
struct Txn {
    xid: u32,
    commit_us: i64,
    /// Already in the snapshot (or already applied): read past it.
    skip: bool,
    changes: u64,
}

/// How a relation's rows are written: resolved once per relation id.
#[derive(Clone)]
struct Statements {
    table: String,
    columns: Vec<String>,
    types: Vec<String>,
    /// Indexes (into `columns`) that identify a row; `None`: the whole old row does.
    key: Option<Vec<usize>>,
    /// Whether the key has a unique index (ON CONFLICT target).
    upsert: bool,
    /// GENERATED ALWAYS identity columns (UPDATE may not assign them).
    always: Vec<bool>,
    /// `--tenant`: which rows of this relation belong to the tenant.
    filter: Option<RowFilter>,
}

/// Columns a restore adds for rows written in a shape older than its schema image (`text`,
/// dropped again after replay): `(schema, table, column)`.
pub(super) type TempColumns = BTreeSet<(String, String, String)>;

pub(super) struct Replay<'a> {
    conn: &'a mut PgConnection,
    /// The visibility of the schema image the restore applied (`None`: the snapshot's own):
    /// the transactions it sees are already in its definitions (their `S` records are not
    /// applied, changes to tables it no longer has are dropped, columns it no longer has are
    /// kept as temporary columns).
    image: Option<PgSnapshot>,
    temporary: TempColumns,
    /// The definitions as replayed so far (`S` records change them).
    schema: Schema,
    /// Tables an `S` record created or changed.
    changed: BTreeSet<(String, String)>,
    /// `--tenant`: only this tenant's rows.
    tenant: Option<TenantOptions>,
    visibility: PgSnapshot,
    until_us: i64,
    relations: HashMap<u32, RelationRecord>,
    /// Shared, not cloned: every row change looks its relation's statements up.
    statements: HashMap<u32, Arc<Statements>>,
    pending: Pending,
    txn: Option<Txn>,
    /// A target transaction is open, with this many row changes applied in it.
    group: Option<u64>,
    last_commit: Lsn,
    pub outcome: Outcome,
    /// The first transaction after the instant was reached.
    pub done: bool,
}

impl<'a> Replay<'a> {
    /// A replay onto `conn` of the transactions `visibility` did not see, up to `until_us`.
    pub fn new(
        conn: &'a mut PgConnection,
        schema: Schema,
        tenant: Option<TenantOptions>,
        visibility: PgSnapshot,
        until_us: i64,
        outcome: Outcome,
    ) -> Replay<'a> {
        Replay {
            conn,
            image: None,
            temporary: TempColumns::new(),
            schema,
            changed: BTreeSet::new(),
            tenant,
            visibility,
            until_us,
            relations: HashMap::new(),
            statements: HashMap::new(),
            pending: Pending::default(),
            txn: None,
            group: None,
            last_commit: Lsn(0),
            outcome,
            done: false,
        }
    }

    /// The restore applied a schema image whose snapshot is `image` (`None`: the snapshot's
    /// own), and added `temporary` columns for the snapshot's rows.
    pub fn with_image(mut self, image: Option<PgSnapshot>, temporary: TempColumns) -> Self {
        self.image = image;
        self.temporary = temporary;
        self
    }

    /// Whether the schema image already has the current transaction's effects (decided by
    /// xid, as at the snapshot handoff, never by time).
    fn before_image(&self) -> bool {
        match (&self.image, &self.txn) {
            (Some(image), Some(t)) => image.sees(t.xid),
            _ => false,
        }
    }

    /// Whether the change log read so far ends inside a transaction.
    pub fn inside_transaction(&self) -> bool {
        self.txn.is_some()
    }

    /// Send what is held back and commit; returns the outcome, the schema as replayed and
    /// the tables schema changes touched.
    pub async fn finish(mut self) -> Result<Replayed> {
        self.commit_group().await?;
        Ok(Replayed {
            outcome: self.outcome,
            schema: self.schema,
            changed: self.changed,
            temporary: self.temporary,
        })
    }

    /// Send every held-back change and commit the target transaction, if one is open.
    async fn commit_group(&mut self) -> Result<()> {
        self.flush_all().await?;
        if self.group.take().is_some() {
            self.sql("COMMIT").await?;
        }
        Ok(())
    }

    pub async fn apply(&mut self, record: Record) -> Result<()> {
        match record {
            Record::Relation(r) => {
                // Rows held back were decoded under the relation's previous columns.
                self.flush_relation(r.id).await?;
                self.statements.remove(&r.id);
                self.relations.insert(r.id, r);
            }
            Record::Begin {
                xid,
                final_lsn,
                commit_us,
            } => {
                let seen = self.visibility.sees(xid);
                let replayed = final_lsn <= self.last_commit;
                if !seen && commit_us > self.until_us {
                    self.done = true;
                    return Ok(());
                }
                let skip = seen || replayed;
                if !skip && self.group.is_none() {
                    self.sql("BEGIN").await?;
                    self.group = Some(0);
                }
                self.txn = Some(Txn {
                    xid,
                    commit_us,
                    skip,
                    changes: 0,
                });
            }
            Record::Commit {
                commit_lsn,
                end_lsn,
                commit_us,
            } => {
                let Some(txn) = self.txn.take() else {
                    return Err(Error::corrupt("a commit without its begin"));
                };
                if !txn.skip {
                    let in_group = self.group.get_or_insert(0);
                    *in_group += txn.changes;
                    if *in_group >= GROUP_CHANGES {
                        self.commit_group().await?;
                    }
                    if txn.changes > 0 {
                        self.outcome.transactions += 1;
                        self.outcome.changes += txn.changes;
                    }
                    self.outcome.last_commit_us = Some(commit_us.max(txn.commit_us));
                    self.outcome.lsn = end_lsn.to_string();
                    self.outcome.xid = Some(txn.xid);
                }
                self.last_commit = self.last_commit.max(commit_lsn);
            }
            Record::Message { .. } => {}
            Record::Schema(change) => {
                if self.txn.as_ref().is_some_and(|t| !t.skip) && !self.before_image() {
                    self.schema_change(*change).await?;
                }
            }
            change => {
                let Some(txn) = self.txn.as_ref() else {
                    return Err(Error::corrupt("a change outside a transaction"));
                };
                if txn.skip {
                    return Ok(());
                }
                let change = match change {
                    Record::Truncate {
                        rels,
                        cascade,
                        restart_identity,
                    } => Record::Truncate {
                        rels: rels
                            .into_iter()
                            .filter(|r| !self.dropped_before_image(*r))
                            .collect(),
                        cascade,
                        restart_identity,
                    },
                    Record::Insert { rel, .. }
                    | Record::Update { rel, .. }
                    | Record::Delete { rel, .. }
                        if self.dropped_before_image(rel) =>
                    {
                        return Ok(());
                    }
                    other => other,
                };
                let txn = self.txn.as_mut().expect("checked above");
                txn.changes += 1;
                self.change(change).await?;
            }
        }
        Ok(())
    }

    /// Create or alter a table as an `S` record says, inside the replayed transaction.
    async fn schema_change(&mut self, change: SchemaChange) -> Result<()> {
        self.flush_all().await?;
        let plan = plan_schema_change(&self.schema, &change);
        if plan.statements.is_empty() && plan.best_effort.is_empty() {
            // The schema image already has this definition.
            return Ok(());
        }
        let t = &change.table;
        self.temporary
            .retain(|(s, n, _)| (s, n) != (&t.schema, &t.name));
        execute_all(self.conn, &plan.statements, "replaying a schema change").await?;
        let identity = identity_always([&change.table], false);
        execute_all(self.conn, &identity, "replaying a schema change").await?;
        for sql in &plan.best_effort {
            self.sql("SAVEPOINT timevault_ddl").await?;
            match sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                .execute(&mut *self.conn)
                .await
            {
                Ok(_) => self.sql("RELEASE SAVEPOINT timevault_ddl").await?,
                Err(e) => {
                    tracing::warn!(%sql, error = %e, "left out during replay");
                    self.sql("ROLLBACK TO SAVEPOINT timevault_ddl").await?;
                }
            }
        }
        let t = &change.table;
        self.changed.insert((t.schema.clone(), t.name.clone()));
        record_schema_change(&mut self.schema, change);
        self.statements.clear();
        Ok(())
    }

    async fn sql(&mut self, sql: &'static str) -> Result<()> {
        sqlx::query(sql)
            .execute(&mut *self.conn)
            .await
            .map_err(|e| db_error(sql, e))?;
        Ok(())
    }

    /// Whether a change to `rel` is dropped: the table is gone from the schema image, and the
    /// change was committed before the image was taken.
    fn dropped_before_image(&self, rel: u32) -> bool {
        self.before_image()
            && self
                .relations
                .get(&rel)
                .is_some_and(|r| self.schema.table(&r.schema, &r.name).is_none())
    }

    /// Before the image, a relation may carry columns the image's table no longer has: they
    /// are added as temporary `text` columns (dropped after replay), so the rows still apply.
    async fn add_missing_columns(&mut self, rel: u32) -> Result<()> {
        let Some(relation) = self.relations.get(&rel) else {
            return Ok(());
        };
        let Some(table) = self.schema.table(&relation.schema, &relation.name) else {
            return Ok(());
        };
        let missing: Vec<String> = relation
            .columns
            .iter()
            .filter(|c| table.column(c).is_none())
            .cloned()
            .collect();
        if missing.is_empty() || !self.before_image() {
            return Ok(());
        }
        let (schema, name) = (relation.schema.clone(), relation.name.clone());
        let statements = add_temporary(
            &mut self.schema,
            &mut self.temporary,
            &schema,
            &name,
            &missing,
        );
        execute_all(self.conn, &statements, "adding a temporary column").await
    }

    async fn statements(&mut self, rel: u32) -> Result<Arc<Statements>> {
        if let Some(s) = self.statements.get(&rel) {
            return Ok(s.clone());
        }
        self.add_missing_columns(rel).await?;
        let relation = self
            .relations
            .get(&rel)
            .ok_or_else(|| Error::corrupt(format!("a change to unknown relation {rel}")))?;
        let table = self
            .schema
            .table(&relation.schema, &relation.name)
            .ok_or_else(|| new_table_error(relation))?;
        let mut s = resolve(table, relation)?;
        if let Some(t) = &self.tenant {
            s.filter = t.row_filter(&self.schema, table, &relation.columns)?;
        }
        let s = Arc::new(s);
        self.statements.insert(rel, s.clone());
        Ok(s)
    }

    async fn change(&mut self, record: Record) -> Result<()> {
        match record {
            Record::Insert { rel, new } => {
                let s = self.statements(rel).await?;
                let key = s.key.as_deref().filter(|_| s.upsert);
                self.hold(rel, Kind::Rows, new.values, key).await?;
            }
            Record::Delete { rel, old, .. } => {
                let s = self.statements(rel).await?;
                if s.key.is_none() {
                    self.flush_relation(rel).await?;
                    return self.delete_row(&s, &old.values).await;
                }
                self.hold(rel, Kind::Deletes, old.values, None).await?;
            }
            Record::Update { rel, old, new } => {
                let s = self.statements(rel).await?;
                match self.as_upsert(&s, old.as_ref(), &new) {
                    Some(key) => self.hold(rel, Kind::Rows, new.values, Some(&key)).await?,
                    None => {
                        self.flush_relation(rel).await?;
                        self.update_row(&s, old.as_ref(), &new).await?;
                    }
                }
            }
            Record::Truncate { rels, .. } => {
                self.flush_all().await?;
                let mut names = Vec::new();
                for rel in rels {
                    names.push(format!("ONLY {}", self.statements(rel).await?.table));
                }
                if !names.is_empty() {
                    let sql = format!("TRUNCATE {}", names.join(", "));
                    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                        .execute(&mut *self.conn)
                        .await
                        .map_err(|e| db_error("replaying a truncate", e))?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The key columns under which an update may be held back as an upsert of its new row:
    /// the row is whole (no unchanged TOAST value), the table has a unique key the update
    /// keeps, no other column is a GENERATED ALWAYS identity (an upsert would assign it),
    /// and no tenant filter is in play (a row leaving the tenant must be deleted instead).
    fn as_upsert(&self, s: &Statements, old: Option<&Tuple>, new: &Tuple) -> Option<Vec<usize>> {
        let key = s
            .key
            .as_ref()
            .filter(|_| s.upsert && self.tenant.is_none())?;
        if !new.unchanged.is_empty() || new.values.len() != s.columns.len() {
            return None;
        }
        if (0..s.columns.len()).any(|i| s.always[i] && !key.contains(&i)) {
            return None;
        }
        let kept = old.is_none_or(|o| key.iter().all(|&i| o.values.get(i) == new.values.get(i)));
        kept.then(|| key.clone())
    }

    /// Hold a row back in `rel`'s batch of `kind`, sending first what must precede it, and
    /// sending the batch (or everything) when it is full.
    async fn hold(&mut self, rel: u32, kind: Kind, row: Row, key: Option<&[usize]>) -> Result<()> {
        if let Some((kind, batch)) = self.pending.take_unlike(rel, kind) {
            self.send(rel, kind, batch).await?;
        }
        // A tenant filter may look at other tables' rows: keep the order across tables.
        if self.tenant.is_some() {
            for (other, kind, batch) in self.pending.take_others(rel) {
                self.send(other, kind, batch).await?;
            }
        }
        if self.pending.push(rel, kind, row, key) {
            self.flush_relation(rel).await?;
        }
        if self.pending.over_budget() {
            self.flush_all().await?;
        }
        Ok(())
    }

    async fn flush_relation(&mut self, rel: u32) -> Result<()> {
        match self.pending.take(rel) {
            Some((kind, batch)) => self.send(rel, kind, batch).await,
            None => Ok(()),
        }
    }

    async fn flush_all(&mut self) -> Result<()> {
        for (rel, kind, batch) in self.pending.take_all() {
            self.send(rel, kind, batch).await?;
        }
        Ok(())
    }

    async fn send(&mut self, rel: u32, kind: Kind, batch: Batch) -> Result<()> {
        let s = self.statements(rel).await?;
        match kind {
            Kind::Rows => self.insert_rows(&s, batch.rows).await,
            Kind::Deletes => self.delete_rows(&s, batch.rows).await,
        }
    }

    /// `INSERT ... SELECT FROM unnest(text arrays)`, as an upsert when the key is unique.
    async fn insert_rows(&mut self, s: &Statements, rows: Vec<Row>) -> Result<()> {
        let n = s.columns.len();
        let names: Vec<String> = s.columns.iter().map(|c| quote_ident(c)).collect();
        let args: Vec<String> = (1..=n).map(|i| format!("${i}::text[]")).collect();
        let casts: Vec<String> = (0..n).map(|i| format!("u.c{i}::{}", s.types[i])).collect();
        let aliases: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
        let mut sql = format!(
            "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM unnest({}) AS u({})",
            s.table,
            names.join(", "),
            casts.join(", "),
            args.join(", "),
            aliases.join(", ")
        );
        if let Some(f) = &s.filter {
            let cast = &s.types[f.index];
            sql.push_str(&format!(
                " WHERE {}",
                f.insert_condition(cast, &format!("${}", n + 1))
            ));
        }
        if let (true, Some(key)) = (s.upsert, &s.key) {
            let target: Vec<&str> = key.iter().map(|&i| names[i].as_str()).collect();
            let set: Vec<String> = (0..n)
                .filter(|i| !key.contains(i) && !s.always[*i])
                .map(|i| format!("{0} = EXCLUDED.{0}", names[i]))
                .collect();
            if set.is_empty() {
                sql.push_str(&format!(" ON CONFLICT ({}) DO NOTHING", target.join(", ")));
            } else {
                sql.push_str(&format!(
                    " ON CONFLICT ({}) DO UPDATE SET {}",
                    target.join(", "),
                    set.join(", ")
                ));
            }
        }
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for i in 0..n {
            query = query.bind(column(&rows, i));
        }
        if s.filter.is_some() {
            let tenant = self.tenant.as_ref().map(|t| t.tenant.clone());
            query = query.bind(tenant);
        }
        query
            .execute(&mut *self.conn)
            .await
            .map_err(|e| db_error(&format!("replaying inserts into {}", s.table), e))?;
        Ok(())
    }

    /// Batched deletes by key.
    async fn delete_rows(&mut self, s: &Statements, rows: Vec<Row>) -> Result<()> {
        let key = s.key.as_ref().expect("batched deletes have a key");
        let names: Vec<String> = key.iter().map(|&i| quote_ident(&s.columns[i])).collect();
        let args: Vec<String> = (1..=key.len()).map(|i| format!("${i}::text[]")).collect();
        let casts: Vec<String> = key
            .iter()
            .enumerate()
            .map(|(j, &i)| format!("u.k{j}::{}", s.types[i]))
            .collect();
        let aliases: Vec<String> = (0..key.len()).map(|j| format!("k{j}")).collect();
        let sql = format!(
            "DELETE FROM ONLY {} WHERE ({}) IN (SELECT {} FROM unnest({}) AS u({}))",
            s.table,
            names.join(", "),
            casts.join(", "),
            args.join(", "),
            aliases.join(", ")
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for &i in key {
            query = query.bind(column(&rows, i));
        }
        query
            .execute(&mut *self.conn)
            .await
            .map_err(|e| db_error(&format!("replaying deletes from {}", s.table), e))?;
        Ok(())
    }

    /// `WHERE` matching one row: by key, or (no key) the first row equal to the old row.
    fn row_match(s: &Statements, first_param: usize) -> (String, Vec<usize>) {
        match &s.key {
            Some(key) => {
                let terms: Vec<String> = key
                    .iter()
                    .enumerate()
                    .map(|(j, &i)| assign(s, i, first_param + j))
                    .collect();
                (terms.join(" AND "), key.clone())
            }
            None => {
                let all: Vec<usize> = (0..s.columns.len()).collect();
                let terms: Vec<String> = all
                    .iter()
                    .map(|&i| {
                        format!(
                            "{} IS NOT DISTINCT FROM ${}::{}",
                            quote_ident(&s.columns[i]),
                            first_param + i,
                            s.types[i]
                        )
                    })
                    .collect();
                (
                    format!(
                        "ctid = (SELECT ctid FROM ONLY {} WHERE {} LIMIT 1)",
                        s.table,
                        terms.join(" AND ")
                    ),
                    all,
                )
            }
        }
    }

    async fn delete_row(&mut self, s: &Statements, old: &[Option<String>]) -> Result<()> {
        let (filter, params) = Self::row_match(s, 1);
        let sql = format!("DELETE FROM ONLY {} WHERE {filter}", s.table);
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for i in params {
            query = query.bind(old.get(i).cloned().flatten());
        }
        query
            .execute(&mut *self.conn)
            .await
            .map_err(|e| db_error(&format!("replaying a delete from {}", s.table), e))?;
        Ok(())
    }

    /// Update one row; unchanged TOAST values are left as they are. A row that is missing (the
    /// safety net for idempotent replay) is inserted when the update carries every value.
    async fn update_row(&mut self, s: &Statements, old: Option<&Tuple>, new: &Tuple) -> Result<()> {
        // Columns to assign: not unchanged TOAST values, and not the key or an ALWAYS identity
        // column when the update did not change it.
        let same = |i: usize| match old {
            None => s.key.as_ref().is_some_and(|k| k.contains(&i)),
            Some(o) => o.values.get(i) == new.values.get(i),
        };
        let changed: Vec<usize> = (0..s.columns.len())
            .filter(|&i| !new.unchanged.contains(&i))
            .filter(|&i| !(same(i) && (s.always[i] || old.is_none())))
            .collect();
        if changed.is_empty() {
            return Ok(());
        }
        // `--tenant`: a row that moved to another tenant is gone from this one.
        if let (Some(f), Some(t)) = (&s.filter, &self.tenant) {
            if !new.unchanged.contains(&f.index) && f.leaves_tenant(&new.values, &t.tenant) {
                let identity = old.unwrap_or(new).values.clone();
                return self.delete_row(s, &identity).await;
            }
        }
        let set: Vec<String> = changed
            .iter()
            .enumerate()
            .map(|(j, &i)| assign(s, i, j + 1))
            .collect();
        let (filter, params) = Self::row_match(s, changed.len() + 1);
        let sql = format!(
            "UPDATE ONLY {} SET {} WHERE {filter}",
            s.table,
            set.join(", ")
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for &i in &changed {
            query = query.bind(new.values.get(i).cloned().flatten());
        }
        let identity = old.unwrap_or(new);
        for i in params {
            query = query.bind(identity.values.get(i).cloned().flatten());
        }
        let result = query
            .execute(&mut *self.conn)
            .await
            .map_err(|e| db_error(&format!("replaying an update of {}", s.table), e))?;
        if result.rows_affected() == 0 && new.unchanged.is_empty() && s.key.is_some() {
            self.insert_rows(s, vec![new.values.clone()]).await?;
        }
        Ok(())
    }
}

/// `"column" = $param::type` for column `i` (a key term or an assignment).
fn assign(s: &Statements, i: usize, param: usize) -> String {
    format!("{} = ${param}::{}", quote_ident(&s.columns[i]), s.types[i])
}

/// Column `i` of `rows`, for binding as a `text[]` that `unnest` turns back into rows.
fn column(rows: &[Row], i: usize) -> Vec<Option<String>> {
    rows.iter().map(|r| r.get(i).cloned().flatten()).collect()
}

fn new_table_error(relation: &RelationRecord) -> Error {
    Error::new(
        ErrorKind::Other,
        format!(
            "table {}.{} changed after the snapshot was taken and the change log has no definition for it",
            relation.schema, relation.name
        ),
    )
    .with_hint("segments written before timevault recorded schema changes (postgres-changes/1) cannot replay it; restore to an instant after the next snapshot")
}

/// What a replay leaves: its outcome, the definitions as replayed, the tables `S` records
/// changed, and the temporary columns still to drop.
pub(super) struct Replayed {
    pub outcome: Outcome,
    pub schema: Schema,
    pub changed: BTreeSet<(String, String)>,
    pub temporary: TempColumns,
}

/// Add `columns` to `schema.name` as temporary `text` columns, in the model and as statements.
pub(super) fn add_temporary(
    model: &mut Schema,
    temporary: &mut TempColumns,
    schema: &str,
    name: &str,
    columns: &[String],
) -> Vec<String> {
    let Some(table) = model
        .tables
        .iter_mut()
        .find(|t| t.schema == schema && t.name == name)
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for column in columns {
        if table.column(column).is_some() {
            continue;
        }
        table.columns.push(Column {
            name: column.clone(),
            type_sql: "text".into(),
            ..Default::default()
        });
        temporary.insert((schema.to_string(), name.to_string(), column.clone()));
        out.push(format!(
            "ALTER TABLE {} ADD COLUMN {} text",
            table.qualified(),
            quote_ident(column)
        ));
    }
    out
}

/// Map a relation of the change stream onto the snapshot's table.
fn resolve(table: &Table, relation: &RelationRecord) -> Result<Statements> {
    let mut types = Vec::with_capacity(relation.columns.len());
    let mut always = Vec::with_capacity(relation.columns.len());
    for name in &relation.columns {
        let column = table
            .column(name)
            .ok_or_else(|| new_table_error(relation))?;
        types.push(column.type_sql.clone());
        always.push(column.identity.as_deref() == Some("a"));
    }
    let index_of = |names: &[String]| -> Option<Vec<usize>> {
        names
            .iter()
            .map(|n| relation.columns.iter().position(|c| c == n))
            .collect()
    };
    let table_key = table.key_columns().and_then(|k| index_of(&k));
    let full = relation.key.len() == relation.columns.len();
    let key = match (&table_key, full) {
        (Some(k), true) => Some(k.clone()),
        (Some(k), false) if *k == relation.key => Some(k.clone()),
        _ if !relation.key.is_empty() && !full => Some(relation.key.clone()),
        _ => table_key.clone(),
    };
    Ok(Statements {
        table: table.qualified(),
        columns: relation.columns.clone(),
        types,
        upsert: table_key.is_some() && key == table_key,
        key,
        always,
        filter: None,
    })
}
