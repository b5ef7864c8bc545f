//! Jobs published to RabbitMQ by any producer: delivered, deduplicated, dead-lettered or
//! reported as failed, with events, replies and acks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lapin::BasicProperties;
use otp_gateway::proto::{timestamp_to_proto, v1};
use otp_gateway::providers::{
    OutboundMessage, Provider, ProviderAccept, ProviderError, ProviderRegistry, Recipient,
    SandboxProvider,
};
use prost::Message;
use serde_json::json;

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn json_and_protobuf_jobs_are_delivered_reported_and_acked() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("deliver");
    let mut broker = Broker::connect(&names).await;
    // Tenant acme does not wait for push acknowledgements: an accepted push ends the chain.
    let overrides = [("tenants.acme.push_acknowledgement", json!(false))];
    let gateway = Gateway::start(config(&names, dir.path(), &overrides)).await;

    // A JSON job that asks for a reply.
    let reply_queue = broker.exclusive_queue().await;
    let mut replies = consume_no_ack(&broker.channel, reply_queue.name().as_str()).await;
    broker
        .publish(
            job("json-1", "482913").to_string().as_bytes(),
            Some("application/json"),
            BasicProperties::default()
                .with_reply_to(reply_queue.name().clone())
                .with_correlation_id("corr-7".into()),
        )
        .await;

    // A protobuf job to a device and a number, push first.
    let proto = v1::SendCodeJob {
        job_id: "proto-1".into(),
        tenant: "acme".into(),
        account: "user-43".into(),
        code: "771205".into(),
        expires_at: Some(timestamp_to_proto(
            jiff::Timestamp::now() + jiff::SignedDuration::from_mins(5),
        )),
        channels: vec![v1::Channel::Push as i32, v1::Channel::Sms as i32],
        targets: vec![
            v1::Target {
                kind: Some(v1::target::Kind::Device(v1::DeviceTarget {
                    id: "ipad-1".into(),
                    platform: v1::Platform::Apns as i32,
                    token: "a1b2c3d4e5f6a7b8c9d0e1f2".into(),
                    topic: "com.example.app".into(),
                    can_display_code: None,
                })),
            },
            v1::Target {
                kind: Some(v1::target::Kind::Phone(v1::PhoneTarget {
                    number: "+14155550199".into(),
                })),
            },
        ],
        ..Default::default()
    };
    broker
        .publish(
            &proto.encode_to_vec(),
            Some("application/x-protobuf"),
            BasicProperties::default(),
        )
        .await;

    let events = broker.events_for(2, WAIT).await;
    let json_report = &events["acme/json-1"];
    assert_eq!(json_report["status"], "SENT");
    assert_eq!(json_report["targets"][0]["target"], "+1415•••0101");
    assert_eq!(
        json_report["targets"][0]["attempts"][0]["provider"],
        "sandbox"
    );
    assert!(
        !json_report.to_string().contains("482913"),
        "events never carry the code"
    );
    let proto_report = &events["acme/proto-1"];
    assert_eq!(proto_report["status"], "SENT");
    assert_eq!(proto_report["targets"][0]["status"], "SENT");
    assert_eq!(
        proto_report["targets"][1]["status"], "SKIPPED",
        "push reached the user; SMS not needed"
    );

    // The reply carries the report and the correlation id.
    let reply = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut replies))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        reply.properties.correlation_id().as_ref().unwrap().as_str(),
        "corr-7"
    );
    let reply: serde_json::Value = serde_json::from_slice(&reply.data).unwrap();
    assert_eq!(reply["delivery_id"], "acme/json-1");
    assert_eq!(reply["status"], "SENT");

    // The handset got the codes.
    let outbox = outbox(dir.path());
    assert_eq!(outbox.len(), 2, "{outbox:?}");
    let sms = outbox
        .iter()
        .find(|l| l["delivery_id"] == "acme/json-1")
        .unwrap();
    assert_eq!(sms["channel"], "sms");
    assert_eq!(sms["to"], "+1415•••0101");
    assert!(sms["message"].as_str().unwrap().contains("482913"));
    let push = outbox
        .iter()
        .find(|l| l["delivery_id"] == "acme/proto-1")
        .unwrap();
    assert_eq!(push["channel"], "push");
    assert!(push["message"].as_str().unwrap().contains("771205"));

    // Both were acked: after the gateway's channel closes nothing returns to the queue.
    gateway.stop().await;
    assert_eq!(broker.ready(&names.jobs_queue).await, 0);
    assert_eq!(broker.ready(&names.dead_letter_queue).await, 0);
    broker.cleanup().await;
}

