//! Applying a schema image with pg_restore: `--section=pre-data` before the rows (schemas,
//! extensions, types, functions, tables, sequences, views), `--section=post-data` after
//! replay (indexes, constraints, foreign keys, triggers, rules, policies), so the load and
//! the replay run without triggers, foreign keys or secondary indexes.
//!
//! The image is read from its chunks into a private temporary file (pg_restore needs a
//! seekable archive for a table of contents and for `-j`), and restored from a list
//! (`pg_restore -l`, then `-L`) that leaves out what the restore builds itself (each table's
//! key, built as soon as its rows are in) and the source's own timevault publication.
//! Ownership and grants are not restored (`--no-owner --no-privileges`): the restoring role
//! owns every object, as after `pg_restore --no-owner`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

use super::replay::{add_temporary, TempColumns};
use super::schema_sql::EarlyKey;
use crate::changelog::SegmentManifest;
use crate::error::{Error, ErrorKind, Result};
use crate::pg_connection::quote_ident;
use crate::repo::Repository;
use crate::source::postgres::image::read_bounded;
use crate::source::postgres::tools::{Libpq, PgTools};
use crate::stored::postgres::image::{RelationName, SchemaImage, IMAGE_FORMAT};
use crate::stored::postgres::schema::Schema;
use crate::stored::postgres::{PgSnapshot, PostgresSnapshotDetails, SegmentDetails};

/// A schema image on local disk with its table of contents.
pub(super) struct ImageFile {
    _dir: tempfile::TempDir,
    archive: PathBuf,
    /// `pg_restore -l`: one line per entry (comment lines start with `;`).
    toc: Vec<String>,
}

/// How pg_restore reaches the database being built.
pub(super) struct Applier {
    pub tools: PgTools,
    pub libpq: Libpq,
    /// Connections for the post-data section (`pg_restore -j`).
    pub jobs: usize,
}

/// Read `image` from the repository into a temporary file and list its contents.
pub(super) async fn fetch(
    repo: &Repository,
    image: &SchemaImage,
    tools: &PgTools,
) -> Result<ImageFile> {
    if image.format != IMAGE_FORMAT {
        return Err(Error::corrupt(format!(
            "schema image format {} is not {IMAGE_FORMAT}",
            image.format
        ))
        .with_hint("a newer timevault wrote it: restore with that version"));
    }
    let dir = tempfile::Builder::new()
        .prefix("timevault-schema-")
        .tempdir()
        .map_err(|e| Error::io("a temporary directory", e))?;
    let archive = dir.path().join("schema.dump");
    let mut file = std::fs::File::create(&archive).map_err(|e| Error::io(archive.display(), e))?;
    let mut bytes = 0u64;
    for chunk in &image.chunks {
        let data = repo.read_listed_chunk(chunk).await?;
        bytes += data.len() as u64;
        file.write_all(&data)
            .map_err(|e| Error::io(archive.display(), e))?;
    }
    file.sync_all()
        .map_err(|e| Error::io(archive.display(), e))?;
    if bytes != image.bytes {
        return Err(Error::corrupt(format!(
            "schema image taken at {}: {bytes} bytes read, its record says {}",
            image.taken_at(),
            image.bytes
        )));
    }
    let toc = list(tools, &archive).await?;
    Ok(ImageFile {
        _dir: dir,
        archive,
        toc,
    })
}

