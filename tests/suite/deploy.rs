//! The monitoring files in `deploy/` against the real daemon: the alert rules pass `promtool`
//! (syntax and the unit tests in `alerts.test.yml`), the Grafana dashboard is well-formed
//! dashboard JSON, and every `timevault_*` metric either of them names, with every label its
//! selectors match on, is served by `/metrics` of a running daemon (an SQLite and a blob
//! source, so jobs, replicas and drills all have samples).

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::{ok, Env};
use serde_json::Value;

const ALERTS: &str = "deploy/prometheus/alerts.yml";
const ALERT_TESTS: &str = "deploy/prometheus/alerts.test.yml";
const PROMETHEUS_CONFIG: &str = "deploy/prometheus/prometheus.yml";
const DASHBOARD: &str = "deploy/grafana/timevault.json";

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Run `promtool ARGS` in the repository; a missing promtool fails with how to install it.
fn promtool(args: &[&str]) {
    let out = match Command::new("promtool")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool is not installed: run `bash .ci/install-deps` (or `apt-get install -y prometheus`)"
        ),
        Err(e) => panic!("promtool: {e}"),
    };
    assert!(
        out.status.success(),
        "promtool {args:?} failed ({:?})\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_pass_promtool() {
    promtool(&["check", "rules", ALERTS]);
    promtool(&["test", "rules", ALERT_TESTS]);
    promtool(&["check", "config", PROMETHEUS_CONFIG]);
}

/// The alert names in `alerts.yml` (`- alert: NAME` lines).
fn alert_names(yaml: &str) -> Vec<String> {
    yaml.lines()
        .filter_map(|l| l.trim_start().strip_prefix("- alert:"))
        .map(|n| n.trim().to_string())
        .collect()
}

#[test]
fn alert_rules_cover_what_an_operator_must_know() {
    let names = alert_names(&read(ALERTS));
    for expected in [
        "TimevaultDown",
        "TimevaultRpoBreached",
        "TimevaultSnapshotTooOld",
        "TimevaultJobFailing",
        "TimevaultJobErrors",
        "TimevaultReplicaDown",
        "TimevaultReplicaLagging",
        "TimevaultReplicaErrors",
        "TimevaultReplicaBadObjects",
        "TimevaultDrillFailed",
        "TimevaultDrillOverdue",
        "TimevaultDrillNeverRun",
        "TimevaultContinuityLost",
        "TimevaultUnhealthy",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected}: {names:?}");
    }
    let runbook = read("docs/OPERATIONS.md");
    for name in &names {
        assert!(
            runbook.contains(&format!("### {name}")),
            "docs/OPERATIONS.md has no runbook section for {name}"
        );
    }
}

/// The PromQL expressions of `alerts.yml`: `expr:` values, on one line or as a block scalar.
fn alert_exprs(yaml: &str) -> Vec<String> {
    let mut exprs = Vec::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if !matches!(rest, "|" | "|-" | ">" | ">-") {
            exprs.push(rest.to_string());
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let mut block = String::new();
        while let Some(next) = lines.peek() {
            let deeper = next.len() - next.trim_start().len() > indent;
            if !next.trim().is_empty() && !deeper {
                break;
            }
            block.push_str(next.trim());
            block.push(' ');
            lines.next();
        }
        exprs.push(block);
    }
    exprs
}

fn templating_vars(dashboard: &Value) -> Vec<&Value> {
    dashboard["templating"]["list"]
        .as_array()
        .map(|l| l.iter().collect())
        .unwrap_or_default()
}

/// Every PromQL expression of the dashboard: panel targets and query variables.
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().unwrap_or_default().to_string());
        }
    }
    for var in templating_vars(dashboard) {
        if var["type"] == "query" {
            let query = &var["query"];
            let text = query["query"]
                .as_str()
                .or(query.as_str())
                .unwrap_or_default();
            exprs.push(text.to_string());
        }
    }
    exprs
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Metric name -> the label names its selectors match on.
type Selected = BTreeMap<String, BTreeSet<String>>;

