//! Key-encryption keys in AWS KMS (issue 24): the repository data key exists only wrapped, one
//! copy per KEK; any usable KEK opens the repository; a disabled key or one pending deletion is
//! refused although moto still decrypts with it; `keys rotate` adds and retires copies without
//! touching data. The KMS is moto's (the harness's S3 server); timevault runs as a process,
//! with the AWS SDK's standard environment pointing at it.

use crate::common;
use common::config::ConfigBuilder;
use common::daemon::Daemon;
use common::kek_app::app_db;
use common::ok;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use timevault_fixtures::harness::{free_port, s3};

/// `timevault --config <config> args...` with the AWS environment of the test KMS.
fn tv(config: &Path, args: &[&str]) -> Output {
    common::timevault_kms(config, args)
}

fn kek(arn: &str) -> String {
    format!("aws-kms:{arn}")
}

/// Two file replicas and the source `app`, with `repository` setting the keys, written to
/// `<name>.toml` in `dir` (one repository, several configs with other keys).
fn config(dir: &Path, name: &str, repository: ConfigBuilder) -> PathBuf {
    repository
        .replica("a", "r1", "ra")
        .replica("b", "r2", "rb")
        .sqlite("app", "app.db")
        .write_as(&dir.join(format!("{name}.toml")))
}

fn exit_code(out: &Output) -> Option<i32> {
    out.status.code()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_repository_opened_only_through_kms_backs_up_restores_and_counts_one_unwrap() {
    let dir = tempfile::tempdir().unwrap();
    let arn = s3().create_kms_key("eu-west-1").unwrap();
    app_db(dir.path(), 500);
    let port = free_port().unwrap();
    let config = ConfigBuilder::new()
        .kek(&[&kek(&arn)])
        .listen(port)
        .replica("a", "r1", "ra")
        .replica("b", "r2", "rb")
        .sqlite("app", "app.db")
        .write(dir.path());
    let out = ok(&tv(&config, &["init"]));
    assert!(out.contains("created repository"), "{out}");
    assert!(
        !out.contains("generated a new key"),
        "no local key exists: {out}"
    );
    // The copy is on both replicas, and no key file was written.
    for replica in ["ra", "rb"] {
        let copies: Vec<_> = std::fs::read_dir(dir.path().join(replica).join("keys/repository"))
            .unwrap()
            .collect();
        assert_eq!(copies.len(), 1, "replica {replica}");
    }
    let shown: serde_json::Value =
        serde_json::from_str(&ok(&tv(&config, &["keys", "show", "--json"]))).unwrap();
    assert_eq!(shown["format"], 2, "{shown}");
    assert_eq!(shown["opened_by"], kek(&arn), "{shown}");
    assert_eq!(shown["copies"][0]["state"], "enabled", "{shown}");
    assert_eq!(
        shown["copies"][0]["algorithm"], "aws-kms-symmetric",
        "{shown}"
    );

    ok(&tv(&config, &["backup"]));
    restore_matches(dir.path(), &config, "restored.db");
    // verify authenticates the wrapped copies too (their MAC is under the data key).
    ok(&tv(&config, &["verify", "--read-data"]));

    // A daemon unwraps once and asks for the key's state once, however often it reopens.
    let daemon = Daemon::command(&config).envs(s3().kms_env()).start();
    let metrics = daemon.metrics_until(
        port,
        (Duration::from_secs(60), Duration::from_millis(500)),
        "the KMS calls of the daemon's open",
        |m| m.contains("operation=\"Decrypt\""),
    );
    let series = |op: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("timevault_kms_requests_total")
                    && l.contains(&format!("operation=\"{op}\""))
            })
            .unwrap_or_else(|| panic!("no {op} series in\n{metrics}"))
            .to_string()
    };
    assert!(series("Decrypt").ends_with(" 1"), "{}", series("Decrypt"));
    assert!(
        series("DescribeKey").ends_with(" 1"),
        "{}",
        series("DescribeKey")
    );
    assert!(series("Decrypt").contains(&format!("kek=\"{}\"", kek(&arn))));
    assert!(
        metrics.contains("timevault_kms_request_errors_total{provider=\"aws-kms\""),
        "{metrics}"
    );
    daemon.stop();
}

