//! Producers mapped to tenants (`amqp.tenant_from_user_id`): a RabbitMQ user of its own per
//! producer (made with rabbitmqctl), its jobs carrying `user_id` (which RabbitMQ checks against
//! the publishing user). A job for a tenant its producer may send for is delivered; one for
//! another tenant, or without `user_id`, is dead-lettered with the reason; a `SendCode` over
//! gRPC (queued by the gateway as its own user) still goes through.

use std::process::Command;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use otp_gateway::proto::v1;
use otp_gateway::queue::{HEADER_ERROR, HEADER_ERROR_FIELD};
use serde_json::json;

use crate::helpers::*;

fn rabbitmqctl(args: &[&str]) {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs (it ships with the broker)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() || stderr.contains("already exists"),
        "rabbitmqctl {args:?}: {stderr}"
    );
}

#[tokio::test]
async fn producers_send_only_for_their_tenants() {
    if !broker_available().await {
        return;
    }
    let names = Names::new("producers");
    let user = format!("otp-producer-{}", names.suffix);
    rabbitmqctl(&["add_user", &user, "producer-pw"]);
    rabbitmqctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);

    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::connect(&names).await;
    let overrides = [(
        "amqp.tenant_from_user_id",
        json!({ user.clone(): ["acme"] }),
    )];
    let gateway = Gateway::start(config(&names, dir.path(), &overrides)).await;

    // The producer's own connection, its jobs signed with its user.
    let producer = Connection::connect(
        &format!("amqp://{user}:producer-pw@127.0.0.1:5672/%2f"),
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = producer.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let publish = |body: serde_json::Value, user_id: Option<&str>| {
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        if let Some(user_id) = user_id {
            properties = properties.with_user_id(user_id.into());
        }
        let channel = channel.clone();
        let exchange = names.jobs_exchange.clone();
        async move {
            channel
                .basic_publish(
                    exchange.as_str().into(),
                    "send-code".into(),
                    BasicPublishOptions::default(),
                    body.to_string().as_bytes(),
                    properties,
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    let mut globex = job("p-globex", "482913");
    globex["tenant"] = json!("globex");
    publish(job("p-acme", "482913"), Some(&user)).await;
    publish(globex, Some(&user)).await;
    publish(job("p-anonymous", "482913"), None).await;

    // A SendCode for globex over gRPC: queued by the gateway as its own user, delivered.
    let mut client = gateway.client().await;
    let mut grpc_job = otp_gateway::proto::job_to_proto(
        &otp_gateway::queue::decode_job(
            Some("application/json"),
            job("g-globex", "482913").to_string().as_bytes(),
        )
        .unwrap(),
    );
    grpc_job.tenant = "globex".into();
    client
        .send_code(v1::SendCodeRequest {
            job: Some(grpc_job),
        })
        .await
        .expect("SendCode is not a queue producer");

    let events = broker.events_for(2, Duration::from_secs(20)).await;
    assert_eq!(events["acme/p-acme"]["status"], "SENT");
    assert_eq!(events["globex/g-globex"]["status"], "SENT");
    assert!(!events.contains_key("globex/p-globex"));

    broker
        .wait_ready(&names.dead_letter_queue, 2, Duration::from_secs(10))
        .await;
    let mut reasons = Vec::new();
    while let Some(message) = broker.get(&names.dead_letter_queue).await {
        let body: serde_json::Value = serde_json::from_slice(&message.data).unwrap();
        reasons.push((
            body["job_id"].as_str().unwrap().to_owned(),
            header(&message, HEADER_ERROR_FIELD).unwrap(),
            header(&message, HEADER_ERROR).unwrap(),
            // The gateway republished it as itself, naming the producer.
            header(&message, "x-otp-original-user-id"),
        ));
    }
    reasons.sort();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert_eq!(reasons[0].0, "p-anonymous");
    assert_eq!(reasons[0].1, "user_id");
    assert!(reasons[0].2.contains("user_id"), "{reasons:?}");
    assert_eq!(reasons[1].0, "p-globex");
    assert_eq!(reasons[1].1, "tenant");
    assert!(
        reasons[1].2.contains("globex") && reasons[1].2.contains(&user),
        "{reasons:?}"
    );
    assert_eq!(reasons[1].3.as_deref(), Some(user.as_str()));

    gateway.stop().await;
    let _ = producer.close(200, "done".into()).await;
    broker.cleanup().await;
    rabbitmqctl(&["delete_user", &user]);
}
