//! Disaster recovery at another site, on the embedded default: one replica is lost entirely;
//! restores still work from the survivor (named, and by automatic failover); `replicas sync`
//! rebuilds the lost one and `verify` is clean again. Credentials never reach output.

use crate::common;

use common::{checksums, ok, timevault, Env};
use timevault_fixtures::Workload;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_replica_is_survived_and_rebuilt() {
    let env = Env::new(31).await;
    let config = env.write_config();
    ok(&timevault(&config, &["init"]));
    ok(&timevault(&config, &["daemon", "--once"]));
    let mut app = env.app().await;
    let mut workload = Workload::new(31, 1).with_bulk_rows(2_000);
    let mut points = Vec::new();
    for _ in 0..3 {
        let point = workload.step(&mut app, None).await.unwrap();
        ok(&timevault(&config, &["daemon", "--once"]));
        let status: serde_json::Value =
            serde_json::from_str(&ok(&timevault(&config, &["status", "--json"]))).unwrap();
        let newest = status["sources"][0]["newest"].as_str().unwrap().to_string();
        points.push((newest, point.tables));
    }

    // The eu-west site is gone.
    std::fs::remove_dir_all(env.path().join("replicas/eu-west")).unwrap();
    std::fs::create_dir_all(env.path().join("replicas/eu-west")).unwrap();
    let verify = timevault(&config, &["verify"]);
    assert_eq!(verify.status.code(), Some(9), "verify reports the loss");

    for (i, (at, tables)) in points.iter().enumerate() {
        // Named survivor, then automatic failover (eu-west is first in the config).
        for (label, extra) in [
            ("named", vec!["--replica", "eu-north"]),
            ("failover", vec![]),
        ] {
            let target = env.path().join(format!("dr-{label}-{i}.db"));
            let mut args = vec![
                "restore",
                "--source",
                "app",
                "--at",
                at.as_str(),
                "--to",
                target.to_str().unwrap(),
            ];
            args.extend(extra);
            ok(&timevault(&config, &args));
            assert_eq!(
                &checksums(&target).await,
                tables,
                "{label} restore of point {i}"
            );
        }
    }

    // Rebuild the lost site from the survivor, then everything verifies.
    let out = ok(&timevault(&config, &["replicas", "sync"]));
    assert!(out.contains("replica eu-west:"), "{out}");
    ok(&timevault(&config, &["verify", "--read-data"]));
    let target = env.path().join("dr-west-only.db");
    let (at, tables) = points.last().unwrap();
    ok(&timevault(
        &config,
        &[
            "restore",
            "--source",
            "app",
            "--at",
            at,
            "--to",
            target.to_str().unwrap(),
            "--replica",
            "eu-west",
        ],
    ));
    assert_eq!(&checksums(&target).await, tables);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_output() {
    let env = Env::new(32).await;
    let secret = "S3cr3t-Do-Not-Print";
    let config = env
        .config_builder()
        .replica_with(
            "eu-north",
            "northeurope",
            "s3://bucket/prefix",
            [
                ("endpoint", "http://127.0.0.1:9"),
                ("allow_http", "true"),
                ("region", "us-east-1"),
                ("access_key_id", "AKIAEXAMPLE"),
                ("secret_access_key", secret),
            ],
        )
        .write_as(&env.path().join("secret.toml"));
    let show = timevault(&config, &["config", "show"]);
    assert!(show.status.success());
    // The S3 endpoint is unreachable: init fails and says so, without the secret.
    let init = timevault(&config, &["--log", "debug", "init"]);
    assert!(!init.status.success());
    let list = timevault(&config, &["replicas", "list"]);
    for out in [&show, &init, &list] {
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!all.contains(secret), "secret leaked: {all}");
    }
    assert!(
        String::from_utf8_lossy(&init.stderr).contains("eu-north"),
        "the failing replica is named"
    );
}
