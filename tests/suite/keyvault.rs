//! Key-encryption keys in Azure Key Vault: a repository whose data key exists only wrapped by a
//! Key Vault key backs up and restores; a disabled, expired or deleted key is refused (exit 3)
//! while an AWS KMS KEK beside it still opens the repository; a wrong client secret is a key error
//! naming the vault; a rotated key (a new version) still opens copies wrapped by the old version.
//! The vault is the harness's in-process fake (HTTPS on 127.0.0.1, see docs/TESTING.md for what
//! it does not model); timevault runs as a process with the Azure SDK's standard environment
//! (`AZURE_*`, `SSL_CERT_FILE`) pointing at it.

use crate::common;
use common::config::ConfigBuilder;
use common::kek_app::app_db;
use common::ok;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use timevault_fixtures::harness::{keyvault, s3};

/// `timevault --config <config> args...` with the fake vault's (and moto's KMS) environment,
/// then `extra` on top.
fn tv_with(config: &Path, args: &[&str], extra: &[(&str, &str)]) -> Output {
    Command::new(common::binary())
        .arg("--config")
        .arg(config)
        .args(args)
        .envs(keyvault().env())
        .envs(s3().kms_env())
        .envs(extra.iter().copied())
        .output()
        .expect("run timevault")
}

fn tv(config: &Path, args: &[&str]) -> Output {
    tv_with(config, args, &[])
}

fn kek(url: &str) -> String {
    format!("azure-keyvault:{url}")
}

/// Two file replicas and the source `app`, the keys as `keks` name them: no local key.
fn repo_config(dir: &Path, name: &str, keks: &[&str]) -> PathBuf {
    ConfigBuilder::new()
        .kek(keks)
        .without_local_key()
        .replica("a", "r1", "ra")
        .replica("b", "r2", "rb")
        .sqlite("app", "app.db")
        .write_as(&dir.join(format!("{name}.toml")))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn shown(config: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&tv(config, &["keys", "show", "--json"]))).unwrap()
}

