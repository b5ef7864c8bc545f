//! A restart in the middle of a stream of jobs loses nothing and sends nothing twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use otp_gateway::proto::v1;
use otp_gateway::providers::{
    OutboundMessage, Provider, ProviderAccept, ProviderError, ProviderRegistry, SandboxProvider,
};
use serde_json::json;

use otp_gateway::config::Config;

use crate::helpers::*;

const JOBS: usize = 500;

/// The sandbox behind a fixed latency, so that a stop lands mid-stream.
struct SlowSandbox {
    inner: SandboxProvider,
    latency: Duration,
}

#[async_trait]
impl Provider for SlowSandbox {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn send(&self, message: &OutboundMessage<'_>) -> Result<ProviderAccept, ProviderError> {
        tokio::time::sleep(self.latency).await;
        self.inner.send(message).await
    }
}

/// The configured providers, with the sandbox behind `latency`.
async fn slow_providers(
    config: &Config,
    dir: &std::path::Path,
    latency: Duration,
) -> ProviderRegistry {
    let sandbox = SandboxProvider::open("sandbox", &dir.join("outbox.jsonl"))
        .await
        .unwrap();
    let slow: Arc<dyn Provider> = Arc::new(SlowSandbox {
        inner: sandbox,
        latency,
    });
    ProviderRegistry::from_config_with(config, BTreeMap::from([("sandbox".to_owned(), slow)]))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_restart_mid_stream_ends_every_job_with_exactly_one_report_and_one_send() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("restart");
    let broker = Broker::connect(&names).await;
    for i in 0..JOBS {
        let mut job = job(&format!("r-{i:03}"), &format!("{:06}", 100_000 + i));
        job["targets"] = json!([{"phone": {"number": format!("+1415555{:04}", i)}}]);
        broker.publish_json(&job).await;
    }
    let overrides = [
        ("amqp.prefetch", json!(16)),
        ("delivery.max_in_flight", json!(16)),
    ];

    let settings = config(&names, dir.path(), &overrides);
    let providers = slow_providers(&settings, dir.path(), Duration::from_millis(15)).await;
    let gateway = Gateway::start_with(settings, providers).await;
    eventually(Duration::from_secs(60), "a first part of the jobs", || {
        outbox(dir.path()).len() >= 100
    })
    .await;
    gateway.stop().await;
    let first_run = outbox(dir.path()).len();
    assert!(
        first_run < JOBS,
        "the stop must land mid-stream (sent {first_run})"
    );

    let settings = config(&names, dir.path(), &overrides);
    let providers = slow_providers(&settings, dir.path(), Duration::from_millis(15)).await;
    let gateway = Gateway::start_with(settings, providers).await;

    // Exactly one terminal report per job, in the ledger that survived the restart.
    let mut client = gateway.client().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let reports = loop {
        let reports = all_reports(&mut client).await;
        if reports.len() == JOBS
            && reports
                .values()
                .all(|s| *s == v1::DeliveryStatus::Sent as i32)
        {
            break reports;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not all jobs SENT: {} reports",
            reports.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(reports.len(), JOBS);

    // Exactly one send per job.
    let outbox = outbox(dir.path());
    let mut per_delivery: HashMap<String, usize> = HashMap::new();
    for line in &outbox {
        *per_delivery
            .entry(line["delivery_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(per_delivery.len(), JOBS);
    let twice: Vec<_> = per_delivery.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");

    gateway.stop().await;
    assert_eq!(broker.ready(&names.jobs_queue).await, 0);
    broker.cleanup().await;
}

/// Every delivery of tenant `acme` by id, paging through ListDeliveries; panics on a repeat.
async fn all_reports(
    client: &mut otp_gateway::proto::v1::code_delivery_client::CodeDeliveryClient<
        tonic::transport::Channel,
    >,
) -> HashMap<String, i32> {
    let mut reports = HashMap::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_deliveries(v1::ListDeliveriesRequest {
                tenant: "acme".into(),
                page_size: 100,
                page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for report in page.deliveries {
            assert!(
                reports
                    .insert(report.delivery_id.clone(), report.status)
                    .is_none(),
                "one report per job"
            );
        }
        if page.next_page_token.is_empty() {
            return reports;
        }
        page_token = page.next_page_token;
    }
}

#[tokio::test]
async fn jobs_still_running_when_the_grace_period_ends_are_redelivered_and_finished() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("grace");
    let mut broker = Broker::connect(&names).await;
    let overrides = [("delivery.shutdown_grace", json!("300ms"))];
    let settings = config(&names, dir.path(), &overrides);
    let hanging = slow_providers(&settings, dir.path(), Duration::from_secs(30)).await;
    let gateway = Gateway::start_with(settings, hanging).await;
    broker.publish_json(&job("stuck", "246810")).await;
    let mut client = gateway.client().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let report = client
            .get_delivery(v1::GetDeliveryRequest {
                delivery_id: "acme/stuck".into(),
            })
            .await;
        if report.is_ok_and(|r| r.into_inner().targets[0].attempts.len() == 1) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the attempt never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gateway.stop().await;
    assert!(outbox(dir.path()).is_empty());

    // The job was left unacked; the next gateway takes it over and finishes it.
    let gateway = Gateway::start(config(&names, dir.path(), &[])).await;
    let (_, report) = broker.next_event(Duration::from_secs(20)).await;
    assert_eq!(report["delivery_id"], "acme/stuck");
    assert_eq!(report["status"], "SENT");
    let attempts = report["targets"][0]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    // What is known of the call the stop cut off: interrupted, outcome unknown (no reason
    // is made up for it).
    assert_eq!(attempts[0]["outcome"], "INTERRUPTED");
    assert!(
        attempts[0].get("reason").is_none_or(|r| r.is_null()),
        "{attempts:?}"
    );
    assert!(
        attempts[0]["provider_message"]
            .as_str()
            .unwrap()
            .contains("not known"),
        "{attempts:?}"
    );
    assert_eq!(attempts[0]["retry"], 0);
    assert_eq!(attempts[1]["outcome"], "SENT");
    assert_eq!(
        attempts[1]["retry"], 1,
        "the second try of the same provider is retry 1"
    );
    assert_eq!(outbox(dir.path()).len(), 1);
    gateway.stop().await;
    broker.cleanup().await;
}
