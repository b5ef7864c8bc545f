//! Conversion feedback: `ReportVerification` over gRPC and verification messages on the jobs
//! exchange record that the user entered the code (or not) on the report, publish
//! `delivery.verified`, and refuse unknown deliveries and bad fields (a gRPC status, or a dead
//! letter naming the field).

use std::time::Duration;

use lapin::BasicProperties;
use otp_gateway::proto::{timestamp_to_proto, v1};
use serde_json::json;
use tonic::Code;

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(20);

/// A gateway on the sandbox, a broker connection for `test`'s names, a gRPC client and a
/// subscriber to `delivery.verified`. Keep `dir` bound: the ledger lives in it.
struct Setup {
    names: Names,
    broker: Broker,
    gateway: Gateway,
    client: v1::code_delivery_client::CodeDeliveryClient<tonic::transport::Channel>,
    verified_events: lapin::Consumer,
    dir: tempfile::TempDir,
}

async fn setup(test: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new(test);
    let broker = Broker::connect(&names).await;
    let gateway = Gateway::start(config(&names, dir.path(), &[])).await;
    let client = gateway.client().await;
    let verified_events = broker.subscribe("delivery.verified").await;
    Setup {
        names,
        broker,
        gateway,
        client,
        verified_events,
        dir,
    }
}

/// A job to `number` through the sandbox, waited for until SENT.
async fn sent_to(broker: &mut Broker, job_id: &str, number: &str) {
    let mut body = job(job_id, "482913");
    body["targets"] = json!([{"phone": {"number": number}}]);
    broker.publish_json(&body).await;
    let (routing_key, report) = broker.next_event(WAIT).await;
    assert_eq!(routing_key, "delivery.sent", "{report}");
}

/// A `ReportVerification` request.
fn request(
    delivery_id: &str,
    verified: bool,
    at: Option<jiff::Timestamp>,
) -> v1::ReportVerificationRequest {
    v1::ReportVerificationRequest {
        delivery_id: delivery_id.into(),
        verified,
        at: at.map(timestamp_to_proto),
    }
}

/// A job to +14155550101 through the sandbox, waited for until SENT.
async fn sent(broker: &mut Broker, job_id: &str) {
    sent_to(broker, job_id, "+14155550101").await;
}

/// The next `delivery.verified` event: its body as JSON, and as text.
async fn next_verified(events: &mut lapin::Consumer) -> (serde_json::Value, String) {
    let event = tokio::time::timeout(WAIT, futures_util::StreamExt::next(events))
        .await
        .expect("delivery.verified within 20 s")
        .unwrap()
        .unwrap();
    (
        serde_json::from_slice(&event.data).unwrap(),
        String::from_utf8_lossy(&event.data).into_owned(),
    )
}

