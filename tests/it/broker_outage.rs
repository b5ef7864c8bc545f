//! The broker is unreachable, or closes the gateway's connection: the gateway says so, reports
//! NOT_SERVING, refuses SendCode without losing anything, and resumes by itself.

use std::process::Command;
use std::time::Duration;

use otp_gateway::proto::{timestamp_to_proto, v1};
use serde_json::json;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::helpers::*;

async fn health(addr: std::net::SocketAddr) -> i32 {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

/// Relays connections from `listener` to the real broker, as the broker "coming up".
async fn relay_to_broker(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect("127.0.0.1:5672").await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

#[tokio::test]
async fn an_unreachable_broker_means_not_serving_and_refused_sends_until_it_comes_up() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("unreachable");
    let mut broker = Broker::connect(&names).await;
    // A port where no broker listens yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let config = config(&names, dir.path(), &[("amqp.url", json!(url))]);
    let mut gateway = Gateway::start_unconnected(config).await;
    assert_eq!(
        health(gateway.grpc_addr).await,
        ServingStatus::NotServing as i32
    );

    let mut client = gateway.client().await;
    let job = v1::SendCodeJob {
        job_id: "while-down".into(),
        tenant: "acme".into(),
        account: "a".into(),
        code: "123456".into(),
        expires_at: Some(timestamp_to_proto(
            jiff::Timestamp::now() + jiff::SignedDuration::from_mins(5),
        )),
        targets: vec![v1::Target {
            kind: Some(v1::target::Kind::Phone(v1::PhoneTarget {
                number: "+14155550101".into(),
            })),
        }],
        ..Default::default()
    };
    let status = client
        .send_code(v1::SendCodeRequest {
            job: Some(job.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("not connected"),
        "{}",
        status.message()
    );
    // Nothing half-accepted is left behind: the caller retries and gets a clean start.
    let missing = client
        .get_delivery(v1::GetDeliveryRequest {
            delivery_id: "acme/while-down".into(),
        })
        .await;
    assert_eq!(missing.unwrap_err().code(), tonic::Code::NotFound);

    // The broker comes up: the gateway connects by itself and serves.
    let relay = tokio::spawn(relay_to_broker(
        tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap(),
    ));
    tokio::time::timeout(
        Duration::from_secs(20),
        gateway
            .link_state
            .wait_for(|s| *s == otp_gateway::queue::LinkState::Up),
    )
    .await
    .expect("the gateway connects once the broker is reachable")
    .unwrap();
    assert_eq!(
        health(gateway.grpc_addr).await,
        ServingStatus::Serving as i32
    );
    let accepted = client
        .send_code(v1::SendCodeRequest { job: Some(job) })
        .await
        .unwrap()
        .into_inner();
    assert!(!accepted.duplicate);
    let (_, report) = broker.next_event(Duration::from_secs(20)).await;
    assert_eq!(report["delivery_id"], "acme/while-down");
    assert_eq!(report["status"], "SENT");
    gateway.stop().await;
    relay.abort();
    broker.cleanup().await;
}

/// The broker-side id of the connection named `name`, if it is open.
fn connection_pid(name: &str) -> Option<String> {
    let output = Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl runs (it ships with the broker)");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find(|line| line.starts_with('<') && line.contains(name))
        .and_then(|line| line.split('\t').next().map(str::to_owned))
}

#[tokio::test]
async fn the_gateway_reconnects_after_the_broker_closes_its_connection() {
    if !broker_available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("reconnect");
    let mut broker = Broker::connect(&names).await;
    let gateway = Gateway::start(config(&names, dir.path(), &[])).await;
    broker.publish_json(&job("before", "111222")).await;
    assert_eq!(
        broker.next_event(Duration::from_secs(20)).await.1["status"],
        "SENT"
    );

    let pid = connection_pid(&names.connection_name).expect("the gateway's connection is listed");
    let closed = Command::new("rabbitmqctl")
        .args([
            "close_connection",
            &pid,
            "test: closing the gateway's connection",
        ])
        .status()
        .unwrap();
    assert!(closed.success());
    eventually(
        Duration::from_secs(30),
        "a new connection from the gateway",
        || connection_pid(&names.connection_name).is_some_and(|new| new != pid),
    )
    .await;

    broker.publish_json(&job("after", "333444")).await;
    // If the close beat the first job's ack, that job is redelivered and its event published
    // again (events are at-least-once); it is not sent again.
    let after = loop {
        let (_, report) = broker.next_event(Duration::from_secs(20)).await;
        if report["delivery_id"] == "acme/after" {
            break report;
        }
        assert_eq!(
            report["delivery_id"], "acme/before",
            "only a redelivered first job may come between"
        );
    };
    assert_eq!(after["status"], "SENT");
    assert_eq!(
        outbox(dir.path()).len(),
        2,
        "one send per job across the reconnect"
    );
    gateway.stop().await;
    broker.cleanup().await;
}
