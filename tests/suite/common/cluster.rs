//! A PostgreSQL cluster a test owns on a port it picks: it can be stopped, restarted and
//! reconfigured, and a new cluster can take its port (the harness's shared clusters cannot).

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

use timevault_fixtures::harness::postgres::PG_BIN;

/// A cluster the test owns on a port it picks: it can be restarted, and a new cluster can
/// take its port. A watcher shell stops it and deletes its files when the guard is dropped or
/// the test process ends in any way (its stdin pipe closes), like the harness's servers.
pub struct Cluster {
    port: u16,
    data: PathBuf,
    dir: PathBuf,
    watcher: Option<ChildStdin>,
    child: Child,
}

/// PostgreSQL refuses to run as root: as root, its programs run as the postgres user.
fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn as_postgres(program: &str) -> Command {
    let path = Path::new(PG_BIN).join(program);
    if running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn run(command: &mut Command) {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Cluster {
    pub fn create(port: u16) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("tv-pg-own-")
            .tempdir()
            .unwrap()
            .keep();
        let data = dir.join("data");
        // Harmless when not root (then the files are ours already).
        let _ = Command::new("chown")
            .arg("-R")
            .arg("postgres:postgres")
            .arg(&dir)
            .status();
        let prefix = if running_as_root() {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let stop = format!(
            "read _ignored; {prefix}{PG_BIN}/pg_ctl -D '{}' -m immediate -w stop >/dev/null 2>&1; rm -rf '{}'",
            data.display(),
            dir.display()
        );
        let mut child = Command::new("sh")
            .args(["-c", &stop])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let watcher = child.stdin.take();
        run(as_postgres("initdb").arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "-N",
        ]));
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_replication_slots = 10\nmax_wal_senders = 10\nfsync = off\n",
            dir.display()
        );
        let mut text = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        text.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), text).unwrap();
        Cluster {
            port,
            data,
            dir,
            watcher,
            child,
        }
    }

    pub fn start(&self) {
        run(as_postgres("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-w", "start"]));
    }

    pub fn stop(&self) {
        run(as_postgres("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "stop"]));
    }

    /// Add settings to postgresql.conf (they apply at the next start).
    pub fn configure(&self, lines: &str) {
        let path = self.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(lines);
        std::fs::write(path, text).unwrap();
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        drop(self.watcher.take());
        let _ = self.child.wait();
    }
}