#[tokio::test]
async fn the_same_job_published_twice_is_sent_once() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("dupe");
    let mut broker = Broker::connect(&names).await;
    let gateway = Gateway::start(config(&names, dir.path(), &[])).await;

    broker.publish_json(&job("twice", "123456")).await;
    broker.publish_json(&job("twice", "123456")).await;
    broker.publish_json(&job("after", "654321")).await;
    let events = broker.events_for(2, WAIT).await;
    assert_eq!(events["acme/twice"]["status"], "SENT");
    gateway.stop().await;

    let sends: Vec<_> = outbox(dir.path())
        .into_iter()
        .filter(|l| l["delivery_id"] == "acme/twice")
        .collect();
    assert_eq!(sends.len(), 1, "one send for one job: {sends:?}");
    assert_eq!(
        broker.ready(&names.jobs_queue).await,
        0,
        "the duplicate was acked too"
    );

    let gateway = Gateway::start(config(&names, dir.path(), &[])).await;
    let list = gateway
        .client()
        .await
        .list_deliveries(v1::ListDeliveriesRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        list.deliveries.len(),
        2,
        "one delivery per job, and the ledger survived the restart"
    );
    gateway.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn a_job_handed_out_delivery_limit_times_is_dead_lettered_by_the_gateway_without_its_code() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("poison");
    let mut broker = Broker::connect(&names).await;
    broker.publish_json(&job("poison", "482913")).await;
    // Handed out and never finished amqp.delivery_limit (10) times, as by gateways that died
    // holding it; then a gateway gets it once more.
    broker.hand_back(&names.jobs_queue, 10).await;
    let gateway = Gateway::start(config(&names, dir.path(), &[])).await;
    broker.wait_ready(&names.dead_letter_queue, 1, WAIT).await;
    let dead = broker.get(&names.dead_letter_queue).await.unwrap();
    assert_eq!(
        header(&dead, "x-otp-error-field").as_deref(),
        Some("x-delivery-count")
    );
    let reason = header(&dead, "x-otp-error").unwrap();
    assert!(
        reason.contains("11 times") && reason.contains("amqp.delivery_limit"),
        "{reason}"
    );
    let body = String::from_utf8_lossy(&dead.delivery.data);
    assert!(
        !body.contains("482913") && body.contains("[redacted]"),
        "{body}"
    );
    assert!(
        body.contains("\"poison\""),
        "the rest is kept for diagnosis: {body}"
    );
    assert!(outbox(dir.path()).is_empty(), "it was not sent again");
    assert_eq!(broker.ready(&names.jobs_queue).await, 0);
    // The next job goes through as usual.
    broker.publish_json(&job("after-poison", "135790")).await;
    let (_, report) = broker.next_event(WAIT).await;
    assert_eq!(report["job_id"], "after-poison");
    assert_eq!(report["status"], "SENT");
    gateway.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn malformed_messages_are_dead_lettered_and_undeliverable_jobs_reported() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("bad");
    let mut broker = Broker::connect(&names).await;
    let gateway = Gateway::start(config(&names, dir.path(), &[])).await;

    // Dead-lettered: nothing identifies a deliverable job.
    broker
        .publish(
            b"{this is not json",
            Some("application/json"),
            BasicProperties::default(),
        )
        .await;
    broker
        .publish(
            b"code=123456",
            Some("text/plain"),
            BasicProperties::default(),
        )
        .await;
    let mut missing_code = job("no-code", "000000");
    missing_code.as_object_mut().unwrap().remove("code");
    broker.publish_json(&missing_code).await;
    broker
        .publish(
            b"\x0a\xff\xff",
            Some("application/x-protobuf"),
            BasicProperties::default(),
        )
        .await;

    // JSON that parses but does not fit: the dead letter names the field.
    let fits_not = |id: &str, change: &dyn Fn(&mut serde_json::Value)| {
        let mut bad = job(id, "000000");
        change(&mut bad);
        bad
    };
    for bad in [
        fits_not("fax", &|j| j["channels"] = json!(["sms", "fax"])),
        fits_not(
            "platform",
            &|j| {
                j["targets"] =
                    json!([{"device": {"id": "d", "platform": "webpush", "token": "ab"}}])
            },
        ),
        fits_not("numeric-code", &|j| j["code"] = json!(482913)),
        fits_not("tomorrow", &|j| j["expires_at"] = json!("tomorrow")),
        fits_not("both", &|j| {
            j["targets"] = json!([{"phone": {"number": "+14155550101"},
                "device": {"id": "d", "platform": "apns", "token": "ab"}}])
        }),
    ] {
        broker.publish_json(&bad).await;
    }

    // Reported as FAILED: the job is well-formed but cannot be delivered.
    let mut expired = job("expired", "111111");
    expired["expires_at"] = json!(in_minutes(-1));
    broker.publish_json(&expired).await;
    let mut bad_number = job("bad-number", "222222");
    bad_number["targets"] = json!([{"phone": {"number": "0044 20 7946 0000"}}]);
    broker.publish_json(&bad_number).await;
    let mut no_targets = job("no-targets", "333333");
    no_targets["targets"] = json!([]);
    broker.publish_json(&no_targets).await;
    let mut mixed = job("mixed", "444444");
    mixed["targets"] = json!([{"phone": {"number": "12345"}}, {"phone": {"number": "+15005550009"}}, {"phone": {"number": "+14155550123"}}]);
    broker.publish_json(&mixed).await;
    // And a valid job after all of that still flows.
    broker.publish_json(&job("valid-after", "555555")).await;

    let events = broker.events_for(5, WAIT).await;
    assert_eq!(events["acme/expired"]["status"], "FAILED");
    assert_eq!(events["acme/expired"]["reason"], "CODE_EXPIRED");
    // Its targets say they were never tried because the code expired (not PENDING).
    let untried = &events["acme/expired"]["targets"][0];
    assert_eq!(untried["status"], "FAILED", "{untried}");
    assert_eq!(untried["reason"], "CODE_EXPIRED");
    assert_eq!(untried["detail"], "the code expired before it was tried");
    assert_eq!(events["acme/bad-number"]["status"], "FAILED");
    assert_eq!(events["acme/bad-number"]["reason"], "INVALID_RECIPIENT");
    assert_eq!(
        events["acme/bad-number"]["targets"][0]["reason"],
        "INVALID_RECIPIENT"
    );
    assert!(
        events["acme/bad-number"]["hint"]
            .as_str()
            .unwrap()
            .contains("number")
    );
    assert_eq!(events["acme/no-targets"]["reason"], "NO_ELIGIBLE_TARGET");
    // A bad number and a landline are passed over; the third number gets the code.
    let mixed = &events["acme/mixed"];
    assert_eq!(mixed["status"], "SENT");
    assert_eq!(mixed["targets"][0]["reason"], "INVALID_RECIPIENT");
    assert_eq!(mixed["targets"][1]["reason"], "NOT_MOBILE_NUMBER");
    assert_eq!(mixed["targets"][1]["attempts"][0]["provider_code"], "21614");
    assert_eq!(mixed["targets"][2]["status"], "SENT");
    assert!(
        mixed["summary"]
            .as_str()
            .unwrap()
            .contains("NOT_MOBILE_NUMBER"),
        "{}",
        mixed["summary"]
    );
    assert_eq!(events["acme/valid-after"]["status"], "SENT");

    let mut dead = Vec::new();
    let mut bodies = Vec::new();
    while let Some(message) = broker.get(&names.dead_letter_queue).await {
        dead.push((
            header(&message, "x-otp-error-field").unwrap(),
            header(&message, "x-otp-error").unwrap(),
        ));
        // Kept 14 days by default (a per-message TTL), without the code.
        assert_eq!(
            message.properties.expiration().as_ref().map(|e| e.as_str()),
            Some("1209600000")
        );
        bodies.push(String::from_utf8_lossy(&message.data).into_owned());
    }
    for code in ["000000", "482913", "123456"] {
        assert!(
            bodies.iter().all(|b| !b.contains(code)),
            "{code} in {bodies:?}"
        );
    }
    assert!(
        bodies
            .iter()
            .any(|b| b.contains("\"fax\"") && b.contains("[redacted]")),
        "the rest of the job is kept for diagnosis: {bodies:?}"
    );
    dead.sort();
    assert_eq!(dead.len(), 9, "{dead:?}");
    for (field, expected) in [
        ("channels[1]", "push"),
        ("targets[0].device.platform", "apns"),
        ("code", "expected a string"),
        ("expires_at", ""),
        ("targets[0]", "exactly one of"),
    ] {
        assert!(
            dead.iter()
                .any(|(f, why)| f == field && why.contains(expected) && !why.contains("482913")),
            "{field}: {dead:?}"
        );
    }
    assert_eq!(
        dead.iter().filter(|(field, _)| field == "body").count(),
        2,
        "{dead:?}"
    );
    assert!(
        dead.iter()
            .any(|(field, why)| field == "code" && why.contains("missing field")),
        "{dead:?}"
    );
    assert!(
        dead.iter()
            .any(|(field, why)| field == "content_type" && why.contains("text/plain")),
        "{dead:?}"
    );
    assert!(
        outbox(dir.path())
            .iter()
            .all(|l| l["delivery_id"] != "acme/expired"),
        "nothing sent after expiry"
    );

    gateway.stop().await;
    assert_eq!(broker.ready(&names.jobs_queue).await, 0);
    broker.cleanup().await;
}

