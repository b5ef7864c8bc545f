//! The fraud guard: a simulated SMS-pumping attack through the real gateway is held within 50
//! fraudulent sends while legitimate traffic and a marketing burst go on; in monitor mode a
//! suspected range is announced (`fraud.suspected`) and counted but sent to; a pinned range
//! fails SMS with DESTINATION_SUSPENDED (push still goes, the safe list is sent), shows in
//! Explain and the account's diagnosis, and sends again once lifted.

use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use otp_gateway::domain::{Clock, ManualClock};
use otp_gateway::proto::v1;
use otp_gateway::sim::pumping::{Scenario, run};
use serde_json::json;

use crate::helpers::*;
use crate::ops::get;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pumping_attack_is_held_within_50_sends_and_legitimate_traffic_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("fraud-sim");
    let _broker = Broker::connect(&names).await;
    let config = config(
        &names,
        dir.path(),
        &[
            ("fraud.mode", "enforce".into()),
            ("fraud.evaluate_every", "20ms".into()),
            ("log.level", "warn".into()),
        ],
    );
    let outcome = run(config, &Scenario::short()).await.unwrap();
    let table = outcome.describe();
    println!("{table}");
    let attacked: Vec<_> = outcome.ranges.iter().filter(|r| r.attacked).collect();
    assert_eq!(attacked.len(), 3, "two ranges and a new country\n{table}");
    assert_eq!(attacked[2].range, "+220", "held as a whole: {table}");
    for range in &attacked {
        assert!(
            range.held_at.is_some(),
            "{} was not held\n{table}",
            range.range
        );
        assert!(
            range.fraud_sent <= 50,
            "{} took {} fraudulent sends before the hold\n{table}",
            range.range,
            range.fraud_sent
        );
        assert!(range.fraud_held > 0, "{table}");
    }
    assert!(
        outcome.legit_ranges_held().is_empty(),
        "legitimate ranges held\n{table}"
    );
    assert_eq!(outcome.legit_sends_held(), 0, "{table}");
    assert!(outcome.burst_sends > 100, "{table}");
    assert_eq!(outcome.burst_held, 0, "{table}");
    // Each quarantine carries the guard's evidence: a surge, and codes nobody entered.
    for quarantine in &outcome.quarantines {
        let evidence = quarantine.evidence.as_ref().expect("evidence");
        assert!(evidence.judged_sends >= 15, "{quarantine:?}");
        assert!(
            (evidence.judged_conversions as f64) < 0.2 * evidence.judged_sends as f64,
            "{quarantine:?}"
        );
        assert!(evidence.hourly_rate > 5.0 * evidence.baseline_hourly);
        assert_eq!(quarantine.mode, "enforce");
        assert!(quarantine.description.contains(&quarantine.range));
    }
}

/// A job of `account` with SMS to `number` (then push to a device when `device`), expiring
/// 5 minutes after `now`.
fn job_at(
    id: &str,
    account: &str,
    number: &str,
    now: Timestamp,
    device: bool,
) -> serde_json::Value {
    let mut targets = vec![json!({"phone": {"number": number}})];
    let mut channels = vec!["sms"];
    if device {
        targets.push(
            json!({"device": {"id": "ipad-1", "platform": "apns", "token": "a1b2c3d4", "topic": "com.example.app"}}),
        );
        channels.push("push");
    }
    json!({
        "job_id": id, "tenant": "acme", "account": account, "code": "482913",
        "expires_at": (now + SignedDuration::from_mins(5)).to_string(), "purpose": "sign_in",
        "locale": "en-US", "user_initiated": true, "channels": channels, "targets": targets
    })
}

