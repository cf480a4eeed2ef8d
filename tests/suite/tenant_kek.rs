//! A tenant's own key-encryption key (issue 24, `[tenancy.keys]`: a customer-managed key in
//! moto's KMS). The tenant's data key is wrapped by it, not by the repository key. Disabled
//! under a running daemon: `/healthz` and `/metrics` name the tenant, capture goes on for every
//! tenant (nothing is lost), a fresh process cannot restore that tenant (exit 3, naming the
//! key's state) while other tenants restore; enabled again: healthy, and a whole restore equals
//! the source. The customer replaces its key: `keys rotate` wraps the tenant's key under the new
//! one, and the tenant restores with the old one disabled. Writes come from `psql`. A customer
//! KEK in Azure Key Vault (the harness's fake) wraps and unwraps the same way, and `tenant
//! forget --delete-kek` deletes it in the vault.

use crate::common;
use common::config::ConfigBuilder;
use common::daemon::Daemon;
use common::{http_get, ok, psql};

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use chrono::Utc;
use timevault::config::Config;
use timevault_fixtures::checksum::tenant_ids;
use timevault_fixtures::harness::{free_port, keyvault, s3, unique_name};
use timevault_fixtures::{
    generate_postgres, table_checksums, tenant_checksums, Database, GenerateOptions,
};

fn tv(config: &Path, args: &[&str]) -> Output {
    common::timevault_kms(config, args)
}

/// Wait until `/healthz` answers `status` with a body containing `needle`.
fn healthz_until(daemon: &Daemon, port: u16, status: u16, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((code, body)) = http_get(port, "/healthz") {
            if code == status && body.contains(needle) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "/healthz never answered {status} with {needle:?}; last {code}: {body}\ndaemon log:\n{}",
                daemon.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_kek_wraps_its_key_and_disabling_it_is_reported_while_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::pg!().create_database().await.unwrap();
    generate_postgres(&url, &GenerateOptions { seed: 81, scale: 3 })
        .await
        .unwrap();
    let mut app = Database::Postgres(url.clone()).connect().await.unwrap();
    let tenants = tenant_ids(&mut app).await.unwrap();
    let (a, b) = (tenants[0], tenants[1]);
    let customer = s3().create_kms_key("eu-west-1").unwrap();
    let customer_kek = format!("aws-kms:{customer}");
    let port = free_port().unwrap();
    // The repository opens with its key file (so this test process can read the catalog); B's
    // data key is wrapped by the customer's KMS key.
    let config_path = ConfigBuilder::one_replica("north")
        .postgres("tk", &url)
        .fixture_tenancy()
        .tenant_kek(&b.to_string(), &customer_kek)
        .kek_check_interval("1s")
        .schedule("capture_interval", "200ms")
        .listen(port)
        .write(dir.path());
    ok(&tv(&config_path, &["init"]));
    let config = Config::load(&config_path).unwrap();
    let daemon = Daemon::command(&config_path).envs(s3().kms_env()).start();
    common::captured_within_a_minute(&config, "tk", Utc::now()).await;

    // B's key is wrapped by its KEK, the others' by the repository key.
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&tv(&config_path, &["tenant", "keys", "--json"]))).unwrap();
    for k in listed.as_array().unwrap() {
        let wrapped_by = k["wrapped_by"].as_str().unwrap();
        if k["tenant"].as_str() == Some(b.to_string().as_str()) {
            assert_eq!(wrapped_by, customer_kek, "{k}");
        } else {
            assert_eq!(wrapped_by, "repository", "{k}");
        }
    }
    healthz_until(&daemon, port, 200, "");

    // The customer disables its key: reported within the check interval, capture goes on.
    s3().set_kms_key(&customer, "DisableKey").unwrap();
    let touch = |tenant: i64, note: &str| {
        psql(
            &url,
            &format!("UPDATE contracts SET title = title || ' {note}' WHERE tenant_id = {tenant}"),
        );
    };
    touch(a, "while disabled");
    touch(b, "while disabled");
    let body = healthz_until(
        &daemon,
        port,
        503,
        &format!("tenant {b}: its key-encryption key is not usable"),
    );
    assert!(body.contains("Disabled"), "{body}");
    let (_, metrics) = http_get(port, "/metrics").unwrap();
    assert!(
        metrics.contains(&format!("timevault_tenant_kek_usable{{tenant=\"{b}\"}} 0")),
        "{metrics}"
    );
    let written = Utc::now();
    touch(a, "still disabled");
    touch(b, "still disabled");
    common::captured_within_a_minute(&config, "tk", written).await;

    // A fresh process cannot unwrap B's key: B's restore fails naming the key's state; A's
    // restore does not need B's key.
    let target = |name: &str| crate::pg!().url(&unique_name(name).replace('-', "_"));
    let restore_tenant = |tenant: i64, to: &str| {
        tv(
            &config_path,
            &[
                "restore",
                "--source",
                "tk",
                "--at",
                "latest",
                "--tenant",
                &tenant.to_string(),
                "--to",
                to,
            ],
        )
    };
    let refused = restore_tenant(b, &target("tkb"));
    assert_eq!(refused.status.code(), Some(3), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("key state is Disabled"), "{stderr}");
    let a_target = target("tka");
    ok(&restore_tenant(a, &a_target));
    let mut restored = Database::Postgres(a_target).connect().await.unwrap();
    assert_eq!(
        tenant_checksums(&mut restored, a).await.unwrap(),
        tenant_checksums(&mut app, a).await.unwrap()
    );

    // Enabled again: healthy, and a whole restore holds every row, B's written while its key
    // was disabled included.
    s3().set_kms_key(&customer, "EnableKey").unwrap();
    healthz_until(&daemon, port, 200, "");
    let last = Utc::now();
    common::captured_within_a_minute(&config, "tk", last).await;
    daemon.stop();
    let whole = target("tkw");
    ok(&tv(
        &config_path,
        &[
            "restore", "--source", "tk", "--at", "latest", "--to", &whole,
        ],
    ));
    let mut restored = Database::Postgres(whole).connect().await.unwrap();
    assert_eq!(
        table_checksums(&mut restored).await.unwrap(),
        table_checksums(&mut app).await.unwrap()
    );

    // The customer replaces its key: the config names the new one, `keys rotate` wraps B's
    // data key under it (the old one opens it), and B restores with the old key disabled.
    let replaced = s3().create_kms_key("eu-west-1").unwrap();
    let replaced_kek = format!("aws-kms:{replaced}");
    let text = std::fs::read_to_string(&config_path).unwrap();
    assert!(text.contains(&customer_kek), "{text}");
    std::fs::write(&config_path, text.replace(&customer_kek, &replaced_kek)).unwrap();
    let said = ok(&tv(&config_path, &["keys", "rotate"]));
    assert!(
        said.contains(&format!("wrapped tenant {b}'s key ")),
        "{said}"
    );
    assert!(
        said.contains(&format!("under {replaced_kek} instead of {customer_kek}")),
        "{said}"
    );
    let again = ok(&tv(&config_path, &["keys", "rotate"]));
    assert!(again.contains("nothing to do"), "rotating twice: {again}");
    s3().set_kms_key(&customer, "DisableKey").unwrap();
    let b_target = target("tkr");
    ok(&restore_tenant(b, &b_target));
    let mut restored = Database::Postgres(b_target).connect().await.unwrap();
    assert_eq!(
        tenant_checksums(&mut restored, b).await.unwrap(),
        tenant_checksums(&mut app, b).await.unwrap()
    );
    let customer = replaced;

    // The customer leaves: forgetting B can schedule its KMS key's deletion too (A has no KEK
    // of its own: refused before anything is destroyed).
    let forget = |tenant: i64| {
        tv(
            &config_path,
            &[
                "tenant",
                "forget",
                &tenant.to_string(),
                "--requested-by",
                "dpo@example.com",
                "--reason",
                "contract ended",
                "--delete-kek",
                "--yes",
            ],
        )
    };
    let refused = forget(a);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("names no key-encryption key"));
    let said = ok(&forget(b));
    assert!(said.contains("deletion scheduled for"), "{said}");
    assert_eq!(s3().kms_key_state(&customer).unwrap(), "PendingDeletion");
    let listed = ok(&tv(&config_path, &["tenant", "keys"]));
    assert!(
        listed.contains(&format!("tenant {a} ")),
        "A untouched: {listed}"
    );
    assert!(!listed.contains(&format!("tenant {b} ")), "{listed}");
}