#[test]
fn a_disabled_or_deleting_kek_is_refused_and_the_other_region_opens() {
    let dir = tempfile::tempdir().unwrap();
    let west = s3().create_kms_key("eu-west-1").unwrap();
    let north = s3().create_kms_key("eu-north-1").unwrap();
    app_db(dir.path(), 200);
    let config = config(
        dir.path(),
        "config",
        ConfigBuilder::new().kek(&[&kek(&west), &kek(&north)]),
    );
    ok(&tv(&config, &["init"]));
    ok(&tv(&config, &["backup"]));

    // West disabled: moto would still decrypt with it; timevault refuses and opens via north.
    s3().set_kms_key(&west, "DisableKey").unwrap();
    let shown: serde_json::Value =
        serde_json::from_str(&ok(&tv(&config, &["keys", "show", "--json"]))).unwrap();
    assert_eq!(shown["opened_by"], kek(&north), "{shown}");
    let states: Vec<String> = shown["copies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("{} {}", c["kek"].as_str().unwrap(), c["state"]))
        .collect();
    assert!(
        states.contains(&format!("{} {{\"refused\":\"Disabled\"}}", kek(&west))),
        "{states:?}"
    );
    restore_matches(dir.path(), &config, "via-north.db");

    // North pending deletion too: nothing opens, and the error names both states (exit 3).
    s3().schedule_kms_key_deletion(&north).unwrap();
    let out = tv(&config, &["snapshots"]);
    assert_eq!(exit_code(&out), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("key state is Disabled") && err.contains("key state is PendingDeletion"),
        "{err}"
    );
    assert!(
        err.contains(&kek(&west)) && err.contains(&kek(&north)),
        "{err}"
    );

    // West enabled again: the repository opens again.
    s3().set_kms_key(&west, "EnableKey").unwrap();
    restore_matches(dir.path(), &config, "via-west.db");
}

#[test]
fn a_copy_from_another_repository_or_an_edited_copy_does_not_open_it() {
    let dir = tempfile::tempdir().unwrap();
    let arn = s3().create_kms_key("us-east-1").unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    for d in [&one, &two] {
        std::fs::create_dir_all(d).unwrap();
        app_db(d, 10);
    }
    let c1 = config(&one, "c1", ConfigBuilder::new().kek(&[&kek(&arn)]));
    let c2 = config(&two, "c2", ConfigBuilder::new().kek(&[&kek(&arn)]));
    ok(&tv(&c1, &["init"]));
    ok(&tv(&c2, &["init"]));
    // The same KEK names the same object in both: put repository one's copy into two.
    let copy = |d: &Path, r: &str| {
        let dir = d.join(r).join("keys/repository");
        std::fs::read_dir(&dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
    };
    for r in ["ra", "rb"] {
        std::fs::copy(copy(&one, r), copy(&two, r)).unwrap();
    }
    let out = tv(&c2, &["snapshots"]);
    assert_eq!(exit_code(&out), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("not of"), "{}", stderr(&out));

    // An edited copy (its MAC no longer matches) on replica a: replica b's copy still opens.
    let path = copy(&one, "ra");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
    value["key"]["created_at"] = "2001-01-01T00:00:00Z".into();
    std::fs::write(&path, serde_json::to_vec_pretty(&value).unwrap()).unwrap();
    ok(&tv(&c1, &["snapshots"]));
    let out = tv(&c1, &["verify", "--read-data"]);
    assert!(!out.status.success(), "verify must report the edited copy");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("keys/repository/"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn keys_rotate_moves_a_key_file_repository_to_kms_and_retires_safely() {
    let dir = tempfile::tempdir().unwrap();
    let arn = s3().create_kms_key("eu-west-1").unwrap();
    let other = s3().create_kms_key("eu-west-1").unwrap();
    app_db(dir.path(), 300);
    // A format-1 repository, made with a key file.
    let with_file = config(dir.path(), "with_file", ConfigBuilder::new().key_file("k"));
    ok(&tv(&with_file, &["init"]));
    ok(&tv(&with_file, &["backup"]));
    let out = ok(&tv(&with_file, &["keys", "rotate", "--kek", &kek(&arn)]));
    assert!(out.contains("wrapped the repository key under"), "{out}");

    // The same repository through KMS alone (no key file in the config).
    std::fs::rename(dir.path().join("k"), dir.path().join("k.away")).unwrap();
    let kms_only = config(
        dir.path(),
        "kms_only",
        ConfigBuilder::new().kek(&[&kek(&arn)]),
    );
    restore_matches(dir.path(), &kms_only, "via-kms.db");

    // Without flags, rotate adds a copy for each configured KEK that has none.
    let both = config(
        dir.path(),
        "both",
        ConfigBuilder::new().kek(&[&kek(&arn), &kek(&other)]),
    );
    let out = ok(&tv(&both, &["keys", "rotate"]));
    assert!(out.contains(&kek(&other)), "{out}");
    let out = ok(&tv(&both, &["keys", "rotate"]));
    assert!(out.contains("nothing to do"), "{out}");

    // Retiring the first KEK's copy while the second key is disabled would leave no copy that
    // opens the repository: refused, naming the state (found by hand).
    s3().set_kms_key(&other, "DisableKey").unwrap();
    let out = tv(&both, &["keys", "rotate", "--retire", &kek(&arn)]);
    assert_eq!(exit_code(&out), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("is Disabled"), "{}", stderr(&out));
    s3().set_kms_key(&other, "EnableKey").unwrap();

    // Retire the first KEK's copy: the second still opens, the first no longer does.
    let out = ok(&tv(&both, &["keys", "rotate", "--retire", &kek(&arn)]));
    assert!(out.contains("retired"), "{out}");
    let only_first = config(
        dir.path(),
        "only_first",
        ConfigBuilder::new().kek(&[&kek(&arn)]),
    );
    let out = tv(&only_first, &["snapshots"]);
    assert_eq!(exit_code(&out), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("holds no copy wrapped by it"),
        "{}",
        stderr(&out)
    );
    restore_matches(dir.path(), &both, "via-other.db");
    // A typo in --retire names the copies there are.
    let out = tv(
        &both,
        &[
            "keys",
            "rotate",
            "--retire",
            "aws-kms:arn:aws:kms:eu-west-1:123456789012:key/typo",
        ],
    );
    assert_eq!(exit_code(&out), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains(&kek(&other)), "{}", stderr(&out));
}

#[test]
fn a_kms_repository_with_a_passphrase_copy_opens_with_either_and_never_loses_its_last_copy() {
    let dir = tempfile::tempdir().unwrap();
    let arn = s3().create_kms_key("eu-west-1").unwrap();
    app_db(dir.path(), 50);
    let both = config(
        dir.path(),
        "both",
        ConfigBuilder::new()
            .passphrase_env("TV_KMS_PASS")
            .kek(&[&kek(&arn)]),
    );
    let run = |config: &Path, args: &[&str]| {
        Command::new(common::binary())
            .arg("--config")
            .arg(config)
            .args(args)
            .envs(s3().kms_env())
            .env("TV_KMS_PASS", "correct horse battery staple")
            .output()
            .unwrap()
    };
    ok(&run(&both, &["init"]));
    ok(&run(&both, &["backup"]));
    let passphrase_only = config(
        dir.path(),
        "passphrase_only",
        ConfigBuilder::new().passphrase_env("TV_KMS_PASS"),
    );
    let shown: serde_json::Value =
        serde_json::from_str(&ok(&run(&passphrase_only, &["keys", "show", "--json"]))).unwrap();
    assert_eq!(shown["opened_by"], "passphrase", "{shown}");
    // A wrong passphrase with the KMS KEK disabled: a key error, not corruption.
    s3().set_kms_key(&arn, "DisableKey").unwrap();
    let out = Command::new(common::binary())
        .arg("--config")
        .arg(&both)
        .arg("snapshots")
        .envs(s3().kms_env())
        .env("TV_KMS_PASS", "wrong")
        .output()
        .unwrap();
    assert_eq!(exit_code(&out), Some(3), "{}", stderr(&out));
    s3().set_kms_key(&arn, "EnableKey").unwrap();
    // Retiring the passphrase leaves the KMS copy; retiring that too is refused.
    ok(&run(&both, &["keys", "rotate", "--retire", "passphrase"]));
    let out = run(&both, &["keys", "rotate", "--retire", &kek(&arn)]);
    assert_eq!(exit_code(&out), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("last copy"), "{}", stderr(&out));
    let out = run(&passphrase_only, &["snapshots"]);
    assert_eq!(exit_code(&out), Some(3), "{}", stderr(&out));
}

/// A restore at `latest` into `dir/name` equals `app.db`.
fn restore_matches(dir: &Path, config: &Path, name: &str) {
    common::kek_app::restore_matches(dir, name, |args| tv(config, args));
}
