//! Personal data kept only as long as needed: the retention purge and `EraseAccount` (over
//! gRPC and the CLI) leave nothing of the account in the SQLite ledger's file, checked on the
//! file's bytes once the gateway stopped; an account's opt-out stays.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use otp_gateway::proto::v1;
use otp_gateway::proto::v1::policy_admin_client::PolicyAdminClient;
use serde_json::json;

use crate::helpers::*;

/// Whether `marker` is anywhere in the ledger's files (database and write-ahead log).
fn in_ledger_files(dir: &Path, marker: &str) -> bool {
    ["ledger.db", "ledger.db-wal"].iter().any(|name| {
        let found = std::fs::read(dir.join(name))
            .unwrap_or_default()
            .windows(marker.len())
            .any(|w| w == marker.as_bytes());
        if found {
            eprintln!("{marker} is in {name}");
        }
        found
    })
}

fn account_job(job_id: &str, account: &str) -> serde_json::Value {
    let mut job = job(job_id, "482913");
    job["account"] = json!(account);
    job
}

// Two workers: the CLI below blocks one while the gateway in this process answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_account_leaves_nothing_in_the_ledger_file_but_its_opt_out() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("erase");
    let mut broker = Broker::connect(&names).await;
    let gateway = Gateway::start(config(&names, dir.path(), &[])).await;
    let erased = format!("erase-me-{}", names.suffix);
    let kept = format!("keep-me-{}", names.suffix);
    for (n, account) in [(0, &erased), (1, &erased), (2, &kept)] {
        broker
            .publish_json(&account_job(&format!("erase-job-{n}"), account))
            .await;
    }
    broker.events_for(3, Duration::from_secs(20)).await;
    // An operator blocked the account; the account also opted out of another tenant's codes.
    let mut admin = PolicyAdminClient::connect(format!("http://{}", gateway.grpc_addr))
        .await
        .unwrap();
    for (tenant, source) in [
        ("acme", v1::BlockSource::Admin),
        ("globex", v1::BlockSource::OptOut),
    ] {
        admin
            .add_block_entry(v1::AddBlockEntryRequest {
                tenant: tenant.into(),
                kind: v1::BlockKind::Account as i32,
                pattern: erased.clone(),
                source: source as i32,
                ..Default::default()
            })
            .await
            .unwrap();
    }

    // Erased through the CLI for acme, and through gRPC for globex (where its opt-out stays).
    let output = Command::new(env!("CARGO_BIN_EXE_otp-gateway"))
        .args(["erase-account", "--tenant", "acme", "--account", &erased])
        .args(["--server", &gateway.grpc_addr.to_string()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        said.contains("2 deliveries, 1 block entries (0 opt-outs kept)"),
        "{said}"
    );
    let globex = admin
        .erase_account(v1::EraseAccountRequest {
            tenant: "globex".into(),
            account: erased.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            globex.deliveries_removed,
            globex.block_entries_removed,
            globex.opt_outs_kept
        ),
        (0, 0, 1)
    );
    let mut client = gateway.client().await;
    let gone = client
        .get_delivery(v1::GetDeliveryRequest {
            delivery_id: "acme/erase-job-0".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
    client
        .get_delivery(v1::GetDeliveryRequest {
            delivery_id: "acme/erase-job-2".into(),
        })
        .await
        .expect("another account's delivery stays");
    gateway.stop().await;

    assert!(!in_ledger_files(dir.path(), "erase-job-0"));
    assert!(!in_ledger_files(dir.path(), "erase-job-1"));
    assert!(in_ledger_files(dir.path(), "erase-job-2"));
    assert!(in_ledger_files(dir.path(), &kept));
    // Not even the opt-out kept names the account: it is hashed.
    let ledger = std::fs::read(dir.path().join("ledger.db")).unwrap();
    let mentions = ledger
        .windows(erased.len())
        .filter(|w| *w == erased.as_bytes())
        .count();
    assert_eq!(
        mentions, 0,
        "the opt-out entry stays, hashed: the account is nowhere in clear"
    );
    broker.cleanup().await;
}

#[tokio::test]
async fn old_deliveries_are_purged_from_the_ledger_file() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("purge");
    let mut broker = Broker::connect(&names).await;
    let overrides = [
        ("retention.deliveries", json!("2s")),
        ("retention.interval", json!("300ms")),
    ];
    let gateway = Gateway::start(config(&names, dir.path(), &overrides)).await;
    let account = format!("purge-me-{}", names.suffix);
    broker
        .publish_json(&account_job("purge-job", &account))
        .await;
    broker.events_for(1, Duration::from_secs(20)).await;
    let mut client = gateway.client().await;
    let request = || v1::GetDeliveryRequest {
        delivery_id: "acme/purge-job".into(),
    };
    client.get_delivery(request()).await.expect("kept at first");
    let mut purged = false;
    for _ in 0..100 {
        if client.get_delivery(request()).await.is_err() {
            purged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(purged, "purged within 10 s of its 2 s retention");
    gateway.stop().await;
    assert!(!in_ledger_files(dir.path(), &account));
    assert!(!in_ledger_files(dir.path(), "purge-job"));
    broker.cleanup().await;
}
