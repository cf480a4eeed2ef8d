//! The small application the key-service tests (`kms`, `keyvault`) back up: a SQLite table
//! written by the `sqlite3` shell, and the check that a restore holds the same rows.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::ok;

/// `app.db` in `dir`, written by the `sqlite3` shell, with `rows` more rows.
pub fn app_db(dir: &Path, rows: u32) -> PathBuf {
    let db = dir.join("app.db");
    let sql = format!(
        "PRAGMA journal_mode=WAL; CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < {rows})
         INSERT INTO t(v) SELECT 'row ' || i FROM n;"
    );
    let out = Command::new("sqlite3").arg(&db).arg(sql).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    db
}

/// The table's row count and total text length, as the shell prints them.
pub fn count(db: &Path) -> String {
    let out = Command::new("sqlite3")
        .arg(db)
        .arg("SELECT count(*), sum(length(v)) FROM t")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// `restore --source app --at latest --to <dir>/<name>` through `run` (timevault with the
/// key service's environment); the restored table must equal `app.db`'s.
pub fn restore_matches(dir: &Path, name: &str, run: impl Fn(&[&str]) -> Output) {
    let target = dir.join(name);
    let to = target.to_str().unwrap();
    ok(&run(&[
        "restore", "--source", "app", "--at", "latest", "--to", to,
    ]));
    assert_eq!(count(&target), count(&dir.join("app.db")));
}