/// The metric names (`timevault_*`) and the label names each is selected on in one PromQL
/// expression. String literals are skipped, so `"$source"` is no identifier.
fn promql_names(expr: &str) -> Selected {
    let chars: Vec<char> = expr.chars().collect();
    let mut found = Selected::new();
    let mut i = 0;
    let skip_string = |i: &mut usize| {
        let quote = chars[*i];
        *i += 1;
        while *i < chars.len() && chars[*i] != quote {
            *i += if chars[*i] == '\\' { 2 } else { 1 };
        }
        *i += 1;
    };
    let skip_ws = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    let ident = |i: &mut usize| {
        let start = *i;
        while *i < chars.len() && is_ident(chars[*i]) {
            *i += 1;
        }
        chars[start..*i].iter().collect::<String>()
    };
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            skip_string(&mut i);
        } else if is_ident_start(c) && (i == 0 || !is_ident(chars[i - 1])) {
            let name = ident(&mut i);
            if !name.starts_with("timevault_") {
                continue;
            }
            let labels = found.entry(name.clone()).or_default();
            skip_ws(&mut i);
            if chars.get(i) != Some(&'{') {
                continue;
            }
            i += 1;
            loop {
                skip_ws(&mut i);
                match chars.get(i) {
                    Some('}') => {
                        i += 1;
                        break;
                    }
                    Some(',') => i += 1,
                    Some(&c) if is_ident_start(c) => {
                        labels.insert(ident(&mut i));
                        skip_ws(&mut i);
                        while matches!(chars.get(i), Some('=' | '!' | '~')) {
                            i += 1;
                        }
                        skip_ws(&mut i);
                        assert!(
                            matches!(chars.get(i), Some('"' | '\'' | '`')),
                            "a matcher of {name} without a quoted value in: {expr}"
                        );
                        skip_string(&mut i);
                    }
                    _ => panic!("cannot read the selector of {name} in: {expr}"),
                }
            }
        } else {
            i += 1;
        }
    }
    found
}

/// Every `timevault_*` word anywhere in a file (expressions, descriptions, comments).
fn words(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("timevault_") {
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let end = tail.find(|c: char| !is_ident(c)).unwrap_or(tail.len());
        if !before.is_some_and(is_ident) {
            out.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    out
}

#[test]
fn promql_names_reads_metrics_and_their_labels() {
    let names = promql_names(
        "sum by (source) (increase(timevault_jobs_total{source=~\"$source|x\", outcome = 'error'}[$__rate_interval])) \
         - timevault_replica_up unless on (instance) timevault_drill_success{source!~\"timevault_fake\"}",
    );
    let expected: Selected = [
        ("timevault_jobs_total", vec!["outcome", "source"]),
        ("timevault_replica_up", vec![]),
        ("timevault_drill_success", vec!["source"]),
    ]
    .into_iter()
    .map(|(n, l)| (n.to_string(), l.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(names, expected);
    assert_eq!(
        alert_exprs("  - alert: A\n    expr: up == 0\n  - alert: B\n    expr: |\n      a\n      or b\n    for: 1m\n"),
        vec!["up == 0".to_string(), "a or b ".to_string()]
    );
    assert_eq!(
        words("`timevault_healthy` and xtimevault_no, timevault_up{"),
        ["timevault_healthy", "timevault_up"]
            .into_iter()
            .map(String::from)
            .collect()
    );
}

#[test]
fn dashboard_is_grafana_dashboard_json() {
    let d: Value = serde_json::from_str(&read(DASHBOARD)).expect("valid JSON");
    assert!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion"
    );
    assert_eq!(d["title"], "timevault");
    assert!(d["uid"]
        .as_str()
        .is_some_and(|u| !u.is_empty() && u.len() <= 40));
    assert!(d["time"]["from"].is_string() && d["time"]["to"].is_string());
    let inputs = d["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs.iter().any(|i| i["name"] == "DS_PROMETHEUS"
            && i["type"] == "datasource"
            && i["pluginId"] == "prometheus"),
        "the DS_PROMETHEUS input"
    );
    let vars = templating_vars(&d);
    let var_names: BTreeSet<&str> = vars.iter().filter_map(|v| v["name"].as_str()).collect();
    assert!(vars
        .iter()
        .any(|v| v["name"] == "source" && v["type"] == "query"));
    let ds = serde_json::json!({"type": "prometheus", "uid": "${DS_PROMETHEUS}"});
    let panels = d["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut cells: BTreeSet<(u64, u64)> = BTreeSet::new();
    let mut charts = 0;
    for p in panels {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "a panel without title: {p}");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "{title}: id"
        );
        let g = &p["gridPos"];
        let [h, w, x, y] = ["h", "w", "x", "y"].map(|k| g[k].as_u64().expect("gridPos"));
        assert!(w >= 1 && x + w <= 24 && h >= 1, "{title}: gridPos {g}");
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(cells.insert((cx, cy)), "{title} overlaps another panel");
            }
        }
        let kind = p["type"].as_str().unwrap_or_default();
        if kind == "row" {
            continue;
        }
        assert!(
            ["timeseries", "stat", "table"].contains(&kind),
            "{title}: {kind}"
        );
        charts += 1;
        assert_eq!(p["datasource"], ds, "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no targets");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert_eq!(t["datasource"], ds, "{title}");
            assert!(refs.insert(t["refId"].as_str().expect("refId")), "{title}");
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(expr.contains("timevault_"), "{title}: expr {expr:?}");
            // `$source`, `$replica`: defined variables; `$__rate_interval`: Grafana's own.
            for var in expr.split('$').skip(1) {
                let name: String = var.chars().take_while(|&c| is_ident(c)).collect();
                assert!(
                    name.starts_with("__") || var_names.contains(name.as_str()),
                    "{title}: ${name} is no templating variable"
                );
            }
        }
    }
    assert!(charts >= 15, "{charts} panels");
}