#[tokio::test]
async fn in_monitor_mode_a_suspected_range_is_announced_and_counted_but_sent_to() {
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("fraud-monitor");
    let mut broker = Broker::connect(&names).await;
    let mut suspicions = broker.subscribe("fraud.suspected").await;
    let start: Timestamp = "2026-12-07T10:00:00Z".parse().unwrap();
    let clock = Arc::new(ManualClock::new(start));
    let mut gateway = Gateway::start_with_clock(
        config(
            &names,
            dir.path(),
            &[("fraud.evaluate_every", "50ms".into())],
        ),
        clock.clone() as Arc<dyn Clock>,
    )
    .await;
    let mut client = gateway.client().await;
    // The tenant reports verifications: one code to another range, entered.
    broker
        .publish_json(&job_at("used", "user-1", "+14155550101", start, false))
        .await;
    assert_eq!(broker.next_event(WAIT).await.0, "delivery.sent");
    client
        .report_verification(v1::ReportVerificationRequest {
            delivery_id: "acme/used".into(),
            verified: true,
            at: None,
        })
        .await
        .unwrap();
    assert_eq!(broker.next_event(WAIT).await.0, "delivery.verified");
    gateway.fraud_rounds_passed().await;
    // Twenty codes to +44770, none entered (judged while fresh: nothing to say); 90 s later
    // another one.
    for i in 0..20 {
        let number = format!("+4477009{i:05}");
        broker
            .publish_json(&job_at(
                &format!("pump-{i}"),
                &format!("bot-{i}"),
                &number,
                start,
                false,
            ))
            .await;
    }
    let ended = broker.events_for(20, WAIT).await;
    assert!(ended.values().all(|r| r["status"] == "SENT"), "{ended:?}");
    gateway.fraud_rounds_passed().await;
    clock.set(start + SignedDuration::from_secs(90));
    broker
        .publish_json(&job_at(
            "pump-late",
            "bot-late",
            "+447700900777",
            clock.now(),
            false,
        ))
        .await;
    assert_eq!(broker.next_event(WAIT).await.0, "delivery.sent");

    let event = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut suspicions))
        .await
        .expect("fraud.suspected within 20 s")
        .unwrap()
        .unwrap();
    let suspicion: serde_json::Value = serde_json::from_slice(&event.data).unwrap();
    assert_eq!(suspicion["tenant"], "acme");
    assert_eq!(suspicion["range"], "+44770");
    assert_eq!(suspicion["mode"], "monitor");
    assert_eq!(suspicion["held"], false);
    assert_eq!(suspicion["evidence"]["judged_sends"], 20);
    assert_eq!(suspicion["evidence"]["judged_conversions"], 0);
    assert_eq!(suspicion["evidence"]["window_sends"], 21);
    let text = String::from_utf8_lossy(&event.data);
    assert!(!text.contains("447700900777"), "never a number: {text}");

    // Monitor mode: the next code to the range is sent, and counted as one enforce would hold.
    broker
        .publish_json(&job_at(
            "watched",
            "user-2",
            "+447700900888",
            clock.now(),
            false,
        ))
        .await;
    let (key, report) = broker.next_event(WAIT).await;
    assert_eq!(key, "delivery.sent", "{report}");
    let (_, metrics) = get(gateway.ops_addr, "/metrics", None).await;
    assert!(
        metrics.contains(
            r#"otp_fraud_held_sends_total{tenant="acme",range="+44770",mode="monitor"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"otp_fraud_suspected_ranges_total{tenant="acme",range="+44770",mode="monitor"} 1"#
        ),
        "{metrics}"
    );
    // Explain says what enforce would do.
    let job = job_at("explain", "user-3", "+447700900999", clock.now(), false);
    let explanation = client
        .explain(v1::ExplainRequest {
            job: Some(otp_gateway::proto::job_to_proto(
                &otp_gateway::domain::Job::from_json(job.to_string().as_bytes()).unwrap(),
            )),
            at: None,
        })
        .await
        .unwrap()
        .into_inner();
    let sms = &explanation.targets[0].channels[0];
    assert_eq!(sms.refused_reason, 0, "{sms:?}");
    assert!(
        sms.fraud_watch.contains("monitor mode") && sms.fraud_watch.contains("+44770"),
        "{sms:?}"
    );
    // The quarantine is listed, in monitor mode and not holding.
    let mut admin = gateway.admin().await;
    let listed = admin
        .list_quarantines(v1::ListQuarantinesRequest {
            tenant: "acme".into(),
            in_force_only: false,
        })
        .await
        .unwrap()
        .into_inner()
        .quarantines;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].mode, "monitor");
    assert!(!listed[0].in_force && !listed[0].pinned);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_range_fails_sms_with_destination_suspended_until_lifted() {
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("fraud-pin");
    let mut broker = Broker::connect(&names).await;
    let gateway = Gateway::start(config(
        &names,
        dir.path(),
        &[
            ("fraud.mode", "enforce".into()),
            ("tenants.acme.fraud.safe_accounts", json!(["qa-bot"])),
            ("tenants.acme.push_acknowledgement", false.into()),
        ],
    ))
    .await;
    let mut admin = gateway.admin().await;
    // A range at another depth is refused, naming the field.
    let refused = admin
        .pin_quarantine(v1::PinQuarantineRequest {
            tenant: "acme".into(),
            range: "+4477".into(),
            note: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("range"), "{refused:?}");
    let pinned = admin
        .pin_quarantine(v1::PinQuarantineRequest {
            tenant: "acme".into(),
            range: "+44770".into(),
            note: "pumping seen at the carrier".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(pinned.pinned && pinned.in_force, "{pinned:?}");
    assert!(pinned.note.contains("pumping seen at the carrier"));

    // The SMS to the held range fails with the reason, its hint and the hold; push still goes.
    let now = Timestamp::now();
    broker
        .publish_json(&job_at("held", "user-42", "+447700900123", now, true))
        .await;
    let (key, report) = broker.next_event(WAIT).await;
    assert_eq!(key, "delivery.sent", "push went: {report}");
    let sms = &report["targets"][0];
    assert_eq!(report["targets"][1]["status"], "SENT", "{report}");
    assert_eq!(sms["status"], "FAILED", "{report}");
    assert_eq!(sms["reason"], "DESTINATION_SUSPENDED");
    assert!(
        sms["hint"].as_str().unwrap().contains("fraud guard"),
        "{sms}"
    );
    let detail = sms["detail"].as_str().unwrap();
    assert!(
        detail.contains("range +44770") && detail.contains("until an operator lifts it"),
        "{detail}"
    );
    assert!(
        sms["attempts"].as_array().unwrap().is_empty(),
        "no provider call"
    );
    // SMS only: the delivery fails with the reason.
    broker
        .publish_json(&job_at("held-sms", "user-42", "+447700900123", now, false))
        .await;
    let (key, report) = broker.next_event(WAIT).await;
    assert_eq!(key, "delivery.failed", "{report}");
    assert_eq!(report["reason"], "DESTINATION_SUSPENDED");
    // The safe list is never held.
    broker
        .publish_json(&job_at("safe", "qa-bot", "+447700900124", now, false))
        .await;
    assert_eq!(broker.next_event(WAIT).await.0, "delivery.sent");
    let messages = outbox(dir.path());
    assert_eq!(
        messages.len(),
        2,
        "the push and the safe account's SMS: {messages:?}"
    );

    // The account's diagnosis names the hold and how to lift it.
    let mut client = gateway.client().await;
    let diagnosis = client
        .diagnose_account(v1::DiagnoseAccountRequest {
            tenant: "acme".into(),
            account: "user-42".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let number = diagnosis
        .targets
        .iter()
        .find(|t| t.target.starts_with("+44"))
        .unwrap();
    assert_eq!(number.fraud_holds.len(), 1, "{number:?}");
    assert_eq!(number.fraud_holds[0].range, "+44770");
    assert!(
        diagnosis
            .fixes
            .iter()
            .any(|f| f.text.contains("+44770")
                && f.text.contains("otp-gateway fraud lift acme +44770")),
        "{:?}",
        diagnosis.fixes
    );
    let (_, metrics) = get(gateway.ops_addr, "/metrics", None).await;
    assert!(
        metrics.contains(
            r#"otp_fraud_held_sends_total{tenant="acme",range="+44770",mode="enforce"} 2"#
        ),
        "{metrics}"
    );

    // Lifted: sent again; lifting twice is NOT_FOUND.
    let lifted = admin
        .lift_quarantine(v1::LiftQuarantineRequest {
            tenant: "acme".into(),
            range: "+44770".into(),
            note: "the carrier confirmed genuine traffic".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lifted.state, v1::quarantine::State::Lifted as i32);
    assert!(!lifted.in_force);
    let again = admin
        .lift_quarantine(v1::LiftQuarantineRequest {
            tenant: "acme".into(),
            range: "+44770".into(),
            note: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::NotFound);
    broker
        .publish_json(&job_at(
            "after",
            "user-42",
            "+447700900123",
            Timestamp::now(),
            false,
        ))
        .await;
    assert_eq!(broker.next_event(WAIT).await.0, "delivery.sent");

    // The same from the command line: pin a country, list what holds, lift it.
    let server = gateway.grpc_addr.to_string();
    let pinned = fraud_cli(
        &server,
        &["fraud", "pin", "acme", "+220", "--note", "no users there"],
    )
    .await;
    let out = String::from_utf8_lossy(&pinned.stdout);
    assert!(
        pinned.status.success() && out.contains("acme  +220  HOLDING"),
        "{out}"
    );
    let listed = fraud_cli(&server, &["fraud", "ls", "--tenant", "acme", "--held"]).await;
    let out = String::from_utf8_lossy(&listed.stdout);
    assert_eq!(out.lines().count(), 1, "only the pin holds: {out}");
    assert!(
        out.contains("until lifted (pinned)") && out.contains("no users there"),
        "{out}"
    );
    broker
        .publish_json(&job_at(
            "gambia",
            "user-7",
            "+2203012345",
            Timestamp::now(),
            false,
        ))
        .await;
    let (_, report) = broker.next_event(WAIT).await;
    assert_eq!(report["reason"], "DESTINATION_SUSPENDED", "{report}");
    let lifted = fraud_cli(&server, &["fraud", "lift", "acme", "+220"]).await;
    assert!(lifted.status.success(), "{lifted:?}");
    let refused = fraud_cli(&server, &["fraud", "lift", "acme", "+220"]).await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not held"),
        "{refused:?}"
    );
    gateway.stop().await;
}

/// `otp-gateway ARGS --server SERVER`, off the runtime (the gateway answers on it).
async fn fraud_cli(server: &str, args: &[&str]) -> std::process::Output {
    let server = server.to_owned();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::auth::cli(&server, None, &args)
    })
    .await
    .unwrap()
}
