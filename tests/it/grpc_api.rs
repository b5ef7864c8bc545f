//! The gRPC API: SendCode through the queue, GetDelivery, WatchDelivery, ListDeliveries,
//! duplicates, errors, health and reflection.

use std::time::Duration;

use otp_gateway::proto::{timestamp_to_proto, v1};
use tonic::Code;

use crate::helpers::*;

/// An APNs device target with id `id`.
fn apns_device(id: String) -> v1::Target {
    v1::Target {
        kind: Some(v1::target::Kind::Device(v1::DeviceTarget {
            id,
            platform: v1::Platform::Apns as i32,
            token: "a1b2c3d4e5f6a7b8c9d0".into(),
            ..Default::default()
        })),
    }
}

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

    // A 20 KB delivery id is refused without being echoed back (it would overflow the
    // metadata limit), and a 5 MiB device id, past the message size limit, is
    // RESOURCE_EXHAUSTED as gRPC's conventions say; a long one within it names its field.
    let long_id = client
        .get_delivery(v1::GetDeliveryRequest {
            delivery_id: format!("acme/{}", "x".repeat(20_000)),
        })
        .await
        .unwrap_err();
    assert_eq!(long_id.code(), Code::InvalidArgument);
    assert!(long_id.message().len() < 200, "{}", long_id.message());
    let mut huge = grpc_job("g-huge", "+14155550101");
    huge.targets.push(apns_device("d".repeat(5 * 1024 * 1024)));
    let too_big = client
        .send_code(v1::SendCodeRequest { job: Some(huge) })
        .await
        .unwrap_err();
    assert_eq!(too_big.code(), Code::ResourceExhausted, "{too_big:?}");
    let mut long = grpc_job("g-long", "+14155550101");
    long.targets.push(apns_device("d".repeat(100_000)));
    let refused = client
        .send_code(v1::SendCodeRequest { job: Some(long) })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("targets[1].device.id"),
        "{refused:?}"
    );
    assert!(refused.message().len() < 200);

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
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
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

    // Reflection answers in both versions (grpcurl speaks v1; grpcio-reflection and older
    // tools v1alpha) and lists the API's services.
    {
        use tonic_reflection::pb::v1;
        let mut reflection =
            v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
        let request = v1::ServerReflectionRequest {
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
            ..Default::default()
        };
        let mut answers = reflection
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let answer = answers.message().await.unwrap().unwrap();
        let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
            answer.message_response
        else {
            panic!("v1 reflection did not list services: {answer:?}");
        };
        let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        assert!(
            names.iter().any(|n| n == "otpgateway.v1.CodeDelivery"),
            "{names:?}"
        );
    }
    {
        use tonic_reflection::pb::v1alpha;
        let mut reflection =
            v1alpha::server_reflection_client::ServerReflectionClient::new(channel.clone());
        let request = v1alpha::ServerReflectionRequest {
            message_request: Some(
                v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
            ),
            ..Default::default()
        };
        let mut answers = reflection
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let answer = answers.message().await.unwrap().unwrap();
        let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
            answer.message_response
        else {
            panic!("v1alpha reflection did not list services: {answer:?}");
        };
        let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        assert!(
            names.iter().any(|n| n == "otpgateway.v1.PolicyAdmin"),
            "{names:?}"
        );
    }

    assert!(
        outbox(dir.path()).is_empty(),
        "nothing was sent for rejected requests"
    );
    gateway.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn acknowledge_delivery_denied_stops_escalation_and_the_event_says_so() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("grpc-ack");
    let mut broker = Broker::connect(&names).await;
    let gateway = Gateway::start(config(
        &names,
        dir.path(),
        &[("delivery.push_ack_timeout", serde_json::json!("20s"))],
    ))
    .await;
    let mut client = gateway.client().await;

    let mut job = grpc_job("ack-1", "+14155550101");
    job.targets.insert(0, apns_device("ipad-1".into()));
    client
        .send_code(v1::SendCodeRequest { job: Some(job) })
        .await
        .unwrap();

    // WatchDelivery shows the delivery under way: the push accepted, waiting for the device.
    let mut stream = client
        .watch_delivery(v1::WatchDeliveryRequest {
            delivery_id: "acme/ack-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    loop {
        let report = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            !otp_gateway::proto::is_terminal(&report),
            "not terminal before the acknowledgement"
        );
        let push = &report.targets[0];
        if push
            .attempts
            .first()
            .is_some_and(|a| a.outcome == v1::AttemptOutcome::Sent as i32)
        {
            break;
        }
    }

    // The push carried the token the device's acknowledgement must show.
    let token = outbox(dir.path())
        .iter()
        .find(|l| l["channel"] == "push")
        .and_then(|l| l["ack_token"].as_str().map(str::to_owned))
        .expect("the push carries an acknowledgement token");
    let ack = |device: &str, acknowledgement: i32, token: &str| v1::AcknowledgeDeliveryRequest {
        delivery_id: "acme/ack-1".into(),
        device_id: device.into(),
        acknowledgement,
        ack_token: token.into(),
    };
    let denied = v1::Acknowledgement::Denied as i32;
    // Without the token, with another device's or a made-up one: refused alike, saying
    // nothing of whether the device is the delivery's.
    let mut refusals = Vec::new();
    for (device, token) in [
        ("ipad-1", ""),
        ("ipad-1", "AAAAAAAAAAAAAAAAAAAAAA"),
        ("someone-elses", token.as_str()),
    ] {
        let refused = client
            .acknowledge_delivery(ack(device, denied, token))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{device} {token}");
        refusals.push(refused.message().to_owned());
    }
    assert!(refusals.windows(2).all(|w| w[0] == w[1]), "{refusals:?}");
    let no_action = client
        .acknowledge_delivery(ack("ipad-1", 0, &token))
        .await
        .unwrap_err();
    assert!(no_action.message().contains("acknowledgement"));

    client
        .acknowledge_delivery(ack("ipad-1", denied, &token))
        .await
        .unwrap();
    let (routing_key, report) = broker.next_event(Duration::from_secs(10)).await;
    assert_eq!(routing_key, "delivery.failed");
    assert_eq!(report["reason"], "USER_DENIED");
    assert_eq!(report["targets"][0]["acknowledgement"], "DENIED");
    assert_eq!(report["targets"][1]["status"], "SKIPPED");
    let sent: Vec<_> = outbox(dir.path())
        .into_iter()
        .map(|l| l["channel"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(sent, ["push"], "no SMS after the user denied");

    let finished = client
        .acknowledge_delivery(ack("ipad-1", v1::Acknowledgement::Shown as i32, &token))
        .await
        .unwrap_err();
    assert_eq!(finished.code(), Code::FailedPrecondition);

    // The status page over gRPC.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", gateway.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let page = otp_gateway::proto::v1::providers_client::ProvidersClient::new(channel)
        .list_providers(v1::ListProvidersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        page.replica
            .starts_with(&format!("{}-", std::process::id())),
        "the page says whose view it shows: {}",
        page.replica
    );
    let providers = page.providers;
    let sandbox = providers.iter().find(|p| p.name == "sandbox").unwrap();
    assert_eq!(sandbox.kind, "sandbox");
    let circuit = sandbox.circuit.as_ref().unwrap();
    assert_eq!(circuit.state, v1::CircuitState::Closed as i32);
    assert_eq!(circuit.calls, 1);
    assert!(circuit.latency_p50.is_some());
    assert!(
        sandbox
            .routes
            .iter()
            .any(|r| r.route == "*" && r.channel == v1::Channel::Push as i32)
    );
    gateway.stop().await;
    broker.cleanup().await;
}

#[tokio::test]
async fn a_stop_ends_open_watch_streams_with_unavailable_at_the_end_of_the_grace_period() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("grpc-watch-stop");
    let broker = Broker::connect(&names).await;
    let gateway = Gateway::start(config(
        &names,
        dir.path(),
        &[
            ("delivery.push_ack_timeout", serde_json::json!("60s")),
            ("delivery.shutdown_grace", serde_json::json!("1s")),
        ],
    ))
    .await;
    let mut client = gateway.client().await;
    let mut job = grpc_job("watched", "+14155550101");
    job.targets.insert(0, apns_device("ipad-1".into()));
    client
        .send_code(v1::SendCodeRequest { job: Some(job) })
        .await
        .unwrap();
    let mut stream = client
        .watch_delivery(v1::WatchDeliveryRequest {
            delivery_id: "acme/watched".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(!otp_gateway::proto::is_terminal(&first));

    // The client keeps watching (a delivery waiting a minute for its device); the process
    // still ends once the grace period is over, and the stream says to reconnect.
    let stopped = tokio::time::timeout(Duration::from_secs(15), gateway.stop()).await;
    assert!(stopped.is_ok(), "the gateway stopped with a stream open");
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("the stream ends")
        {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    let status = ended.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("reconnect"), "{status:?}");
    broker.cleanup().await;
}
