//! The gRPC API: SendCode through the queue, GetDelivery, WatchDelivery, ListDeliveries,
//! duplicates, errors, health and reflection.

use std::time::Duration;

use otp_gateway::proto::{timestamp_to_proto, v1};
use tonic::Code;

use crate::helpers::*;

fn grpc_job(job_id: &str, number: &str) -> v1::SendCodeJob {
    v1::SendCodeJob {
        job_id: job_id.into(),
        tenant: "acme".into(),
        account: "user-42".into(),
        code: "908172".into(),
        expires_at: Some(timestamp_to_proto(
            jiff::Timestamp::now() + jiff::SignedDuration::from_mins(5),
        )),
        targets: vec![v1::Target {
            kind: Some(v1::target::Kind::Phone(v1::PhoneTarget {
                number: number.into(),
            })),
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn send_code_then_watch_get_and_list_reach_the_terminal_report() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("grpc");
    let broker = Broker::connect(&names).await;
    let gateway = Gateway::start(config(&names, dir.path(), &[])).await;
    let mut client = gateway.client().await;

    let sent = client
        .send_code(v1::SendCodeRequest {
            job: Some(grpc_job("g-1", "+14155550101")),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sent.delivery_id, "acme/g-1");
    assert_eq!(sent.status, v1::DeliveryStatus::Accepted as i32);
    assert!(!sent.duplicate);

    let mut stream = client
        .watch_delivery(v1::WatchDeliveryRequest {
            delivery_id: sent.delivery_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut statuses = Vec::new();
    let last = tokio::time::timeout(Duration::from_secs(20), async {
        let mut last = None;
        while let Some(report) = stream.message().await.unwrap() {
            statuses.push(report.status);
            last = Some(report);
        }
        last.unwrap()
    })
    .await
    .expect("the watch ends at the terminal report");
    assert_eq!(last.status, v1::DeliveryStatus::Sent as i32, "{statuses:?}");
    assert_eq!(last.targets[0].attempts[0].provider, "sandbox");
    assert_eq!(
        last.targets[0].attempts[0].outcome,
        v1::AttemptOutcome::Sent as i32
    );
    assert!(last.targets[0].attempts[0].ended_at.is_some());

    let got = client
        .get_delivery(v1::GetDeliveryRequest {
            delivery_id: "acme/g-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, last);

    // A repeated (tenant, job_id) returns the same delivery and sends nothing.
    let again = client
        .send_code(v1::SendCodeRequest {
            job: Some(grpc_job("g-1", "+14155550101")),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.delivery_id, "acme/g-1");
    assert!(again.duplicate);
    assert_eq!(again.status, v1::DeliveryStatus::Sent as i32);

    // A failing one, then list with filters and paging.
    client
        .send_code(v1::SendCodeRequest {
            job: Some(grpc_job("g-2", "+15005550004")),
        })
        .await
        .unwrap();
    let mut stream = client
        .watch_delivery(v1::WatchDeliveryRequest {
            delivery_id: "acme/g-2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut failed = None;
    while let Some(report) = stream.message().await.unwrap() {
        failed = Some(report);
    }
    let failed = failed.unwrap();
    assert_eq!(failed.status, v1::DeliveryStatus::Failed as i32);
    assert_eq!(failed.reason, v1::FailureReason::RecipientOptedOut as i32);
    assert!(failed.hint.contains("opted out"), "{}", failed.hint);
    assert_eq!(failed.targets[0].attempts[0].provider_code, "21610");

    let page = client
        .list_deliveries(v1::ListDeliveriesRequest {
            tenant: "acme".into(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.deliveries[0].delivery_id, "acme/g-2", "newest first");
    let page = client
        .list_deliveries(v1::ListDeliveriesRequest {
            tenant: "acme".into(),
            page_size: 1,
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.deliveries[0].delivery_id, "acme/g-1");
    assert!(page.next_page_token.is_empty());
    let failed_only = client
        .list_deliveries(v1::ListDeliveriesRequest {
            tenant: "acme".into(),
            status: v1::DeliveryStatus::Failed as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(failed_only.deliveries.len(), 1);

    assert_eq!(
        outbox(dir.path()).len(),
        1,
        "one SMS for g-1, none for the opted-out number"
    );
    gateway.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn bad_requests_and_unknown_ids_get_clear_statuses() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("grpc-errors");
    let broker = Broker::connect(&names).await;
    let gateway = Gateway::start(config(&names, dir.path(), &[])).await;
    let mut client = gateway.client().await;

    let missing = client
        .get_delivery(v1::GetDeliveryRequest {
            delivery_id: "acme/nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert!(missing.message().contains("acme/nope"));

    let malformed_id = client
        .get_delivery(v1::GetDeliveryRequest {
            delivery_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(malformed_id.code(), Code::InvalidArgument);
    assert!(malformed_id.message().contains("delivery_id"));

    let mut job = grpc_job("g-bad", "+14155550101");
    job.code = String::new();
    let status = client
        .send_code(v1::SendCodeRequest { job: Some(job) })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("`code`"), "{}", status.message());
    assert_eq!(status.metadata().get("x-otp-field").unwrap(), "code");

    let mut job = grpc_job("g-bad", "+14155550101");
    job.expires_at = None;
    let status = client
        .send_code(v1::SendCodeRequest { job: Some(job) })
        .await
        .unwrap_err();
    assert!(
        status.message().contains("expires_at"),
        "{}",
        status.message()
    );
    let status = client
        .send_code(v1::SendCodeRequest { job: None })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let status = client
        .list_deliveries(v1::ListDeliveriesRequest::default())
        .await
        .unwrap_err();
    assert!(status.message().contains("tenant"));
    let status = client
        .list_deliveries(v1::ListDeliveriesRequest {
            tenant: "acme".into(),
            page_token: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(status.message().contains("page_token"));

    // Health says SERVING while consuming; reflection lists the service.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", gateway.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "otpgateway.v1.CodeDelivery".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    assert!(
        outbox(dir.path()).is_empty(),
        "nothing was sent for rejected requests"
    );
    gateway.stop().await;
    broker.cleanup().await;
}
