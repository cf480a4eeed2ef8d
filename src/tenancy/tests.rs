use std::collections::BTreeMap;

use super::*;

fn table(name: &str, columns: &[&str]) -> TableSchema {
    TableSchema {
        name: name.into(),
        columns: columns
            .iter()
            .map(|c| ColumnSchema {
                name: c.to_string(),
                declared: "INTEGER".into(),
                kind: ValueKind::Integer,
            })
            .collect(),
        primary_key: vec![columns[0].to_string()],
        unique: Vec::new(),
    }
}

fn schema(tables: &[TableSchema]) -> Schema {
    let mut s = Schema::default();
    for t in tables {
        s.push(t.clone());
    }
    s
}

fn fixture_like() -> Schema {
    schema(&[
        table("plans", &["id", "code"]),
        table("tenants", &["tenant_id", "plan_id"]),
        table("contracts", &["id", "tenant_id"]),
        table("contract_versions", &["id", "contract_id"]),
        table("reviews", &["id", "version_id"]),
    ])
}

fn config(tables: &[(&str, &str)]) -> TenancyConfig {
    TenancyConfig {
        column: "tenant_id".into(),
        tables: tables
            .iter()
            .map(|(t, r)| (t.to_string(), parse_table_rule(r).unwrap()))
            .collect(),
        blobs: BTreeMap::new(),
        tenant_keys: false,
        keys: Default::default(),
    }
}

#[test]
fn rules_parse_and_print_back() {
    assert_eq!(parse_table_rule(" global ").unwrap(), TableRule::Global);
    let two = "version_id -> contract_versions.id, contract_id -> contracts.id";
    let rule = parse_table_rule(two).unwrap();
    assert_eq!(rule.to_string(), two);
    assert!(parse_table_rule("contract_id contracts.id").is_err());
    assert!(parse_table_rule("contract_id -> contracts").is_err());
    assert!(parse_table_rule("contract id -> contracts.id").is_err());
    assert_eq!(
        parse_blob_rule("prefix:tenants/{tenant}/").unwrap(),
        BlobRule::Prefix("tenants/{tenant}/".into())
    );
    assert!(parse_blob_rule("prefix:tenants/{tenant}").is_err());
    assert!(parse_blob_rule("prefix:tenants/").is_err());
    assert_eq!(
        parse_blob_rule("table:attachments.blob_key").unwrap(),
        BlobRule::Table {
            table: "attachments".into(),
            column: "blob_key".into()
        }
    );
    assert!(parse_blob_rule("attachments.blob_key").is_err());
}

#[test]
fn paths_flatten_through_mapped_tables() {
    let c = config(&[
        ("plans", "global"),
        ("contract_versions", "contract_id -> contracts.id"),
        ("reviews", "version_id -> contract_versions.id"),
    ]);
    let r = resolve(&c, &fixture_like(), "app").unwrap();
    assert_eq!(r.membership("plans"), Some(&Membership::Global));
    assert_eq!(r.membership("contracts"), Some(&Membership::Direct));
    let Some(Membership::Path(hops)) = r.membership("reviews") else {
        panic!("reviews is a path")
    };
    assert_eq!(hops.len(), 2);
    assert_eq!(hops[1].table, "contracts");
}

#[test]
fn unmapped_and_broken_paths_are_named() {
    let c = config(&[("plans", "global")]);
    let err = resolve(&c, &fixture_like(), "app").unwrap_err();
    assert!(err.to_string().contains("contract_versions"), "{err}");
    assert!(err.to_string().contains("reviews"), "{err}");

    let c = config(&[
        ("plans", "global"),
        ("contract_versions", "contract_id -> contracts.nope"),
        ("reviews", "version_id -> contract_versions.id"),
    ]);
    let err = resolve(&c, &fixture_like(), "app").unwrap_err();
    assert!(err.to_string().contains("no column nope"), "{err}");

    let c = config(&[
        ("plans", "global"),
        ("contract_versions", "contract_id -> plans.id"),
        ("reviews", "version_id -> contract_versions.id"),
    ]);
    let err = resolve(&c, &fixture_like(), "app").unwrap_err();
    assert!(err.to_string().contains("global"), "{err}");

    let c = config(&[
        ("plans", "global"),
        ("contract_versions", "id -> reviews.id"),
        ("reviews", "version_id -> contract_versions.id"),
    ]);
    let err = resolve(&c, &fixture_like(), "app").unwrap_err();
    assert!(err.to_string().contains("loops"), "{err}");

    let c = config(&[("plans", "global"), ("ghosts", "global")]);
    let err = resolve(&c, &fixture_like(), "app").unwrap_err();
    assert!(err.to_string().contains("ghosts"), "{err}");
}

