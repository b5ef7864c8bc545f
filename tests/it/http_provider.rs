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
use crate::helpers::{PrivateCa, SERVER_NAMES};

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
            axum::Json(json!({"error": {"code": "INVALID_NUMBER", "message": "no such number: +15005550001"}})),
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
    // The aggregator quotes the number; the ledger keeps it masked.
    assert_eq!(
        attempt.provider_message.as_deref(),
        Some("no such number: +1500•••0001")
    );

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

/// An HTTPS aggregator (HTTP/1.1 over rustls) that accepts every message as `msg-tls`.
async fn tls_aggregator(cert: &std::path::Path, key: &std::path::Path) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                // Read the request head and its body, then answer and close.
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                loop {
                    let Ok(n) = tls.read(&mut buffer).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buffer[..n]);
                    let text = String::from_utf8_lossy(&request);
                    if let Some(head_end) = text.find("\r\n\r\n") {
                        let length = text[..head_end]
                            .lines()
                            .find_map(|l| {
                                let (name, value) = l.split_once(':')?;
                                name.eq_ignore_ascii_case("content-length")
                                    .then(|| value.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if request.len() >= head_end + 4 + length {
                            break;
                        }
                    }
                }
                let body = r#"{"id": "msg-tls"}"#;
                let answer = format!(
                    "HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    port
}

#[tokio::test]
async fn a_provider_behind_a_private_ca_is_trusted_through_its_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let authority = PrivateCa::new(dir.path(), "provider");
    let (cert, key) = authority.issue("server", SERVER_NAMES);
    let ca = authority.pem();
    let port = tls_aggregator(&cert, &key).await;
    let provider = |ca_file: Option<&std::path::Path>| {
        let mut provider = json!({
            "kind": "http", "url": format!("https://localhost:{port}/send"),
            "body": r#"{"to": "{{to}}", "text": "{{text}}"}"#,
            "message_id_field": "/id", "retry": {"max_attempts": 1}
        });
        if let Some(ca) = ca_file {
            provider["ca_file"] = json!(ca);
        }
        provider
    };
    let routes = json!({"push": ["aggregator"], "sms": ["aggregator"], "voice": ["aggregator"]});

    let trusted = engine_config(
        dir.path(),
        json!({"aggregator": provider(Some(&ca))}),
        &[("routes", routes.clone())],
    );
    let service = engine(&trusted, vec![]).await;
    let report = deliver(
        &service,
        &job(
            "tls",
            300.0,
            &["sms"],
            json!([{"phone": {"number": "+14155550101"}}]),
        ),
    )
    .await;
    assert_eq!(report.status, DeliveryStatus::Sent, "{report:#?}");
    assert_eq!(
        report.targets[0].attempts[0].provider_message_id.as_deref(),
        Some("msg-tls")
    );

    // Without it the system's roots do not know the private CA: the call fails, saying why.
    let dir2 = tempfile::tempdir().unwrap();
    let untrusted = engine_config(
        dir2.path(),
        json!({"aggregator": provider(None)}),
        &[("routes", routes)],
    );
    let service = engine(&untrusted, vec![]).await;
    let report = deliver(
        &service,
        &job(
            "no-ca",
            300.0,
            &["sms"],
            json!([{"phone": {"number": "+14155550101"}}]),
        ),
    )
    .await;
    assert_eq!(report.status, DeliveryStatus::Failed, "{report:#?}");
    let message = report.targets[0].attempts[0]
        .provider_message
        .clone()
        .unwrap();
    assert!(message.to_lowercase().contains("certificate"), "{message}");

    // A ca_file that holds no certificate is a configuration error naming the key.
    let bad = dir.path().join("not-a-ca.pem");
    std::fs::write(&bad, "nothing here").unwrap();
    let config = engine_config(
        dir.path(),
        json!({"aggregator": provider(Some(&bad))}),
        &[(
            "routes",
            json!({"push": ["aggregator"], "sms": ["aggregator"], "voice": ["aggregator"]}),
        )],
    );
    let error = otp_gateway::providers::ProviderRegistry::from_config(&config)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("providers.aggregator.ca_file"), "{error}");
}