#[tokio::test]
async fn report_verification_records_the_conversion_and_announces_it() {
    if !broker_available().await {
        return;
    }
    let Setup {
        names: _,
        mut broker,
        gateway,
        mut client,
        mut verified_events,
        dir: _dir,
    } = setup("verify").await;
    sent(&mut broker, "v-1").await;

    let report = |verified: bool, at: Option<jiff::Timestamp>| request("acme/v-1", verified, at);
    let unknown = client
        .report_verification(request("acme/nope", true, None))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    let future = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1);
    let refused = client
        .report_verification(report(true, Some(future)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("at"), "{refused:?}");

    // The user typed a wrong code first, then the right one.
    let failed = client
        .report_verification(report(false, None))
        .await
        .unwrap()
        .into_inner();
    assert!(failed.verification_failed_at.is_some() && failed.verified_at.is_none());
    let at = jiff::Timestamp::now();
    let verified = client
        .report_verification(report(true, Some(at)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        verified.verified_at.map(|t| t.seconds),
        Some(at.as_second())
    );
    assert!(verified.verification_failed_at.is_none());
    assert_eq!(
        verified.status,
        v1::DeliveryStatus::Sent as i32,
        "the status stays"
    );
    let (body, text) = next_verified(&mut verified_events).await;
    assert_eq!(body["delivery_id"], "acme/v-1");
    assert_eq!(body["verification"]["verified"], true);
    assert!(!text.contains("482913"));
    // Later reports change nothing: the first verification stands.
    let again = client
        .report_verification(report(false, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.verified_at, verified.verified_at);
    let stored = client
        .get_delivery(v1::GetDeliveryRequest {
            delivery_id: "acme/v-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.verified_at, verified.verified_at);
    gateway.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn verification_messages_on_the_jobs_exchange_are_recorded_or_dead_lettered_naming_the_field()
{
    if !broker_available().await {
        return;
    }
    let Setup {
        names,
        mut broker,
        gateway,
        mut client,
        mut verified_events,
        dir: _dir,
    } = setup("verify-queue").await;
    sent(&mut broker, "q-1").await;

    let publish = |body: serde_json::Value| {
        let broker = &broker;
        async move {
            broker
                .publish_with_key(
                    "report-verification",
                    body.to_string().as_bytes(),
                    Some("application/json"),
                    BasicProperties::default(),
                )
                .await
        }
    };
    publish(json!({"delivery_id": "acme/q-1", "verified": true})).await;
    let (body, _) = next_verified(&mut verified_events).await;
    assert_eq!(body["delivery_id"], "acme/q-1");
    let stored = client
        .get_delivery(v1::GetDeliveryRequest {
            delivery_id: "acme/q-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stored.verified_at.is_some());

    for (body, field) in [
        (
            json!({"delivery_id": "acme/q-1", "verified": "yes"}),
            "verified",
        ),
        (
            json!({"delivery_id": "acme/unknown", "verified": true}),
            "delivery_id",
        ),
        (
            json!({"delivery_id": "acme/q-1", "verified": true, "at": "yesterday"}),
            "at",
        ),
        (
            json!({"delivery_id": "acme/q-1", "verified": true, "code": "1"}),
            "code",
        ),
    ] {
        publish(body.clone()).await;
        broker.wait_ready(&names.dead_letter_queue, 1, WAIT).await;
        let dead = broker.get(&names.dead_letter_queue).await.unwrap();
        assert_eq!(
            header(&dead, "x-otp-error-field").as_deref(),
            Some(field),
            "{body}: {:?}",
            header(&dead, "x-otp-error")
        );
    }
    gateway.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn sends_and_conversions_are_counted_per_tenant_range_and_hour_never_by_number() {
    if !broker_available().await {
        return;
    }
    let Setup {
        mut broker,
        gateway,
        mut client,
        dir,
        ..
    } = setup("verify-counts").await;
    for (job_id, number) in [
        ("c-1", "+447700900001"),
        ("c-2", "+447700900002"),
        ("c-3", "+14155550101"),
    ] {
        sent_to(&mut broker, job_id, number).await;
    }
    client
        .report_verification(request("acme/c-1", true, None))
        .await
        .unwrap();
    // The counts reach the store within a second, and at the latest when the gateway stops.
    gateway.stop().await;
    let ledger = rusqlite::Connection::open(dir.path().join("ledger.db")).unwrap();
    let mut counts: Vec<(String, String, i64, i64)> = ledger
        .prepare(
            "SELECT tenant, dest_range, sends, conversions FROM destination_counts
             ORDER BY dest_range",
        )
        .unwrap()
        .query_map([], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    counts.sort();
    assert_eq!(
        counts,
        [
            ("acme".to_owned(), "+1415".to_owned(), 1, 0),
            ("acme".to_owned(), "+44770".to_owned(), 2, 1),
        ],
        "ranges at the default depth (3 digits after the calling code)"
    );
    let ranges: Vec<String> = ledger
        .prepare("SELECT dest_range FROM attempts ORDER BY id")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(ranges, ["+44770", "+44770", "+1415"]);
    broker.cleanup().await;
}

#[tokio::test]
async fn a_push_shown_on_the_device_verifies_the_delivery_and_announces_it() {
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("verify-shown");
    let mut broker = Broker::connect(&names).await;
    let gateway = Gateway::start(config(
        &names,
        dir.path(),
        &[("tenants.acme.push_acknowledgement", false.into())],
    ))
    .await;
    let mut client = gateway.client().await;
    let mut verified_events = broker.subscribe("delivery.verified").await;
    let mut body = job("pushed", "482913");
    body["channels"] = json!(["push"]);
    body["targets"] = json!([{"device": {"id": "ipad-1", "platform": "apns",
        "token": "a1b2c3d4e5f6", "topic": "com.example.app"}}]);
    broker.publish_json(&body).await;
    let (routing_key, report) = broker.next_event(WAIT).await;
    assert_eq!(routing_key, "delivery.sent", "{report}");
    let token = outbox(dir.path())
        .iter()
        .find_map(|l| l["ack_token"].as_str().map(str::to_owned))
        .expect("the push carries an acknowledgement token");
    let report = client
        .acknowledge_delivery(v1::AcknowledgeDeliveryRequest {
            delivery_id: "acme/pushed".into(),
            device_id: "ipad-1".into(),
            acknowledgement: v1::Acknowledgement::Shown as i32,
            ack_token: token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.status, v1::DeliveryStatus::Delivered as i32);
    assert!(report.verified_at.is_some(), "{report:?}");
    assert!(report.verification_failed_at.is_none());
    let (event, _) = next_verified(&mut verified_events).await;
    assert_eq!(event["delivery_id"], "acme/pushed");
    assert_eq!(event["verification"]["verified"], true);
    let (_, metrics) = crate::ops::get(gateway.ops_addr, "/metrics", None).await;
    assert!(
        metrics.contains(r#"otp_verifications_total{tenant="acme",verified="true"} 1"#),
        "{metrics}"
    );
    gateway.stop().await;
}