#[test]
fn a_hop_must_end_on_a_key_of_its_table() {
    let mut s = fixture_like();
    s.tables
        .get_mut("contracts")
        .unwrap()
        .columns
        .push(ColumnSchema {
            name: "number".into(),
            declared: "TEXT".into(),
            kind: ValueKind::Text,
        });
    let c = |rule: &str| {
        config(&[
            ("plans", "global"),
            ("contract_versions", rule),
            ("reviews", "version_id -> contract_versions.id"),
        ])
    };
    let err = resolve(&c("contract_id -> contracts.number"), &s, "app").unwrap_err();
    let text = err.to_string();
    assert!(text.contains("contract_versions"), "{text}");
    assert!(text.contains("`contract_id -> contracts.number`"), "{text}");
    assert!(
        text.contains("neither the primary key nor a unique column"),
        "{text}"
    );
    let hint = err.hint().unwrap();
    assert!(hint.contains("contracts.id (its primary key)"), "{hint}");
    assert!(
        hint.contains("UNIQUE constraint on contracts(number)"),
        "{hint}"
    );
    // A unique column is a key; so is a composite key only as a whole.
    s.tables.get_mut("contracts").unwrap().unique = vec![vec!["number".into()]];
    resolve(&c("contract_id -> contracts.number"), &s, "app").unwrap();
    let contracts = s.tables.get_mut("contracts").unwrap();
    contracts.unique = vec![vec!["number".into(), "tenant_id".into()]];
    contracts.primary_key = vec!["id".into(), "tenant_id".into()];
    let err = resolve(&c("contract_id -> contracts.id"), &s, "app").unwrap_err();
    assert!(err.hint().unwrap().contains("unique on its own"), "{err:?}");
}

#[test]
fn resolving_tables_alone_ignores_entries_for_tables_the_schema_lacks() {
    let c = config(&[
        ("plans", "global"),
        ("contract_versions", "contract_id -> contracts.id"),
        ("reviews", "version_id -> contract_versions.id"),
        ("added_later", "global"),
    ]);
    assert!(resolve(&c, &fixture_like(), "app").is_err());
    let r = resolve_tables(&c, &fixture_like(), "app").unwrap();
    assert_eq!(r.tables.len(), 5);
}

#[test]
fn sql_binds_the_tenant_and_nests_paths() {
    let c = config(&[
        ("plans", "global"),
        ("contract_versions", "contract_id -> contracts.id"),
        ("reviews", "version_id -> contract_versions.id"),
    ]);
    let s = fixture_like();
    let r = resolve(&c, &s, "app").unwrap();
    let sql = rows_sql(
        &s.tables["reviews"],
        r.membership("reviews").unwrap(),
        "tenant_id",
        Dialect::Sqlite,
    )
    .unwrap();
    assert_eq!(
        sql,
        "SELECT t0.\"id\", t0.\"version_id\" FROM \"reviews\" AS t0 WHERE t0.\"version_id\" IN \
         (SELECT t1.\"id\" FROM \"contract_versions\" AS t1 WHERE t1.\"contract_id\" IN \
         (SELECT t2.\"id\" FROM \"contracts\" AS t2 WHERE t2.\"tenant_id\" = ?)) ORDER BY t0.\"id\""
    );
    assert!(rows_sql(
        &s.tables["plans"],
        &Membership::Global,
        "tenant_id",
        Dialect::Sqlite
    )
    .is_none());
    let pg = rows_sql(
        &s.tables["contracts"],
        r.membership("contracts").unwrap(),
        "tenant_id",
        Dialect::Postgres,
    )
    .unwrap();
    assert!(pg.contains("WHERE t0.\"tenant_id\"::text = $1"), "{pg}");
}