async fn list(tools: &PgTools, archive: &Path) -> Result<Vec<String>> {
    let out = Command::new(&tools.pg_restore)
        .arg("--list")
        .arg(archive)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| Error::io(tools.pg_restore.display(), e))?;
    if !out.status.success() {
        return Err(Error::other(format!(
            "pg_restore --list of the schema image failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

impl ImageFile {
    /// The entries to restore: every one but the keys built early and `publication`.
    fn selected(&self, early: &[EarlyKey], publication: &str) -> Vec<String> {
        let skip: Vec<String> = early
            .iter()
            .map(|k| match k.constraint {
                true => format!(" CONSTRAINT {} {} {} ", k.schema, k.table, k.name),
                false => format!(" INDEX {} {} ", k.schema, k.name),
            })
            .chain([format!(" PUBLICATION - {publication} ")])
            .collect();
        self.toc
            .iter()
            .filter(|line| {
                let padded = format!("{line} ");
                line.starts_with(';') || !skip.iter().any(|s| padded.contains(s.as_str()))
            })
            .cloned()
            .collect()
    }

    /// The populated materialized views in the image's restore order (dependencies first).
    pub fn refresh_order(&self, populated: &[RelationName]) -> Vec<String> {
        let position = |v: &RelationName| {
            let entry = format!(" MATERIALIZED VIEW {} {} ", v.schema, v.name);
            self.toc
                .iter()
                .position(|line| format!("{line} ").contains(&entry))
                .unwrap_or(usize::MAX)
        };
        let mut ordered: Vec<&RelationName> = populated.iter().collect();
        ordered.sort_by_key(|v| position(v));
        ordered.into_iter().map(RelationName::qualified).collect()
    }
}

/// Which part of the image a pg_restore run applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Section {
    PreData,
    PostData,
}

impl Section {
    fn flag(self) -> &'static str {
        match self {
            Section::PreData => "--section=pre-data",
            Section::PostData => "--section=post-data",
        }
    }
}

impl Applier {
    /// Restore one section of `file` (without the entries [`ImageFile::selected`] leaves
    /// out). `strict`: the first error fails the restore; otherwise every entry is tried and
    /// the errors are returned (pg_restore's own report) for the caller to log.
    pub async fn apply(
        &self,
        file: &ImageFile,
        section: Section,
        skip: (&[EarlyKey], &str),
        strict: bool,
    ) -> Result<Option<String>> {
        let list = file.archive.with_extension(match section {
            Section::PreData => "pre.list",
            Section::PostData => "post.list",
        });
        let selected = file.selected(skip.0, skip.1).join("\n") + "\n";
        std::fs::write(&list, selected).map_err(|e| Error::io(list.display(), e))?;
        let mut command = Command::new(&self.tools.pg_restore);
        command
            .args([section.flag(), "--no-owner", "--no-privileges"])
            .arg(format!("--jobs={}", self.jobs.max(1)))
            .arg("--use-list")
            .arg(&list)
            .arg(format!("--dbname={}", self.conninfo()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if strict {
            command.arg("--exit-on-error");
        }
        command.arg(&file.archive);
        self.libpq.apply(&mut command);
        let mut child = command
            .spawn()
            .map_err(|e| Error::io(self.tools.pg_restore.display(), e))?;
        let stderr = read_bounded(child.stderr.take().expect("piped stderr")).await;
        let status = child
            .wait()
            .await
            .map_err(|e| Error::io(self.tools.pg_restore.display(), e))?;
        match (status.success(), strict) {
            (true, _) => Ok(None),
            (false, false) => Ok(Some(stderr)),
            (false, true) => Err(self.failed(section, status, &stderr)),
        }
    }

    /// `dbname=<name>` for `--dbname` (the other settings come from the environment).
    fn conninfo(&self) -> String {
        let name = self.libpq.database_name().unwrap_or_default();
        format!(
            "dbname='{}'",
            name.replace('\\', "\\\\").replace('\'', "\\'")
        )
    }

    fn failed(&self, section: Section, status: std::process::ExitStatus, stderr: &str) -> Error {
        let missing_extension = stderr.contains("extension") && stderr.contains("is not available");
        let error = Error::new(
            ErrorKind::Other,
            format!(
                "pg_restore {} into {} failed ({status}): {}",
                section.flag(),
                self.libpq.shown(),
                stderr.trim()
            ),
        );
        if missing_extension {
            error.with_hint("install the extension's package on the target server (the source had it), then restore again")
        } else {
            error.with_hint("the schema image could not be applied to the target server; fix what pg_restore reports (a missing role, extension or tablespace) and restore again")
        }
    }
}

/// The schema image a restore applies, its table model, and which transactions it has.
pub(super) struct Chosen {
    pub image: SchemaImage,
    pub model: Schema,
    /// The image's `pg_current_snapshot()`; `None` for the snapshot's own image (the
    /// snapshot's visibility already decides).
    pub visibility: Option<PgSnapshot>,
}

/// The schema image a restore to `until_us` applies: the newest taken at or before it among
/// the snapshot's and those recorded in the segments read, with its table model.
pub(super) fn choose_image(
    details: &PostgresSnapshotDetails,
    segments: &[(String, SegmentManifest)],
    until_us: i64,
) -> Result<Chosen> {
    let base = details.schema_image.clone().ok_or_else(format_1)?;
    let mut chosen = Chosen {
        image: base,
        model: details.schema.clone(),
        visibility: None,
    };
    for (key, segment) in segments {
        let Some(recorded) = segment.details::<SegmentDetails>()? else {
            continue;
        };
        let Some(image) = recorded.schema_image else {
            continue;
        };
        if image.taken_us > until_us || image.taken_us <= chosen.image.taken_us {
            continue;
        }
        let incomplete = || {
            Error::corrupt(format!(
                "segment {key}: schema image without its model or visibility"
            ))
        };
        let model = image.schema.clone().ok_or_else(incomplete)?;
        let visibility = image
            .visibility
            .as_deref()
            .and_then(PgSnapshot::parse)
            .ok_or_else(incomplete)?;
        chosen = Chosen {
            image,
            model,
            visibility: Some(visibility),
        };
    }
    Ok(chosen)
}

fn format_1() -> Error {
    Error::new(
        ErrorKind::Input,
        "this snapshot is PostgreSQL snapshot format 1 (no schema image): this version restores \
         format 2 only (the whole schema taken with pg_dump, docs/FORMAT.md §8.1)",
    )
    .with_hint(
        "restore it with the timevault version that wrote it, or restore to an instant after \
         a snapshot taken by this version",
    )
}

/// How the snapshot's rows meet the image's tables.
pub(super) struct LoadShape {
    /// The snapshot's table images of tables the image has, and the model the load uses
    /// (tables whose columns changed type since the snapshot are left out of it, so their
    /// rows load as text).
    pub details: PostgresSnapshotDetails,
    /// The image's model with the temporary columns: what replay starts from.
    pub model: Schema,
    pub temporary: TempColumns,
    /// Before the load: add the temporary columns, drop NOT NULL of columns the snapshot's
    /// rows lack (no default fills them; replay does).
    pub before: Vec<String>,
    /// After replay: NOT NULL back on those columns.
    pub after: Vec<String>,
}

/// Fit the snapshot's rows to the image's tables: columns the image lacks (dropped since the
/// snapshot) become temporary `text` columns, dropped after replay; NOT NULL columns the
/// rows lack (added since) wait for the replay.
pub(super) fn shape_load(details: &PostgresSnapshotDetails, model: &Schema) -> LoadShape {
    let mut model = model.clone();
    let mut temporary = TempColumns::new();
    let (mut before, mut after) = (Vec::new(), Vec::new());
    let mut tables = Vec::new();
    let mut text_only = Vec::new();
    for image in &details.tables {
        let Some(table) = model.table(&image.schema, &image.name).cloned() else {
            tracing::info!(table = %format!("{}.{}", image.schema, image.name), "dropped before the schema image: its snapshot rows are left out");
            continue;
        };
        let missing: Vec<String> = image
            .columns
            .iter()
            .filter(|c| table.column(c).is_none())
            .cloned()
            .collect();
        before.extend(add_temporary(
            &mut model,
            &mut temporary,
            &image.schema,
            &image.name,
            &missing,
        ));
        for c in table.stored_columns().filter(|c| {
            c.not_null
                && c.default.is_none()
                && c.identity.is_none()
                && !image.columns.contains(&c.name)
        }) {
            let column = quote_ident(&c.name);
            before.push(format!(
                "ALTER TABLE {} ALTER COLUMN {column} DROP NOT NULL",
                table.qualified()
            ));
            after.push(format!(
                "ALTER TABLE {} ALTER COLUMN {column} SET NOT NULL",
                table.qualified()
            ));
        }
        let same_types = details
            .schema
            .table(&image.schema, &image.name)
            .is_some_and(|old| {
                image.columns.iter().all(|c| {
                    let old = old.column(c).map(|c| &c.type_sql);
                    old.is_some() && old == table.column(c).map(|c| &c.type_sql)
                })
            });
        if !same_types {
            text_only.push((image.schema.clone(), image.name.clone()));
        }
        tables.push(image.clone());
    }
    let mut load_model = model.clone();
    load_model
        .tables
        .retain(|t| !text_only.contains(&(t.schema.clone(), t.name.clone())));
    LoadShape {
        details: PostgresSnapshotDetails {
            schema: load_model,
            tables,
            ..details.clone()
        },
        model,
        temporary,
        before,
        after,
    }
}

/// Drop the temporary columns replay did not drop itself.
pub(super) fn drop_temporary(temporary: &TempColumns) -> Vec<String> {
    temporary
        .iter()
        .map(|(schema, table, column)| {
            format!(
                "ALTER TABLE {}.{} DROP COLUMN IF EXISTS {}",
                quote_ident(schema),
                quote_ident(table),
                quote_ident(column)
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(toc: &[&str]) -> ImageFile {
        let dir = tempfile::tempdir().unwrap();
        ImageFile {
            archive: dir.path().join("x"),
            _dir: dir,
            toc: toc.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn early_keys_and_the_own_publication_are_left_out() {
        let image = file(&[
            ";",
            "; Selected TOC Entries:",
            "215; 1259 16400 TABLE public accounts postgres",
            "3340; 2606 16410 CONSTRAINT public accounts accounts_pkey postgres",
            "3341; 2606 16411 CONSTRAINT public accounts accounts_pkey2 postgres",
            "3345; 1259 16420 INDEX public accounts_email_key postgres",
            "3346; 1259 16421 INDEX ATTACH public accounts_email_key postgres",
            "3365; 6104 16450 PUBLICATION - timevault_app postgres",
            "3366; 6104 16451 PUBLICATION - app_events postgres",
        ]);
        let early = [
            EarlyKey {
                schema: "public".into(),
                table: "accounts".into(),
                name: "accounts_pkey".into(),
                constraint: true,
                statement: String::new(),
            },
            EarlyKey {
                schema: "public".into(),
                table: "accounts".into(),
                name: "accounts_email_key".into(),
                constraint: false,
                statement: String::new(),
            },
        ];
        let kept = image.selected(&early, "timevault_app");
        assert_eq!(kept.len(), 6, "{kept:#?}");
        assert!(kept.iter().any(|l| l.contains("accounts_pkey2")));
        assert!(kept.iter().any(|l| l.contains("INDEX ATTACH")));
        assert!(kept.iter().any(|l| l.contains("app_events")));
        assert!(!kept.iter().any(|l| l.contains("timevault_app")));
    }

    #[test]
    fn materialized_views_refresh_in_the_images_order() {
        let image = file(&[
            "10; 1259 1 MATERIALIZED VIEW app totals postgres",
            "11; 1259 2 MATERIALIZED VIEW app daily postgres",
        ]);
        let v = |name: &str| RelationName {
            schema: "app".into(),
            name: name.into(),
        };
        assert_eq!(
            image.refresh_order(&[v("daily"), v("totals")]),
            ["\"app\".\"totals\"", "\"app\".\"daily\""]
        );
    }
}