/// The sandbox, except that one number's calls hang.
struct OneNumberHangs {
    inner: SandboxProvider,
    number: &'static str,
}

#[async_trait]
impl Provider for OneNumberHangs {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn send(&self, message: &OutboundMessage<'_>) -> Result<ProviderAccept, ProviderError> {
        if matches!(message.recipient, Recipient::Phone(number) if number == self.number) {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        self.inner.send(message).await
    }
}

#[tokio::test]
async fn a_slow_job_holds_back_no_other_jobs_ack_and_a_stop_acks_every_finished_job() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("acks");
    let mut broker = Broker::connect(&names).await;
    let settings = config(
        &names,
        dir.path(),
        &[("delivery.shutdown_grace", json!("1s"))],
    );
    let slow: Arc<dyn Provider> = Arc::new(OneNumberHangs {
        inner: SandboxProvider::open("sandbox", &dir.path().join("outbox.jsonl"))
            .await
            .unwrap(),
        number: "+14155550000",
    });
    let providers = ProviderRegistry::from_config_with(
        &settings,
        BTreeMap::from([("sandbox".to_owned(), slow)]),
    )
    .await
    .unwrap();
    let gateway = Gateway::start_with(settings, providers).await;

    // The first job hangs at the provider; the ten after it go through.
    let mut first = job("hangs", "111111");
    first["targets"] = json!([{"phone": {"number": "+14155550000"}}]);
    broker.publish_json(&first).await;
    for i in 1..=10 {
        let mut job = job(&format!("quick-{i}"), "222222");
        job["targets"] = json!([{"phone": {"number": format!("+141555500{i:02}")}}]);
        broker.publish_json(&job).await;
    }
    for _ in 0..10 {
        let (_, report) = broker.next_event(WAIT).await;
        assert_eq!(report["status"], "SENT");
    }
    // Their acks went out although the job before them is still at the provider.
    let queue = names.jobs_queue.clone();
    eventually(WAIT, "only the hanging job unacked", || {
        broker.unacked(&queue) == Some(1)
    })
    .await;