#[test]
fn sqlite_kinds_follow_affinity_and_checks() {
    let sql =
        r#"CREATE TABLE t ("a" INTEGER CHECK ("a" IN (0, 1)), "j" TEXT CHECK (json_valid("j")))"#;
    assert_eq!(schema::sqlite_kind("INTEGER", "a", sql), ValueKind::Boolean);
    assert_eq!(schema::sqlite_kind("INTEGER", "b", sql), ValueKind::Integer);
    assert_eq!(schema::sqlite_kind("TEXT", "j", sql), ValueKind::Json);
    assert_eq!(schema::sqlite_kind("NUMERIC", "m", sql), ValueKind::Numeric);
    assert_eq!(schema::sqlite_kind("BLOB", "x", sql), ValueKind::Bytes);
    assert_eq!(schema::sqlite_kind("", "x", sql), ValueKind::Bytes);
    assert_eq!(schema::sqlite_kind("DOUBLE", "x", sql), ValueKind::Real);
}

#[test]
fn tenant_ids_that_could_escape_a_prefix_are_refused() {
    assert!(check_tenant_id("1001").is_ok());
    for bad in ["", "../1", "a/b", "..", " 1"] {
        assert!(check_tenant_id(bad).is_err(), "{bad:?}");
    }
}

#[tokio::test]
async fn the_embedded_config_maps_every_table_of_the_fixture() {
    let origin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schedules/embedded.toml");
    let config = crate::config::Config::parse(crate::config::EMBEDDED_TOML, &origin).unwrap();
    let tenancy = config.tenancy.expect("[tenancy] in the embedded config");
    assert_eq!(
        tenancy.blobs["files"],
        BlobRule::Prefix("tenants/{tenant}/".into())
    );
    // A copy: opening the committed fixture in place would leave -wal/-shm files in the tree.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/app.db"),
        &db,
    )
    .unwrap();
    let mut conn = schema::open_sqlite(&db).await.unwrap();
    let schema = schema::read_sqlite(&mut conn).await.unwrap();
    let resolved = resolve(&tenancy, &schema, "app").unwrap();
    assert_eq!(resolved.tables.len(), 9);
    assert_eq!(resolved.membership("plans"), Some(&Membership::Global));
    assert!(matches!(
        resolved.membership("contract_versions"),
        Some(Membership::Path(_))
    ));
    assert_eq!(resolved.membership("tenants"), Some(&Membership::Direct));
}

#[test]
fn config_errors_name_the_line_and_the_key() {
    let base =
        "[repository]\nkey_file = \"k\"\n[[replicas]]\nname = \"a\"\nregion = \"r\"\nurl = \"x\"\n";
    let origin = std::path::Path::new("/etc/timevault.toml");
    let parse = |extra: &str| {
        crate::config::Config::parse(&format!("{base}{extra}"), origin)
            .unwrap_err()
            .to_string()
    };
    let err = parse(
        "[tenancy]\ncolumn = \"tenant_id\"\n[tenancy.tables]\nv = \"contract_id contracts.id\"\n",
    );
    assert!(err.contains("timevault.toml:10"), "{err}");
    assert!(err.contains("tenancy.tables.v"), "{err}");
    let err = parse("[tenancy]\n[tenancy.tables]\nplans = \"global\"\n");
    assert!(err.contains("no column"), "{err}");
    let err = parse(
        "[tenancy]\ncolumn = \"tenant_id\"\n[tenancy.blobs]\nfiles = \"prefix:t/{tenant}/\"\n",
    );
    assert!(err.contains("no blobs source named `files`"), "{err}");
    let err = parse("[tenancy]\ncolumn = \"tenant_id\"\nextra = 1\n");
    assert!(err.contains("extra"), "{err}");
}