/// Per metric family in a scrape: its type and the label names of its samples.
struct Scrape {
    types: BTreeMap<String, String>,
    samples: BTreeMap<String, BTreeSet<String>>,
}

fn parse_scrape(text: &str) -> Scrape {
    let mut types = BTreeMap::new();
    let mut samples: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            types.insert(name.to_string(), kind.to_string());
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).expect("sample");
            let labels = samples.entry(line[..end].to_string()).or_default();
            if let Some(inner) = line[end..]
                .strip_prefix('{')
                .and_then(|r| r.split_once('}'))
            {
                for pair in inner.0.split("\",") {
                    if let Some((label, _)) = pair.split_once('=') {
                        labels.insert(label.to_string());
                    }
                }
            }
        }
    }
    Scrape { types, samples }
}

impl Scrape {
    /// The family a name in a query belongs to: itself, or a histogram's or summary's
    /// `_bucket`/`_sum`/`_count` series.
    fn family<'a>(&self, name: &'a str) -> Option<&'a str> {
        if self.types.contains_key(name) {
            return Some(name);
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = name.strip_suffix(suffix)?;
            matches!(
                self.types.get(base).map(String::as_str),
                Some("histogram" | "summary")
            )
            .then_some(base)
        })
    }
}

fn free_port() -> u16 {
    timevault_fixtures::harness::free_port().unwrap()
}

/// Scrape until both sources have a drill and a capture has finished.
fn scrape_complete(port: u16, daemon: &Daemon) -> String {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some((200, text)) = common::http_get(port, "/metrics") {
            let has = |s: &str| common::metric_sample(&text, s).is_some();
            if has("timevault_drill_success{source=\"app\"}")
                && has("timevault_drill_success{source=\"files\"}")
                && has("timevault_job_last_success{source=\"app\",job=\"capture\"}")
            {
                return text;
            }
        }
        assert!(
            Instant::now() < deadline,
            "metrics never complete; daemon log:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_use_only_metrics_the_daemon_serves() {
    let env = Env::new(71).await;
    let port = free_port();
    let blobs = env.path().join("blobs");
    std::fs::create_dir_all(blobs.join("docs")).unwrap();
    std::fs::write(blobs.join("docs/a.txt"), "first attachment").unwrap();
    // The key in KMS alone (a local key would be tried first), so the key-service series are
    // served too.
    let kms = timevault_fixtures::harness::s3();
    let kek = format!("aws-kms:{}", kms.create_kms_key("eu-west-1").unwrap());
    let config = env
        .config_builder()
        .without_local_key()
        .kek(&[&kek])
        .schedule("blob_scan", "0 */5 * * * *")
        .schedule("drill", "*/3 * * * * *")
        .blobs("files", "blobs")
        .listen(port)
        .write(env.path());
    let init = Command::new(common::binary())
        .arg("--config")
        .arg(&config)
        .arg("init")
        .envs(kms.kms_env())
        .output()
        .unwrap();
    ok(&init);
    let daemon = Daemon::command(&config).envs(kms.kms_env()).start();
    let text = scrape_complete(port, &daemon);
    daemon.stop();
    let scrape = parse_scrape(&text);

    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).unwrap();
    let alerts = read(ALERTS);
    let mut used: Vec<(&str, String, Selected)> = Vec::new();
    for expr in dashboard_exprs(&dashboard) {
        used.push((DASHBOARD, expr.clone(), promql_names(&expr)));
    }
    for expr in alert_exprs(&alerts) {
        used.push((ALERTS, expr.clone(), promql_names(&expr)));
    }
    let mut problems = Vec::new();
    let mut families = BTreeSet::new();
    for (file, expr, names) in &used {
        for (name, labels) in names {
            let Some(family) = scrape.family(name) else {
                problems.push(format!("{file}: {name} is not served (in `{expr}`)"));
                continue;
            };
            families.insert(family.to_string());
            let Some(served) = scrape.samples.get(name.as_str()) else {
                problems.push(format!("{file}: {name} has no sample in the scrape"));
                continue;
            };
            for label in labels {
                // Prometheus keeps `job` for the scrape job and renames the daemon's own.
                let label = if label == "exported_job" {
                    "job"
                } else {
                    label
                };
                if !served.contains(label) {
                    problems.push(format!(
                        "{file}: {name} has no label {label} (it has {served:?}; in `{expr}`)"
                    ));
                }
            }
        }
    }
    // Descriptions and comments name metrics too: they must be real as well.
    for (file, text) in [(DASHBOARD, read(DASHBOARD)), (ALERTS, alerts.clone())] {
        for word in words(&text) {
            if scrape.family(&word).is_none() {
                problems.push(format!("{file}: mentions {word}, which is not served"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{}\n\nscrape:\n{text}",
        problems.join("\n")
    );
    // The files use the metrics an operator needs (windows, lag, jobs, replicas, drills,
    // continuity), not just a few.
    assert!(families.len() >= 20, "only {families:?}");
}
