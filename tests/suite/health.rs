//! The daemon's `/healthz` and `/metrics` on a free port, scraped while it runs: the series
//! exist with sane values (window end near now, small lag, jobs and drills ok), and a snapshot
//! older than `max_snapshot_age` turns `/healthz` into a 503 that says why.

use crate::common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::config::ConfigBuilder;
use common::daemon::Daemon;
use common::{ok, timevault, Env};
use timevault_fixtures::Workload;

fn free_port() -> u16 {
    timevault_fixtures::harness::free_port().unwrap()
}

fn get(port: u16, path: &str) -> Option<(u16, String)> {
    common::http_get(port, path)
}

/// The value of the sample `name{labels}` (labels exactly as rendered).
fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
}

/// Scrape until `done` accepts the metrics text (the daemon needs a few job rounds).
fn scrape_until(port: u16, daemon: &Daemon, done: impl Fn(&str) -> bool) -> String {
    let patience = (Duration::from_secs(180), Duration::from_millis(250));
    daemon.metrics_until(port, patience, "complete metrics", done)
}

/// Files in a blob source `files` beside the SQLite source, a drill every 3 seconds and the
/// metrics on `port`; the config is not written yet.
fn config_with(env: &Env, port: u16) -> ConfigBuilder {
    let blobs = env.path().join("blobs");
    std::fs::create_dir_all(blobs.join("docs")).unwrap();
    std::fs::write(blobs.join("docs/a.txt"), "first attachment").unwrap();
    std::fs::write(blobs.join("b.bin"), vec![7u8; 100_000]).unwrap();
    env.config_builder()
        .schedule("blob_scan", "0 */5 * * * *")
        .schedule("drill", "*/3 * * * * *")
        .blobs("files", "blobs")
        .listen(port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_serves_sane_metrics_and_health() {
    let env = Env::new(61).await;
    let port = free_port();
    let config = config_with(&env, port).write(env.path());
    ok(&timevault(&config, &["init"]));
    let daemon = Daemon::start(&config);
    let mut app = env.app().await;
    Workload::new(61, 1).step(&mut app, None).await.unwrap();

    let drilled = |t: &str| {
        ["app", "files"]
            .iter()
            .all(|s| metric(t, "timevault_drill_success", &format!("source=\"{s}\"")).is_some())
            && metric(
                t,
                "timevault_job_last_success",
                "source=\"app\",job=\"capture\"",
            )
            .is_some()
    };
    let text = scrape_until(port, &daemon, drilled);
    let now = chrono::Utc::now().timestamp() as f64;
    let app_labels = "source=\"app\",kind=\"sqlite\"";
    let newest = metric(
        &text,
        "timevault_window_newest_timestamp_seconds",
        app_labels,
    )
    .unwrap();
    let oldest = metric(
        &text,
        "timevault_window_oldest_timestamp_seconds",
        app_labels,
    )
    .unwrap();
    assert!(
        oldest <= newest && (now - newest).abs() < 120.0,
        "window {oldest}..{newest}, now {now}\n{text}"
    );
    let lag = metric(&text, "timevault_capture_lag_seconds", app_labels).unwrap();
    assert!((0.0..120.0).contains(&lag), "lag {lag}\n{text}");
    let age = metric(&text, "timevault_last_snapshot_age_seconds", app_labels).unwrap();
    assert!((0.0..600.0).contains(&age), "snapshot age {age}\n{text}");
    let files_age = metric(
        &text,
        "timevault_last_snapshot_age_seconds",
        "source=\"files\",kind=\"blobs\"",
    )
    .unwrap();
    assert!(
        (0.0..600.0).contains(&files_age),
        "scan age {files_age}\n{text}"
    );
    for (source, job) in [
        ("app", "snapshot"),
        ("app", "capture"),
        ("files", "scan"),
        ("app", "drill"),
        ("files", "drill"),
    ] {
        let labels = format!("source=\"{source}\",job=\"{job}\"");
        assert_eq!(
            metric(&text, "timevault_job_last_success", &labels),
            Some(1.0),
            "{labels}\n{text}"
        );
        assert!(metric(&text, "timevault_job_last_duration_seconds", &labels).unwrap() >= 0.0);
        let runs = format!("{labels},outcome=\"ok\"");
        assert!(
            metric(&text, "timevault_jobs_total", &runs).unwrap() >= 1.0,
            "{runs}\n{text}"
        );
    }
    for (replica, region) in [("eu-west", "westeurope"), ("eu-north", "northeurope")] {
        let labels = format!("replica=\"{replica}\",region=\"{region}\"");
        assert!(
            metric(&text, "timevault_replica_bytes_written_total", &labels).unwrap() > 0.0,
            "{text}"
        );
        assert_eq!(
            metric(&text, "timevault_replica_errors_total", &labels),
            Some(0.0),
            "{text}"
        );
        assert_eq!(
            metric(&text, "timevault_replica_up", &labels),
            Some(1.0),
            "{text}"
        );
    }
    assert!(
        metric(&text, "timevault_drill_rows_checked", "source=\"app\"").unwrap() > 0.0,
        "{text}"
    );
    assert!(
        metric(&text, "timevault_drill_objects_checked", "source=\"files\"").unwrap() >= 2.0,
        "{text}"
    );
    assert!(metric(&text, "timevault_drill_restore_seconds", "source=\"app\"").unwrap() > 0.0);
    assert!(
        text.contains("# TYPE timevault_jobs_total counter\n"),
        "{text}"
    );
    assert_eq!(
        metric(&text, "timevault_healthy", ""),
        None,
        "unlabelled: no braces"
    );
    assert!(text.contains("\ntimevault_healthy 1\n"), "{text}");
    assert_eq!(get(port, "/healthz"), Some((200, "ok\n".to_string())));
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_503_with_the_reason_when_the_snapshot_is_too_old() {
    let env = Env::new(62).await;
    let port = free_port();
    let config = config_with(&env, port)
        .daemon("max_snapshot_age", "1s")
        .write(env.path());
    ok(&timevault(&config, &["init"]));
    let daemon = Daemon::start(&config);
    let deadline = Instant::now() + Duration::from_secs(120);
    let body = loop {
        match get(port, "/healthz") {
            Some((503, body)) if body.contains("source app: last snapshot") => break body,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "never unhealthy: {}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(body.starts_with("unhealthy\n"), "{body}");
    assert!(body.contains("more than max_snapshot_age 1s"), "{body}");
    let (_, text) = get(port, "/metrics").unwrap();
    assert!(text.contains("\ntimevault_healthy 0\n"), "{text}");
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_drill_in_the_daemon_is_loud() {
    let env = Env::new(63).await;
    let port = free_port();
    let config = config_with(&env, port).write(env.path());
    ok(&timevault(&config, &["init"]));
    ok(&timevault(&config, &["daemon", "--once"]));
    // Damage the snapshot's first chunk on both replicas.
    let chunk = {
        let repo =
            timevault::repo::Repository::open(&timevault::config::Config::load(&config).unwrap())
                .await
                .unwrap();
        let catalog = timevault::catalog::SourceCatalog::load(&repo, "app")
            .await
            .unwrap();
        let key = &catalog.chains[0].snapshot.key;
        let snapshot = timevault::catalog::SnapshotManifest::read(&repo, key)
            .await
            .unwrap();
        snapshot.chunks[0].id.clone()
    };
    for replica in ["eu-west", "eu-north"] {
        let path = env
            .path()
            .join("replicas")
            .join(replica)
            .join(timevault::repo::layout::chunk(&chunk));
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
    }
    let daemon = Daemon::start(&config);
    let failed = |t: &str| metric(t, "timevault_drill_success", "source=\"app\"") == Some(0.0);
    let text = scrape_until(port, &daemon, failed);
    assert_eq!(
        metric(
            &text,
            "timevault_job_last_success",
            "source=\"app\",job=\"drill\""
        ),
        Some(0.0),
        "{text}"
    );
    let (status, body) = get(port, "/healthz").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("source app: last restore drill FAILED"),
        "{body}"
    );
    assert!(
        body.contains(&chunk),
        "the reason names the damaged chunk: {body}"
    );
    let log_text = daemon.stop();
    assert!(
        log_text.contains("ERROR") && log_text.contains("restore drill FAILED"),
        "{log_text}"
    );
}

/// Run SQL through `psql` (another process), stopping at the first error.
fn psql(url: &str, sql: &str) {
    let out = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql])
        .output()
        .expect("psql is installed by .ci/install-deps (postgresql-client)");
    assert!(
        out.status.success(),
        "psql failed: {}\n{sql}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Poll `/healthz` until `want` accepts (status, body); panics with the daemon log after 90 s.
fn healthz_until(port: u16, daemon: &Daemon, want: impl Fn(u16, &str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some((status, body)) = get(port, "/healthz") {
            if want(status, &body) {
                return body;
            }
        }
        assert!(
            Instant::now() < deadline,
            "/healthz never became what the test waits for; daemon log:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A schema image that fails during capture is not silent (issue 20's gap): a table the backup
/// role may not read appears, so `pg_dump --schema-only` fails on every pass while rows are
/// still captured. `/healthz` turns 503 naming the source and the image, `/metrics` counts the
/// failed `schema-image` job; once the table is granted, the next image succeeds and `/healthz`
/// is 200 again. (Before, the failure was only an error line in the log.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_schema_image_fails_healthz_until_an_image_succeeds() {
    let env = Env::new(63).await;
    let url = crate::pg!().create_database().await.unwrap();
    let suffix = timevault_fixtures::harness::unique_name("x").replace('-', "_");
    let role = format!("tv_image_{suffix}");
    let source = format!("imaged_{suffix}");
    psql(
        &url,
        &format!(
            "CREATE TABLE public.visible (id int PRIMARY KEY, v text); \
             INSERT INTO public.visible VALUES (1, 'a'); \
             CREATE ROLE {role} LOGIN REPLICATION; \
             GRANT SELECT ON public.visible TO {role}; \
             CREATE PUBLICATION timevault_{source} FOR ALL TABLES"
        ),
    );
    let limited = url.replacen("postgres@", &format!("{role}@"), 1);
    let port = free_port();
    let config = env
        .config_builder()
        .postgres(&source, &limited)
        .listen(port)
        .write(env.path());
    ok(&timevault(&config, &["init"]));
    let daemon = Daemon::start(&config);
    let captured = format!("source=\"{source}\",job=\"capture\"");
    scrape_until(port, &daemon, |t| {
        metric(t, "timevault_job_last_success", &captured) == Some(1.0)
    });
    healthz_until(port, &daemon, |status, _| status == 200);

    psql(&url, "CREATE TABLE public.secret (id int PRIMARY KEY)");
    let body = healthz_until(port, &daemon, |status, body| {
        status == 503 && body.contains("schema image failing")
    });
    assert!(body.contains(&source), "{body}");
    assert!(body.contains("permission denied"), "{body}");
    let image = format!("source=\"{source}\",job=\"schema-image\"");
    let text = scrape_until(port, &daemon, |t| {
        metric(t, "timevault_job_last_success", &image) == Some(0.0)
    });
    assert_eq!(
        metric(&text, "timevault_job_last_success", &captured),
        Some(1.0),
        "rows are captured all the same\n{text}"
    );

    psql(&url, &format!("GRANT SELECT ON public.secret TO {role}"));
    healthz_until(port, &daemon, |status, _| status == 200);
    scrape_until(port, &daemon, |t| {
        metric(t, "timevault_job_last_success", &image) == Some(1.0)
    });
    daemon.stop();
}
