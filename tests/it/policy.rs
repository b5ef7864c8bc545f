//! Block lists through the real queue, the PolicyAdmin API and the CLI: a blocked number is
//! passed over with the entry named in the report; opt-outs and dead tokens reported by a
//! provider block the next job; bad entries are refused with the reason.

use std::process::Command;
use std::time::Duration;

use otp_gateway::proto::v1;
use otp_gateway::proto::v1::policy_admin_client::PolicyAdminClient;
use serde_json::json;
use tonic::Code;

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(20);

async fn admin(gateway: &Gateway) -> PolicyAdminClient<tonic::transport::Channel> {
    PolicyAdminClient::connect(format!("http://{}", gateway.grpc_addr))
        .await
        .unwrap()
}

async fn add(
    client: &mut PolicyAdminClient<tonic::transport::Channel>,
    tenant: &str,
    kind: v1::BlockKind,
    pattern: &str,
) -> Result<v1::AddBlockEntryResponse, tonic::Status> {
    client
        .add_block_entry(v1::AddBlockEntryRequest {
            tenant: tenant.into(),
            kind: kind as i32,
            pattern: pattern.into(),
            note: "test".into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn a_blocked_number_is_passed_over_and_named_in_the_report() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("block");
    let mut broker = Broker::connect(&names).await;
    let gateway = Gateway::start(config(&names, dir.path(), &[])).await;
    let mut client = admin(&gateway).await;

    let entry = add(&mut client, "acme", v1::BlockKind::Number, "+14155550101")
        .await
        .unwrap()
        .entry
        .unwrap();
    let again = add(&mut client, "acme", v1::BlockKind::Number, "+14155550101")
        .await
        .unwrap();
    assert!(!again.created, "the same entry twice is one entry");
    assert_eq!(again.entry.unwrap().id, entry.id);
    add(&mut client, "", v1::BlockKind::Prefix, "+882")
        .await
        .unwrap();

    let mut job = job("blocked-first", "135790");
    job["targets"] = json!([{"phone": {"number": "+14155550101"}}, {"phone": {"number": "+88212345678"}}, {"phone": {"number": "+14155550102"}}]);
    broker.publish_json(&job).await;
    let (_, report) = broker.next_event(WAIT).await;
    assert_eq!(report["status"], "SENT");
    let first = &report["targets"][0];
    assert_eq!(first["reason"], "RECIPIENT_BLOCKED");
    let detail = first["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("block-list entry #{}", entry.id)),
        "{detail}"
    );
    assert!(
        detail.contains("number +1415•••0101") && detail.contains("admin"),
        "{detail}"
    );
    assert!(
        first["attempts"].as_array().unwrap().is_empty(),
        "nothing was sent to it"
    );
    assert!(
        report["targets"][1]["detail"]
            .as_str()
            .unwrap()
            .contains("prefix +882"),
        "a global prefix entry"
    );
    assert_eq!(report["targets"][2]["status"], "SENT");
    let sent: Vec<_> = outbox(dir.path())
        .into_iter()
        .map(|l| l["to"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(sent, ["+1415•••0102"]);

    // The entry is listed masked and kept as a keyed hash: the number is nowhere in the
    // ledger's files, and its key is in a file of its own beside them.
    let listed = client
        .list_block_entries(v1::ListBlockEntriesRequest {
            tenant: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(
        listed.iter().any(|e| e.pattern == "+1415•••0101"),
        "{listed:?}"
    );
    assert_eq!(entry.pattern, "+1415•••0101");
    let mut bytes = std::fs::read(dir.path().join("ledger.db")).unwrap();
    bytes.extend(std::fs::read(dir.path().join("ledger.db-wal")).unwrap_or_default());
    assert!(
        !bytes.windows(12).any(|w| w == b"+14155550101"),
        "no clear number in the ledger"
    );
    assert!(dir.path().join("ledger.db.hash-key").exists());

    // Removed: the number gets codes again.
    client
        .remove_block_entry(v1::RemoveBlockEntryRequest { id: entry.id })
        .await
        .unwrap();
    let missing = client
        .remove_block_entry(v1::RemoveBlockEntryRequest { id: entry.id })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    broker
        .publish_json(&crate::helpers::job("unblocked", "246802"))
        .await;
    let (_, report) = broker.next_event(WAIT).await;
    assert_eq!(report["targets"][0]["status"], "SENT");

    // Bad entries are refused with the reason.
    let bad = add(&mut client, "acme", v1::BlockKind::Prefix, "882")
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("prefix"), "{}", bad.message());
    let bad = add(&mut client, "acme", v1::BlockKind::Unspecified, "+1")
        .await
        .unwrap_err();
    assert!(bad.message().contains("kind"), "{}", bad.message());
    gateway.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn opt_outs_and_dead_tokens_reported_by_a_provider_block_the_next_job() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("learn");
    let mut broker = Broker::connect(&names).await;
    let gateway = Gateway::start(config(&names, dir.path(), &[])).await;

    // The sandbox answers +15005550004 like Twilio 21610 and `unregistered…` tokens like APNs 410.
    let targets = json!([
        {"device": {"id": "old-phone", "platform": "apns", "token": "unregistered-a1b2c3d4e5f6"}},
        {"phone": {"number": "+15005550004"}}
    ]);
    let mut first = job("learn-1", "111333");
    first["channels"] = json!(["push", "sms"]);
    first["targets"] = targets.clone();
    broker.publish_json(&first).await;
    let (_, report) = broker.next_event(WAIT).await;
    assert_eq!(report["targets"][0]["reason"], "DEVICE_UNREGISTERED");
    assert_eq!(report["targets"][1]["reason"], "RECIPIENT_OPTED_OUT");
    assert_eq!(
        report["targets"][1]["attempts"][0]["provider_code"],
        "21610"
    );

    let mut client = admin(&gateway).await;
    let entries = client
        .list_block_entries(v1::ListBlockEntriesRequest {
            tenant: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let sources: Vec<_> = entries
        .iter()
        .map(|e| (e.kind, e.source, e.pattern.as_str()))
        .collect();
    assert!(
        sources.contains(&(
            v1::BlockKind::Number as i32,
            v1::BlockSource::OptOut as i32,
            "+1500•••0004"
        )),
        "numbers and tokens are listed masked: {sources:?}"
    );
    assert!(
        !sources
            .iter()
            .any(|(_, _, p)| p.contains("5005550004") || p.contains("a1b2c3d4")),
        "{sources:?}"
    );
    assert!(
        sources.contains(&(
            v1::BlockKind::DeviceToken as i32,
            v1::BlockSource::ProviderFeedback as i32,
            "unre•••e5f6"
        )),
        "{sources:?}"
    );

    let mut second = first.clone();
    second["job_id"] = json!("learn-2");
    broker.publish_json(&second).await;
    let (_, report) = broker.next_event(WAIT).await;
    assert_eq!(report["status"], "FAILED");
    assert_eq!(report["targets"][1]["reason"], "RECIPIENT_OPTED_OUT");
    assert!(
        report["targets"][1]["detail"]
            .as_str()
            .unwrap()
            .contains("opt out")
    );
    assert!(
        report["targets"][1]["attempts"]
            .as_array()
            .unwrap()
            .is_empty(),
        "no second attempt to an opted-out number"
    );
    assert_eq!(report["targets"][0]["reason"], "RECIPIENT_BLOCKED");
    assert!(
        report["targets"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("provider feedback")
    );
    assert!(report["hint"].as_str().is_some());
    gateway.stop().await;
    broker.cleanup().await;
}

// Multi-threaded: the CLI runs as a blocking child process while this process serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_block_command_adds_lists_and_removes_entries() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("block-cli");
    let broker = Broker::connect(&names).await;
    let gateway = Gateway::start(config(&names, dir.path(), &[])).await;
    let server = gateway.grpc_addr.to_string();
    let cli = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_otp-gateway"))
            .args(args)
            .args(["--server", &server])
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, out, _) = cli(&[
        "block",
        "add",
        "--prefix",
        "+882",
        "--note",
        "premium range",
        "--ttl",
        "30d",
    ]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("*  prefix +882  admin  until") && out.contains("premium range"),
        "{out}"
    );
    let id = out
        .trim_start_matches('#')
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let (code, out, _) = cli(&["block", "ls", "--tenant", "acme"]);
    assert_eq!(code, Some(0));
    assert!(out.contains(&format!("#{id}")), "{out}");
    let (code, _, err) = cli(&["block", "add", "--number", "4155550101", "--tenant", "acme"]);
    assert_eq!(code, Some(64));
    assert!(err.contains("E.164"), "{err}");
    let (code, out, _) = cli(&["block", "rm", &id]);
    assert_eq!(code, Some(0), "{out}");
    let (_, out, _) = cli(&["block", "ls"]);
    assert!(!out.contains(&format!("#{id} ")), "{out}");

    // Rate limits.
    let (code, out, _) = cli(&[
        "limits", "set", "--per", "prefix", "--prefix", "+882", "--limit", "1000", "--window", "1h",
    ]);
    assert_eq!(code, Some(0));
    assert!(out.contains("*  1000 per 1h to +882"), "{out}");
    let (code, out, _) = cli(&[
        "limits",
        "set",
        "--per",
        "recipient",
        "--limit",
        "5",
        "--window",
        "10m",
        "--tenant",
        "acme",
    ]);
    assert_eq!(code, Some(0));
    assert!(out.contains("acme  5 per 10m per recipient"), "{out}");
    let (_, listed, _) = cli(&["limits", "ls", "--tenant", "acme"]);
    assert_eq!(listed.lines().count(), 2, "{listed}");
    let (code, _, err) = cli(&[
        "limits",
        "set",
        "--per",
        "recipient",
        "--limit",
        "0",
        "--window",
        "10m",
    ]);
    assert_eq!(code, Some(64));
    assert!(err.contains("limit"), "{err}");
    let id = out
        .trim_start_matches('#')
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(cli(&["limits", "rm", &id]).0, Some(0));
    assert_eq!(
        cli(&["limits", "ls", "--tenant", "acme"]).1.lines().count(),
        1
    );

    // Quiet hours: valid rules are stored and listed, invalid ones refused with what is wrong.
    let (code, out, err) = cli(&[
        "quiet",
        "set",
        "--from",
        "22:00",
        "--to",
        "07:00",
        "--zone",
        "Europe/Berlin",
        "--channels",
        "sms,voice",
        "--days",
        "fri,sat",
        "--action",
        "defer",
        "--tenant",
        "acme",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("acme  22:00–07:00 Europe/Berlin  fri,sat  sms,voice  defer"),
        "{out}"
    );
    let quiet_id = out
        .trim_start_matches('#')
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    for (args, problem) in [
        (vec!["--from", "22:00", "--to", "22:00"], "empty"),
        (
            vec!["--from", "22:00", "--to", "07:00", "--zone", "Mars/Olympus"],
            "not a known time zone",
        ),
        (
            vec!["--from", "22:00", "--to", "07:00", "--days", "funday"],
            "not a day",
        ),
        (vec!["--from", "25:00", "--to", "07:00"], "HH:MM"),
    ] {
        let mut full = vec!["quiet", "set"];
        full.extend(args);
        let (code, _, err) = cli(&full);
        assert_eq!(code, Some(64), "{full:?}");
        assert!(err.contains(problem), "{full:?}: {err}");
    }
    let (_, listed, _) = cli(&["quiet", "ls", "--tenant", "acme"]);
    assert_eq!(listed.lines().count(), 1, "{listed}");
    assert_eq!(cli(&["quiet", "rm", &quiet_id]).0, Some(0));
    assert_eq!(cli(&["quiet", "ls"]).1.lines().count(), 0);
    gateway.stop().await;
    broker.cleanup().await;
}

// Multi-threaded: the CLI runs as a blocking child process while this process serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_agrees_with_what_a_send_then_does_and_counts_nothing() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("explain");
    let mut broker = Broker::connect(&names).await;
    let gateway = Gateway::start(config(&names, dir.path(), &[])).await;
    let mut admin = admin(&gateway).await;
    let blocked = add(&mut admin, "acme", v1::BlockKind::Number, "+14155550101")
        .await
        .unwrap()
        .entry
        .unwrap();
    admin
        .set_rate_limit(v1::SetRateLimitRequest {
            scope: v1::RateScope::Recipient as i32,
            limit: 1,
            window: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();

    let targets = json!([
        {"phone": {"number": "+14155550101"}}, {"phone": {"number": "0044 20"}},
        {"phone": {"number": "+14155550103"}}, {"phone": {"number": "+14155550104"}}
    ]);
    let mut body = job("explain-1", "864209");
    body["targets"] = targets.clone();
    let job = otp_gateway::domain::Job::from_json(body.to_string().as_bytes()).unwrap();
    let mut client = gateway.client().await;
    let explain =
        |client: &mut otp_gateway::proto::v1::code_delivery_client::CodeDeliveryClient<
            tonic::transport::Channel,
        >| {
            let request = v1::ExplainRequest {
                job: Some(otp_gateway::proto::job_to_proto(&job)),
                at: None,
            };
            let mut client = client.clone();
            async move { client.explain(request).await.unwrap().into_inner() }
        };
    let mut plan = explain(&mut client).await;
    for _ in 0..3 {
        plan = explain(&mut client).await; // explaining again and again counts nothing
    }
    assert_eq!(plan.stages, [v1::Channel::Sms as i32]);
    assert_eq!(
        plan.targets[0].reason,
        v1::FailureReason::RecipientBlocked as i32
    );
    assert!(
        plan.targets[0]
            .decision
            .contains(&format!("#{}", blocked.id)),
        "{}",
        plan.targets[0].decision
    );
    assert_eq!(
        plan.targets[1].reason,
        v1::FailureReason::InvalidRecipient as i32
    );
    assert!(plan.targets[2].eligible && plan.targets[3].eligible);
    let sms = &plan.targets[2].channels[0];
    assert_eq!(
        (sms.route.as_str(), sms.providers[0].name.as_str()),
        ("*", "sandbox")
    );
    assert_eq!(sms.providers[0].circuit, v1::CircuitState::Closed as i32);
    assert_eq!(
        sms.refused_reason, 0,
        "not yet rate limited: the explains were not counted"
    );

    // The real send does what the plan said.
    broker.publish_json(&body).await;
    let (_, report) = broker.next_event(WAIT).await;
    assert_eq!(report["targets"][0]["reason"], "RECIPIENT_BLOCKED");
    assert_eq!(report["targets"][1]["reason"], "INVALID_RECIPIENT");
    assert_eq!(
        report["targets"][2]["status"], "SENT",
        "the first eligible number"
    );
    assert_eq!(report["targets"][3]["status"], "SKIPPED");

    // Now number 3 has had its one code in ten minutes: the plan says so, and so does a send.
    let plan = explain(&mut client).await;
    let sms = &plan.targets[2].channels[0];
    assert_eq!(sms.refused_reason, v1::FailureReason::RateLimited as i32);
    assert!(
        sms.refused_detail.contains("allowed again at"),
        "{}",
        sms.refused_detail
    );
    body["job_id"] = json!("explain-2");
    broker.publish_json(&body).await;
    let (_, report) = broker.next_event(WAIT).await;
    assert_eq!(report["targets"][2]["reason"], "RATE_LIMITED");
    assert_eq!(report["targets"][3]["status"], "SENT");

    // The CLI prints the same plan from a job file.
    let file = dir.path().join("job.json");
    std::fs::write(&file, body.to_string()).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_otp-gateway"))
        .args([
            "explain",
            file.to_str().unwrap(),
            "--server",
            &gateway.grpc_addr.to_string(),
        ])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{printed}");
    assert!(
        printed.contains("target 0 +1415•••0101: RECIPIENT_BLOCKED"),
        "{printed}"
    );
    assert!(printed.contains("refused: RATE_LIMITED"), "{printed}");
    assert!(!printed.contains("864209"), "the plan never shows the code");
    gateway.stop().await;
    broker.cleanup().await;
}