/// The one copy's record on replica `ra`.
fn stored_copy(dir: &Path) -> serde_json::Value {
    let copies: Vec<_> = std::fs::read_dir(dir.join("ra/keys/repository"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(copies.len(), 1, "{copies:?}");
    serde_json::from_slice(&std::fs::read(&copies[0]).unwrap()).unwrap()
}

#[test]
fn a_repository_opened_only_through_key_vault_backs_up_and_restores() {
    let dir = tempfile::tempdir().unwrap();
    let key = keyvault().create_key("tv-rsa");
    app_db(dir.path(), 400);
    let config = repo_config(dir.path(), "config", &[&kek(&key)]);
    let out = ok(&tv(&config, &["init"]));
    assert!(out.contains("created repository"), "{out}");
    assert!(!out.contains("generated a new key"), "{out}");

    // The copy records the key version that wrapped it, and RSA-OAEP-256 for an RSA key.
    let record = stored_copy(dir.path());
    assert_eq!(record["key"]["algorithm"], "RSA-OAEP-256", "{record}");
    let kid = record["key"]["kid"].as_str().unwrap().to_string();
    assert!(kid.starts_with(&format!("{key}/")), "{kid}");
    let version = kid.rsplit('/').next().unwrap();
    let name = key.rsplit('/').next().unwrap();
    let calls = keyvault().calls(&key);
    assert!(
        calls.contains(&format!("WrapKey {name}/{version}")),
        "{calls:?}"
    );

    let report = shown(&config);
    assert_eq!(report["format"], 2, "{report}");
    assert_eq!(report["opened_by"], kek(&key), "{report}");
    assert_eq!(report["copies"][0]["state"], "enabled", "{report}");
    assert_eq!(report["copies"][0]["algorithm"], "RSA-OAEP-256", "{report}");

    ok(&tv(&config, &["backup"]));
    restore_matches(dir.path(), &config, "restored.db");
    ok(&tv(&config, &["verify", "--read-data"]));
    // Every unwrap named the recorded version.
    let unwraps: Vec<String> = keyvault()
        .calls(&key)
        .into_iter()
        .filter(|c| c.starts_with("UnwrapKey"))
        .collect();
    assert!(!unwraps.is_empty());
    assert!(
        unwraps
            .iter()
            .all(|c| *c == format!("UnwrapKey {name}/{version}")),
        "{unwraps:?}"
    );
}

#[test]
fn a_symmetric_key_wraps_with_a256kw_and_a_new_version_still_opens_old_copies() {
    let dir = tempfile::tempdir().unwrap();
    let key = keyvault().create_oct_key("tv-oct");
    app_db(dir.path(), 100);
    let config = repo_config(dir.path(), "config", &[&kek(&key)]);
    ok(&tv(&config, &["init"]));
    ok(&tv(&config, &["backup"]));
    let before = stored_copy(dir.path());
    assert_eq!(before["key"]["algorithm"], "A256KW", "{before}");

    // Rotated in the vault: the copy still names (and unwraps with) the version that wrapped it.
    let older = before["key"]["kid"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    let newer = keyvault().new_version(&key);
    restore_matches(dir.path(), &config, "after-rotation.db");
    let name = key.rsplit('/').next().unwrap();
    let calls = keyvault().calls(&key);
    assert!(
        calls.contains(&format!("UnwrapKey {name}/{older}")),
        "{calls:?}"
    );
    assert!(
        !calls.contains(&format!("UnwrapKey {name}/{newer}")),
        "{calls:?}"
    );

    // The same key pinned to its new version is another KEK: rotate adds its copy beside.
    let pinned = kek(&format!("{key}/{newer}"));
    let both = repo_config(dir.path(), "both", &[&kek(&key), &pinned]);
    let out = ok(&tv(&both, &["keys", "rotate"]));
    assert!(out.contains(&pinned), "{out}");
    let only_pinned = repo_config(dir.path(), "pinned", &[&pinned]);
    assert_eq!(shown(&only_pinned)["opened_by"], pinned);
}

#[test]
fn a_disabled_expired_or_deleted_key_is_refused_and_a_kms_kek_beside_it_opens() {
    let dir = tempfile::tempdir().unwrap();
    let key = keyvault().create_key("tv-refused");
    let arn = s3().create_kms_key("eu-west-1").unwrap();
    let aws = format!("aws-kms:{arn}");
    app_db(dir.path(), 200);
    let both = repo_config(dir.path(), "both", &[&kek(&key), &aws]);
    let azure_only = repo_config(dir.path(), "azure_only", &[&kek(&key)]);
    ok(&tv(&both, &["init"]));
    ok(&tv(&both, &["backup"]));
    assert_eq!(shown(&azure_only)["opened_by"], kek(&key));

    // Disabled: refused (the fake would refuse to unwrap too; timevault asks GetKey first).
    keyvault().disable(&key);
    let out = tv(&azure_only, &["snapshots"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("{}: key state is Disabled", kek(&key))),
        "{}",
        stderr(&out)
    );
    let report = shown(&both);
    assert_eq!(report["opened_by"], aws, "{report}");
    let states: Vec<String> = report["copies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("{} {}", c["kek"].as_str().unwrap(), c["state"]))
        .collect();
    assert!(
        states.contains(&format!("{} {{\"refused\":\"Disabled\"}}", kek(&key))),
        "{states:?}"
    );
    restore_matches(dir.path(), &both, "via-kms.db");

    // Enabled but expired: refused as Expired.
    keyvault().enable(&key);
    keyvault().expire(&key);
    let out = tv(&azure_only, &["snapshots"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("key state is Expired"),
        "{}",
        stderr(&out)
    );

    // Deleted: NotFound, and the KMS KEK still opens.
    keyvault().delete(&key);
    let out = tv(&azure_only, &["snapshots"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("key state is NotFound"),
        "{}",
        stderr(&out)
    );
    ok(&tv(&both, &["snapshots"]));
}

#[test]
fn a_wrong_client_secret_is_a_key_error_naming_the_vault() {
    let dir = tempfile::tempdir().unwrap();
    let key = keyvault().create_key("tv-secret");
    app_db(dir.path(), 10);
    let config = repo_config(dir.path(), "config", &[&kek(&key)]);
    ok(&tv(&config, &["init"]));

    let out = tv_with(
        &config,
        &["snapshots"],
        &[("AZURE_CLIENT_SECRET", "not-the-secret")],
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains(&keyvault().url()), "{err}");
    assert!(err.contains("Invalid client secret"), "{err}");
    // Nothing reached the key: the token was refused before any authorized call.
    assert!(
        !keyvault()
            .calls(&key)
            .iter()
            .any(|c| c.starts_with("UnwrapKey")),
        "{:?}",
        keyvault().calls(&key)
    );
}

/// A restore at `latest` into `dir/name` equals `app.db`.
fn restore_matches(dir: &Path, config: &Path, name: &str) {
    common::kek_app::restore_matches(dir, name, |args| tv(config, args));
}