/// A backup host with a customer's KEK (issue 25): the daemon, holding only a backup
/// credential, wraps each new tenant key under the customer's KMS key and never asks it to
/// decrypt. moto does not evaluate key policies, so the test asserts the requests the daemon
/// makes (its `/metrics` count every KMS call): `Encrypt` and `DescribeKey`, never `Decrypt`;
/// a policy granting the backup identity `kms:Encrypt` and `kms:DescribeKey` only is enough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_host_wraps_tenant_keys_under_the_customer_kek_and_never_decrypts() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::pg!().create_database().await.unwrap();
    generate_postgres(&url, &GenerateOptions { seed: 83, scale: 1 })
        .await
        .unwrap();
    let mut app = Database::Postgres(url.clone()).connect().await.unwrap();
    let b = tenant_ids(&mut app).await.unwrap()[1];
    let customer = s3().create_kms_key("eu-west-1").unwrap();
    let customer_kek = format!("aws-kms:{customer}");
    let port = free_port().unwrap();
    let base = ConfigBuilder::one_replica("north")
        .postgres("tkbackup", &url)
        .fixture_tenancy()
        .tenant_kek(&b.to_string(), &customer_kek)
        .schedule("capture_interval", "200ms")
        .listen(port);
    let admin = base.write(dir.path());
    ok(&tv(&admin, &["init"]));
    let cred = dir.path().join("backup.cred");
    ok(&tv(
        &admin,
        &["keys", "role", "backup", "--out", cred.to_str().unwrap()],
    ));
    let backup = base
        .clone()
        .key_file("backup.cred")
        .write_as(&dir.path().join("backup.toml"));
    let config = Config::load(&backup).unwrap();
    let daemon = Daemon::command(&backup).envs(s3().kms_env()).start();
    common::captured_within_a_minute(&config, "tkbackup", Utc::now()).await;
    psql(
        &url,
        &format!(
            "UPDATE contracts SET title = title || ' on the backup host' WHERE tenant_id = {b}"
        ),
    );
    common::captured_within_a_minute(&config, "tkbackup", Utc::now()).await;
    let (_, metrics) = http_get(port, "/metrics").unwrap();
    let calls = |operation: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("timevault_kms_requests_total")
                    && l.contains(&format!("operation=\"{operation}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(calls("Encrypt") >= 1.0, "B's new key wrapped: {metrics}");
    assert_eq!(calls("Decrypt"), 0.0, "never asked to decrypt: {metrics}");
    daemon.stop();
    // The admin (the restore role would do) opens B's key through the customer's KEK.
    let listed = ok(&tv(&admin, &["tenant", "keys"]));
    assert!(listed.contains(&customer_kek), "{listed}");
}

/// A customer's KEK in Azure Key Vault (the harness's fake, through the Azure SDK): the
/// tenant's data key is wrapped by `wrapKey`, a fresh process restores the tenant through
/// `unwrapKey`, and `tenant forget --delete-kek` deletes the key in the vault (soft delete: the
/// vault answers with its purge date) after destroying the tenant's keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_kek_in_key_vault_wraps_its_key_and_forget_deletes_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::pg!().create_database().await.unwrap();
    generate_postgres(&url, &GenerateOptions { seed: 85, scale: 1 })
        .await
        .unwrap();
    let mut app = Database::Postgres(url.clone()).connect().await.unwrap();
    let tenants = tenant_ids(&mut app).await.unwrap();
    let (a, b) = (tenants[0], tenants[1]);
    let vault = keyvault();
    let customer = vault.create_key("tv-tenant");
    let customer_kek = format!("azure-keyvault:{customer}");
    let config = ConfigBuilder::one_replica("north")
        .postgres("tkvault", &url)
        .fixture_tenancy()
        .tenant_kek(&b.to_string(), &customer_kek)
        .write(dir.path());
    let tv = |args: &[&str]| {
        std::process::Command::new(common::binary())
            .arg("--config")
            .arg(&config)
            .args(args)
            .envs(vault.env())
            .output()
            .expect("run timevault")
    };
    ok(&tv(&["init"]));
    ok(&tv(&["backup"]));
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&tv(&["tenant", "keys", "--json"]))).unwrap();
    let wrapped_by = |tenant: i64| {
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["tenant"].as_str() == Some(tenant.to_string().as_str()))
            .map(|k| k["wrapped_by"].as_str().unwrap().to_string())
    };
    assert_eq!(wrapped_by(b).as_deref(), Some(customer_kek.as_str()));
    assert_eq!(wrapped_by(a).as_deref(), Some("repository"));
    let calls = vault.calls(&customer);
    assert!(calls.iter().any(|c| c.starts_with("WrapKey ")), "{calls:?}");

    // A fresh process restores B through the vault.
    let b_target = crate::pg!().url(&unique_name("tkvb").replace('-', "_"));
    ok(&tv(&[
        "restore",
        "--source",
        "tkvault",
        "--at",
        "latest",
        "--tenant",
        &b.to_string(),
        "--to",
        &b_target,
    ]));
    let mut restored = Database::Postgres(b_target).connect().await.unwrap();
    assert_eq!(
        tenant_checksums(&mut restored, b).await.unwrap(),
        tenant_checksums(&mut app, b).await.unwrap()
    );
    let calls = vault.calls(&customer);
    assert!(
        calls.iter().any(|c| c.starts_with("UnwrapKey ")),
        "{calls:?}"
    );

    // B leaves: its keys are destroyed, then its key is deleted in the vault.
    let said = ok(&tv(&[
        "tenant",
        "forget",
        &b.to_string(),
        "--requested-by",
        "dpo@example.com",
        "--reason",
        "contract ended",
        "--delete-kek",
        "--yes",
    ]));
    assert!(
        said.contains(&format!("{customer_kek}: deleted; purge scheduled for ")),
        "{said}"
    );
    assert!(vault.is_deleted(&customer));
    assert_eq!(
        vault.calls(&customer).last().map(String::as_str),
        Some(format!("DeleteKey {}/latest", customer.rsplit('/').next().unwrap()).as_str())
    );
    let listed = ok(&tv(&["tenant", "keys"]));
    assert!(listed.contains(&format!("tenant {a} ")), "{listed}");
    assert!(!listed.contains(&format!("tenant {b} ")), "{listed}");
    let audit = ok(&tv(&["audit", "--json"]));
    assert!(
        audit.contains("purge scheduled for"),
        "the audit keeps it: {audit}"
    );
}