    // A stop leaves the hanging job to the broker (past the grace period) and nothing else.
    gateway.stop().await;
    broker.wait_ready(&names.jobs_queue, 1, WAIT).await;
    let redelivered = broker
        .get(&names.jobs_queue)
        .await
        .expect("the hanging job is back in the queue");
    let redelivered: serde_json::Value =
        serde_json::from_slice(&redelivered.delivery.data).unwrap();
    assert_eq!(redelivered["job_id"], "hangs");
    broker.cleanup().await;
}

#[tokio::test]
async fn a_job_is_acked_only_once_its_outcome_is_on_disk() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("on-disk");
    let mut broker = Broker::connect(&names).await;
    let gateway = Gateway::start(config(&names, dir.path(), &[])).await;
    let queue = names.jobs_queue.clone();

    broker.publish_json(&job("before", "333333")).await;
    let (_, report) = broker.next_event(WAIT).await;
    assert_eq!(report["status"], "SENT");
    // Its ack follows the event.
    eventually(WAIT, "the first job acked", || {
        broker.unacked(&queue) == Some(0)
    })
    .await;

    // The disk fails: the ledger's log can no longer be synced.
    std::fs::remove_file(dir.path().join("ledger.db-wal")).unwrap();
    broker.publish_json(&job("after", "444444")).await;
    // The outcome is committed and announced (the event goes out while the sync runs)...
    let (_, report) = broker.next_event(WAIT).await;
    assert_eq!(report["delivery_id"], "acme/after");
    assert_eq!(report["status"], "SENT");
    // ...but the job stays with the broker, unacked, long after an ack would have gone out:
    // a power cut could still undo its outcome.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gateway.stop().await;
    broker.wait_ready(&queue, 1, WAIT).await;
    let left = broker
        .get(&queue)
        .await
        .expect("the job is back in the queue");
    let left: serde_json::Value = serde_json::from_slice(&left.delivery.data).unwrap();
    assert_eq!(left["job_id"], "after");
    assert_eq!(broker.ready(&queue).await, 0, "the job before it was acked");
    broker.cleanup().await;
}

#[tokio::test]
async fn a_burst_published_while_the_gateway_starts_is_delivered_whole() {
    if !broker_available().await {
        return;
    }
    const JOBS: usize = 500;
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("start-burst");
    let mut broker = Broker::connect(&names).await;
    // The gateway is starting (not consuming yet) while the producer publishes, with publisher
    // confirms: every confirmed job must end with exactly one report.
    let gateway = Gateway::start_unconnected(config(&names, dir.path(), &[])).await;
    for i in 0..JOBS {
        broker
            .publish_json(&job(&format!("burst-{i}"), "482913"))
            .await;
    }
    let events = broker.events_for(JOBS, Duration::from_secs(120)).await;
    assert_eq!(events.len(), JOBS, "a report for every confirmed job");
    assert!(events.values().all(|e| e["status"] == "SENT"));
    assert_eq!(outbox(dir.path()).len(), JOBS, "each sent once");
    gateway.stop().await;
    broker.cleanup().await;
}
