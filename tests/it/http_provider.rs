//! The generic HTTP provider against a local aggregator: the configured header and body
//! template reach it (valid JSON, placeholders escaped), its message id is kept, and its error
//! codes and statuses map to reasons.

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use otp_gateway::domain::{DeliveryStatus, FailureReason};
use serde_json::{Value, json};

use crate::engine::{deliver, engine, engine_config, job};

#[derive(Default)]
struct Aggregator {
    bodies: Mutex<Vec<Value>>,
}

async fn send(
    State(aggregator): State<Arc<Aggregator>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer k3y") {
        return (StatusCode::UNAUTHORIZED, "no").into_response();
    }
    let Ok(body) = serde_json::from_str::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not JSON").into_response();
    };
    aggregator.bodies.lock().unwrap().push(body.clone());
    match body["to"].as_str().unwrap_or_default() {
        "+15005550001" => (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": {"code": "INVALID_NUMBER", "message": "no such number"}})),
        )
            .into_response(),
        "+15005550002" => (StatusCode::SERVICE_UNAVAILABLE, "maintenance").into_response(),
        _ => (
            StatusCode::ACCEPTED,
            axum::Json(json!({"id": "msg-1", "status": "queued"})),
        )
            .into_response(),
    }
}

#[tokio::test]
async fn an_aggregator_is_driven_by_configuration_alone() {
    let aggregator = Arc::new(Aggregator::default());
    let app = axum::Router::new()
        .route("/send", post(send))
        .with_state(Arc::clone(&aggregator));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/send", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let provider = json!({
        "kind": "http", "url": url, "headers": {"Authorization": "Bearer k3y"},
        "body": r#"{"to": "{{to}}", "text": "{{text}}", "ref": "{{delivery_id}}"}"#,
        "message_id_field": "/id", "error_code_field": "/error/code", "error_message_field": "/error/message",
        "codes": {"INVALID_NUMBER": "INVALID_RECIPIENT"}, "retry": {"max_attempts": 1}
    });
    let config = engine_config(
        dir.path(),
        json!({"aggregator": provider}),
        &[(
            "routes",
            json!({"push": ["aggregator"], "sms": ["aggregator"], "voice": ["aggregator"]}),
        )],
    );
    assert!(
        !format!("{config:?}").contains("k3y"),
        "header values are redacted"
    );
    let service = engine(&config, vec![]).await;

    let report = deliver(
        &service,
        &job(
            "ok",
            300.0,
            &["sms"],
            json!([{"phone": {"number": "+14155550101"}}]),
        ),
    )
    .await;
    assert_eq!(report.status, DeliveryStatus::Sent);
    assert_eq!(
        report.targets[0].attempts[0].provider_message_id.as_deref(),
        Some("msg-1")
    );
    let body = aggregator.bodies.lock().unwrap()[0].clone();
    assert_eq!(body["to"], "+14155550101");
    assert!(body["text"].as_str().unwrap().contains("482913"));
    assert_eq!(body["ref"], "acme/ok");

    let report = deliver(
        &service,
        &job(
            "bad",
            300.0,
            &["sms"],
            json!([{"phone": {"number": "+15005550001"}}]),
        ),
    )
    .await;
    let attempt = &report.targets[0].attempts[0];
    assert_eq!(attempt.reason, Some(FailureReason::InvalidRecipient));
    assert_eq!(attempt.provider_code.as_deref(), Some("INVALID_NUMBER"));
    assert_eq!(attempt.provider_message.as_deref(), Some("no such number"));

    let report = deliver(
        &service,
        &job(
            "down",
            300.0,
            &["sms"],
            json!([{"phone": {"number": "+15005550002"}}]),
        ),
    )
    .await;
    let attempt = &report.targets[0].attempts[0];
    assert_eq!(attempt.reason, Some(FailureReason::ProviderUnavailable));
    assert_eq!(attempt.provider_code.as_deref(), Some("503"));
}
